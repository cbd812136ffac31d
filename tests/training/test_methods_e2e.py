"""Every posterior method end to end: ``caveat-train compare`` on a small slice of the embedded default,
SWAG / ensemble / MC-dropout / VI bundles served by the real server app, and L-LoRA-S and Bayesian-LoRA
bundles of the embedded MiniLM served with the trainer's predictive."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from adapters import LoraXSClassifier, inject_lora_xs, load_bundle
from adapters.heads import HEAD_BIAS, HEAD_WEIGHT
from tests.service.bundles import running_app
from training.cli import main, parse_config
from training.data import Example
from training.inference import predict
from training.pipeline import train

SLICE = [
    "--train-limit",
    "120",
    "--eval-limit",
    "40",
    "--validation-size",
    "120",
    "--epochs",
    "1",
    "--rank",
    "2",
    "--targets",
    "query,value",
    "--num-samples",
    "3",
    "--laplace-limit",
    "48",
    "--swag-snapshots",
    "4",
    "--swag-rank",
    "2",
    "--no-progress",
    "--calibration",
    "posterior",
]  # fmt: skip  (--calibration posterior: the posteriors' own predictives are served by default)


@pytest.mark.slow
def test_compare_every_method_on_a_small_slice(tmp_path: Path) -> None:
    out = tmp_path / "compare.json"
    methods = ["map", "temperature", "mc-dropout", "ensemble", "swag", "vi", "bayesian-lora", "laplace-kron"]
    argv = ["compare", "--posteriors", ",".join(methods), "--json", str(out), "--ood", "bbcnews", "--members", "2"]
    assert main([*argv, "--ood-limit", "30", "--max-length", "64", *SLICE]) == 0
    rows = {row["posterior"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == set(methods)
    for method, row in rows.items():
        assert 0 <= row["test"]["accuracy"] <= 1 and row["test"]["nll"] > 0, method
        # a time is reported, but timings are never asserted: a tiny slice may train in under 0.1 s
        assert row["bundle_kb"] > 0 and row["train_seconds"] >= 0, method
        # the predictive's validation metrics, what methods are tuned on, beside the reported ones
        assert row["validation"]["nll"] > 0 and 0 <= row["validation"]["ece"] <= 1, method
        if method not in ("map", "temperature"):
            assert "mutual_information" in row["ood"], method
    assert rows["map"]["temperature"] == 1.0 and rows["temperature"]["temperature"] != 1.0
    assert rows["ensemble"]["num_samples"] == 2 and rows["swag"]["predictive"] == "sample"
    assert rows["bayesian-lora"]["predictive"] == "sample" and rows["bayesian-lora"]["fit"]["kl"] > 0
    assert rows["laplace-kron"]["predictive"] == "glm"
    assert len(rows["ensemble"]["fit"]["member_training_seconds"]) == 2  # one MAP training per member


def _train(tiny_base: Path, out: Path, *flags: str) -> Path:
    assert main(["--base-model", str(tiny_base), "--out", str(out), "--max-length", "32", *SLICE, *flags]) == 0
    return out


@pytest.mark.slow
def test_new_posterior_bundles_are_served_and_an_ensemble_serves_the_mean_of_its_members(
    tiny_base: Path, tmp_path: Path
) -> None:
    adapters = tmp_path / "adapters"
    _train(tiny_base, adapters / "ens", "--posterior", "ensemble", "--members", "3")
    _train(tiny_base, adapters / "swag", "--posterior", "swag", "--posterior-head")
    _train(tiny_base, adapters / "vi", "--posterior", "vi", "--vi-rank", "2")
    _train(tiny_base, adapters / "drop", "--posterior", "mc-dropout", "--adapter-dropout", "0.3")
    families = {name: load_bundle(adapters / name).manifest.posterior for name in ("ens", "swag", "vi", "drop")}
    assert {n: p.family for n, p in families.items()} == {
        "ens": "ensemble", "swag": "lowrank_diag", "vi": "lowrank_diag", "drop": "dropout"
    }  # fmt: skip
    assert families["ens"].covers_head and families["swag"].covers_head and not families["vi"].covers_head
    assert all(p.predictive == "sample" for p in families.values())
    texts = ["a gorgeous, witty, seductive movie.", "it is a dull film"]
    client = running_app(tiny_base, adapters)
    try:
        answers = {
            name: client.post("/v1/predict", json={"adapter": name, "inputs": texts, "seed": 3})
            for name in ("ens", "swag", "vi", "drop")
        }
        glm = client.post("/v1/predict", json={"adapter": "ens", "inputs": texts, "method": "glm"})
        swag_glm = client.post("/v1/predict", json={"adapter": "swag", "inputs": texts, "method": "glm"})
    finally:
        client.__exit__(None, None, None)
    for name, answer in answers.items():
        assert answer.status_code == 200, (name, answer.text)
        assert all(r["uncertainty"]["mutual_information"] >= 0 for r in answer.json()["results"]), name
    assert glm.status_code == 400 and "glm" in glm.text.lower()  # an ensemble is not a Gaussian
    assert swag_glm.status_code == 200, swag_glm.text  # SWAG is, linearised at its mean
    assert answers["ens"].json()["num_samples"] == 3 and answers["drop"].json()["num_samples"] == 3
    # the ensemble's served predictive (S = M, its default) is the average of its members' softmaxes
    bundle = load_bundle(adapters / "ens")
    assert set(bundle.posterior.names) >= {HEAD_WEIGHT, HEAD_BIAS}
    served = torch.tensor([r["probs"] for r in answers["ens"].json()["results"]])
    torch.testing.assert_close(served, _member_probs(tiny_base, bundle, texts), atol=1e-5, rtol=1e-4)


def _member_probs(tiny_base: Path, bundle, texts: list[str]) -> torch.Tensor:
    """Each member in single mode (its cores and head in the model's own layers), one text at a time."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    base = AutoModel.from_pretrained(tiny_base).eval()
    spec = bundle.manifest.adapter
    inject_lora_xs(base, spec.target_modules, bundle.projections, alpha=spec.alpha)
    model = LoraXSClassifier(base, num_labels=2).eval()
    members = bundle.posterior.members
    num = bundle.posterior.num_members
    probs = torch.zeros(len(texts), 2)
    with torch.no_grad():
        for m in range(num):
            for name, layer in model.lora_layers.items():
                layer.core.weight.copy_(members[name][m])
            model.head.load_state_dict({"weight": members[HEAD_WEIGHT][m], "bias": members[HEAD_BIAS][m]})
            for i, text in enumerate(texts):
                batch = tokenizer([text], truncation=True, max_length=32, return_tensors="pt")
                probs[i] += model(**batch)[0].softmax(-1) / num
    return probs


@pytest.mark.slow
def test_l_lora_s_and_bayesian_lora_bundles_of_minilm_serve_the_trainers_predictive(tmp_path: Path) -> None:
    """Train on the embedded MiniLM (small slice), serve, predict: the served MAP predictive of an L-LoRA-S
    bundle and the served sampled predictive of a Bayesian-LoRA bundle equal the trainer's (same draws)."""
    adapters, seed, draws = tmp_path / "adapters", 3, 4
    runs = {
        "llora-s": ["--train-projections", "--projection-lr", "1e-3", "--posterior", "map"],
        "blora": ["--posterior", "bayesian-lora", "--blora-samples", "2", "--blora-prior-std", "0.3"],
    }
    trained = {
        name: train(parse_config(["--out", str(adapters / name), *SLICE, *flags])) for name, flags in runs.items()
    }
    texts = ["a gorgeous, witty, seductive movie.", "it is a dull film", "neither good nor bad, just long"]
    examples = [Example(text, 0) for text in texts]
    expected = {}
    for name, (_, session, fitted) in trained.items():
        posterior = None if name == "llora-s" else fitted.posterior
        outputs = predict(
            session.model, examples, session.encoder, posterior=posterior, num_samples=draws, seed=seed,
            batch_size=len(texts), progress=False,
        )  # fmt: skip
        expected[name] = outputs.logits.softmax(-1).mean(0)

    session = trained["llora-s"][1]
    bundle = load_bundle(adapters / "llora-s")
    assert bundle.manifest.adapter.projection.trained
    for module, layer in session.model.lora_layers.items():  # trained, stored, and not the family's any more
        stored, initial = bundle.projections[module], session.initial_projections[module]
        assert torch.equal(stored.A, layer.lora_A.cpu()) and torch.equal(stored.B, layer.lora_B.cpu())
        assert not torch.equal(stored.A, initial.A) and not torch.equal(stored.B, initial.B)
    assert load_bundle(adapters / "blora").manifest.posterior.family == "matrix_normal"

    client = running_app(Path("minilm"), adapters)
    try:
        served = {
            "llora-s": client.post("/v1/predict", json={"adapter": "llora-s", "inputs": texts}),
            "blora": client.post(
                "/v1/predict", json={"adapter": "blora", "inputs": texts, "seed": seed, "num_samples": draws}
            ),
        }
        glm = client.post("/v1/predict", json={"adapter": "blora", "inputs": texts, "method": "glm"})
    finally:
        client.__exit__(None, None, None)
    for name, answer in served.items():
        assert answer.status_code == 200, (name, answer.text)
        probs = torch.tensor([r["probs"] for r in answer.json()["results"]])
        torch.testing.assert_close(probs, expected[name], atol=1e-5, rtol=1e-4)
    assert served["blora"].json()["method"] == "sample"
    assert glm.status_code == 200, glm.text  # a matrix-normal posterior is Gaussian: the GLM predictive is allowed


@pytest.mark.slow
def test_trained_projections_are_shared_only_between_identical_bundles(tiny_base: Path, tmp_path: Path) -> None:
    """The server interns projections by content: two bundles with the same trained projections share one
    device copy; trained projections that differ, or the family's untrained ones, are never shared."""
    adapters = tmp_path / "adapters"
    for name, lr in (("one", "1e-3"), ("same", "1e-3"), ("other", "3e-3")):
        _train(tiny_base, adapters / name, "--posterior", "map", "--train-projections", "--projection-lr", lr)
    _train(tiny_base, adapters / "plain", "--posterior", "map")
    client = running_app(tiny_base, adapters)
    try:
        registry = client.app.state.caveat.registry
        weights = {n: registry.entry(n).resident.weights.projections for n in ("one", "same", "other", "plain")}
    finally:
        client.__exit__(None, None, None)
    for module, projection in weights["one"].items():
        assert projection is weights["same"][module], module
        assert projection is not weights["other"][module] and projection is not weights["plain"][module], module
        assert weights["other"][module] is not weights["plain"][module], module
