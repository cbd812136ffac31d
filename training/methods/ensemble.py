"""``--posterior ensemble``: a deep ensemble (Lakshminarayanan et al., 2017) of independently seeded MAPs.

M members: the session's MAP, members loaded from ``--member-bundles``, and the rest trained here with seeds
``seed+1, seed+2, ...`` (same data, new initialisation and shuffling). Every member brings its own head, so
the ensemble covers the head; its predictive uses each member once.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from adapters import EnsemblePosterior, load_bundle
from adapters.defaults import PredictiveMode
from adapters.errors import CaveatError
from adapters.heads import HEAD_BIAS, HEAD_WEIGHT
from training.config import ENSEMBLE_PROJECTIONS, ConfigError, PosteriorMethod
from training.methods.base import Fitted, Method, register
from training.scopes import restored, snapshot
from training.session import Session, data_card, fit_map, reinitialise


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
                member, member_seconds = _member_from_bundle(session, Path(path))
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


def _member_from_bundle(session: Session, path: Path) -> tuple[dict[str, Tensor], float]:
    """A trained member's cores and head from its bundle, after checking it saw the same data and base."""
    try:
        bundle = load_bundle(path)
    except (CaveatError, OSError) as exc:
        raise ConfigError(f"--member-bundles {path}: {exc}") from exc
    manifest, rank = bundle.manifest, session.config.adapter.rank
    if manifest.base_model.fingerprint != session.fingerprint or manifest.adapter.modules != session.names:
        raise ConfigError(f"--member-bundles {path}: adapts another base model or other modules")
    if manifest.eval.data is None or manifest.eval.data.sha256 != data_card(session).sha256:
        raise ConfigError(f"--member-bundles {path}: trained on other data splits (give it the same --data-seed)")
    if manifest.adapter.rank != rank:
        raise ConfigError(f"--member-bundles {path}: rank {manifest.adapter.rank}, not {rank}")
    device = next(session.model.parameters()).device
    member = {name: core.to(device) for name, core in bundle.cores.items()}
    member[HEAD_WEIGHT], member[HEAD_BIAS] = bundle.head_weight.to(device), bundle.head_bias.to(device)
    training = manifest.eval.training
    seconds = training.stage_seconds.get("map_training", 0.0) if training else 0.0
    return member, float(seconds)


register(Ensemble())
