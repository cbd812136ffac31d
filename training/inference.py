"""Predictions of the MAP and of the posterior predictive, and the evaluation card of a bundle.

The posterior predictive runs through the serving path (``LoraXSClassifier.forward_rows`` with fresh
samples per batch), so the reported numbers are what the server computes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from adapters import LoraXSClassifier, Posterior, Predictive, RowBlock, cloze, make_generator
from adapters.batching import base_only
from adapters.defaults import resolve_token_budget
from adapters.ood.features import capture_states, pooled_features
from adapters.predictive import predictive
from adapters.predictives import linearised_draws
from adapters.tasks import mask_choices
from training.data import Example
from training.encoding import Encoder, LengthGroupedSampler, model_inputs
from training.metrics import auroc, classification_metrics, fpr_at_tpr


@dataclass
class Outputs:
    """Per-sample logits ``(S, N, C)`` of a split, in the split's order."""

    logits: Tensor

    def distribution(self, temperature: float = 1.0) -> Predictive:
        """The predictive distribution of the draws (temperature-scaled logits)."""
        return predictive(self.logits, temperature)


@torch.no_grad()
def predict(
    model: LoraXSClassifier,
    examples: list[Example],
    encoder: Encoder,
    *,
    posterior: Posterior | None = None,
    num_samples: int = 16,
    seed: int = 0,
    batch_size: int = 32,
    token_budget: int | None = None,
    desc: str = "predict",
    progress: bool = True,
) -> Outputs:
    """MAP logits (``posterior=None``, S = 1) or posterior-sampled logits for every example.

    ``token_budget`` caps rows × padded length per forward (default: 4,096 on a CPU, where larger forwards
    fall out of cache — docs/benchmarks.md — and no cap on a GPU).
    """
    token_budget = resolve_token_budget(_device(model), token_budget)
    adapter = model.own_adapter() if posterior is not None else None
    generator = make_generator(seed, posterior.device) if posterior is not None else None
    num_out = 1 if posterior is None else num_samples
    out = torch.empty(num_out, len(examples), model.head.out_features)
    for indices, batch in _batches(model, examples, encoder, batch_size, desc, progress):
        device = batch["input_ids"].device
        if posterior is None:
            logits = model(**batch).unsqueeze(0)
        else:
            block = RowBlock(
                adapter, posterior.sample(num_samples, generator), torch.arange(len(indices), device=device)
            )
            (logits,) = model.forward_rows(batch, [block], token_budget=token_budget)
        out[:, torch.tensor(indices)] = logits.float().cpu()
    return Outputs(mask_choices(out, [e.num_choices for e in examples]))


@dataclass
class Linearisation:
    """A split linearised at the MAP: logits ``(N, C)`` and Jacobians w.r.t. the posterior's blocks
    ``(N, C, *shape)`` (CPU, float32). They do not depend on the posterior, so one linearisation serves every
    prior precision and every Gaussian family."""

    logits: Tensor
    jacobians: dict[str, Tensor]

    def outputs(self, posterior: Posterior, num_samples: int, seed: int) -> Outputs:
        """GLM logit draws ``(S, N, C)`` under ``posterior`` (the ``glm`` predictive's, ``J Σ Jᵀ`` per input)."""
        return Outputs(linearised_draws(self.logits, self.jacobians, posterior, num_samples, seed))


def linearise(
    model: LoraXSClassifier,
    examples: list[Example],
    encoder: Encoder,
    *,
    include_head: bool,
    batch_size: int = 32,
    token_budget: int | None = None,
    desc: str = "linearise",
    progress: bool = True,
) -> Linearisation:
    """MAP logits and per-example Jacobians of every example (the batched-rows linearisation)."""
    token_budget = resolve_token_budget(_device(model), token_budget)
    adapter = model.own_adapter()
    point = {n: p.detach()[None] for n, p in model.posterior_parameters(include_head=include_head).items()}
    logits = torch.empty(len(examples), model.head.out_features)
    jacobians: dict[str, Tensor] = {}
    for indices, batch in _batches(model, examples, encoder, batch_size, desc, progress):
        block = RowBlock(adapter, point, torch.arange(len(indices), device=batch["input_ids"].device))
        ((out, jac),) = model.forward_rows_jacobians(batch, [block], token_budget=token_budget)
        rows = torch.tensor(indices)
        logits[rows] = out.cpu()
        for name in point:
            if name not in jacobians:
                jacobians[name] = torch.empty(len(examples), *jac[name].shape[1:])
            jacobians[name][rows] = jac[name].cpu()
    return Linearisation(mask_choices(logits, [e.num_choices for e in examples]), jacobians)


@torch.no_grad()
def base_features(
    model: LoraXSClassifier,
    examples: list[Example],
    encoder: Encoder,
    layers: Sequence[int],
    *,
    batch_size: int = 32,
    desc: str = "base features",
    progress: bool = True,
) -> Tensor:
    """The frozen base's OOD features ``(N, len(layers)·H)`` of every example (float32, CPU): every adapter
    bypassed (:func:`adapters.batching.base_only`), as the server's base rows compute them."""
    out: Tensor | None = None
    with base_only(model.lora_layers):
        for indices, batch in _batches(model, examples, encoder, batch_size, desc, progress):
            with capture_states(model.base, layers, slice(None)) as states:
                model.hidden_states(batch)
            features = pooled_features(states, cloze.prompt_mask(batch), model.pooling).cpu()
            if out is None:
                out = torch.empty(len(examples), features.shape[1])
            out[torch.tensor(indices)] = features
    if out is None:
        raise ValueError("base_features needs at least one example")
    return out


def _device(model: LoraXSClassifier) -> torch.device:
    return next(model.parameters()).device


def _batches(
    model: LoraXSClassifier, examples: list[Example], encoder: Encoder, batch_size: int, desc: str, progress: bool
) -> Iterator[tuple[list[int], dict[str, Tensor]]]:
    """Length-grouped batches of a split, encoded and on the model's device (the model put in eval mode)."""
    model.eval()
    device = next(model.parameters()).device
    sampler = LengthGroupedSampler(encoder.lengths(examples), batch_size, shuffle=False)
    for indices in tqdm(sampler, desc=desc, disable=not progress, leave=False):
        yield indices, {k: v.to(device) for k, v in model_inputs(encoder([examples[i] for i in indices])).items()}


def labels_of(examples: list[Example]) -> Tensor:
    return torch.tensor([e.label for e in examples])


def ood_scores(pred: Predictive) -> dict[str, Tensor]:
    """Scores where higher means "more likely out of distribution"."""
    return {"max_prob": 1 - pred.confidence, "entropy": pred.entropy, "mutual_information": pred.mutual_information}


def ood_metrics(in_dist: Predictive, out_dist: Predictive, with_mi: bool) -> dict[str, float]:
    """AUROC (OOD positive) per score, and FPR at 95% TPR."""
    inside, outside = ood_scores(in_dist), ood_scores(out_dist)
    names = ["max_prob", "entropy"] + (["mutual_information"] if with_mi else [])
    result = {name: auroc(inside[name], outside[name]) for name in names}
    result.update({f"{name}_fpr_at_95_tpr": fpr_at_tpr(inside[name], outside[name]) for name in names})
    return result


def split_metrics(pred: Predictive, labels: Tensor) -> dict[str, float]:
    metrics = classification_metrics(pred.probs, labels)
    metrics["mean_mutual_information"] = pred.mutual_information.mean().item()
    metrics["mean_entropy"] = pred.entropy.mean().item()
    return metrics
