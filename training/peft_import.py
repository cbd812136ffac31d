"""``caveat-train --from-peft DIR``: a user's PEFT LoRA as the session's MAP, converted exactly to LoRA-XS.

Every module's ``s · B_L A_L`` becomes frozen orthonormal projections and an ``r × r`` core
(:func:`adapters.lora_conversion.lora_to_xs`; modules of smaller rank are padded exactly to the largest, every
module's own scaling folded into its core, the bundle's LoRA-XS scaling is 1). The head is the one PEFT's model
computes: the architecture's own sequence-classification head, with weights from ``modules_to_save`` (or, for
BERT's pooler, the base): BERT reads the first token through its pooler and ``classifier``; RoBERTa through
``classifier.dense`` and ``classifier.out_proj``; a decoder's ``score`` reads the last non-padding token. Before
anything is fitted, the converted model's logits are compared with PEFT's own on validation inputs.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.utils import logging as transformers_logging

from adapters import LoraXSClassifier, inject_lora_xs, lora_xs_layers
from adapters.architectures import default_pooling, is_decoder
from adapters.base_model import LoadedBase
from adapters.lora_conversion import lora_to_xs
from adapters.manifest import ImportSpec
from adapters.peft_lora import WEIGHTS_FILE, PeftFormatError, PeftLora
from adapters.pooling import BASE_POOLER, DenseTanhPooler
from adapters.projections import Projection
from training.config import ConfigError
from training.data import Example
from training.encoding import Encoder, make_loader, model_inputs

CHECK_INPUTS = 64  # validation inputs the converted logits are compared with PEFT's on
LOGIT_TOLERANCE = 1e-4  # refused beyond this (float32 round-off of two orders of summation stays near 1e-6)
PROJECTION_SPEC = "peft-lora"  # the manifest's record of where the projections came from
XS_SCALING = 1.0  # the bundle's alpha equals its rank: every module's own LoRA scaling is in its core
RECORDED = (
    "r",
    "lora_alpha",
    "use_rslora",
    "target_modules",
    "rank_pattern",
    "alpha_pattern",
    "modules_to_save",
    "task_type",
    "base_model_name_or_path",
    "peft_version",
)  # the original's settings the bundle records


@dataclass
class ImportedLora:
    """A PEFT LoRA converted for the session's base.

    Attributes:
        names: the adapted modules, named as in the base Caveat loads (model order).
        projections: module → frozen ``A (r × d_in)``, ``B (d_out × r)``; cores: module → ``(r, r)``.
        rank: the bundle's rank (the largest module rank).
        head_weight ``(C, H)``, head_bias ``(C,)``: the linear head of a sequence-classification LoRA, ``None`` for a
            causal LM's (multiple choice reads the LM's own logits); pooler: the dense layer and tanh in front of
            the head (BERT, RoBERTa), ``None`` for a decoder's last-token head; pooler_module: the base's layer the
            pooler is (BERT's own, not in modules_to_save), ``None`` when the LoRA saved its own.
        lora: what was read.
    """

    names: list[str]
    projections: dict[str, Projection]
    cores: dict[str, Tensor]
    rank: int
    head_weight: Tensor | None
    head_bias: Tensor | None
    pooler: DenseTanhPooler | None
    lora: PeftLora
    pooler_module: str | None = None

    @property
    def causal_lm(self) -> bool:
        return self.head_weight is None


def convert(
    lora: PeftLora, directory: Path, loaded: LoadedBase, num_labels: int, causal_lm: bool = False
) -> ImportedLora:
    """Convert ``lora`` for ``loaded``'s base and a task of ``num_labels`` labels (``causal_lm``: a LoRA of the
    causal LM itself, for multiple choice: no head of its own).

    Raises:
        PeftFormatError: a module the base does not have, or a layer of another shape.
        ConfigError: a head this library cannot reproduce, or one of another size than the task's labels.
    """
    base = loaded.model
    linears = {name: m for name, m in base.named_modules() if isinstance(m, nn.Linear)}
    prefix = f"{type(base).base_model_prefix}."
    modules = {_base_name(name, prefix, linears, directory): module for name, module in lora.modules.items()}
    rank = max(module.rank for module in modules.values())
    projections, cores = {}, {}
    for name, module in modules.items():
        shape = tuple(linears[name].weight.shape)
        if (module.B.shape[0], module.A.shape[1]) != shape:
            raise PeftFormatError(
                f"{directory / WEIGHTS_FILE}: {name} is {module.B.shape[0]}×{module.A.shape[1]}, the base's layer "
                f"{shape[0]}×{shape[1]} (a LoRA of another base?)"
            )
        factors = lora_to_xs(module.A, module.B, module.scale, XS_SCALING, rank=rank)
        projections[name], cores[name] = Projection(factors.A, factors.B), factors.core
    names = [name for name in linears if name in modules]
    if causal_lm:
        if lora.saved:
            raise ConfigError(
                f"--from-peft {directory}: modules_to_save {sorted(lora.saved)[:3]} would change the LM itself; "
                "multiple choice imports a LoRA of the attention and MLP maps only"
            )
        return ImportedLora(names, projections, cores, rank, None, None, None, lora)
    weight, bias, pooler, pooler_module = _head(lora, directory, loaded)
    if weight.shape[0] != num_labels:
        raise ConfigError(
            f"--from-peft {directory}: its head has {weight.shape[0]} outputs, the task {num_labels} labels"
        )
    return ImportedLora(names, projections, cores, rank, weight, bias, pooler, lora, pooler_module)


def _base_name(name: str, prefix: str, linears: Mapping[str, nn.Module], directory: Path) -> str:
    """A PEFT module name (relative to the task model it wrapped: ``bert.encoder...``) as the base names it."""
    stripped = name.removeprefix(prefix)
    for candidate in (stripped, name):
        if candidate in linears:
            return candidate
    raise PeftFormatError(
        f"{directory / WEIGHTS_FILE}: module {name} is not a linear layer of the base (a LoRA of another base? "
        "give the base it was trained on with --base-model)"
    )


def _head(
    lora: PeftLora, directory: Path, loaded: LoadedBase
) -> tuple[Tensor, Tensor, DenseTanhPooler | None, str | None]:
    """The linear head and its pooler, as the architecture's sequence-classification model computes them, and the
    base's layer that pooler is (``None``: the LoRA's own, or none)."""
    base, saved = loaded.model, lora.saved
    model_type = base.config.model_type
    if is_decoder(base.config):
        weight = _saved(saved, "score.weight", directory)
        return weight, torch.zeros(weight.shape[0]), None, None
    if "classifier.out_proj.weight" in saved or model_type in ("roberta", "xlm-roberta"):  # RoBERTa's head
        pooler = DenseTanhPooler(
            _saved(saved, "classifier.dense.weight", directory), _saved(saved, "classifier.dense.bias", directory)
        )
        out = "classifier.out_proj"
        return _saved(saved, f"{out}.weight", directory), _saved(saved, f"{out}.bias", directory), pooler, None
    prefix = f"{type(base).base_model_prefix}.{BASE_POOLER}"
    module = None
    if f"{prefix}.weight" in saved:  # the pooler was trained too (modules_to_save)
        pooler = DenseTanhPooler(saved[f"{prefix}.weight"], _saved(saved, f"{prefix}.bias", directory))
    else:
        pooler, module = DenseTanhPooler.of_base(base), BASE_POOLER
    if pooler is None:
        raise ConfigError(
            f"--from-peft {directory}: a {model_type!r} base without a pooler; Caveat reproduces BERT-style "
            "(pooler + classifier), RoBERTa-style (classifier.dense + out_proj) and decoder (score) heads"
        )
    weight, bias = _saved(saved, "classifier.weight", directory), _saved(saved, "classifier.bias", directory)
    return weight, bias, pooler, module


def _saved(saved: Mapping[str, Tensor], key: str, directory: Path) -> Tensor:
    if key not in saved:
        module = key.rsplit(".", 1)[0]
        raise ConfigError(
            f"--from-peft {directory}: {module} is not in the LoRA's modules_to_save, so PEFT's model initialised it "
            "at random and its predictions cannot be reproduced (train with modules_to_save=[...] or "
            "task_type='SEQ_CLS')"
        )
    return saved[key].float()


def inject(loaded: LoadedBase, imported: ImportedLora) -> None:
    """Wrap the base's adapted layers with the converted projections and cores, in place."""
    inject_lora_xs(loaded.model, imported.names, imported.projections, alpha=float(imported.rank))
    with torch.no_grad():
        for name, layer in lora_xs_layers(loaded.model).items():
            layer.core.weight.copy_(imported.cores[name])


def build_model(loaded: LoadedBase, imported: ImportedLora, num_labels: int) -> LoraXSClassifier:
    """The sequence-classification model around the converted LoRA: projections and cores injected, the head set."""
    inject(loaded, imported)
    base = loaded.model
    model = LoraXSClassifier(base, num_labels, pooling=default_pooling(base.config), readout=imported.pooler)
    with torch.no_grad():
        model.head.weight.copy_(imported.head_weight)
        model.head.bias.copy_(imported.head_bias)
    model.freeze_base()  # what the posterior covers: the cores and the head
    return model


def check_against_peft(
    model: LoraXSClassifier,
    loaded: LoadedBase,
    imported: ImportedLora,
    directory: Path,
    examples: list[Example],
    encoder: Encoder,
) -> ImportSpec:
    """Compare the converted model's logits with PEFT's own model on the first validation inputs: the classifier's
    logits, or for a causal LM's LoRA the LM's next-token logits over the items' prompts.

    Raises:
        ConfigError: PEFT is not installed, PEFT cannot load the LoRA onto the base, or the logits differ by more
            than ``LOGIT_TOLERANCE`` (the conversion would not be the user's model).
    """
    examples = examples[:CHECK_INPUTS]
    reference = _peft_model(loaded, directory, None if imported.causal_lm else model.head.out_features)
    device = next(model.parameters()).device
    reference.to(device)
    worst = 0.0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for inputs in _check_batches(examples, encoder, loaded, imported.causal_lm):
            inputs = {k: v.to(device) for k, v in inputs.items()}
            theirs = reference(**inputs).logits
            if imported.causal_lm:  # every real token's next-token logits
                mask = inputs["attention_mask"].bool()
                ours = (model.hidden_states(inputs) @ loaded.output_embeddings.to(device).T)[mask]
                theirs = theirs[mask]
            else:
                ours = model(**inputs)
            worst = max(worst, (ours.double() - theirs.double()).abs().max().item())
    model.train(was_training)
    if not worst <= LOGIT_TOLERANCE:
        raise ConfigError(
            f"--from-peft {directory}: the converted model's logits differ from PEFT's own by {worst:.2e} (more than "
            f"{LOGIT_TOLERANCE:g}) on {len(examples)} validation inputs; is --base-model the base it was trained on?"
        )
    config = {key: imported.lora.config[key] for key in RECORDED if key in imported.lora.config}
    return ImportSpec(source=str(directory), config=config, max_abs_logit_diff=worst, checked_inputs=len(examples))


def _check_batches(
    examples: list[Example], encoder: Encoder, loaded: LoadedBase, causal_lm: bool
) -> Iterator[dict[str, Tensor]]:
    """Batches of the checked inputs: as the classifier reads them, or each item's prompt as plain text."""
    if not causal_lm:
        yield from (model_inputs(batch) for batch in make_loader(examples, encoder, 16, shuffle=False))
        return
    for start in range(0, len(examples), 16):
        texts = [e.text for e in examples[start : start + 16]]
        yield dict(loaded.tokenizer(texts, truncation=True, max_length=encoder.max_length, padding=True,
                                    return_tensors="pt"))  # fmt: skip


def _peft_model(loaded: LoadedBase, directory: Path, num_labels: int | None) -> nn.Module:
    """PEFT's own model: the architecture's sequence-classification model of the base (the causal LM when
    ``num_labels`` is ``None``), with the LoRA loaded."""
    try:
        from peft import PeftModel
    except ImportError:
        raise ConfigError("--from-peft checks the conversion against PEFT itself: pip install 'caveat[peft]'") from None
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # its head is missing from the base by design: PEFT loads it
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            if num_labels is None:
                task_model = AutoModelForCausalLM.from_pretrained(loaded.path, dtype=torch.float32)
            else:
                task_model = AutoModelForSequenceClassification.from_pretrained(
                    loaded.path, num_labels=num_labels, dtype=torch.float32
                )
            task_model.config.pad_token_id = loaded.tokenizer.pad_token_id  # a decoder's head: the last real token
            return PeftModel.from_pretrained(task_model, directory).eval()
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ConfigError(f"--from-peft {directory}: PEFT cannot load it onto the base: {exc}") from None
    finally:
        transformers_logging.set_verbosity(verbosity)
