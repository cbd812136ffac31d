"""The frozen base model, loaded one way for the trainer and the server: both must read the same float32
weights (a bundle's fingerprint is checked against them) and tokenize the same way."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
from transformers.pytorch_utils import Conv1D

from adapters.architectures import is_decoder
from adapters.defaults import prepare_tokenizer
from adapters.embedded import resolve_model
from adapters.errors import CaveatError
from adapters.tasks import letter_token_ids


class BaseModelError(CaveatError, ValueError):
    """The base model cannot be found or loaded; the message starts with the name it was given."""


@dataclass(frozen=True)
class LoadedBase:
    """A base model ready for LoRA-XS.

    Attributes:
        path: where it was read from: an embedded model's folder, a local path or a hub id.
        tokenizer: with a padding token and right padding.
        model: float32; its forward returns ``last_hidden_state`` (``AutoModel``, or a causal LM's decoder).
        output_embeddings: a decoder's LM head ``(V, H)`` (cloze scoring reads it); ``None`` for an encoder.
    """

    path: str
    tokenizer: Any
    model: nn.Module
    output_embeddings: Tensor | None = None

    def letter_head(self) -> Tensor:
        """The answer letters' rows of the LM head ``(C, H)``: letter-scored multiple choice's fixed head.

        Raises:
            BaseModelError: an encoder, or answer letters that are not one token each.
        """
        if self.output_embeddings is None:
            raise BaseModelError(f"{self.path}: multiple choice needs a causal LM (a decoder with an LM head)")
        try:
            letters = letter_token_ids(self.tokenizer)
        except ValueError as exc:
            raise BaseModelError(f"{self.path}: {exc}") from exc
        return self.output_embeddings[letters].clone()


def load_base(
    name_or_path: str, *, multiple_choice: bool = False, hub_offline: Callable[[], str] | None = None
) -> LoadedBase:
    """Load ``name_or_path`` (an embedded short name such as ``minilm``, a local folder or a hub id).

    A decoder (or any base for multiple choice) is loaded as a causal LM: its decoder is the model, and its LM
    head is kept for cloze and letter scoring. ``hub_offline``, when given, is asked before a hub id is looked
    up: why the hub is not used (``""`` when it is), so that a missing model says so.

    Raises:
        BaseModelError: no such path, a folder without ``config.json``, or a model or tokenizer that cannot be
            loaded.
    """
    path = resolve_model(name_or_path)
    local = Path(path).expanduser()
    if (path.startswith((".", "/", "~")) or Path(path).suffix) and not local.exists():
        raise BaseModelError(f"{name_or_path}: no such path")
    if local.is_dir() and not (local / "config.json").is_file():
        raise BaseModelError(
            f"{name_or_path}: the folder has no config.json (write the model there with save_pretrained)"
        )
    offline = "" if local.exists() or hub_offline is None else hub_offline()
    with _loading(name_or_path, offline):
        tokenizer = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
    if getattr(config, "quantization_config", None):  # the fingerprint and the conversions need float weights
        raise BaseModelError(
            f"{name_or_path} is quantised (quantization_config); Caveat adapts a float model: give the unquantised base"
        )
    causal = multiple_choice or is_decoder(config)
    with _loading(name_or_path, offline):
        model = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(path, dtype=torch.float32)
    prepare_tokenizer(tokenizer)
    conv1d_as_linear(model)
    if not causal:
        return LoadedBase(path, tokenizer, model)
    return LoadedBase(path, tokenizer, model.base_model, model.get_output_embeddings().weight.detach())


def conv1d_as_linear(model: nn.Module) -> int:
    """Replace GPT-2-style ``Conv1D`` layers (``y = x W + b`` with ``W (d_in × d_out)``) by the equivalent
    ``nn.Linear`` (weight ``Wᵀ``), in place: every adaptable map is then an ``nn.Linear`` for injection,
    fingerprints and LoRA conversion (a PEFT LoRA with ``fan_in_fan_out`` stores its factors in ``nn.Linear``'s
    orientation already). Returns how many were replaced."""
    modules = dict(model.named_modules())
    replaced = 0
    for name, module in modules.items():
        if not isinstance(module, Conv1D):
            continue
        linear = nn.Linear(module.nx, module.nf, device=module.weight.device, dtype=module.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(module.weight.T)
            linear.bias.copy_(module.bias)
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, linear)
        replaced += 1
    return replaced


@contextmanager
def _loading(name_or_path: str, offline: str) -> Iterator[None]:
    """What the libraries raise while loading, as one :class:`BaseModelError` naming the model."""
    try:
        yield
    except (OSError, ValueError, ImportError) as exc:
        if offline:
            raise BaseModelError(
                f"{name_or_path}: not a local folder, not in the Hugging Face cache, and {offline}"
            ) from exc
        raise BaseModelError(f"{name_or_path} cannot be loaded: {str(exc).strip().splitlines()[0]}") from exc
