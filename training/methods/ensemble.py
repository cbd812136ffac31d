"""``--posterior ensemble``: a deep ensemble (Lakshminarayanan et al., 2017) of independently seeded MAPs.

M members: the session's MAP, members loaded from ``--member-bundles``, and the rest trained here with seeds
``seed+1, seed+2, ...`` (same data, new initialisation and shuffling). Every member brings its own head, so
the ensemble covers the head; its predictive uses each member once.
"""

from __future__ import annotations

from pathlib import Path

import torch

from adapters import EnsemblePosterior
from adapters.vocab import PredictiveMode
from training.config import ENSEMBLE_PROJECTIONS, ConfigError, PosteriorMethod
from training.methods.base import Fitted, Method, register
from training.scopes import restored, snapshot
from training.session import Session, bundle_parameters, fit_map, reinitialise


class Ensemble(Method):
    name = PosteriorMethod.ENSEMBLE

    def fit(self, session: Session) -> Fitted:
        """The model is left holding the first member (the session's MAP)."""
        config, model = session.config, session.model
        settings = config.posterior.ensemble
        if config.optimisation.train_projections:
            raise ConfigError(ENSEMBLE_PROJECTIONS)
        seconds = [session.map_result.seconds if session.map_result else 0.0]
        with restored(model.posterior_parameters(include_head=True)) as first:
            members = [first]
            for path in settings.member_bundles or []:
                member, member_seconds = bundle_parameters(session, Path(path), "--member-bundles")
                members.append(member)
                seconds.append(member_seconds)
            seed = config.seed
            while len(members) < settings.members:
                seed += 1
                session.log(f"ensemble member {len(members) + 1}/{settings.members} (seed {seed})")
                reinitialise(model, seed)
                seconds.append(fit_map(session, seed=seed, record=False).seconds)
                members.append(snapshot(model.posterior_parameters(include_head=True)))
        stacked = {name: torch.stack([m[name] for m in members]) for name in first}
        diagnostics = {
            "members": len(members),
            "loaded": list(settings.member_bundles or []),
            "member_training_seconds": [round(v, 1) for v in seconds],
        }
        posterior = EnsemblePosterior(stacked)
        fitted = Fitted(self.name, posterior, PredictiveMode.SAMPLE, posterior.num_members, diagnostics)
        fitted.train_seconds = sum(diagnostics["member_training_seconds"])
        return fitted


register(Ensemble())
