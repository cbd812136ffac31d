"""``glm``: the network linearised at the posterior mean; Gaussian logits ``N(f̂, J Σ Jᵀ)`` drawn in logit space.

One network row per input, whatever the draws: the forward also returns each input's Jacobian w.r.t. the cores
(one backward pass per class), and the draws cost no network pass (docs/methods.md, the GLM predictive).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from adapters.model import LoraXSClassifier
from adapters.posteriors.base import Posterior, make_generator
from adapters.predictive import glm_logit_draws, glm_logits_from_noise
from adapters.predictives.base import (
    Draws,
    EvaluationSplit,
    Points,
    Predictor,
    Requests,
    RowOutput,
    TensorDict,
    register,
)
from adapters.vocab import PredictiveMode


class GlmPredictor(Predictor):
    mode = PredictiveMode.GLM
    description = "the linearised network (Gaussian logits, sampled in logit space)"
    default_draws = 256  # in logit space: many are cheap
    logit_space = True
    forward_kind = "jacobians"

    def unavailable(self, posterior: Posterior) -> str | None:
        if not posterior.gaussian:
            return f"a {posterior.family} posterior has no GLM predictive"
        return None

    def passes(self, num_classes: int) -> int:
        """The forward and one backward pass per class for the Jacobian."""
        return 1 + num_classes

    def draw_many(
        self, posterior: Posterior, cores: TensorDict, requests: Requests, points: Points
    ) -> list[TensorDict]:
        """The linearisation point, one shared dict: the posterior mean (the MAP for Laplace, the SWA or
        variational mean otherwise)."""
        return self.shared_point(
            points, len(requests), lambda: {name: value.unsqueeze(0) for name, value in posterior.mean().items()}
        )

    def forward(self, model: LoraXSClassifier, batch: TensorDict, blocks: Sequence, **options: Any) -> list[RowOutput]:
        """Logits ``(1, n, C)`` and Jacobians ``(n, C, *shape)`` of each block (needs autograd: not under inference
        mode)."""
        return [(out.unsqueeze(0), jac) for out, jac in model.forward_rows_jacobians(batch, blocks, **options)]

    def summary_key(self, posterior: Posterior) -> tuple:
        return (*super().summary_key(posterior), id(posterior))  # one J Σ Jᵀ needs one posterior

    def logit_draws(
        self, logits: list[Tensor], jacobians: list[TensorDict | None], posterior: Posterior, draws: Sequence[Draws]
    ) -> Tensor:
        """``J Σ Jᵀ`` of all the requests' inputs at once, each request's draws from its own seeded generator
        (the draws it gets alone)."""
        jacobian = {k: torch.cat([part[k] for part in jacobians]) for k in jacobians[0]}
        covariance = posterior.jacobian_covariance(
            {k: v.to(device=posterior.device, dtype=posterior.dtype) for k, v in jacobian.items()}
        )
        device, points = covariance.device, [out[0] for out in logits]
        noise = torch.cat([
            torch.randn(d.num_samples, *out.shape, generator=make_generator(d.seed, device), device=device,
                        dtype=torch.float64)
            for d, out in zip(draws, points, strict=True)
        ], dim=1)  # fmt: skip
        return glm_logits_from_noise(torch.cat(points).to(device), covariance, noise)

    def split_draws(self, split: EvaluationSplit, posterior: Posterior, num_samples: int, seed: int) -> Tensor:
        logits, jacobians = split.linearisation()
        return linearised_draws(logits, jacobians, posterior, num_samples, seed)


def linearised_draws(
    logits: Tensor, jacobians: TensorDict, posterior: Posterior, num_samples: int, seed: int, chunk: int = 256
) -> Tensor:
    """GLM logit draws ``(S, N, C)`` (float32) of a linearised split under ``posterior``, in float64 on the CPU,
    ``chunk`` inputs at a time from one generator.

    Args:
        logits: ``(N, C)`` at the linearisation point.
        jacobians: block → ``(N, C, *shape)``.
    """
    generator, posterior = make_generator(seed), posterior.to("cpu", torch.float64)
    draws = []
    for start in range(0, logits.shape[0], chunk):
        part = {name: t[start : start + chunk].double() for name, t in jacobians.items()}
        covariance = posterior.jacobian_covariance(part)
        draws.append(glm_logit_draws(logits[start : start + chunk], covariance, num_samples, generator))
    return torch.cat(draws, dim=1).float()


GLM = register(GlmPredictor())
