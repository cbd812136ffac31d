"""``--posterior laplace-diag | laplace-kron | laplace-full``: a Laplace approximation around the MAP.

The curvature (GGN) is fitted on a subset of the training data and scaled to all N examples
(:mod:`training.laplace_fit`); the prior precision δ maximises the marginal likelihood (``--prior marglik``)
or the validation NLL of the predictive on a grid around that value (``--prior grid``).
"""

from __future__ import annotations

from typing import Any

from adapters import Posterior
from adapters.defaults import PredictiveMode
from training.config import ConfigError, PosteriorMethod, Prior
from training.data import subset
from training.encoding import make_loader
from training.inference import labels_of, predict
from training.laplace_fit import LaplaceFit, fit_laplace
from training.methods.base import Fitted, Method, draws, register
from training.metrics import nll
from training.session import Session

# Validation grid for δ, in decades above the marglik value (for a sampled predictive the marglik prior is too
# weak, never too strong); the best coarse point is then refined by half decades on each side.
GRID_DECADES = (-1.0, 0.0, 1.0, 2.0, 3.0)
GRID_VALIDATION, GRID_SAMPLES = 300, 8


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
        session.log(f"posterior {self.name}: prior precision {fitted.diagnostics['prior_precision']} ({laplace.prior})")
        return fitted


def _grid_prior(session: Session, fit: LaplaceFit, num_samples: int) -> tuple[Posterior, dict[str, Any]]:
    """δ by validation NLL of the predictive: decades around the marglik value, then half decades.

    With the GLM predictive every point reuses one linearisation of the whole validation split; with
    network sampling each point is a sampled pass over a validation subset.
    """
    config = session.config
    if isinstance(fit.info["prior_precision"], list):
        raise ConfigError("--prior grid needs a scalar prior (--prior-structure scalar)")
    glm = config.posterior.predictive == PredictiveMode.GLM
    examples = session.validation if glm else subset(session.validation, GRID_VALIDATION, config.seed)
    labels = labels_of(examples)
    marglik = fit.info["prior_precision"]
    scores: dict[float, float] = {}

    def score(decade: float) -> None:
        delta = marglik * 10**decade
        if glm:
            linearised = session.linearisation("validation", examples)
            outputs = linearised.outputs(fit.with_prior(delta), num_samples, config.seed)
        else:
            outputs = predict(  # the same seed at every δ: common random numbers make the comparison fair
                session.model, examples, session.encoder, posterior=fit.with_prior(delta),
                num_samples=min(num_samples, GRID_SAMPLES), seed=config.seed,
                batch_size=config.optimisation.batch_size, desc=f"prior grid δ={delta:.3g}", progress=config.progress,
            )  # fmt: skip
        scores[decade] = nll(outputs.distribution().probs, labels)

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
    return fit.with_prior(marglik * 10**best), info


for _name, _structure in (
    (PosteriorMethod.LAPLACE_DIAG, "diag"),
    (PosteriorMethod.LAPLACE_KRON, "kron"),
    (PosteriorMethod.LAPLACE_FULL, "full"),
):
    register(Laplace(_name, _structure))
