"""``--posterior mc-dropout``: MC dropout on the adapter input (Gal & Ghahramani's dropout-as-Bayes, applied
to the rank directions of each layer's ``A x``). The MAP is trained with the same dropout, and the posterior
is the trained cores plus the rate: each draw is a fresh mask."""

from __future__ import annotations

from adapters import DropoutPosterior
from training.config import PosteriorMethod, TrainConfig
from training.methods.base import Fitted, Method, register, sampled
from training.objectives import AdapterDropout, Objective
from training.scopes import snapshot
from training.session import Session


class McDropout(Method):
    name = PosteriorMethod.MC_DROPOUT

    def fit(self, session: Session) -> Fitted:
        rate = session.config.posterior.mc_dropout.rate
        posterior = DropoutPosterior(snapshot(session.model.posterior_parameters()), rate)
        return sampled(self.name, session.config, posterior, {"rate": rate})

    def map_objective(self, config: TrainConfig) -> Objective:
        return AdapterDropout(config.posterior.mc_dropout.rate)


register(McDropout())
