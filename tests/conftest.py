"""Shared fixtures: pinned torch threads and tiny random models built with ``from_config``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, BertConfig, LlamaConfig

# Two torch processes with default threading on 2 cores run 10-30x slower: pin before any work.
torch.set_num_threads(int(os.environ.get("CAVEAT_TEST_THREADS", "2")))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_bert(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
    )
    return AutoModel.from_config(config).eval()


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return AutoModel.from_config(config).eval()


def random_batch(num_inputs: int, max_len: int = 9, vocab: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids with varying lengths (right padding) and the matching attention mask."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, max_len + 1, (num_inputs,), generator=generator)
    input_ids = torch.randint(1, vocab, (num_inputs, max_len), generator=generator)
    mask = (torch.arange(max_len)[None, :] < lengths[:, None]).long()
    return {"input_ids": input_ids * mask, "attention_mask": mask}


@pytest.fixture
def bert() -> torch.nn.Module:
    return tiny_bert()


@pytest.fixture
def llama() -> torch.nn.Module:
    return tiny_llama()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT with a tokenizer, saved as a model directory (``tests.service.bundles``)."""
    from tests.service.bundles import save_tiny_base  # the test helpers import this module's models

    return save_tiny_base(tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible server (moto's, in a process of its own) for the bundle-store tests: its URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("moto's S3 server did not start") from None
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    server.terminate()
    server.wait(10)
