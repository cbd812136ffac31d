"""The typed evaluation card reads the cards bundles already carry, and writes them back unchanged."""

from __future__ import annotations

import json
from pathlib import Path

from adapters.eval_card import EvalCard

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results"


def test_a_recorded_card_round_trips_through_the_types() -> None:
    """docs/results/main-sst2-minilm-cpu.json holds the eval card of a real bundle written before the types."""
    recorded = json.loads((RESULTS / "main-sst2-minilm-cpu.json").read_text())["eval"]
    card = EvalCard.model_validate(recorded)
    assert card.test is not None and card.test.posterior["nll"] == recorded["test"]["posterior"]["nll"]
    assert card.ood is not None and card.ood.dataset == recorded["ood"]["dataset"]
    assert card.model_dump(mode="json") == recorded


def test_an_empty_card_loads_and_stays_empty() -> None:
    assert EvalCard.model_validate({}).model_dump(mode="json") == {}
