"""Served answers that must stay identical across refactorings of the prediction path, and their reference.

A fixed request set — the ``sample``, ``glm`` and ``map`` predictives, a request override of the abstention
rules, text pairs, multiple choice, an out-of-domain input, the Open Inference Protocol, and two adapters with
two methods in one engine step — is answered by bundles of a tiny random BERT (synthetic: Kronecker with an OOD
score, diagonal, MAP, text pairs), a multiple-choice bundle trained by ``caveat-train`` on a tiny random LLaMA,
and a synthetic Kronecker bundle with an OOD score on the embedded MiniLM. Every answer's body (less its request
id, timings and the bundle's identity) is kept as exact JSON values. The bits depend on the CPU and the thread
count, as the training bitwise reference's do (:mod:`tests.training.bitwise`), so ``fixtures/answers.json``
holds one set per machine class. Regenerate this machine's set (only when a change of the numbers is intended,
and say so in the commit) with::

    CAVEAT_TEST_THREADS=2 .venv/bin/python -m tests.service.answers
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from adapters.embedded import resolve_model
from adapters.predictive import AbstentionRule
from adapters.store import BundleStore
from service.engine import BatchingConfig, Engine, Job
from service.host import ModelHost, TextInput
from service.metrics import Metrics
from service.registry import AdapterRegistry
from tests.service.bundles import make_bundle, running_app, save_tiny_base, save_tiny_llama
from tests.training.bitwise import machine_class
from training.cli import main as train

REFERENCE = Path(__file__).with_name("fixtures") / "answers.json"
PREDICTIVE_VALUES = (
    "probs",
    "label",
    "confidence",
    "entropy",
    "entropy_normalized",
    "expected_entropy",
    "mutual_information",
    "mc_stderr",
)  # what an engine result's values held when the reference was made (now also its abstention and OOD fields)

TEXTS = ["a gorgeous, witty, seductive movie.", "it is a dull film", "the plot goes nowhere at all, slowly"]
FAMILIAR = "good film loved the music great cast"  # the synthetic OOD scores' own vocabulary: a usual p-value
NEWS = "The central bank raised interest rates by a quarter point on Thursday, citing inflation in services."
PAIRS = [{"text": "good film", "text_pair": "boring plot"}, {"text": "loved the music", "text_pair": "hated it"}]
QUESTIONS = [
    {"question": "Which gas do plants take in?", "choices": ["oxygen", "carbon dioxide", "helium"]},
    {"question": "What is frozen water called?", "choices": ["ice", "steam", "fog", "rain", "snow"]},
]
MC_FLAGS = [  # the letter bundle as first recorded: fixed calibration (the posterior, T = 1)
    "--dataset", "arc-easy", "--mc-scoring", "letter", "--calibration", "posterior",
    "--train-limit", "24", "--eval-limit", "8", "--validation-size", "24", "--max-length",
    "96", "--epochs", "1", "--rank", "2", "--num-samples", "3", "--laplace-limit", "16", "--seed", "0", "--no-progress",
]  # fmt: skip

# name → (adapter, request body beyond the adapter)
TINY_REQUESTS: dict[str, tuple[str, dict[str, Any]]] = {
    "kron-sample": ("kron", {"inputs": [*TEXTS, FAMILIAR, NEWS], "method": "sample", "num_samples": 5, "seed": 1,
                             "return_samples": True}),
    "kron-glm": ("kron", {"inputs": [*TEXTS, FAMILIAR, NEWS], "method": "glm", "num_samples": 64, "seed": 2}),
    "kron-map": ("kron", {"inputs": [*TEXTS, FAMILIAR, NEWS], "method": "map", "seed": 0}),
    "diag-default": ("diag", {"inputs": TEXTS, "seed": 3}),
    "diag-override": ("diag", {"inputs": TEXTS, "seed": 4, "abstain": {"entropy": 0.5, "mutual_information": 0.01}}),
    "diag-coverage": ("diag", {"inputs": TEXTS, "seed": 4, "coverage": 0.6, "abstain": {"ambiguous": 1}}),
    "map-bundle": ("map", {"inputs": TEXTS, "seed": 5}),
    "pair": ("pair", {"inputs": PAIRS, "seed": 6, "num_samples": 4}),
}  # fmt: skip
MC_REQUESTS = {
    "mc-default": ("mc", {"inputs": QUESTIONS, "seed": 7}),
    "mc-sample": ("mc", {"inputs": QUESTIONS, "seed": 8, "method": "sample", "num_samples": 3}),
    "mc-map": ("mc", {"inputs": QUESTIONS, "method": "map", "seed": 0}),
}
MINILM_REQUESTS = {
    "minilm-sample": ("minilm", {"inputs": [*TEXTS, FAMILIAR, NEWS], "method": "sample", "num_samples": 4, "seed": 9}),
    "minilm-glm": ("minilm", {"inputs": [*TEXTS, FAMILIAR, NEWS], "method": "glm", "seed": 10}),
    "minilm-map": ("minilm", {"inputs": [*TEXTS, FAMILIAR, NEWS], "method": "map", "seed": 0}),
}
V2_REQUEST = {
    "parameters": {"method": "glm", "num_samples": 32, "seed": 11},
    "inputs": [{"name": "text", "shape": [3], "datatype": "BYTES", "data": [TEXTS[0], FAMILIAR, NEWS]}],
}


def tiny_bundles(base: Path, adapters: Path) -> None:
    """The tiny BERT's bundles: Kronecker with an OOD score, diagonal, MAP, and text pairs."""
    make_bundle(base, adapters / "kron", name="kron", family="kron", seed=1, variance=0.3, ood_method="mahalanobis")
    make_bundle(
        base, adapters / "diag", name="diag", family="diag", seed=2, variance=0.5, abstain_mi=0.02, conformal="aps"
    )
    make_bundle(base, adapters / "map", name="map", family="map", seed=3, labels=("a", "b", "c"))
    make_bundle(base, adapters / "pair", name="pair", family="diag", seed=4, text_pair=True)


def _answers(client, requests: dict[str, tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    out = {}
    for name, (adapter, body) in requests.items():
        response = client.post("/v1/predict", json={"adapter": adapter, **body})
        assert response.status_code == 200, (name, response.text)
        out[name] = _answer_only(response.json())
    return out


def _answer_only(body: dict[str, Any]) -> dict[str, Any]:
    """A response less what names the request or the bundle's bytes rather than the answer: request id, answer ids,
    timings, the bundle's sha256 and version (``bundle.json`` holds its creation time)."""
    body = {k: v for k, v in body.items() if k not in ("request_id", "timing", "model_version")}
    if "results" in body:  # each answer's id is fresh: not the answer
        body["results"] = [{k: v for k, v in result.items() if k != "id"} for result in body["results"]]
    if "outputs" in body:
        body["outputs"] = [output for output in body["outputs"] if output["name"] != "id"]
    if "adapter" in body:
        body["adapter"] = body["adapter"]["name"]
    if "parameters" in body:
        body["parameters"] = {k: v for k, v in body["parameters"].items() if k != "sha256"}
    return body


def _one_step(base: Path, adapters: Path) -> dict[str, Any]:
    """Two adapters (sample and GLM, with and without an OOD score) admitted before the worker starts, so that
    they share one step."""

    async def run() -> list:
        host = ModelHost(str(base))
        registry = AdapterRegistry(host, BundleStore(adapters), budget_bytes=1 << 30)
        assert await registry.load_store() == []
        kron, diag = registry.entry("kron").resident, registry.entry("diag").resident
        texts = [TextInput(t, None, kron.max_length) for t in [*TEXTS, FAMILIAR, NEWS]]
        tokens = max(host.token_counts(texts))
        jobs = [
            Job(kron, texts, 6, "sample", 12, kron.abstention_rules(), tokens),
            Job(diag, texts[:2], 16, "glm", 13, [AbstentionRule("max_prob", 0.9)], tokens),
        ]
        engine = Engine(host, BatchingConfig(max_batch_rows=10_000, step_tokens=10**9), Metrics())
        waiting = [asyncio.ensure_future(engine.submit(job)) for job in jobs]
        await asyncio.sleep(0)  # both admitted before the worker's first step
        engine.start()
        try:
            return await asyncio.gather(*waiting)
        finally:
            await engine.close()

    out = {}
    for name, result in zip(("step-kron-sample", "step-diag-glm"), asyncio.run(run()), strict=True):
        assert result.batch_requests == 2, result.batch_requests
        out[name] = {
            "values": {field: result.values[field] for field in PREDICTIVE_VALUES}, "abstain": result.abstain,
            "reasons": result.reasons,
            "ood_score": result.ood_score, "ood_pvalue": result.ood_pvalue,
            "prediction_set": result.values.get("prediction_set"),
            "sample_probs": result.pred.sample_probs.tolist(),
        }  # fmt: skip
    return out


def answers(workdir: Path) -> dict[str, Any]:
    """Every answer of the request set, by request name (bundles and models built under ``workdir``)."""
    base, adapters = save_tiny_base(workdir / "tiny-base"), workdir / "tiny-adapters"
    tiny_bundles(base, adapters)
    out: dict[str, Any] = {}
    client = running_app(base, adapters)
    try:
        out.update(_answers(client, TINY_REQUESTS))
        response = client.post("/v2/models/kron/infer", json=V2_REQUEST)
        assert response.status_code == 200, response.text
        out["v2-kron-glm"] = _answer_only(response.json())
    finally:
        client.__exit__(None, None, None)
    out.update(_one_step(base, adapters))

    llama = save_tiny_llama(workdir / "tiny-llama")
    assert train([*MC_FLAGS, "--base-model", str(llama), "--out", str(workdir / "mc-adapters" / "mc")]) == 0
    client = running_app(llama, workdir / "mc-adapters")
    try:
        out.update(_answers(client, MC_REQUESTS))
    finally:
        client.__exit__(None, None, None)

    minilm = resolve_model("minilm")
    make_bundle(minilm, workdir / "minilm-adapters" / "minilm", name="minilm", family="kron", seed=5, variance=0.2,
                ood_method="mahalanobis", targets=("query", "value"), rank=8)  # fmt: skip
    client = running_app(minilm, workdir / "minilm-adapters")
    try:
        out.update(_answers(client, MINILM_REQUESTS))
    finally:
        client.__exit__(None, None, None)
    return out


def references() -> dict[str, dict[str, Any]]:
    """Machine class → request name → answer."""
    return json.loads(REFERENCE.read_text()) if REFERENCE.is_file() else {}


def regenerate() -> None:
    """Answer the request set and store it as this machine class's set (the other classes' are kept)."""
    reference = references()
    with tempfile.TemporaryDirectory() as tmp:
        reference[machine_class()] = answers(Path(tmp))
    REFERENCE.parent.mkdir(exist_ok=True)
    REFERENCE.write_text(json.dumps(reference, sort_keys=True) + "\n")


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("CAVEAT_TEST_THREADS", "2")))  # as under pytest (tests/conftest.py)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    regenerate()
    sys.exit(0)
