"""The OOD score served: computed in the batched forward's base rows, equal to the trainer's score for the same
input and bundle; the ``ood`` rule and its overrides; schema-1 bundles; the V2 output and the metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from adapters import LoraXSClassifier, RowBlock, inject_lora_xs
from adapters.bundle import load_bundle
from adapters.manifest import MANIFEST_FILE, SCHEMA_VERSION
from adapters.ood.features import BaseFeatureTap, default_feature_layers
from adapters.predictive import OOD_REASON
from benchmarks.harness import synthetic_texts
from tests.service.bundles import make_bundle, running_app
from training.data import Example
from training.encoding import Encoder, model_inputs
from training.inference import base_features

TEXTS = [
    "good film",
    "the quarterly earnings of the central bank rose sharply amid inflation fears",
    "boring plot and dull acting",
    "zzz qqq xxx",
]


def trainer_scores(base_dir: Path, bundle_dir: Path, texts: list[str]) -> torch.Tensor:
    """The trainer's score of ``texts`` (training.inference.base_features on an adapted model)."""
    bundle = load_bundle(bundle_dir)
    base = AutoModel.from_pretrained(base_dir).eval()
    inject_lora_xs(base, ["query", "value"], bundle.projections, alpha=8.0)  # adapters the features must bypass
    model = LoraXSClassifier(base, num_labels=2).eval()
    encoder = Encoder(AutoTokenizer.from_pretrained(base_dir), bundle.manifest.task.max_length)
    layers = bundle.manifest.ood.layers
    features = base_features(model, [Example(t, 0) for t in texts], encoder, layers, progress=False)
    return bundle.ood.score(features)


@pytest.fixture(scope="module")
def served(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("ood")
    make_bundle(tiny_base, root / "adapters" / "alpha", name="alpha", ood_method="mahalanobis", variance=0.3)
    make_bundle(tiny_base, root / "adapters" / "beta", name="beta", seed=4, family="kron", ood_method="knn")
    make_bundle(tiny_base, root / "adapters" / "plain", name="plain", seed=2)
    client = running_app(tiny_base, root / "adapters")
    yield client, root
    client.__exit__(None, None, None)


@pytest.mark.parametrize("method", ["sample", "glm", "map"])
def test_served_ood_score_equals_the_trainers(served, tiny_base: Path, method: str) -> None:
    client, root = served
    expected = trainer_scores(tiny_base, root / "adapters" / "alpha", TEXTS)
    body = {"adapter": "alpha", "inputs": TEXTS, "method": method, "num_samples": 3, "seed": 1}
    response = client.post("/v1/predict", json=body)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    served_scores = torch.tensor([r["uncertainty"]["ood_score"] for r in results], dtype=torch.float64)
    torch.testing.assert_close(served_scores, expected, rtol=1e-5, atol=1e-5)
    bundle = load_bundle(root / "adapters" / "alpha")
    pvalues = bundle.ood.pvalue(expected).tolist()
    assert [r["uncertainty"]["ood_pvalue"] for r in results] == pytest.approx(pvalues)


def test_base_rows_of_a_batch_mixing_two_adapters_equal_the_trainers_features(tiny_base: Path, tmp_path: Path) -> None:
    """Two adapters' blocks over overlapping inputs in one batched forward (and in GLM linearisation): one base
    row per unique input, features equal to the trainer's (adapters bypassed)."""
    alpha = load_bundle(make_bundle(tiny_base, tmp_path / "a", name="a", seed=1))
    beta = load_bundle(make_bundle(tiny_base, tmp_path / "b", name="b", seed=2, targets=("query",)))
    base = AutoModel.from_pretrained(tiny_base).eval()
    inject_lora_xs(base, ["query", "key", "value", "dense"])  # host layers: batched rows only
    host = LoraXSClassifier(base, num_labels=None).eval()
    texts = synthetic_texts(5, seed=7)
    encoder = Encoder(AutoTokenizer.from_pretrained(tiny_base), 64)
    batch = model_inputs(encoder([Example(t, 0) for t in texts]))
    layers = default_feature_layers(base.config.num_hidden_layers)
    samples = alpha.posterior.sample(3, torch.Generator().manual_seed(0))
    blocks = [
        RowBlock(alpha.adapter_weights(), samples, torch.tensor([0, 1, 2])),
        RowBlock(beta.adapter_weights(), {k: v[None] for k, v in beta.cores.items()}, torch.tensor([2, 3, 4])),
    ]
    expected = base_features(host, [Example(t, 0) for t in texts], encoder, layers, progress=False)
    for token_budget in (None, 24):  # one forward, and chunks (an input in two chunks gets one base row)
        tap = BaseFeatureTap(layers, host.pooling, range(5))
        with torch.inference_mode():
            host.forward_rows(batch, blocks, token_budget=token_budget, tap=tap)
        torch.testing.assert_close(tap.select(layers, range(5)), expected, rtol=1e-5, atol=1e-5)
    glm_blocks = [
        RowBlock(alpha.adapter_weights(), {k: v[None] for k, v in alpha.cores.items()}, torch.tensor([0, 1, 2])),
        RowBlock(beta.adapter_weights(), {k: v[None] for k, v in beta.cores.items()}, torch.tensor([2, 3, 4])),
    ]
    tap = BaseFeatureTap(layers, host.pooling, range(5))
    host.forward_rows_jacobians(batch, glm_blocks, tap=tap)
    torch.testing.assert_close(tap.select(layers, range(5)), expected, rtol=1e-5, atol=1e-5)


def test_the_ood_rule_abstains_out_of_distribution_and_requests_override_it(served) -> None:
    client, _ = served
    far = "the quarterly earnings of the central bank rose sharply amid inflation fears " * 3
    body = {"adapter": "alpha", "inputs": [far], "method": "map", "abstain": {"ood": 1.0}}
    result = client.post("/v1/predict", json=body).json()["results"][0]
    assert result["abstain"] and result["abstain_reason"].startswith(OOD_REASON)
    body["abstain"] = {"ood": 0.0}  # a p-value is never below 0
    assert client.post("/v1/predict", json=body).json()["results"][0]["abstain"] is False
    body["abstain"] = {}
    assert client.post("/v1/predict", json=body).json()["results"][0]["abstain"] is False
    assert client.post("/v1/predict", json={**body, "abstain": {"ood": 1.5}}).status_code == 422
    rules = load_bundle_rules(served)
    assert "ood" in rules
    metrics = client.get("/metrics").text
    assert 'caveat_abstentions_total{adapter="alpha",rule="out_of_distribution"}' in metrics
    assert 'caveat_prediction_ood_pvalue_count{adapter="alpha"}' in metrics


def load_bundle_rules(served) -> list[str]:
    _, root = served
    return [r.kind for r in load_bundle(root / "adapters" / "alpha").manifest.calibration.abstention]


def test_adapters_without_a_score_serve_null_and_schema_1_still_loads(served, tiny_base: Path) -> None:
    client, root = served
    manifest_path = root / "adapters" / "plain" / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION and manifest["ood"] is None
    manifest["schema_version"] = 1
    manifest.pop("ood")
    old = root / "adapters" / "old"
    old.mkdir()
    for f in (root / "adapters" / "plain").iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    (old / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert load_bundle(old).ood is None
    assert client.post("/v1/adapters", json={"path": "old", "name": "old"}).status_code == 201
    body = {"adapter": "old", "inputs": TEXTS[:2], "num_samples": 2, "abstain": {"ood": 0.5}}
    response = client.post("/v1/predict", json=body)
    assert response.status_code == 200, response.text
    for result in response.json()["results"]:
        assert result["uncertainty"]["ood_score"] is None and result["uncertainty"]["ood_pvalue"] is None
        assert not result["abstain"]  # the ood rule never fires without a score
    v2 = client.post(
        "/v2/models/old/infer", json={"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}
    )
    assert v2.status_code == 200 and "ood_score" not in [o["name"] for o in v2.json()["outputs"]]


def test_v2_infer_returns_the_ood_score(served, tiny_base: Path) -> None:
    client, root = served
    body = {
        "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": TEXTS[:2]}],
        "outputs": [{"name": "ood_score"}],
        "parameters": {"method": "map"},
    }
    response = client.post("/v2/models/beta/infer", json=body)
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    expected = trainer_scores(tiny_base, root / "adapters" / "beta", TEXTS[:2])
    torch.testing.assert_close(torch.tensor(output["data"], dtype=torch.float64), expected, rtol=1e-5, atol=1e-5)
    meta = client.get("/v2/models/beta").json()
    assert "ood_score" in [o["name"] for o in meta["outputs"]]
    plain = client.post("/v2/models/plain/infer", json=body)
    assert plain.status_code == 400 and "no OOD score" in plain.text


def test_length_aware_p_values_served_equal_the_trainers(tiny_base: Path, tmp_path: Path) -> None:
    """A bundle whose OOD p-values are length-aware: the server passes each input's token count (as the trainer's
    encoder counts it) and serves the trainer's p-values; the ``ood`` rule reads them."""
    adapters = tmp_path / "adapters"
    make_bundle(tiny_base, adapters / "lengths", name="lengths", ood_method="mahalanobis", ood_length_buckets=2)
    bundle = load_bundle(adapters / "lengths")
    assert bundle.ood.length_aware and bundle.manifest.ood.params["length_buckets"] == 2
    texts = synthetic_texts(16, seed=9)  # like the validation texts: p-values away from their floor
    encoder = Encoder(AutoTokenizer.from_pretrained(tiny_base), bundle.manifest.task.max_length)
    lengths = torch.tensor(encoder.lengths([Example(t, 0) for t in texts]))
    scores = trainer_scores(tiny_base, adapters / "lengths", texts)
    expected = bundle.ood.pvalue(scores, lengths)
    other_bucket = torch.where(lengths <= bundle.ood.length_edges[0], 1000, 1)
    assert not torch.equal(expected, bundle.ood.pvalue(scores, other_bucket))  # each input's own length matters
    client = running_app(tiny_base, adapters)
    try:
        body = {"adapter": "lengths", "inputs": texts, "method": "map", "abstain": {"max_prob": None}}
        results = client.post("/v1/predict", json=body).json()["results"]
    finally:
        client.__exit__(None, None, None)
    assert [r["uncertainty"]["ood_pvalue"] for r in results] == pytest.approx(expected.tolist())
    threshold = next(r.threshold for r in bundle.manifest.calibration.abstention if r.kind == "ood")
    assert [r["abstain_reason"] == OOD_REASON for r in results] == (expected < threshold).tolist()
