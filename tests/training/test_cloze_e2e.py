"""Cloze multiple choice end to end on a tiny random LLaMA (SmolLM2's tokenizer): caveat-train on a handful of
ARC-Easy questions, then the server answers ``{question, choices}`` with the trainer's own predictives (MAP,
sampled, GLM), alone and in one engine step beside a classification adapter; bad requests are 4xx."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapters import load_bundle, save_bundle
from adapters.feedback import read_feedback
from adapters.manifest import CalibrationSpec
from adapters.posteriors import MapPosterior
from adapters.posteriors.base import make_generator
from adapters.predictive import glm_logit_draws, predictive
from adapters.store import BundleStore
from adapters.tasks import DEFAULT_CLOZE_TEMPLATE, ChoiceFormat, mask_choices
from benchmarks.harness import synthetic_bundle
from service.engine import BatchingConfig, Engine, Job
from service.host import ModelHost, TextInput
from service.metrics import Metrics
from service.registry import AdapterRegistry
from tests.service.bundles import running_app, save_tiny_llama
from training.cli import main as train_main
from training.cli import parse_config
from training.data import Example
from training.inference import linearise, predict
from training.pipeline import train

SLICE = [
    "--dataset", "arc-easy", "--shift", "arc-challenge", "--ood", "openbookqa", "--train-limit", "32",
    "--eval-limit", "12", "--validation-size", "32", "--shift-limit", "12", "--ood-limit", "12", "--epochs", "1",
    "--rank", "2", "--num-samples", "3", "--laplace-limit", "16", "--max-length", "128", "--no-progress",
]  # fmt: skip
QUESTIONS = [
    {"question": "Which gas do plants take in?", "choices": ["oxygen", "carbon dioxide", "helium"]},
    {"question": "What melts ice?", "choices": ["heat", "cold", "a rock", "the night", "a loud noise"]},
    {"question": "Is the sun a star?", "choices": ["yes", "no"]},
]
SEED, DRAWS = 3, 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """A cloze bundle (Laplace-Kronecker, the default) of the tiny LLaMA, and the session that trained it."""
    llama = save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    adapters = tmp_path_factory.mktemp("adapters")
    path, session, fitted = train(parse_config(["--base-model", str(llama), "--out", str(adapters / "arc"), *SLICE]))
    return llama, adapters, path, session, fitted


def _examples() -> list[Example]:
    fmt = ChoiceFormat()
    return [
        Example(fmt.prompt(q["question"], q["choices"]), 0, num_choices=len(q["choices"]), choices=tuple(q["choices"]))
        for q in QUESTIONS
    ]


def _trainer_probs(session, fitted, temperature: float) -> dict[str, torch.Tensor]:
    """The trainer's MAP, sampled and GLM predictives of :data:`QUESTIONS` (the server's seed and draws)."""
    examples, counts = _examples(), [len(q["choices"]) for q in QUESTIONS]
    model, encoder = session.model, session.encoder
    point = mask_choices(predict(model, examples, encoder, progress=False).logits, counts)
    sampled = predict(
        model, examples, encoder, posterior=fitted.posterior, num_samples=DRAWS, seed=SEED, progress=False
    ).logits
    linear = linearise(model, examples, encoder, include_head=False, progress=False)
    covariance = fitted.posterior.jacobian_covariance(linear.jacobians)
    glm = glm_logit_draws(linear.logits, covariance, DRAWS, make_generator(SEED))
    return {
        "map": predictive(point, temperature).probs,
        "sample": predictive(mask_choices(sampled, counts), temperature).probs,
        "glm": predictive(glm, temperature).probs,
    }


@pytest.mark.slow
def test_served_cloze_answers_equal_the_trainers(trained) -> None:
    llama, adapters, path, session, fitted = trained
    bundle = load_bundle(path)
    task = bundle.manifest.task
    assert (task.type, task.choice_scoring, task.cloze_normalisation) == ("multiple-choice", "cloze", "none")
    assert task.prompt_template == DEFAULT_CLOZE_TEMPLATE and task.labels == ["A", "B", "C", "D", "E"]
    assert torch.equal(bundle.head_weight, torch.eye(5)) and not bundle.manifest.posterior.covers_head
    assert bundle.manifest.eval.shift.dataset == "arc-challenge"
    # the OOD score fits one Gaussian of all questions: an answer's letter is no class of the question (ARC's
    # rare fifth choice left a class of one example, and the fit failed)
    assert bundle.manifest.ood.method == "mahalanobis" and bundle.ood.gaussian.means.shape[0] == 1
    expected = _trainer_probs(session, fitted, bundle.manifest.calibration.temperature)
    client = running_app(llama, adapters)
    try:
        answers = {
            method: client.post(
                "/v1/predict",
                json={"adapter": "arc", "inputs": QUESTIONS, "method": method, "seed": SEED, "num_samples": DRAWS},
            )
            for method in expected
        }
    finally:
        client.__exit__(None, None, None)
    for method, answer in answers.items():
        assert answer.status_code == 200, (method, answer.text)
        results = answer.json()["results"]
        probs = torch.tensor([r["probs"] for r in results])
        torch.testing.assert_close(probs, expected[method], atol=1e-5, rtol=1e-4, msg=method)
        assert [sum(p > 0 for p in r["probs"]) for r in results] == [3, 5, 2]  # missing choices get 0
        assert all("ood_score" in r["uncertainty"] for r in results)
        # prediction sets over each item's own letters: the calibration's sets of the served probabilities
        valid = torch.tensor([[i < n for i in range(5)] for n in (3, 5, 2)])
        sets = bundle.conformal.sets(
            torch.tensor([r["probs"] for r in results]), bundle.manifest.conformal.alpha, valid
        )
        labels = task.labels
        assert [r["prediction_set"] for r in results] == [[labels[i] for i in row.nonzero().flatten()] for row in sets]
        assert all(set(r["prediction_set"]) <= set(labels[:n]) for r, n in zip(results, (3, 5, 2), strict=True))


@pytest.mark.slow
def test_a_step_mixing_a_cloze_and_a_classification_adapter_answers_each_as_alone(trained, tmp_path: Path) -> None:
    llama, adapters, *_ = trained
    synthetic_bundle(llama, adapters / "texts", name="texts", targets=("q_proj", "v_proj"), pooling="last", seed=1)

    async def run(together: bool) -> list:
        host = ModelHost(str(llama))
        registry = AdapterRegistry(host, BundleStore(adapters), budget_bytes=1 << 30)
        assert await registry.load_store() == []
        arc, texts = registry.entry("arc").resident, registry.entry("texts").resident
        fmt = arc.manifest.task.choice_format
        items = [
            TextInput(fmt.prompt(q["question"], q["choices"]), None, arc.max_length, len(q["choices"]),
                      tuple(q["choices"]), fmt.normalisation, 5)
            for q in QUESTIONS
        ]  # fmt: skip
        sentences = [TextInput(t, None, texts.max_length) for t in ("a fine day", "a long and winding text input")]
        tokens = max(host.token_counts([*items, *sentences]))
        jobs = [Job(arc, items, 1, "map", 0, [], tokens), Job(texts, sentences, 4, "sample", 5, [], tokens)]
        results = []
        for group in [jobs] if together else [[job] for job in jobs]:
            engine = Engine(host, BatchingConfig(max_batch_rows=10_000, step_tokens=10**9), Metrics())
            waiting = [asyncio.ensure_future(engine.submit(job)) for job in group]
            await asyncio.sleep(0)  # all admitted before the worker's first step
            engine.start()
            try:
                results += await asyncio.gather(*waiting)
            finally:
                await engine.close()
        return results

    together, alone = asyncio.run(run(True)), asyncio.run(run(False))
    assert [r.batch_requests for r in together] == [2, 2] and [r.batch_requests for r in alone] == [1, 1]
    for mixed, single in zip(together, alone, strict=True):
        torch.testing.assert_close(mixed.pred.probs, single.pred.probs, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_bad_multiple_choice_requests_are_4xx_naming_the_field(trained) -> None:
    llama, adapters, *_ = trained
    if not (adapters / "texts").exists():
        synthetic_bundle(llama, adapters / "texts", name="texts", targets=("q_proj", "v_proj"), pooling="last")
    question = QUESTIONS[0]
    cases = {
        "one choice": ("arc", [{"question": "q?", "choices": ["only"]}], 422, "choices"),
        "six choices": ("arc", [{"question": "q?", "choices": list("abcdef")}], 422, "choices"),
        "an empty choice": ("arc", [question, {"question": "q?", "choices": ["fine", "   "]}], 422,
                            "choices.1: Value error, a text must not be empty"),
        "choices beyond the max length": ("arc", [{"question": "q?", "choices": ["word " * 200, "no"]}], 400,
                                          "inputs[0]: the choices take"),
        "a text to the cloze adapter": ("arc", ["just a text"], 400, "inputs[0]: adapter 'arc' answers multiple"),
        "a question to a text adapter": ("texts", [question], 400, "inputs[0]: adapter 'texts' classifies texts"),
    }  # fmt: skip
    client = running_app(llama, adapters)
    try:
        for name, (adapter, inputs, status, needle) in cases.items():
            answer = client.post("/v1/predict", json={"adapter": adapter, "inputs": inputs})
            assert answer.status_code == status, (name, answer.text)
            assert needle in answer.text, (name, answer.text)
    finally:
        client.__exit__(None, None, None)


@pytest.mark.slow
def test_a_zero_shot_cloze_bundle_serves_the_lms_own_log_likelihoods(trained, tmp_path: Path) -> None:
    """The trained bundle with its cores zeroed (the LM as it is) and temperature 1: the served probabilities
    are the softmax of each choice's summed log-likelihood (the default normalisation), computed here one forward
    per choice."""
    llama, _, path, *_ = trained
    bundle = load_bundle(path)
    zeros = {name: torch.zeros_like(core) for name, core in bundle.cores.items()}
    manifest = bundle.manifest.model_copy(
        update={
            "name": "zero",
            "posterior": bundle.manifest.posterior.model_copy(update={"family": "map", "predictive": "map"}),
            "calibration": CalibrationSpec(temperature=1.0),
        }
    )
    save_bundle(
        dataclasses.replace(bundle, manifest=manifest, cores=zeros, posterior=MapPosterior(zeros)), tmp_path / "zero"
    )
    lm = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(llama)
    expected = torch.zeros(len(QUESTIONS), 5)
    for i, q in enumerate(QUESTIONS):
        prompt = tokenizer(DEFAULT_CLOZE_TEMPLATE.format(question=q["question"])).input_ids
        scores = []
        for choice in q["choices"]:
            ids = tokenizer(" " + choice, add_special_tokens=False).input_ids
            with torch.no_grad():
                log_probs = lm(torch.tensor([prompt + ids])).logits[0].log_softmax(-1)
            scores.append(sum(log_probs[len(prompt) + j - 1, t] for j, t in enumerate(ids)))  # the default: summed
        expected[i, : len(scores)] = torch.stack(scores).softmax(-1)
    client = running_app(llama, tmp_path)
    try:
        answer = client.post("/v1/predict", json={"adapter": "zero", "inputs": QUESTIONS})
    finally:
        client.__exit__(None, None, None)
    assert answer.status_code == 200, answer.text
    assert answer.json()["method"] == "map"
    torch.testing.assert_close(
        torch.tensor([r["probs"] for r in answer.json()["results"]]), expected, atol=1e-5, rtol=1e-4
    )


def test_a_cloze_bundle_exports_as_a_causal_lm_lora_peft_loads(trained, tmp_path: Path) -> None:
    """No modules_to_save (the form vLLM accepts); PEFT's LM logits are the bundle MAP's."""
    from peft import PeftModel

    from training.cli import main
    from training.peft_export import export

    llama, _, path, session, _ = trained
    assert main(["export-peft", str(path), str(tmp_path / "peft")]) == 0
    config, tensors = export(load_bundle(path))
    assert config["task_type"] == "CAUSAL_LM" and config["modules_to_save"] is None
    assert all(key.endswith(("lora_A.weight", "lora_B.weight")) for key in tensors)
    tokenizer = AutoTokenizer.from_pretrained(llama)
    batch = dict(tokenizer(["Which gas do plants take in? carbon dioxide", "Is the sun a star?"], padding=True,
                           return_tensors="pt"))  # fmt: skip
    lm = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32).eval()
    with torch.no_grad():
        plain = lm(**batch).logits
    peft = PeftModel.from_pretrained(lm, tmp_path / "peft")
    model = session.model.eval()
    with torch.no_grad():
        theirs = peft.eval()(**batch).logits
        ours = model.hidden_states(batch) @ model.output_embeddings.T
    mask = batch["attention_mask"].bool()
    assert (ours[mask] - plain[mask]).abs().max() > 1e-3  # the adapter moves the logits: the check can fail
    torch.testing.assert_close(ours[mask], theirs[mask], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_the_feedback_loop_recalibrates_a_cloze_bundle_over_its_own_choices(trained, tmp_path: Path) -> None:
    """Serve → labels → recalibrate → swap on multiple choice: the temperature is fitted over the logged per-draw
    probabilities of each item's own choices, the same request and seed is then served exactly that predictive
    (letters an item lacks stay at 0), and the refitted sets hold only an item's own letters."""
    llama, _, path, *_ = trained
    served = tmp_path / "adapters"
    served.mkdir()
    save_bundle(load_bundle(path), served / "arc")
    items = QUESTIONS * 8  # 24 answers: enough to fit on after the held-out part
    request = {"adapter": "arc", "inputs": items, "seed": SEED, "num_samples": DRAWS}
    client = running_app(llama, served, feedback_dir=tmp_path / "log")
    try:
        results = client.post("/v1/predict", json=request).json()["results"]
        labels = [["A", "B", "C"][i % 3] if len(q["choices"]) > 2 else "B" for i, q in enumerate(items)]
        feedback = [{"id": r["id"], "label": y} for r, y in zip(results, labels, strict=True)]
        assert client.post("/v1/feedback", json={"feedback": feedback}).status_code == 200
        out = served / "arc-2"
        argv = ["recalibrate", str(served / "arc"), "--labels", str(tmp_path / "log"), "--out", str(out)]
        assert train_main([*argv, "--holdout", "0.1", "--version", "2"]) == 0
        assert client.put("/v1/adapters/arc", json={"path": "arc-2"}).status_code == 200
        after = client.post("/v1/predict", json=request).json()["results"]
    finally:
        client.__exit__(None, None, None)
    tau = load_bundle(out).manifest.eval.recalibration["temperature_over_served"]
    logged = [{record.id: record for record in read_feedback(tmp_path / "log")[0]}[r["id"]] for r in results]
    # what the temperature is fitted over: a posterior predictive's logged draws, else the served probabilities
    rows = [r.probs if r.sample_probs is None else r.sample_probs for r in logged]
    draws = torch.tensor(rows, dtype=torch.float64)
    draws = draws.unsqueeze(0) if draws.ndim == 2 else draws.transpose(0, 1)
    expected = predictive(draws.clamp_min(1e-300).log(), tau).probs.double()
    probs = torch.tensor([r["probs"] for r in after], dtype=torch.float64)
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-4)
    counts = [len(q["choices"]) for q in items]
    assert all(p == 0 for r, n in zip(after, counts, strict=True) for p in r["probs"][n:])
    assert all(set(r["prediction_set"]) <= set("ABCDE"[:n]) for r, n in zip(after, counts, strict=True))
