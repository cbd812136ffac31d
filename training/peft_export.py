"""``caveat-train export-peft BUNDLE OUT``: a bundle's MAP (or posterior mean) as a standard PEFT LoRA directory.

A LoRA-XS update ``c · B R A`` is exactly the LoRA ``lora_B = c B``, ``lora_A = R A`` at ``r = lora_alpha = rank``
(PEFT's scaling 1; :func:`adapters.lora_conversion.xs_to_lora`). What a Hugging Face model computes around it
decides what exports:

* sequence classification with the architecture's own head: task.pooling ``pooler`` on BERT (``pooler`` and
  ``classifier`` in ``modules_to_save``) or RoBERTa (``classifier.dense`` + ``classifier.out_proj``), or ``last``
  on a decoder whose head has no bias (``score``); a mean- or first-token-pooled head has no Hugging Face form;
* multiple choice (cloze or letters): the LM's own logits, so a causal-LM LoRA without ``modules_to_save``: the
  variant vLLM's LoRA loader accepts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor
from transformers import CONFIG_MAPPING, MODEL_MAPPING

from adapters import load_bundle
from adapters.bundle import Bundle
from adapters.errors import CaveatError
from adapters.files import staged
from adapters.heads import HEAD_BIAS, HEAD_WEIGHT
from adapters.lora_conversion import XsFactors, xs_to_lora
from adapters.peft_lora import CONFIG_FILE, PREFIX, WEIGHTS_FILE
from adapters.pooling import BASE_POOLER
from adapters.vocab import Pooling, TaskType
from training.config import ConfigError
from training.pipeline import prepare_output

WEIGHTS = ("map", "mean")
DESCRIPTION = (
    "Write a bundle's MAP (or its posterior's mean) as a PEFT LoRA directory (adapter_config.json + "
    "adapter_model.safetensors) that PeftModel.from_pretrained loads on the same base."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="caveat-train export-peft", description=DESCRIPTION)
    parser.add_argument("bundle", type=Path, help="the bundle to export")
    parser.add_argument("out", type=Path, help="the PEFT adapter directory to write")
    parser.add_argument(
        "--weights", choices=WEIGHTS, default="map", help="the MAP cores, or the posterior's mean (SWAG, VI, ...)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a PEFT adapter in OUT")
    return parser


def main(argv: list[str]) -> Path:
    args = build_parser().parse_args(argv)
    try:
        bundle = load_bundle(args.bundle)
    except (CaveatError, OSError) as exc:
        raise ConfigError(f"{args.bundle}: {exc}") from exc
    prepare_output(args.out, args.overwrite, marker=CONFIG_FILE, kind="a PEFT adapter", flag="")
    config, tensors = export(bundle, args.weights)
    with staged(args.out) as staging:
        save_file(tensors, staging / WEIGHTS_FILE, metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    kind = "sequence classification" if config["modules_to_save"] else "a causal LM (no modules_to_save)"
    print(f"PEFT LoRA for {kind} written to {args.out} (r = {config['r']}, {len(config['target_modules'])} targets)")
    return args.out


def export(bundle: Bundle, weights: str = "map") -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The PEFT ``adapter_config.json`` and ``adapter_model.safetensors`` tensors of ``bundle``.

    Raises:
        ConfigError: a bundle whose head has no Hugging Face form (named with the reason).
    """
    manifest = bundle.manifest
    values = _values(bundle, weights)
    classification = manifest.task.type == TaskType.SEQUENCE_CLASSIFICATION
    modules_to_save, saved = _head(bundle, values) if classification else (None, {})  # refuses first
    prefix = _base_model_prefix(bundle)
    rank, scaling = manifest.adapter.rank, manifest.adapter.scaling
    tensors: dict[str, Tensor] = {}
    for name, projection in bundle.projections.items():
        lora_A, lora_B = xs_to_lora(XsFactors(projection.A, values[name], projection.B), scaling)
        key = f"{PREFIX}{prefix}.{name}"
        tensors[f"{key}.lora_A.weight"] = lora_A.float().contiguous()
        tensors[f"{key}.lora_B.weight"] = lora_B.float().contiguous()
    tensors |= {f"{PREFIX}{key}": value.float().contiguous() for key, value in saved.items()}
    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if classification else "CAUSAL_LM",
        "base_model_name_or_path": manifest.base_model.name_or_path,
        "r": rank,
        "lora_alpha": rank,
        "target_modules": sorted(bundle.projections),  # full names: PEFT matches a name or a dotted suffix of one
        "modules_to_save": modules_to_save,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    return config, tensors


def _values(bundle: Bundle, weights: str) -> dict[str, Tensor]:
    """The cores and head to export: the MAP's, or the posterior's mean where it has one."""
    values = {**bundle.cores, HEAD_WEIGHT: bundle.head_weight, HEAD_BIAS: bundle.head_bias}
    if weights == "mean":
        values |= {name: mean.to(values[name].dtype) for name, mean in bundle.posterior.mean().items()}
    return values


def _head(bundle: Bundle, values: dict[str, Tensor]) -> tuple[list[str], dict[str, Tensor]]:
    """The classification head's ``modules_to_save`` and their tensors, by their names in the task model."""
    manifest = bundle.manifest
    weight, bias = values[HEAD_WEIGHT], values[HEAD_BIAS]
    pooling, architecture = manifest.task.pooling, manifest.base_model.architecture
    if pooling == Pooling.POOLER and architecture in ("roberta", "xlm-roberta"):
        pooler = bundle.pooler
        return ["classifier"], {"classifier.dense.weight": pooler.weight, "classifier.dense.bias": pooler.bias,
                                "classifier.out_proj.weight": weight, "classifier.out_proj.bias": bias}  # fmt: skip
    if pooling == Pooling.POOLER and manifest.head.pooler_module:  # BERT reading through the base's own pooler
        return ["classifier"], {"classifier.weight": weight, "classifier.bias": bias}
    if pooling == Pooling.POOLER:  # BERT with a pooler of its own (trained too: imported from modules_to_save)
        pooler, dense = bundle.pooler, f"{_base_model_prefix(bundle)}.{BASE_POOLER}"
        return ["classifier", "pooler"], {f"{dense}.weight": pooler.weight, f"{dense}.bias": pooler.bias,
                                          "classifier.weight": weight, "classifier.bias": bias}  # fmt: skip
    if pooling == Pooling.LAST and bool((bias == 0).all()):
        return ["score"], {"score.weight": weight}
    if pooling == Pooling.LAST:
        raise ConfigError(
            f"{bundle.path}: its head has a bias; a decoder's Hugging Face score layer has none, so it cannot be "
            "exported exactly"
        )
    raise ConfigError(
        f"{bundle.path}: its head reads {pooling}-pooled features; Hugging Face's sequence-classification models read "
        "the first token through a pooler (BERT, RoBERTa) or the last token (decoders): train with --pooling pooler "
        "to export"
    )


def _base_model_prefix(bundle: Bundle) -> str:
    """Where the Hugging Face task model keeps the base (``bert``, ``roberta``, ``model``, ...)."""
    architecture = bundle.manifest.base_model.architecture
    try:
        return MODEL_MAPPING[CONFIG_MAPPING[architecture]].base_model_prefix
    except KeyError:
        raise ConfigError(f"{bundle.path}: architecture {architecture!r} is not one transformers knows") from None
