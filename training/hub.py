"""The Hugging Face Hub connection: fail fast when it cannot be reached.

Unreachable, ``huggingface_hub`` retries every request for tens of seconds before it gives up. Before the
first hub lookup (a dataset or model id that is not a local path) one TCP connection to the endpoint is
tried; when it fails, or ``HF_HUB_OFFLINE`` is set, ``huggingface_hub`` and ``datasets`` are switched to
offline mode, so ids resolve from the local cache or fail at once.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

import datasets
from huggingface_hub import constants

PROBE_SECONDS = 3.0
TRUE = {"1", "true", "yes", "on"}


@functools.cache
def offline_reason() -> str:
    """Why the hub is not used ("" when it is): ``HF_HUB_OFFLINE`` is set, or the endpoint does not accept
    a TCP connection within ``PROBE_SECONDS`` (asked once per process)."""
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=PROBE_SECONDS).close()
    except OSError:
        return f"the hub ({constants.ENDPOINT}) cannot be reached"
    return ""


def offline() -> bool:
    """True when the hub is not used; then ``huggingface_hub`` and ``datasets`` are put in offline mode, so
    that hub ids resolve from the local caches or fail at once instead of after retries."""
    if not offline_reason():
        return False
    constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True
    return True
