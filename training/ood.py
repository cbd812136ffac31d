"""The OOD stage: fit the feature-space OOD score on the frozen base's features of a training subset (before MAP
training: the features do not depend on it, and a score that cannot be fitted fails before the costly part),
calibrate its p-values and the ``ood`` rule on validation, and measure its AUROC against the shift and OOD sets.

The score reads the *frozen* base (every adapter bypassed): fine-tuning pulls the adapted features towards the
task's directions and loses most of the domain signal (docs/results.md). The server computes the same features
in a base row of its batched forward (docs/design.md, OOD score).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from adapters.errors import OodFitError
from adapters.eval_card import Metrics
from adapters.manifest import AbstentionSpec, OodSpec
from adapters.ood import OodMethod, OodScore, fit_ood_score
from adapters.ood.features import default_feature_layers
from adapters.vocab import AbstentionKind
from training.config import NO_OOD, ConfigError
from training.data import subset
from training.inference import base_features, labels_of
from training.metrics import auroc, fpr_at_tpr
from training.session import Session


@dataclass
class FittedOod:
    """A fitted, calibrated OOD score, its bundle record, its ``ood`` rule and its AUROCs.

    Attributes:
        metrics: ``"ood"`` / ``"shift"`` → ``{"auroc", "fpr_at_95_tpr"}`` of the score against the test split.
    """

    score: OodScore
    spec: OodSpec
    rule: AbstentionSpec
    metrics: dict[str, Metrics] = field(default_factory=dict)


def fit_ood(session: Session) -> FittedOod | None:
    """Fit the ``--ood-method`` score (``None`` for ``none``); a training set too small for it is a
    :class:`ConfigError` (exit 2)."""
    config, model = session.config, session.model
    options = config.ood
    if options.method == NO_OOD:
        return None
    method = OodMethod(options.method)
    layers = default_feature_layers(model.base.config.num_hidden_layers)
    train = subset(session.train, options.train_size, config.split_seed)
    score = _fit(method, features_of(session, train, layers, "train"), _groups(train, config), config)
    lengths = torch.tensor(session.encoder.lengths(session.validation)) if options.length_buckets else None
    try:
        score.calibrate(features_of(session, session.validation, layers, "validation"), lengths, options.length_buckets)
    except OodFitError as exc:
        raise ConfigError(f"--ood-length-buckets {options.length_buckets}: {exc}") from exc
    threshold, target = score.threshold(options.fraction), {"validation_fraction": options.fraction}
    rule = AbstentionSpec(kind=AbstentionKind.OOD, threshold=threshold, target=target)
    spec = OodSpec(
        method=method, layers=list(layers), pooling=model.pooling, budget_bytes=options.budget,
        fraction=options.fraction, train_size=len(train),
    )  # fmt: skip
    fitted = FittedOod(score, spec, rule)
    inside = score.score(features_of(session, session.test, layers, "test"))
    for name, examples in (("shift", session.shift), ("ood", session.ood)):
        if examples is not None:
            outside = score.score(features_of(session, examples[1], layers, name))
            fitted.metrics[name] = {"auroc": auroc(inside, outside), "fpr_at_95_tpr": fpr_at_tpr(inside, outside)}
    session.log(f"OOD score: {method} on {len(train)} training inputs, {score!r}; AUROC {fitted.metrics}")
    return fitted


def _groups(train: list, config) -> Tensor:
    """The classes a class-conditional score fits: the labels; for multiple choice one class, all questions
    together (an answer's position, A or E, says nothing of what a question is about, and ARC's rare fifth
    choice leaves its class a single example)."""
    labels = labels_of(train)
    return labels.zero_() if config.multiple_choice else labels


def features_of(session: Session, examples: list, layers: tuple[int, ...], split: str) -> Tensor:
    config = session.config
    return base_features(
        session.model, examples, session.encoder, layers, batch_size=config.optimisation.batch_size,
        desc=f"{split} (base features)", progress=config.progress,
    )  # fmt: skip


def _fit(method: OodMethod, features: Tensor, labels: Tensor, config) -> OodScore:
    options = config.ood
    settings = {
        "k": options.k, "shrinkage": options.shrinkage, "rank": options.rank, "budget_bytes": options.budget,
        "seed": config.seed,
    }  # fmt: skip
    kwargs = {name: settings[name] for name in OodScore.registry[method].fit_options}  # each score's own options
    try:
        return fit_ood_score(method, features, labels, **kwargs)
    except OodFitError as exc:
        raise ConfigError(
            f"--ood-method {method} cannot be fitted on {features.shape[0]} training inputs "
            f"(--ood-train-size {options.train_size}): {exc}"
        ) from exc
