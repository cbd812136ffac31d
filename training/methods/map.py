"""``--posterior map``: the trained cores alone (a point mass; no uncertainty beyond the softmax)."""

from __future__ import annotations

from adapters import MapPosterior
from adapters.vocab import PredictiveMode
from training.config import PosteriorMethod
from training.methods.base import Fitted, Method, register
from training.scopes import snapshot
from training.session import Session


class Map(Method):
    name = PosteriorMethod.MAP

    def fit(self, session: Session) -> Fitted:
        posterior = MapPosterior(snapshot(session.model.posterior_parameters()))
        return Fitted(self.name, posterior, PredictiveMode.MAP, 1)


register(Map())
