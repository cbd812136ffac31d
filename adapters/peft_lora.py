"""Reading a PEFT LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``) into per-module factors,
refusing what LoRA-XS cannot hold exactly, with the file or setting named (``PeftFormatError``).

Only plain LoRA on linear layers is read (GPT-2's ``Conv1D`` with ``fan_in_fan_out`` included: its factors are
stored in ``nn.Linear``'s orientation): DoRA, biases other than ``none`` (and LoRA biases), LoRA on embeddings or
convolutions, LoRA on parameters or trainable tokens, and non-finite weights are refused. Scaling follows PEFT:
``lora_alpha / r`` (``/ √r`` with rsLoRA), per module from ``alpha_pattern`` (a pattern matches a module name
ending in it at a dot boundary, as PEFT matches); the rank is read from the tensors (``rank_pattern`` shaped
them).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from adapters.errors import CaveatError
from adapters.lora_conversion import lora_scaling

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<factor>[AB])\.weight")


class PeftFormatError(CaveatError, ValueError):
    """A PEFT adapter directory this library cannot read exactly; the message names the file or setting."""


@dataclass(frozen=True)
class LoraModule:
    """One adapted linear layer: ``ΔW = scale · B A`` with ``A (r × d_in)``, ``B (d_out × r)``."""

    A: Tensor
    B: Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclass(frozen=True)
class PeftLora:
    """A PEFT LoRA: its config, its modules by name (relative to the model PEFT wrapped), and the full tensors of
    ``modules_to_save`` (a classification head) by name."""

    config: dict[str, Any]
    modules: dict[str, LoraModule]
    saved: dict[str, Tensor] = field(default_factory=dict)

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")


def read_peft_lora(directory: str | Path) -> PeftLora:
    """Read and check a PEFT LoRA directory; raises :class:`PeftFormatError`."""
    directory = Path(directory)
    config = _config(directory)
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise PeftFormatError(f"{directory}: no {WEIGHTS_FILE} (a PEFT LoRA saves its weights there)")
    try:
        tensors = load_file(path)
    except Exception as exc:  # safetensors raises its own error types
        raise PeftFormatError(f"{path}: not a safetensors file ({exc})") from None
    factors: dict[str, dict[str, Tensor]] = {}
    saved: dict[str, Tensor] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PREFIX)
        if "lora_embedding_" in name or "lora_magnitude_vector" in name:
            raise PeftFormatError(f"{path}: {key} is {_variant(name)}; only LoRA on linear layers converts exactly")
        if not torch.isfinite(tensor).all():
            raise PeftFormatError(f"{path}: {key} holds NaN or infinite values")
        match = LORA_KEY.fullmatch(name)
        if match:
            factors.setdefault(match["module"], {})[match["factor"]] = tensor
        elif ".modules_to_save." in name or _saved(name, config):
            saved[name.replace(".modules_to_save.default", "").replace(".modules_to_save", "")] = tensor
        else:
            raise PeftFormatError(f"{path}: unexpected tensor {key}")
    if not factors:
        raise PeftFormatError(f"{path}: no LoRA weights (lora_A / lora_B)")
    modules = {name: _module(path, name, pair, config) for name, pair in factors.items()}
    return PeftLora(config, modules, saved)


def _config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise PeftFormatError(f"{directory}: no {CONFIG_FILE} (not a PEFT adapter directory)")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PeftFormatError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(config, dict):
        raise PeftFormatError(f"{path}: must hold a JSON object")
    if config.get("peft_type") != "LORA":
        raise PeftFormatError(f"{path}: peft_type {config.get('peft_type')!r}; only LORA converts to LoRA-XS")
    if config.get("use_dora"):
        raise PeftFormatError(f"{path}: use_dora is set; DoRA's magnitude vector has no LoRA-XS form")
    if config.get("bias", "none") != "none":
        raise PeftFormatError(f"{path}: bias {config['bias']!r}; only bias 'none' converts (biases stay frozen)")
    for setting in ("lora_bias", "target_parameters", "trainable_token_indices"):
        if config.get(setting):
            raise PeftFormatError(f"{path}: {setting} is set; only plain LoRA on linear layers converts exactly")
    return config


def _module(path: Path, name: str, pair: dict[str, Tensor], config: dict[str, Any]) -> LoraModule:
    if set(pair) != {"A", "B"}:
        raise PeftFormatError(f"{path}: {name} has lora_{next(iter(pair))} without its partner")
    A, B = pair["A"], pair["B"]
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
        raise PeftFormatError(
            f"{path}: {name} lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not make a LoRA (a convolution?)"
        )
    alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8))
    return LoraModule(A.float(), B.float(), lora_scaling(A.shape[0], float(alpha), bool(config.get("use_rslora"))))


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's rule: the first pattern that matches the module name at a dot boundary."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def _saved(name: str, config: dict[str, Any]) -> bool:
    return any(name == m or name.startswith(f"{m}.") or f".{m}." in name for m in config.get("modules_to_save") or [])


def _variant(name: str) -> str:
    return "LoRA on an embedding" if "lora_embedding_" in name else "DoRA's magnitude vector"
