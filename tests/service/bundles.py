"""Test bundles: a tiny random BERT saved to disk (with MiniLM's real tokenizer), and bundles made for it.

The bundles are real (projections from the base's weights, safetensors, a Laplace-family posterior) but
their cores are random rather than trained: the server tests are about serving, not accuracy.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer, BertConfig

from adapters import LoraXSClassifier, LoraXSConfig, compute_projections, inject_lora_xs, target_names
from adapters.bundle import Bundle, save_bundle
from adapters.embedded import resolve_model
from adapters.manifest import (
    AbstentionSpec,
    AdapterSpec,
    BaseModelSpec,
    BundleManifest,
    CalibrationSpec,
    HeadSpec,
    PosteriorSpec,
    TaskSpec,
)
from adapters.model import base_fingerprint, lora_xs_layers
from adapters.posteriors import DiagPosterior

TARGETS = ("query", "value")
RANK = 4


def save_tiny_base(directory: Path, seed: int = 0) -> Path:
    """A 2-layer random BERT (hidden 32) with MiniLM's tokenizer, as a local model directory."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=128,
    )  # fmt: skip
    AutoModel.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_bundle(
    base_dir: Path,
    out: Path,
    *,
    name: str = "tiny",
    version: str = "1",
    seed: int = 0,
    labels: tuple[str, ...] = ("negative", "positive"),
    variance: float = 0.5,
    abstain_mi: float | None = None,
    max_length: int = 64,
) -> Path:
    """Save a bundle for the tiny base: SVD projections, random cores and head, a diagonal posterior."""
    base = AutoModel.from_pretrained(base_dir).eval()
    config = LoraXSConfig(rank=RANK, alpha=2.0 * RANK, target_modules=TARGETS, seed=seed)
    names = target_names(base, TARGETS)
    fingerprint = base_fingerprint(base, names)
    adapted = copy.deepcopy(base)
    inject_lora_xs(adapted, TARGETS, compute_projections(adapted, names, config), alpha=config.alpha, seed=seed)
    model = LoraXSClassifier(adapted, num_labels=len(labels))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_xs_layers(adapted).values():
            layer.core.weight.copy_(torch.randn(RANK, RANK, generator=generator))
        model.head.weight.copy_(torch.randn(len(labels), 32, generator=generator))
    mean = {n: p.detach().clone() for n, p in model.posterior_parameters().items()}
    posterior = DiagPosterior(mean, {n: torch.full_like(t, variance) for n, t in mean.items()})
    rules = [AbstentionSpec(kind="max_prob", threshold=0.55)]
    if abstain_mi is not None:
        rules.append(AbstentionSpec(kind="mutual_information", threshold=abstain_mi))
    manifest = BundleManifest(
        name=name,
        version=version,
        task=TaskSpec(labels=list(labels), max_length=max_length),
        base_model=BaseModelSpec(name_or_path=str(base_dir), fingerprint=fingerprint, hidden_size=32),
        adapter=AdapterSpec(rank=RANK, alpha=config.alpha, target_modules=list(TARGETS), modules=names),
        head=HeadSpec(in_features=32, num_labels=len(labels)),
        posterior=PosteriorSpec(family="diag", default_num_samples=8),
        calibration=CalibrationSpec(abstention=rules),
    )
    return save_bundle(Bundle.from_classifier(model, posterior, manifest), out)
