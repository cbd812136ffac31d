"""What Caveat knows about each Hugging Face architecture, in one table keyed by ``config.model_type``.

Each :class:`Architecture` says whether the model is a decoder (so which pooling suits it), where its stack of
transformer blocks is (the OOD features hook them) and which linear maps LoRA-XS adapts by default. A model
type outside the table still works: it is a decoder if its config says so, its blocks are found by their
count, and its targets must be named (``--targets``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

from torch import nn

from adapters.vocab import Pooling

# Default targets (docs/methods.md, LoRA-XS). Targets are always chosen by pattern; these only supply defaults.
BERT_TARGETS = ("query", "key", "value", "intermediate.dense", "output.dense")  # every attention and MLP map
LLAMA_TARGETS = ("q_proj", "v_proj")


@dataclass(frozen=True)
class Architecture:
    """One Hugging Face ``model_type``.

    Attributes:
        model_type: the ``config.model_type`` this record describes.
        decoder: a causal decoder, read at its last token; otherwise an encoder, read by the mean of its tokens.
        blocks: attribute path from the ``AutoModel`` (a causal LM's ``base_model``) to its ``ModuleList`` of
            transformer blocks.
        targets: the default LoRA-XS target patterns; empty when none is chosen for this architecture.
    """

    model_type: str
    decoder: bool
    blocks: str
    targets: tuple[str, ...] = ()

    @property
    def pooling(self) -> Pooling:
        return Pooling.LAST if self.decoder else Pooling.MEAN


ARCHITECTURES: dict[str, Architecture] = {
    arch.model_type: arch
    for arch in (
        Architecture("bert", decoder=False, blocks="encoder.layer", targets=BERT_TARGETS),
        Architecture("roberta", decoder=False, blocks="encoder.layer", targets=BERT_TARGETS),
        Architecture("llama", decoder=True, blocks="layers", targets=LLAMA_TARGETS),
        Architecture("qwen2", decoder=True, blocks="layers", targets=LLAMA_TARGETS),
        Architecture("mistral", decoder=True, blocks="layers", targets=LLAMA_TARGETS),
        Architecture("gpt2", decoder=True, blocks="h"),
        Architecture("gpt_neox", decoder=True, blocks="layers"),
        Architecture("phi", decoder=True, blocks="layers"),
        Architecture("gemma", decoder=True, blocks="layers"),
    )
}


def architecture(config) -> Architecture | None:
    """The table's record for a model config, ``None`` for a model type it does not know."""
    return ARCHITECTURES.get(config.model_type)


def is_decoder(config) -> bool:
    """A decoder by the table, or by its config's own word: ``is_decoder`` or a ``*ForCausalLM`` architecture
    (how a model type outside the table, or an encoder type configured as a decoder, says so)."""
    known = architecture(config)
    causal = any(name.endswith("ForCausalLM") for name in getattr(config, "architectures", None) or [])
    return (known is not None and known.decoder) or getattr(config, "is_decoder", False) or causal


def default_pooling(config) -> Pooling:
    """``last`` for decoders (the last token has read the whole input), ``mean`` for encoders."""
    return Pooling.LAST if is_decoder(config) else Pooling.MEAN


def default_targets(config) -> tuple[str, ...]:
    """The architecture's default target patterns; empty when it has none (the caller must be told)."""
    known = architecture(config)
    return known.targets if known is not None else ()


def transformer_blocks(base: nn.Module) -> nn.ModuleList:
    """The base's stack of transformer blocks: at the table's path, or found by its count for a model type the
    table does not know."""
    known = architecture(base.config)
    if known is None:
        return blocks_by_count(base)
    return operator.attrgetter(known.blocks)(base)


def blocks_by_count(base: nn.Module) -> nn.ModuleList:
    """The first ``ModuleList`` of ``config.num_hidden_layers`` modules: the transformer blocks of the usual
    layouts (``encoder.layer`` of BERT, ``layers`` of Llama, ``h`` of GPT-2)."""
    count = base.config.num_hidden_layers
    for module in base.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(f"cannot find the {count} transformer blocks of {type(base).__name__}")
