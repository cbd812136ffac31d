"""Conformal prediction sets served: equal to the bundle's calibration applied to the served probabilities, at the
bundle's level or a request's; the ``ambiguous`` rule; the V2 output; bundles without conformal calibration."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import pytest
import torch

from adapters.bundle import load_bundle
from adapters.errors import InvalidValueError, ManifestError
from adapters.manifest import MANIFEST_FILE
from adapters.predictive import AMBIGUOUS_REASON
from tests.service.bundles import make_bundle, running_app

TEXTS = ["good film", "boring plot and dull acting", "the music", "loved it, hated the ending", "plot"]


@pytest.fixture(scope="module")
def served(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("conformal")
    make_bundle(tiny_base, root / "adapters" / "lac", name="lac", seed=1, variance=0.3, conformal="lac")
    make_bundle(tiny_base, root / "adapters" / "aps", name="aps", seed=2, labels=("a", "b", "c"), conformal="aps")
    make_bundle(tiny_base, root / "adapters" / "plain", name="plain", seed=3)
    client = running_app(tiny_base, root / "adapters")
    yield client, root
    client.__exit__(None, None, None)


def served_sets(client, adapter: str, **body) -> tuple[list[str], list[dict]]:
    response = client.post("/v1/predict", json={"adapter": adapter, "inputs": TEXTS, "seed": 1, **body})
    assert response.status_code == 200, response.text
    return response.json()["labels"], response.json()["results"]


@pytest.mark.parametrize("adapter", ["lac", "aps"])
@pytest.mark.parametrize("coverage", [None, 0.5, 0.95])
def test_served_sets_are_the_calibrations_sets_of_the_served_probabilities(served, adapter, coverage) -> None:
    client, root = served
    calibration = load_bundle(root / "adapters" / adapter).conformal
    labels, results = served_sets(client, adapter, method="map", **({} if coverage is None else {"coverage": coverage}))
    probs = torch.tensor([r["probs"] for r in results], dtype=torch.float64)
    alpha = 0.1 if coverage is None else 1 - coverage
    expected = calibration.sets(probs, alpha)
    assert [r["prediction_set"] for r in results] == [[labels[i] for i in row.nonzero().flatten()] for row in expected]


def test_a_higher_coverage_never_gives_smaller_sets(served) -> None:
    client, _ = served
    for adapter in ("lac", "aps"):
        sizes = [
            [len(r["prediction_set"]) for r in served_sets(client, adapter, method="map", coverage=c)[1]]
            for c in (0.3, 0.6, 0.9, 0.99)
        ]
        assert all(a <= b for low, high in pairwise(sizes) for a, b in zip(low, high, strict=True)), sizes


def test_the_ambiguous_rule_abstains_on_sets_of_more_than_one_label(served) -> None:
    client, _ = served
    _, results = served_sets(client, "lac", method="map", coverage=0.9, abstain={"ambiguous": 1})
    for result in results:
        ambiguous = len(result["prediction_set"]) != 1
        assert result["abstain"] is ambiguous
        assert (result["abstain_reason"] or "").startswith(AMBIGUOUS_REASON) is ambiguous
    assert any(r["abstain"] for r in results) and not all(r["abstain"] for r in results), results
    _, wide = served_sets(client, "lac", method="map", coverage=0.8, abstain={"ambiguous": 2})
    assert not any(r["abstain"] for r in wide)
    metrics = client.get("/metrics").text
    assert f'caveat_abstentions_total{{adapter="lac",rule="{AMBIGUOUS_REASON}"}}' in metrics


def test_bad_coverage_requests_are_refused_naming_the_field(served) -> None:
    client, _ = served
    for coverage in (0, 1, 1.5, -0.1, "0.9"):
        response = client.post("/v1/predict", json={"adapter": "lac", "inputs": TEXTS, "coverage": coverage})
        assert response.status_code == 422 and "coverage" in response.text, (coverage, response.text)
    response = client.post("/v1/predict", json={"adapter": "plain", "inputs": TEXTS, "coverage": 0.9})
    assert response.status_code == 400 and "coverage" in response.text and "conformal" in response.text


def test_an_adapter_without_calibration_serves_null_sets_and_the_rule_never_fires(served) -> None:
    client, _ = served
    _, results = served_sets(client, "plain", abstain={"ambiguous": 1})
    assert all(r["prediction_set"] is None and not r["abstain"] for r in results)


def test_v2_returns_membership_per_label_and_takes_a_coverage(served) -> None:
    client, _ = served
    body = {
        "inputs": [{"name": "text", "shape": [3], "datatype": "BYTES", "data": TEXTS[:3]}],
        "parameters": {"method": "map", "coverage": 0.95, "seed": 1},
    }
    response = client.post("/v2/models/aps/infer", json=body)
    assert response.status_code == 200, response.text
    output = next(o for o in response.json()["outputs"] if o["name"] == "prediction_set")
    assert output["datatype"] == "BOOL" and output["shape"] == [3, 3]
    labels, results = served_sets(client, "aps", method="map", coverage=0.95)
    expected = [label in r["prediction_set"] for r in results[:3] for label in labels]
    assert output["data"] == expected
    meta = client.get("/v2/models/aps").json()
    assert {"name": "prediction_set", "datatype": "BOOL", "shape": [-1, 3]} in meta["outputs"]
    assert "prediction_set" not in [o["name"] for o in client.get("/v2/models/plain").json()["outputs"]]
    bad = client.post("/v2/models/aps/infer", json={**body, "parameters": {"coverage": 2}})
    assert bad.status_code == 400 and "coverage" in bad.text
    plain = client.post("/v2/models/plain/infer", json={**body, "outputs": [{"name": "prediction_set"}],
                                                        "parameters": {}})  # fmt: skip
    assert plain.status_code == 400 and "no conformal calibration" in plain.text


def test_a_damaged_calibration_is_refused_at_load(served, tmp_path: Path) -> None:
    _, root = served
    copy = tmp_path / "lac"
    copy.mkdir()
    for f in (root / "adapters" / "lac").iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    manifest["conformal"]["thresholds"][0] = 0.123
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(InvalidValueError, match="other thresholds"):
        load_bundle(copy)
    manifest["schema_version"] = 2
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="schema version 3"):
        load_bundle(copy)
