"""Posterior methods around (or from) the trained MAP: Laplace (marglik or grid prior), SWAG, VI, ensembles
and MC dropout; :func:`fit_posterior` dispatches on ``--posterior``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from adapters import (
    DropoutPosterior,
    EnsemblePosterior,
    LoraXSClassifier,
    MapPosterior,
    Posterior,
    load_bundle,
)
from adapters.defaults import CORE_INIT_STD, DEFAULT_DRAWS, PredictiveMode
from adapters.errors import CaveatError
from adapters.model import HEAD_BIAS, HEAD_WEIGHT
from training.config import (
    GRID_DECADES,
    GRID_SAMPLES,
    GRID_VALIDATION,
    POSTERIORS,
    ConfigError,
)
from training.encoding import make_loader
from training.evaluate import labels_of, predict
from training.laplace_fit import STRUCTURES, fit_laplace
from training.map_training import train_map
from training.metrics import nll
from training.session import Fitted, Session, data_card, map_schedule, subset
from training.swag import SwagSchedule, fit_swag
from training.variational import ViSchedule, fit_vi


def fit_posterior(session: Session, method: str) -> Fitted:
    """The posterior of ``method`` around (or from) the trained MAP in the session's model."""
    config, model = session.config, session.model
    start = time.perf_counter()
    draws = config.num_samples or DEFAULT_DRAWS[PredictiveMode.SAMPLE]
    if method == "map":
        posterior = MapPosterior(_snapshot(model))
        fitted = Fitted(method, posterior, "map", 1)
    elif method in STRUCTURES:
        fitted = _fit_laplace(session, method)
    elif method == "swag":
        schedule = SwagSchedule(
            epochs=config.swag_epochs, lr=config.swag_lr, snapshots=config.swag_snapshots, rank=config.swag_rank,
            scale=config.swag_scale, batch_size=config.batch_size, seed=config.seed,
        )  # fmt: skip
        posterior, info = fit_swag(
            model, session.train, session.encoder, schedule, config.posterior_head, progress=config.progress
        )
        fitted = Fitted(method, posterior, "sample", draws, info)
    elif method == "vi":
        schedule = ViSchedule(
            epochs=config.vi_epochs, batch_size=config.batch_size, lr=config.vi_lr, std_lr=config.vi_std_lr,
            init_std=config.vi_init_std, rank=config.vi_rank, prior_precision=config.vi_prior_precision,
            kl_weight=config.vi_kl_weight, seed=config.seed,
        )  # fmt: skip
        posterior, info = fit_vi(model, session.train, session.encoder, schedule, config.progress)
        fitted = Fitted(method, posterior, "sample", draws, info)
    elif method == "ensemble":
        posterior, info = train_ensemble(session)
        fitted = Fitted(method, posterior, "sample", posterior.num_members, info)  # each member once
    elif method == "mc-dropout":
        posterior = DropoutPosterior(_snapshot(model), config.adapter_dropout)
        fitted = Fitted(method, posterior, "sample", draws, {"rate": config.adapter_dropout})
    else:
        raise ConfigError(f"unknown --posterior {method!r}; choose one of {list(POSTERIORS)}")
    fitted.seconds = round(time.perf_counter() - start, 1)
    if method != "map":
        session.say(f"posterior {method}: {fitted.posterior} in {fitted.seconds:.0f} s")
    return fitted


def _snapshot(model: LoraXSClassifier, include_head: bool = False) -> dict[str, Tensor]:
    """A copy of the values a posterior covers (the cores, and the head with ``include_head``)."""
    return {n: p.detach().clone() for n, p in model.posterior_parameters(include_head=include_head).items()}


def _fit_laplace(session: Session, method: str) -> Fitted:
    """A Laplace structure around the MAP (curvature on a subset, scaled to N); δ by marglik or grid."""
    config = session.config
    curvature_data = subset(session.train, config.laplace_limit, config.seed)
    loader = make_loader(curvature_data, session.encoder, config.batch_size, shuffle=False)
    fit = fit_laplace(
        session.model,
        loader,
        STRUCTURES[method],
        include_head=config.posterior_head,
        n_data=len(session.train),
        prior_structure=config.prior_structure,
        progress=config.progress,
    )
    fitted = Fitted(
        method,
        fit.posterior,
        config.predictive,
        config.num_samples or DEFAULT_DRAWS[PredictiveMode(config.predictive)],
        fit.info,
    )
    if config.prior == "grid":
        fitted.posterior, fitted.info = _grid_prior(session, fit, fitted)
    session.say(f"posterior {method}: prior precision {fitted.info['prior_precision']} ({config.prior})")
    return fitted


def train_ensemble(session: Session) -> tuple[EnsemblePosterior, dict[str, Any]]:
    """M members: the session's MAP, members loaded from ``--member-bundles``, and the rest trained here
    with seeds ``seed+1, seed+2, ...`` (same data, new initialisation and shuffling). Every member brings its
    own head, so the ensemble covers the head. The model is left holding the first member."""
    config, model = session.config, session.model
    first = _snapshot(model, include_head=True)
    members, seconds = [first], [session.map_result.seconds if session.map_result else 0.0]
    for path in config.member_bundles or []:
        member, member_seconds = _member_from_bundle(session, Path(path))
        members.append(member)
        seconds.append(member_seconds)
    seed = config.seed
    while len(members) < config.members:
        seed += 1
        session.say(f"ensemble member {len(members) + 1}/{config.members} (seed {seed})")
        reinitialise(model, seed)
        result = train_map(
            model, session.train, session.validation, session.encoder, map_schedule(config, seed),
            session.accelerator, progress=config.progress,
        )  # fmt: skip
        members.append(_snapshot(model, include_head=True))
        seconds.append(result.seconds)
    with torch.no_grad():
        for name, param in model.posterior_parameters(include_head=True).items():
            param.copy_(first[name])
    stacked = {name: torch.stack([m[name] for m in members]) for name in first}
    info = {
        "members": len(members),
        "loaded": list(config.member_bundles or []),
        "member_training_seconds": [round(v, 1) for v in seconds],
    }
    return EnsemblePosterior(stacked), info


def reinitialise(model: LoraXSClassifier, seed: int) -> None:
    """Fresh cores (``N(0, 1e-5²)``, as at injection) and a fresh trainable head, from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.lora_layers.values():
            weight = layer.core.weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * CORE_INIT_STD)
        if model.train_head:  # a multiple-choice head is the LM's, shared by every member
            torch.manual_seed(seed)
            model.head.reset_parameters()


def _member_from_bundle(session: Session, path: Path) -> tuple[dict[str, Tensor], float]:
    """A trained member's cores and head from its bundle, after checking it saw the same data and base."""
    try:
        bundle = load_bundle(path)
    except (CaveatError, OSError) as exc:
        raise ConfigError(f"--member-bundles {path}: {exc}") from exc
    manifest = bundle.manifest
    card = manifest.eval.get("data", {})
    if manifest.base_model.fingerprint != session.fingerprint or manifest.adapter.modules != session.names:
        raise ConfigError(f"--member-bundles {path}: adapts another base model or other modules")
    if card.get("sha256", {}) != data_card(session)["sha256"]:
        raise ConfigError(f"--member-bundles {path}: trained on other data splits (give it the same --data-seed)")
    if manifest.adapter.rank != session.config.rank:
        raise ConfigError(f"--member-bundles {path}: rank {manifest.adapter.rank}, not {session.config.rank}")
    device = next(session.model.parameters()).device
    member = {name: core.to(device) for name, core in bundle.cores.items()}
    member[HEAD_WEIGHT], member[HEAD_BIAS] = bundle.head_weight.to(device), bundle.head_bias.to(device)
    seconds = manifest.eval.get("training", {}).get("stage_seconds", {}).get("map_training", 0.0)
    return member, float(seconds)


def _grid_prior(session: Session, fit, fitted: Fitted) -> tuple[Posterior, dict[str, Any]]:
    """δ by validation NLL of the predictive: decades around the marglik value, then half decades.

    With the GLM predictive every point reuses one linearisation of the whole validation split; with
    network sampling each point is a sampled pass over a validation subset.
    """
    config = session.config
    if isinstance(fit.info["prior_precision"], list):
        raise ConfigError("--prior grid needs a scalar prior (--prior-structure scalar)")
    glm = config.predictive == "glm"
    examples = session.validation if glm else subset(session.validation, GRID_VALIDATION, config.seed)
    labels = labels_of(examples)
    marglik = fit.info["prior_precision"]
    scores: dict[float, float] = {}

    def score(decade: float) -> None:
        delta = marglik * 10**decade
        if glm:
            linearised = session.linearisation("validation", examples)
            outputs = linearised.outputs(fit.at(delta), fitted.num_samples, config.seed)
        else:
            outputs = predict(  # the same seed at every δ: common random numbers make the comparison fair
                session.model, examples, session.encoder, posterior=fit.at(delta),
                num_samples=min(fitted.num_samples, GRID_SAMPLES), seed=config.seed, batch_size=config.batch_size,
                desc=f"prior grid δ={delta:.3g}", progress=config.progress,
            )  # fmt: skip
        scores[decade] = nll(outputs.predictive().probs, labels)

    for decade in GRID_DECADES:
        score(decade)
    coarse = min(scores, key=scores.get)
    for decade in (coarse - 0.5, coarse + 0.5):
        score(decade)
    best = min(scores, key=scores.get)
    info = fit.info | {
        "prior_precision": marglik * 10**best,
        "prior_method": "validation grid",
        "marglik_prior_precision": marglik,
        "grid_validation_nll": {f"{marglik * 10**d:.6g}": round(v, 6) for d, v in sorted(scores.items())},
    }
    return fit.at(marglik * 10**best), info
