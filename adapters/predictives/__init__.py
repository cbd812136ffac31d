"""Predictive modes: how a prediction is computed from a bundle, one module each (``base.py`` has the contract).

=========  =================================  ==============================================================
mode       :class:`Predictor`                 draws
=========  =================================  ==============================================================
``sample`` :class:`~.sample.SamplePredictor`  posterior samples of the cores through the network
``glm``    :class:`~.glm.GlmPredictor`        Gaussian logits of the network linearised at the posterior mean
``map``    :class:`~.map.MapPredictor`        the MAP cores alone
=========  =================================  ==============================================================

:func:`predictor_for` is the one place that decides which mode a request gets. Each module of this package is
imported with it and registers its mode, so a new mode is a new module (and its name in ``adapters.vocab``).
"""

from __future__ import annotations

import importlib
import pkgutil

from adapters.posteriors.base import Posterior
from adapters.predictives.base import PREDICTORS, Draws, EvaluationSplit, Predictor, RowOutput, register
from adapters.predictives.glm import GLM, linearised_draws
from adapters.predictives.map import MAP
from adapters.predictives.sample import SAMPLE
from adapters.vocab import PosteriorFamily, PredictiveMode

for _module in pkgutil.iter_modules(__path__):  # every module of the package registers its mode on import
    importlib.import_module(f"{__name__}.{_module.name}")


class PredictorUnavailableError(ValueError):
    """The asked mode cannot predict with the bundle's posterior (the message says why)."""


def get_predictor(mode: str) -> Predictor:
    """The registered mode named ``mode``; ``ValueError`` naming the choices otherwise."""
    try:
        return PREDICTORS[PredictiveMode(mode)]
    except ValueError:
        raise ValueError(f"method must be one of {[str(m) for m in PREDICTORS]}, not {mode!r}") from None


def forward_kinds() -> list[str]:
    """The forward kinds of the registered modes, in the order a step runs them: that of
    :class:`~adapters.vocab.PredictiveMode` (the first forward of a step carries its OOD base rows)."""
    return list(dict.fromkeys(PREDICTORS[mode].forward_kind for mode in PredictiveMode if mode in PREDICTORS))


def predictor_for(mode: str | None, posterior: Posterior, recorded: str) -> Predictor:
    """The mode a prediction with ``posterior`` runs: ``mode`` when asked, else the one the bundle ``recorded``
    (evaluated and calibrated with). A MAP posterior has nothing to sample: it always predicts with the MAP.

    Raises:
        ValueError: ``mode`` is no mode's name.
        PredictorUnavailableError: the asked mode cannot use this posterior (e.g. GLM of an ensemble).
    """
    predictor = get_predictor(recorded if mode is None else mode)
    if posterior.family == PosteriorFamily.MAP:
        return MAP
    reason = predictor.unavailable(posterior)
    if reason is not None:
        raise PredictorUnavailableError(reason)
    return predictor


__all__ = [
    "GLM",
    "MAP",
    "PREDICTORS",
    "SAMPLE",
    "Draws",
    "EvaluationSplit",
    "Predictor",
    "PredictorUnavailableError",
    "RowOutput",
    "forward_kinds",
    "get_predictor",
    "linearised_draws",
    "predictor_for",
    "register",
]
