"""Predictive distributions from posterior samples, their uncertainty split, and abstention rules.

From per-sample logits ``(S, N, C)``: ``p_s = softmax(f_s / T)``; the predictive averages probabilities,
never logits (averaging logits collapses the posterior to the MAP); total uncertainty ``H[p̄]``; aleatoric
part ``E_s H[p_s]``; epistemic part (mutual information) ``H[p̄] − E_s H[p_s] ≥ 0``; and the Monte-Carlo
standard error of the top probability ``std_s(p_s[c*]) / √S`` (docs/methods.md, predictive
distributions). All in nats.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from adapters.vocab import AbstentionKind

OOD_REASON = "out_of_distribution"  # the ``ood`` rule's reason (and its abstention counter's label)
AMBIGUOUS_REASON = "ambiguous"  # the ``ambiguous`` rule's


def entropy(probs: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy in nats; ``0 log 0 = 0``."""
    return -torch.special.xlogy(probs, probs).sum(dim=dim)


@dataclass
class Predictive:
    """The predictive of N inputs over C classes from S samples.

    Attributes:
        probs: ``(N, C)`` predictive ``p̄``.
        label: ``(N,)`` argmax of ``p̄``.
        confidence: ``(N,)`` ``max_c p̄_c``.
        entropy: ``(N,)`` ``H[p̄]`` (total).
        entropy_normalized: ``(N,)`` ``H[p̄] / log C`` in [0, 1].
        expected_entropy: ``(N,)`` ``E_s H[p_s]`` (aleatoric).
        mutual_information: ``(N,)`` ``H[p̄] − E_s H[p_s]`` (epistemic), never negative.
        mc_stderr: ``(N,)`` Monte-Carlo standard error of ``p̄[label]`` (0 when S = 1).
        sample_probs: ``(S, N, C)`` per-sample probabilities.
    """

    probs: Tensor
    label: Tensor
    confidence: Tensor
    entropy: Tensor
    entropy_normalized: Tensor
    expected_entropy: Tensor
    mutual_information: Tensor
    mc_stderr: Tensor
    sample_probs: Tensor

    @property
    def num_samples(self) -> int:
        return self.sample_probs.shape[0]

    def slice(self, start: int, stop: int) -> Predictive:
        """Inputs ``start:stop`` (views)."""
        fields = {f.name: getattr(self, f.name)[start:stop] for f in dataclasses.fields(self)}
        fields["sample_probs"] = self.sample_probs[:, start:stop]
        return Predictive(**fields)

    def select(self, index: Tensor) -> Predictive:
        """Inputs ``index`` ``(n,)``."""
        fields = {f.name: getattr(self, f.name).index_select(0, index) for f in dataclasses.fields(self)}
        fields["sample_probs"] = self.sample_probs.index_select(1, index)
        return Predictive(**fields)

    def cpu(self) -> Predictive:
        return Predictive(**{f.name: getattr(self, f.name).cpu() for f in dataclasses.fields(self)})


def predictive(logits: Tensor, temperature: float = 1.0) -> Predictive:
    """Summarise per-sample logits ``(S, N, C)`` (or ``(N, C)`` for one sample) at temperature ``T``."""
    if logits.ndim == 2:
        logits = logits.unsqueeze(0)
    if logits.ndim != 3:
        raise ValueError(f"logits must be (S, N, C) or (N, C), got {tuple(logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    sample_probs = torch.softmax(logits.float() / temperature, dim=-1)
    probs = sample_probs.mean(dim=0)
    confidence, label = probs.max(dim=-1)
    total = entropy(probs)
    expected = entropy(sample_probs).mean(dim=0)
    num_samples, num_classes = sample_probs.shape[0], sample_probs.shape[-1]
    top = sample_probs.gather(-1, label.expand(num_samples, -1).unsqueeze(-1)).squeeze(-1)
    stderr = top.std(dim=0) / math.sqrt(num_samples) if num_samples > 1 else torch.zeros_like(confidence)
    return Predictive(
        probs=probs,
        label=label,
        confidence=confidence,
        entropy=total,
        entropy_normalized=total / math.log(num_classes) if num_classes > 1 else torch.zeros_like(total),
        expected_entropy=expected,
        mutual_information=(total - expected).clamp_min(0.0),  # float error can leave tiny negatives
        mc_stderr=stderr,
        sample_probs=sample_probs,
    )


@dataclass(frozen=True)
class InputSignals:
    """What abstention rules read about each input besides its predictive; ``None``: the adapter computes no such
    value, and the rules that read it never fire.

    Attributes:
        ood_pvalue: ``(N,)`` the feature-space OOD score's p-values (``adapters.ood``).
        set_size: ``(N,)`` labels in each input's conformal prediction set (``adapters.conformal``).
    """

    ood_pvalue: Tensor | None = None
    set_size: Tensor | None = None

    def select(self, index: Tensor) -> InputSignals:
        """Inputs ``index`` ``(n,)``."""
        return InputSignals(*(None if v is None else v[index] for v in (self.ood_pvalue, self.set_size)))


@dataclass(frozen=True)
class AbstentionScore:
    """What an abstention rule of one kind thresholds.

    Attributes:
        read: the score of each input ``(N,)`` from the predictive and the input's other signals (NaN where the
            adapter has no such signal: the rule never fires).
        below: the rule fires when the score is below its threshold (else above it).
        low, high: a threshold's range (a bundle's is widened for the trainer's "abstain on everything":
            ``adapters.manifest.THRESHOLD_RANGES``).
        description: what a request's threshold of this kind means (the OpenAPI document shows it).
        fitted: the trainer fits its threshold on validation (``--abstain-on``); the others are set by a rule.
    """

    read: Callable[[Predictive, InputSignals], Tensor]
    below: bool
    low: float
    high: float
    description: str
    fitted: bool = True


def _signal(pred: Predictive, value: Tensor | None) -> Tensor:
    return torch.full_like(pred.confidence, math.nan) if value is None else value.to(pred.confidence)


def _ambiguity(pred: Predictive, signals: InputSignals) -> Tensor:
    """The conformal set's size, an empty set counted as every label (neither answers the question)."""
    size = _signal(pred, signals.set_size)
    return size.masked_fill(size == 0, pred.probs.shape[-1])


ABSTENTION_SCORES: dict[AbstentionKind, AbstentionScore] = {
    AbstentionKind.MAX_PROB: AbstentionScore(
        lambda pred, _: pred.confidence, True, 0.0, 1.0, "abstain when the top probability is below"
    ),
    AbstentionKind.ENTROPY: AbstentionScore(
        lambda pred, _: pred.entropy_normalized, False, 0.0, 1.0, "abstain when the normalised entropy is above"
    ),
    AbstentionKind.MUTUAL_INFORMATION: AbstentionScore(
        lambda pred, _: pred.mutual_information, False, 0.0, math.inf, "abstain when MI (nats) is above"
    ),
    AbstentionKind.OOD: AbstentionScore(
        lambda pred, signals: _signal(pred, signals.ood_pvalue), True, 0.0, 1.0,
        "abstain (out_of_distribution) when the OOD p-value is below; no effect for an adapter without an OOD score",
        fitted=False,
    ),
    AbstentionKind.AMBIGUOUS: AbstentionScore(
        _ambiguity, False, 0.0, math.inf,
        "abstain when the conformal prediction set holds more labels than this (an empty set counts as all; 1: "
        "answer only single-label sets); no effect for an adapter without conformal calibration",
        fitted=False,
    ),
}  # fmt: skip
AMBIGUOUS_THRESHOLD = 1.0  # the trainer's ``ambiguous`` rule: answer only when the set is one label


@dataclass(frozen=True)
class AbstentionRule:
    """Abstain when a score crosses a threshold.

    ``max_prob`` abstains when the confidence is *below* the threshold; ``entropy`` (normalised to
    [0, 1]) and ``mutual_information`` (nats) abstain when the score is *above* it; ``ood`` abstains when the
    input's OOD p-value (``adapters.ood``) is *below* it, and never for a bundle without an OOD score;
    ``ambiguous`` abstains when the input's conformal prediction set holds more labels than the threshold, or
    none, and never for a bundle without conformal calibration.
    """

    kind: AbstentionKind
    threshold: float

    def __post_init__(self) -> None:
        if self.kind not in ABSTENTION_SCORES:
            raise ValueError(f"unknown abstention rule {self.kind!r}; choose one of {[str(k) for k in AbstentionKind]}")

    def score(self, pred: Predictive, signals: InputSignals | None = None) -> Tensor:
        """The score this rule thresholds, for each input (NaN where the adapter lacks the signal it reads)."""
        return ABSTENTION_SCORES[self.kind].read(pred, signals or InputSignals())

    def fires(self, pred: Predictive, signals: InputSignals | None = None) -> Tensor:
        score = self.score(pred, signals).to(pred.confidence.device)
        return score < self.threshold if ABSTENTION_SCORES[self.kind].below else score > self.threshold

    def reason(self) -> str:
        if self.kind == AbstentionKind.OOD:
            return f"{OOD_REASON} (ood_pvalue below {self.threshold:.4g})"
        if self.kind == AbstentionKind.AMBIGUOUS:
            return f"{AMBIGUOUS_REASON} (conformal set of more than {self.threshold:.4g} labels, or none)"
        relation = "below" if ABSTENTION_SCORES[self.kind].below else "above"
        return f"{self.kind} {relation} {self.threshold:.4g}"


def abstain(
    pred: Predictive, rules: list[AbstentionRule], signals: InputSignals | None = None
) -> tuple[Tensor, list[str | None]]:
    """Apply rules (abstain when any fires). Returns ``(N,)`` flags and, per input, the first reason.

    ``signals``: the inputs' OOD p-values and conformal set sizes, for the rules that read them (``None``: those
    rules never fire).
    """
    flags = torch.zeros_like(pred.confidence, dtype=torch.bool)
    reasons: list[str | None] = [None] * flags.shape[0]
    for rule in rules:
        fired = rule.fires(pred, signals)
        for i in torch.nonzero(fired & ~flags).flatten().tolist():
            reasons[i] = rule.reason()
        flags |= fired
    return flags, reasons


def glm_logit_draws(
    logits: Tensor, covariance: Tensor, num_samples: int, generator: torch.Generator | None = None
) -> Tensor:
    """Draws ``f_s = f̂ + Σ_f^{1/2} ε_s`` of the linearised (GLM) logits, ``(S, N, C)`` in float64.

    Args:
        logits: ``(N, C)`` logits at the linearisation point (the MAP).
        covariance: ``(N, C, C)`` ``J Σ Jᵀ`` per input (``Posterior.jacobian_covariance``); singular is fine.
        num_samples: logit draws (no network passes: cheap).
        generator: RNG on the covariance's device, for reproducible draws.
    """
    noise = torch.randn(num_samples, *logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
    return glm_logits_from_noise(logits, covariance, noise)


def glm_logits_from_noise(logits: Tensor, covariance: Tensor, noise: Tensor) -> Tensor:
    """``f_s = f̂ + Σ_f^{1/2} ε_s`` for given standard-normal ``noise`` ``(S, N, C)`` (float64), ``(S, N, C)``:
    what :func:`glm_logit_draws` does after drawing, so inputs drawn from different generators can share it."""
    if covariance.shape != (*logits.shape, logits.shape[-1]) or noise.shape[1:] != logits.shape:
        raise ValueError(
            f"covariance {tuple(covariance.shape)} or noise {tuple(noise.shape)} does not fit logits "
            f"{tuple(logits.shape)}"
        )
    covariance = covariance.double()
    eigvals, eigvecs = torch.linalg.eigh((covariance + covariance.transpose(1, 2)) / 2)
    root = eigvecs * eigvals.clamp_min(0).sqrt().unsqueeze(1)  # Σ = root rootᵀ
    return logits.double() + torch.einsum("nij,snj->sni", root, noise.to(root.dtype))


def glm_predictive(
    logits: Tensor,
    covariance: Tensor,
    num_samples: int,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
) -> Predictive:
    """The linearised (GLM) predictive by Monte-Carlo in logit space (:func:`glm_logit_draws`)."""
    return predictive(glm_logit_draws(logits, covariance, num_samples, generator), temperature)
