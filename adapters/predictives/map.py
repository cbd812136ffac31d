"""``map``: the trained cores alone, one row per input (a point prediction: no epistemic part)."""

from __future__ import annotations

from torch import Tensor

from adapters.posteriors.base import Posterior
from adapters.predictives.base import EvaluationSplit, Points, Predictor, Requests, TensorDict, register
from adapters.vocab import PredictiveMode


class MapPredictor(Predictor):
    mode = PredictiveMode.MAP
    description = "the MAP alone"
    default_draws = 1
    fixed_draws = 1
    epistemic = False

    def draw_many(
        self, posterior: Posterior, cores: TensorDict, requests: Requests, points: Points
    ) -> list[TensorDict]:
        """The MAP cores, one shared dict for every request."""
        return self.shared_point(points, len(requests), lambda: {name: c.unsqueeze(0) for name, c in cores.items()})

    def split_draws(self, split: EvaluationSplit, posterior: Posterior, num_samples: int, seed: int) -> Tensor:
        return split.map_logits().unsqueeze(0)


MAP = register(MapPredictor())
