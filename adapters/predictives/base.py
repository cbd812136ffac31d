"""The contract of a predictive mode: how a prediction is computed from a bundle, by the server and the trainer.

A predictive mode decides four things, and nothing outside its module branches on which mode it is:

* **rows**: how many network rows a request of ``n`` inputs and ``S`` draws costs (:meth:`Predictor.network_samples`,
  :meth:`Predictor.passes` for the admission cost);
* **draws**: the cores each request's rows run with (:meth:`Predictor.draw_many`: posterior samples, or one
  shared point);
* **forward**: the batched-rows forward that runs them (:meth:`Predictor.forward`; modes with the same
  :attr:`Predictor.forward_kind` share one forward per step);
* **logit draws**: the ``(S, N, C)`` logits the predictive summarises (:meth:`Predictor.logit_draws` for served
  requests, :meth:`Predictor.split_draws` for the trainer's evaluation splits).

The summary itself (probabilities averaged over draws, entropy, its split, abstention) is the same for every
mode: :func:`adapters.predictive.predictive`. A new mode is one module with a subclass of :class:`Predictor` and
its :func:`register` call, plus its name in :class:`adapters.vocab.PredictiveMode`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from adapters.model import LoraXSClassifier
from adapters.posteriors.base import Posterior
from adapters.vocab import PredictiveMode

TensorDict = dict[str, Tensor]
Requests = Sequence[tuple[int, int]]  # per request: its draws S and its seed
Points = dict[Any, TensorDict]  # one bundle's shared points, by mode
RowOutput = tuple[Tensor, TensorDict | None]  # a block's logits (S_rows, n, C) and, when linearised, its Jacobians


class Draws(Protocol):
    """One request's share of a summary: its draws ``num_samples`` and the ``seed`` of its noise."""

    num_samples: int
    seed: int


class EvaluationSplit(Protocol):
    """One evaluation split as a predictive reads it (the trainer computes these once and caches them)."""

    def map_logits(self) -> Tensor:
        """``(N, C)`` logits at the MAP."""
        ...

    def linearisation(self) -> tuple[Tensor, TensorDict]:
        """``(N, C)`` logits at the MAP and the Jacobians ``(N, C, *block shape)`` w.r.t. the posterior's blocks."""
        ...

    def sampled_logits(self, posterior: Posterior, num_samples: int, seed: int) -> Tensor:
        """``(S, N, C)`` logits under ``S`` posterior samples of the cores, drawn with ``seed``."""
        ...


class Predictor(ABC):
    """A predictive mode. Stateless: one registered instance serves every bundle.

    Attributes:
        mode: its name (a request's ``method``, ``posterior.predictive`` in ``bundle.json``).
        description: what it does, for the API's documentation.
        default_draws: draws per prediction when neither the request nor the bundle says.
        fixed_draws: the only number of draws it takes, when it takes one (the MAP: 1).
        logit_space: its draws are drawn in logit space (no network pass each), under their own request limit.
        epistemic: its draws differ, so mutual information measures something (not for a point prediction).
        forward_kind: modes with the same kind share one batched forward in a step (so they must share
            :meth:`forward`).
    """

    mode: ClassVar[PredictiveMode]
    description: ClassVar[str]
    default_draws: ClassVar[int]
    fixed_draws: ClassVar[int | None] = None
    logit_space: ClassVar[bool] = False
    epistemic: ClassVar[bool] = True
    forward_kind: ClassVar[str] = "rows"

    def unavailable(self, posterior: Posterior) -> str | None:
        """Why this mode cannot predict with ``posterior`` (``None``: it can)."""
        return None

    # --------------------------------------------------------------------------------------------- rows

    def network_samples(self, num_samples: int) -> int:
        """Network rows per input for ``num_samples`` draws."""
        return 1 if self.logit_space else num_samples

    def passes(self, num_classes: int) -> int:
        """Network passes each row costs (forward, and backward passes where the mode needs them)."""
        return 1

    # -------------------------------------------------------------------------------------------- draws

    @abstractmethod
    def draw_many(
        self, posterior: Posterior, cores: TensorDict, requests: Requests, points: Points
    ) -> list[TensorDict]:
        """The cores each request ``(S, seed)`` runs with: block → ``(S_rows, *shape)`` on the posterior's device.

        Args:
            cores: the bundle's MAP cores.
            points: a cache for one bundle's shared points (the same dict object for every request lets a row
                plan gather it once).
        """

    def shared_point(self, points: Points, count: int, make: Callable[[], TensorDict]) -> list[TensorDict]:
        """One point for ``count`` requests, made once per bundle (``make``) and kept in ``points``: the same
        dict object for every request lets a row plan gather it once."""
        if self.mode not in points:
            points[self.mode] = make()
        return [points[self.mode]] * count

    # ------------------------------------------------------------------------------------------ forward

    @torch.inference_mode()
    def forward(self, model: LoraXSClassifier, batch: TensorDict, blocks: Sequence, **options: Any) -> list[RowOutput]:
        """The batched-rows forward of ``blocks`` (``options``: token budget, padding split, feature tap), under
        inference mode."""
        return [(logits, None) for logits in model.forward_rows(batch, blocks, **options)]

    # ------------------------------------------------------------------------------------- logit draws

    def summary_key(self, posterior: Posterior) -> tuple:
        """Requests with equal keys (and equal draws, classes and temperature) are summarised together."""
        return (type(self).logit_draws,)

    def logit_draws(
        self, logits: list[Tensor], jacobians: list[TensorDict | None], posterior: Posterior, draws: Sequence[Draws]
    ) -> Tensor:
        """``(S, N, C)`` logits of several requests' inputs (in order) from their network rows.

        Args:
            logits: per request ``(S_rows, n_k, C)``, choices already masked.
            jacobians: per request, its inputs' Jacobians (``None`` where the forward gives none).
            draws: per request, its draws and seed.
        """
        return torch.cat(logits, dim=-2)

    @abstractmethod
    def split_draws(self, split: EvaluationSplit, posterior: Posterior, num_samples: int, seed: int) -> Tensor:
        """``(S, N, C)`` logits of an evaluation split, computed as the server computes them."""


PREDICTORS: dict[PredictiveMode, Predictor] = {}


def register(predictor: Predictor) -> Predictor:
    """Make a mode available to the trainer and the server (its module calls this on import)."""
    PREDICTORS[predictor.mode] = predictor
    return predictor
