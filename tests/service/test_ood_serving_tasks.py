"""The served OOD score of text-pair and multiple-choice bundles equals the trainer's for the same input and bundle:
for every predictive method, and in one batched forward that mixes the two adapters.

The bundles are trained by ``caveat-train`` on tiny random models: a multiple-choice bundle (ARC-Easy) and a
text-pair bundle on a LLaMA, whose OOD feature is the last token's state, and a text-pair bundle on a BERT
(mean-pooled, with token types). The trainer's score is computed by the trainer's own session and feature code
(:func:`training.ood.features_of`); inputs longer than the max length check that both truncate alike (prompts
from the left, so that ``Answer:`` survives; pairs longest first).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from adapters.bundle import load_bundle
from adapters.tasks import format_prompt
from benchmarks.harness import synthetic_texts
from tests.service.bundles import running_app, save_tiny_base, save_tiny_llama
from training.cli import main, parse_config
from training.data import Example
from training.ood import features_of
from training.session import prepare

SMALL = ["--epochs", "1", "--rank", "2", "--num-samples", "3", "--laplace-limit", "24", "--no-progress"]
MC_FLAGS = [
    "--dataset", "arc-easy", "--mc-scoring", "letter",
    "--train-limit", "40", "--eval-limit", "16", "--validation-size", "40",
    "--max-length", "96", *SMALL,
]  # fmt: skip
PAIR_FLAGS = ["--text-pair-column", "text_pair", "--train-limit", "60", "--eval-limit", "24", "--validation-size", "40",
              "--max-length", "32", *SMALL]  # fmt: skip

QUESTIONS = [
    {"question": "Which gas do plants take in?", "choices": ["oxygen", "carbon dioxide", "helium"]},
    {"question": "What is frozen water called?", "choices": ["ice", "steam", "fog", "rain"]},
    {  # longer than the max length: the prompt loses its start, never its "Answer:"
        "question": "A student pours water into a tray, puts it in the freezer and waits a night. " * 6,
        "choices": ["it melts", "it freezes", "it boils", "it evaporates", "nothing happens"],
    },
]
PAIRS = [
    {"text": "good film", "text_pair": "boring plot and dull acting"},
    {"text": "the central bank raised rates", "text_pair": "inflation in services stayed high"},
    {"text": "loved the music " * 12, "text_pair": "hated the story " * 6},  # longer than the max length
]


def write_pairs(path: Path) -> Path:
    """A text-pair dataset (JSON lines) of review-like sentences with two labels."""
    first, second = synthetic_texts(160, seed=11), synthetic_texts(160, seed=12)
    rows = [{"text": a, "text_pair": b, "label": ("same", "different")[i % 3 == 0]} for i, (a, b) in
            enumerate(zip(first, second, strict=True))]  # fmt: skip
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def train(argv: list[str], out: Path) -> list[str]:
    """Train a bundle into ``out``; returns the flags (without ``--out``) that rebuild its session."""
    assert main([*argv, "--out", str(out)]) == 0
    return argv


def examples_of(inputs: list, bundle_dir: Path) -> list[Example]:
    """Served inputs as the trainer's examples: a multiple-choice item becomes its prompt."""
    template = load_bundle(bundle_dir).manifest.task.prompt_template
    if "question" in inputs[0]:
        return [Example(format_prompt(i["question"], i["choices"], template), 0, num_choices=len(i["choices"]))
                for i in inputs]  # fmt: skip
    return [Example(i["text"], 0, text_pair=i["text_pair"]) for i in inputs]


def trainer_scores(argv: list[str], bundle_dir: Path, inputs: list) -> torch.Tensor:
    """The score the trainer computes for ``inputs``: its session's frozen-base features, the bundle's score."""
    bundle = load_bundle(bundle_dir)
    session = prepare(parse_config(argv))
    features = features_of(session, examples_of(inputs, bundle_dir), tuple(bundle.manifest.ood.layers), "served")
    return bundle.ood.score(features)


def served_scores(client: TestClient, adapter: str, inputs: list, method: str) -> tuple[torch.Tensor, dict]:
    body = {"adapter": adapter, "inputs": inputs, "method": method, "num_samples": 3, "seed": 1}
    response = client.post("/v1/predict", json=body)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    scores = torch.tensor([r["uncertainty"]["ood_score"] for r in results], dtype=torch.float64)
    return scores, response.json()


class Deployment:
    """A server on one tiny base with trained bundles, and each bundle's flags and trainer scores."""

    def __init__(self, client: TestClient, root: Path, bundles: dict[str, tuple[list[str], list]]) -> None:
        self.client, self.root = client, root
        self.inputs = {name: inputs for name, (_, inputs) in bundles.items()}
        self.expected = {name: trainer_scores(argv, root / name, inputs) for name, (argv, inputs) in bundles.items()}


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory):
    """A multiple-choice and a text-pair bundle on a tiny LLaMA, served together (a long batching wait and a
    large step, so that concurrent requests share one forward)."""
    root = tmp_path_factory.mktemp("ood-llama")
    base = save_tiny_llama(root / "base")
    pairs = write_pairs(root / "pairs.jsonl")
    bundles = {
        "arc": (train(["--base-model", str(base), *MC_FLAGS], root / "arc"), QUESTIONS),
        "pairs": (train(["--base-model", str(base), "--dataset", str(pairs), *PAIR_FLAGS], root / "pairs"), PAIRS),
    }
    client = running_app(base, root, max_wait_ms=500, step_tokens=1 << 16)
    yield Deployment(client, root, bundles)
    client.__exit__(None, None, None)


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory):
    """A text-pair bundle on a tiny BERT (mean pooling, token types)."""
    root = tmp_path_factory.mktemp("ood-bert")
    base = save_tiny_base(root / "base")
    pairs = write_pairs(root / "pairs.jsonl")
    argv = train(["--base-model", str(base), "--dataset", str(pairs), *PAIR_FLAGS], root / "bert-pairs")
    client = running_app(base, root)
    yield Deployment(client, root, {"bert-pairs": (argv, PAIRS)})
    client.__exit__(None, None, None)


def test_the_long_inputs_are_truncated(llama: Deployment, bert: Deployment) -> None:
    """The checks above cover truncation: the last question and pair exceed their bundles' max lengths."""
    tokenizer = AutoTokenizer.from_pretrained(llama.root / "base")
    prompt = examples_of(QUESTIONS, llama.root / "arc")[-1].text
    assert len(tokenizer(prompt).input_ids) > load_bundle(llama.root / "arc").manifest.task.max_length
    for deployment, adapter in ((llama, "pairs"), (bert, "bert-pairs")):
        tokenizer = AutoTokenizer.from_pretrained(deployment.root / "base")
        tokens = tokenizer(PAIRS[-1]["text"], PAIRS[-1]["text_pair"]).input_ids
        assert len(tokens) > load_bundle(deployment.root / adapter).manifest.task.max_length


@pytest.mark.parametrize("method", ["sample", "glm", "map"])
@pytest.mark.parametrize("adapter", ["arc", "pairs", "bert-pairs"])
def test_served_ood_score_equals_the_trainers(request: pytest.FixtureRequest, adapter: str, method: str) -> None:
    deployment: Deployment = request.getfixturevalue("bert" if adapter == "bert-pairs" else "llama")
    manifest = load_bundle(deployment.root / adapter).manifest
    assert manifest.ood is not None and manifest.ood.pooling == ("mean" if adapter == "bert-pairs" else "last")
    scores, body = served_scores(deployment.client, adapter, deployment.inputs[adapter], method)
    assert body["method"] == method
    expected = deployment.expected[adapter]
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    pvalues = load_bundle(deployment.root / adapter).ood.pvalue(expected).tolist()
    assert [r["uncertainty"]["ood_pvalue"] for r in body["results"]] == pytest.approx(pvalues)


@pytest.mark.parametrize("methods", [("sample", "glm"), ("glm", "map"), ("map", "sample")])
def test_a_batch_mixing_the_two_adapters_serves_the_trainers_scores(llama: Deployment, methods) -> None:
    """Concurrent requests for the multiple-choice and the text-pair adapter share a step: one base row per
    input of either (sampled and linearised pieces reading one tap). An idle engine runs the first request at
    once; the five queued meanwhile share the next step, and a step of more than three of them holds both
    adapters (three requests each)."""
    jobs = list(zip(("arc", "pairs"), methods, strict=True)) * 3

    def ask(job: tuple[str, str]) -> tuple[torch.Tensor, dict]:
        return served_scores(llama.client, job[0], llama.inputs[job[0]], job[1])

    for _ in range(3):  # a round whose requests all arrive one step apart would not mix: try again
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(ask, jobs))
        for (adapter, method), (scores, body) in zip(jobs, answers, strict=True):
            assert body["method"] == method
            torch.testing.assert_close(scores, llama.expected[adapter], rtol=1e-5, atol=1e-5)
        if max(body["timing"]["batch_requests"] for _, body in answers) > 3:
            return
    pytest.fail("no step mixed the two adapters in three rounds of six concurrent requests")
