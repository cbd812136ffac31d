"""``sample``: posterior samples of the cores through the network, each sample a row of the batched forward."""

from __future__ import annotations

from torch import Tensor

from adapters.posteriors.base import Posterior, make_generator
from adapters.predictives.base import EvaluationSplit, Points, Predictor, Requests, TensorDict, register
from adapters.vocab import PredictiveMode


class SamplePredictor(Predictor):
    mode = PredictiveMode.SAMPLE
    description = "posterior samples through the network"
    default_draws = 16  # each sample costs a forward of the adapted layers

    def draw_many(
        self, posterior: Posterior, cores: TensorDict, requests: Requests, points: Points
    ) -> list[TensorDict]:
        """Each request's samples from its own seeded generator (the same as alone), the posterior's map applied
        once for all (``Posterior.sample_many``)."""
        return posterior.sample_many([(S, make_generator(seed, posterior.device)) for S, seed in requests])

    def split_draws(self, split: EvaluationSplit, posterior: Posterior, num_samples: int, seed: int) -> Tensor:
        return split.sampled_logits(posterior, num_samples, seed)


SAMPLE = register(SamplePredictor())
