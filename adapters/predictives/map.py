"""``map``: the trained cores alone, one row per input (a point prediction: no epistemic part)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from adapters.posteriors.base import Posterior
from adapters.predictives.base import EvaluationSplit, Predictor, TensorDict, register
from adapters.vocab import PredictiveMode


class MapPredictor(Predictor):
    mode = PredictiveMode.MAP
    description = "the MAP alone"
    default_draws = 1
    fixed_draws = 1
    epistemic = False

    def draw_many(
        self,
        posterior: Posterior,
        cores: TensorDict,
        requests: Sequence[tuple[int, int]],
        points: dict[Any, TensorDict],
    ) -> list[TensorDict]:
        """The MAP cores, one shared dict for every request."""
        if self.mode not in points:
            points[self.mode] = {name: core.unsqueeze(0) for name, core in cores.items()}
        return [points[self.mode]] * len(requests)

    def split_draws(self, split: EvaluationSplit, posterior: Posterior, num_samples: int, seed: int) -> Tensor:
        return split.map_logits().unsqueeze(0)


MAP = register(MapPredictor())
