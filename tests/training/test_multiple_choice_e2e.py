"""Multiple choice end to end on a tiny random LLaMA (SmolLM2's tokenizer): caveat-train on a handful of
ARC-Easy questions, then the server answers {question, choices} with the causal LM's own letter logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapters import inject_lora_xs, load_bundle
from adapters.tasks import format_prompt, letter_token_ids
from tests.service.bundles import running_app, save_tiny_llama
from training import compare as compare_module
from training.cli import main


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


SLICE = [
    "--dataset", "arc-easy", "--mc-scoring", "letter",
    "--shift", "openbookqa", "--ood", "openbookqa", "--train-limit", "40",
    "--eval-limit", "16", "--validation-size", "40", "--shift-limit", "16", "--ood-limit", "16", "--epochs", "1",
    "--rank", "2", "--num-samples", "3", "--laplace-limit", "24", "--max-length", "96", "--no-progress",
    "--calibration", "posterior",  # the posterior's own predictive served by default
]  # fmt: skip


@pytest.mark.slow
def test_compare_from_zero_shot_to_laplace(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "mc.json"
    methods = "zero-shot,map,laplace-kron,laplace-diag"
    assert main(["compare", "--posteriors", methods, "--json", str(out), "--base-model", str(tiny_llama), *SLICE]) == 0
    rows = {row["posterior"]: row for row in json.loads(out.read_text())["rows"]}
    assert list(rows) == methods.split(",")
    # zero-shot trains nothing; the MAP's time is reported but never asserted (a tiny model trains in < 0.1 s)
    assert rows["zero-shot"]["train_seconds"] == 0 and rows["map"]["train_seconds"] >= 0
    assert rows["zero-shot"]["test"]["nll"] != rows["map"]["test"]["nll"]  # training changed the model
    assert all(0 <= row["test"]["accuracy"] <= 1 and "ood" in row for row in rows.values())


def test_zero_shot_alone_trains_nothing(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_training(*args, **kwargs):
        raise AssertionError("a zero-shot comparison trained a MAP")

    monkeypatch.setattr(compare_module, "fit_map", no_training)
    out = tmp_path / "zero-shot.json"
    argv = ["compare", "--posteriors", "zero-shot", "--json", str(out), "--base-model", str(tiny_llama), *SLICE]
    assert main(argv) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["posterior"] == "zero-shot" and row["train_seconds"] == 0 and 0 <= row["test"]["accuracy"] <= 1


@pytest.mark.slow
def test_multiple_choice_bundle_trains_and_serves_the_lms_letter_logits(tiny_llama: Path, tmp_path: Path) -> None:
    adapters = tmp_path / "adapters"
    assert main(["--base-model", str(tiny_llama), "--out", str(adapters / "arc"), *SLICE]) == 0
    bundle = load_bundle(adapters / "arc")
    task = bundle.manifest.task
    assert task.type == "multiple-choice" and task.labels == ["A", "B", "C", "D", "E"] and task.pooling == "last"
    assert bundle.manifest.adapter.target_modules == ["q_proj", "v_proj"]
    assert not bundle.manifest.posterior.covers_head and not bundle.manifest.head.trained  # the LM head is frozen
    ev = bundle.manifest.eval
    assert ev.shift.dataset == "openbookqa" and set(ev.ood.posterior) >= {"entropy", "mutual_information"}
    lm = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    letters = letter_token_ids(AutoTokenizer.from_pretrained(tiny_llama))
    torch.testing.assert_close(bundle.head_weight, lm.get_output_embeddings().weight[letters])  # the LM's own rows

    question = {"question": "Which gas do plants take in?", "choices": ["oxygen", "carbon dioxide", "helium"]}
    client = running_app(tiny_llama, adapters)
    try:
        served = client.post("/v1/predict", json={"adapter": "arc", "inputs": [question], "method": "map"})
        sampled = client.post("/v1/predict", json={"adapter": "arc", "inputs": [question, question], "seed": 1})
        text = client.post("/v1/predict", json={"adapter": "arc", "inputs": ["just a text"]})
    finally:
        client.__exit__(None, None, None)
    assert served.status_code == 200, served.text
    probs = torch.tensor(served.json()["results"][0]["probs"])
    assert probs.shape == (5,) and (probs[3:] == 0).all()
    # oracle: the causal LM with the bundle's cores, its next-token logits of " A", " B", " C" after the prompt
    spec = bundle.manifest.adapter
    inject_lora_xs(lm.model, spec.target_modules, bundle.projections, alpha=spec.alpha)
    with torch.no_grad():
        for name, core in bundle.cores.items():
            lm.model.get_submodule(name).core.weight.copy_(core)
        tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
        prompt = format_prompt(question["question"], question["choices"])
        logits = lm(**tokenizer([prompt], return_tensors="pt")).logits[0, -1, letters[:3]]
    torch.testing.assert_close(probs[:3], logits.softmax(-1), atol=1e-5, rtol=1e-4)
    assert sampled.status_code == 200 and sampled.json()["method"] == "glm"
    for result in sampled.json()["results"]:
        assert result["probs"][3:] == [0.0, 0.0] and result["uncertainty"]["mutual_information"] >= 0
    assert text.status_code == 400 and "question, choices" in text.text
