"""``--posterior laplace-diag | laplace-kron | laplace-full``: a Laplace approximation around the MAP.

The curvature (GGN) is fitted on a subset of the training data and scaled to all N examples
(:mod:`training.methods.laplace_fit`). The prior precision δ maximises the marginal likelihood
(``--prior marglik``), or the validation NLL of the predictive on a grid around that value (``--prior grid``),
or, by default (``--prior marglik-checked``), is the marginal likelihood's raised on a half-decade ladder until
the predictive's validation NLL is no worse than the MAP's and its validation ECE at most ``--prior-ece-slack``
above the MAP's.
Raising δ only narrows the covariance and δ → ∞ is the MAP, so the check always ends: at the latest at
``MAP_LIMIT_DECADES``, where the posterior is the MAP to float precision.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from adapters import Posterior
from adapters.vocab import PredictiveMode
from training.config import ConfigError, PosteriorMethod, Prior
from training.data import subset
from training.encoding import make_loader
from training.inference import Outputs, labels_of, predict
from training.methods.base import Fitted, Method, draws, register
from training.methods.laplace_fit import LaplaceFit, fit_laplace
from training.metrics import ece, nll
from training.session import Session

# Validation grid for δ, in decades above the marglik value (for a sampled predictive the marglik prior is too
# weak, never too strong); the best coarse point is then refined by half decades on each side.
GRID_DECADES = (-1.0, 0.0, 1.0, 2.0, 3.0)
GRID_VALIDATION, GRID_SAMPLES = 300, 8
# marglik-checked: δ rises on a ladder of this step (decades) from the marglik value; at MAP_LIMIT_DECADES above it the
# covariance is ~1e-12 of the marglik one, so the predictive is the MAP's up to float rounding.
CHECK_STEP, MAP_LIMIT_DECADES = 0.5, 12.0
CHECKED_METHOD = "marglik, checked against the MAP on validation NLL and ECE"


class Laplace(Method):
    """One Hessian structure (``diag``, ``kron`` or ``full``) of the Laplace approximation."""

    def __init__(self, name: PosteriorMethod, structure: str) -> None:
        self.name = name
        self.structure = structure

    def fit(self, session: Session) -> Fitted:
        config = session.config
        posterior_config, laplace = config.posterior, config.posterior.laplace
        curvature_data = subset(session.train, laplace.limit, config.seed)
        loader = make_loader(curvature_data, session.encoder, config.optimisation.batch_size, shuffle=False)
        fit = fit_laplace(
            session.model,
            loader,
            self.structure,
            include_head=posterior_config.head,
            n_data=len(session.train),
            prior_structure=laplace.prior_structure,
            progress=config.progress,
        )
        mode = posterior_config.predictive
        fitted = Fitted(self.name, fit.posterior, mode, draws(config, mode), fit.info)
        if laplace.prior == Prior.GRID:
            fitted.posterior, fitted.diagnostics = _grid_prior(session, fit, fitted.num_samples)
        elif laplace.prior == Prior.CHECKED:
            fitted.posterior, fitted.diagnostics = _checked_prior(session, fit, fitted.num_samples)
        session.log(f"posterior {self.name}: prior precision {fitted.diagnostics['prior_precision']} ({laplace.prior})")
        return fitted


@dataclass(frozen=True)
class ValidationFit:
    """The predictive's validation NLL and ECE at one prior precision (or the MAP's)."""

    nll: float
    ece: float

    def no_worse_than(self, reference: ValidationFit, ece_slack: float) -> bool:
        """NLL no worse than ``reference``'s, and ECE at most ``ece_slack`` above it."""
        return self.nll <= reference.nll and self.ece <= reference.ece + ece_slack

    def record(self) -> dict[str, float]:
        return {"nll": round(self.nll, 6), "ece": round(self.ece, 6)}


class ValidationScore:
    """The predictive's validation NLL and ECE at a scalar prior precision δ, and the MAP's (δ → ∞).

    With the GLM predictive every δ reuses one linearisation of the whole validation split; with network
    sampling each δ is a sampled pass over a validation subset (the same seed at every δ: common random numbers
    make the comparison fair). ``scores`` keeps every δ tried.
    """

    def __init__(self, session: Session, fit: LaplaceFit, num_samples: int) -> None:
        if isinstance(fit.info["prior_precision"], list):
            raise ConfigError(f"--prior {session.config.posterior.laplace.prior} needs --prior-structure scalar")
        config = session.config
        self.session, self.fit, self.num_samples = session, fit, num_samples
        self.glm = config.posterior.predictive == PredictiveMode.GLM
        self.examples = session.validation if self.glm else subset(session.validation, GRID_VALIDATION, config.seed)
        self.labels = labels_of(self.examples)
        self.scores: dict[float, ValidationFit] = {}

    def __call__(self, delta: float) -> ValidationFit:
        config = self.session.config
        if self.glm:
            linearised = self.session.linearisation("validation", self.examples)
            outputs = linearised.outputs(self.fit.with_prior(delta), self.num_samples, config.seed)
        else:
            outputs = predict(
                self.session.model, self.examples, self.session.encoder, posterior=self.fit.with_prior(delta),
                num_samples=min(self.num_samples, GRID_SAMPLES), seed=config.seed,
                batch_size=config.optimisation.batch_size, desc=f"prior δ={delta:.3g}", progress=config.progress,
            )  # fmt: skip
        self.scores[delta] = self._fit(outputs)
        return self.scores[delta]

    def map_fit(self) -> ValidationFit:
        session = self.session
        if self.glm:
            outputs = session.map_outputs("validation", self.examples)
        else:  # the subset's own MAP logits (the cached ones are the whole split's)
            outputs = predict(
                session.model, self.examples, session.encoder, batch_size=session.config.optimisation.batch_size,
                desc="prior check (MAP)", progress=session.config.progress,
            )  # fmt: skip
        return self._fit(outputs)

    def _fit(self, outputs: Outputs) -> ValidationFit:
        probs = outputs.distribution().probs
        return ValidationFit(nll(probs, self.labels), ece(probs, self.labels))

    def record(self) -> dict[str, dict[str, float]]:
        return {f"{delta:.6g}": value.record() for delta, value in sorted(self.scores.items())}


def _grid_prior(session: Session, fit: LaplaceFit, num_samples: int) -> tuple[Posterior, dict[str, Any]]:
    """δ by validation NLL of the predictive: decades around the marglik value, then half decades."""
    score = ValidationScore(session, fit, num_samples)
    marglik = fit.info["prior_precision"]
    by_decade = {decade: score(marglik * 10**decade).nll for decade in GRID_DECADES}
    coarse = min(by_decade, key=by_decade.get)
    for decade in (coarse - 0.5, coarse + 0.5):
        by_decade[decade] = score(marglik * 10**decade).nll
    best = marglik * 10 ** min(by_decade, key=by_decade.get)
    info = fit.info | {
        "prior_precision": best,
        "prior_method": "validation grid",
        "marglik_prior_precision": marglik,
        "grid_validation": score.record(),
    }
    return fit.with_prior(best), info


def _checked_prior(session: Session, fit: LaplaceFit, num_samples: int) -> tuple[Posterior, dict[str, Any]]:
    """``--prior marglik-checked``: :func:`check_prior` on the predictive's validation NLL and ECE."""
    score = ValidationScore(session, fit, num_samples)
    marglik, map_fit = fit.info["prior_precision"], score.map_fit()
    ece_slack = session.config.posterior.laplace.ece_slack
    delta, choice = check_prior(score, marglik, map_fit, ece_slack)
    info = fit.info | {
        "prior_precision": delta,
        "prior_method": CHECKED_METHOD,
        "prior_choice": choice,
        "marglik_prior_precision": marglik,
        "ece_slack": ece_slack,
        "map_validation": map_fit.record(),
        "checked_validation": score.record(),
    }
    return fit.with_prior(delta), info


def check_prior(
    score_at: Callable[[float], ValidationFit], marglik: float, map_fit: ValidationFit, ece_slack: float
) -> tuple[float, str]:
    """The marglik δ if its validation NLL is no worse than the MAP's and its ECE at most ``ece_slack`` above
    the MAP's; else the widest posterior on the half-decade ladder above it that is: the first rung that passes
    with the rung below it failing (width is what helps under shift). The ladder is searched in doubling steps
    (½, 1, 2, 4, 8 decades, up to ``MAP_LIMIT_DECADES``, where the posterior is the MAP to float precision) and
    then by bisection, so a check that must climb far costs ~10 validation scores instead of up to 25; with a
    validation score that improves steadily towards the MAP it picks the rung a climb one step at a time would.
    Returns δ and why it won."""
    scores: dict[float, ValidationFit] = {}

    def passes(rung: int) -> bool:
        scores[rung * CHECK_STEP] = score_at(marglik * 10 ** (rung * CHECK_STEP))
        return scores[rung * CHECK_STEP].no_worse_than(map_fit, ece_slack)

    top = round(MAP_LIMIT_DECADES / CHECK_STEP)
    if passes(0):
        return (
            marglik,
            f"marglik {marglik:.4g} kept: validation {_describe(scores[0.0])}, the MAP's {_describe(map_fit)}",
        )
    failing, rung = 0, 1
    while not passes(rung):
        if rung == top:  # float rounding at the MAP limit: the covariance is ~1e-12 of the marglik one
            delta = marglik * 10**MAP_LIMIT_DECADES
            return (
                delta,
                f"{delta:.4g}, the MAP limit: validation {_describe(scores[MAP_LIMIT_DECADES])}, the MAP's "
                f"{_describe(map_fit)}",
            )
        failing, rung = rung, min(2 * rung, top)
    while rung - failing > 1:  # bisect: the lowest passing rung above the highest failing one
        middle = (failing + rung) // 2
        failing, rung = (failing, middle) if passes(middle) else (middle, rung)
    decade = rung * CHECK_STEP
    delta = marglik * 10**decade
    wanted = "NLL" if ece_slack >= 1 else f"NLL or ECE (+{ece_slack:g})"
    return delta, (
        f"{delta:.4g} = marglik {marglik:.4g} × 10^{decade:g}: the marglik posterior's validation "
        f"{_describe(scores[0.0])} is worse than the MAP's {_describe(map_fit)} in {wanted}; {delta:.4g} is the "
        f"widest δ tried that is not ({_describe(scores[decade])})"
    )


def _describe(value: ValidationFit) -> str:
    return f"NLL {value.nll:.4f}, ECE {value.ece:.4f}"


for _name, _structure in (
    (PosteriorMethod.LAPLACE_DIAG, "diag"),
    (PosteriorMethod.LAPLACE_KRON, "kron"),
    (PosteriorMethod.LAPLACE_FULL, "full"),
):
    register(Laplace(_name, _structure))
