"""The method contract: every posterior method turns the trained MAP of a :class:`~training.session.Session`
into a :class:`Fitted` posterior, and registers itself under its ``--posterior`` name.

Adding a method is one module in this package (it registers with :func:`register` when the package is
imported) plus its section in :class:`training.config.PosteriorConfig`; docs/design.md walks through one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from adapters import Posterior
from adapters.predictives import Predictor, get_predictor
from adapters.vocab import PredictiveMode
from training.config import ConfigError, PosteriorMethod, TrainConfig
from training.objectives import Objective
from training.scopes import Timer
from training.session import Session


@dataclass
class Fitted:
    """A posterior and how its predictive is computed.

    Attributes:
        method: the ``--posterior`` value that produced it.
        posterior: the distribution over the cores (and the head, when it covers it).
        mode: ``glm`` (linearised, Gaussians only), ``sample`` (network samples) or ``map``.
        num_samples: draws of the predictive (logit draws for ``glm``).
        diagnostics: what the fit records in the bundle (prior precision, schedule, diagnostics).
        seconds: wall time of the fit, training beyond the MAP included.
        train_seconds: MAP training this posterior needed when it is not the session's one MAP (the sum over
            an ensemble's members); ``None`` otherwise.
    """

    method: str
    posterior: Posterior
    mode: PredictiveMode
    num_samples: int
    diagnostics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    train_seconds: float | None = None

    @property
    def predictor(self) -> Predictor:
        return get_predictor(self.mode)


class Method(Protocol):
    """A posterior method. ``fit`` starts from the MAP in ``session.model`` and leaves it there."""

    name: ClassVar[PosteriorMethod]

    def fit(self, session: Session) -> Fitted:
        """The posterior around (or from) the session's trained MAP."""
        ...

    def map_objective(self, config: TrainConfig) -> Objective | None:
        """The MAP training loss this method needs, if not plain cross-entropy (MC dropout trains with it)."""
        return None


REGISTRY: dict[PosteriorMethod, Method] = {}


def register(method: Method) -> Method:
    """Make ``method`` available as ``--posterior <method.name>``."""
    if method.name in REGISTRY:
        raise RuntimeError(f"two methods registered as {method.name!r}")
    REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in REGISTRY:
        raise ConfigError(f"unknown --posterior {name!r}; choose one of {[str(m) for m in REGISTRY]}")
    return REGISTRY[name]


def fit(session: Session, name: str) -> Fitted:
    """Fit the posterior of method ``name`` on the session's trained model, timed."""
    with Timer() as timer:
        fitted = get_method(name).fit(session)
    fitted.seconds = timer.seconds
    if name != PosteriorMethod.MAP:
        session.log(f"posterior {name}: {fitted.posterior} in {fitted.seconds:.0f} s")
    return fitted


def draws(config: TrainConfig, mode: PredictiveMode) -> int:
    """``--num-samples``, or the shared default of the predictive."""
    return config.posterior.num_samples or get_predictor(mode).default_draws


def sampled(name: PosteriorMethod, config: TrainConfig, posterior: Posterior, diagnostics: dict[str, Any]) -> Fitted:
    """A posterior evaluated with network samples (``--num-samples`` of them, 16 by default)."""
    return Fitted(name, posterior, PredictiveMode.SAMPLE, draws(config, PredictiveMode.SAMPLE), diagnostics)
