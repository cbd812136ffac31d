"""The engine in process: a step that mixes many adapters and methods answers each request exactly as it is
answered alone with the same seed (per-batch sampling, row plan and predictive change nothing)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from adapters.predictive import AbstentionRule
from adapters.store import BundleStore
from adapters.vocab import PredictiveMode
from service.engine import BatchingConfig, Engine, Job, JobResult
from service.fields import PREDICTIVE_FIELDS
from service.host import MAX_STEP_TOKENS, STEP_TOKENS, ModelHost, TextInput
from service.metrics import Metrics
from service.registry import AdapterRegistry
from tests.service.bundles import make_bundle, running_app

METHODS = (PredictiveMode.SAMPLE, PredictiveMode.GLM, PredictiveMode.MAP)
TEXTS = ["a gorgeous, witty, seductive movie.", "it is a dull film", "meh", "the plot goes nowhere at all, slowly"]


@pytest.fixture(scope="module")
def fifty(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """50 bundles of the tiny base: diagonal and Kronecker posteriors, every fifth with an OOD score."""
    adapters = tmp_path_factory.mktemp("fifty")
    for i in range(50):
        make_bundle(
            tiny_base, adapters / f"a{i}", name=f"a{i}", seed=i, variance=0.3, family=("diag", "kron")[i % 2],
            ood_method="mahalanobis" if i % 5 == 0 else None,
        )  # fmt: skip
    return adapters


def _jobs(registry: AdapterRegistry, host: ModelHost) -> list[Job]:
    """One request per adapter: methods in turn, 1–3 inputs, own seeds, every seventh with its own rules."""
    jobs = []
    for i in range(50):
        adapter = registry.entry(f"a{i}").resident
        texts = [TextInput(t, None, adapter.max_length) for t in TEXTS[i % 4 : i % 4 + 1 + i % 3]]
        method = METHODS[i % 3]
        samples = 1 if method == PredictiveMode.MAP else 3 + i % 4
        rules = [AbstentionRule("entropy", 0.5)] if i % 7 == 0 else adapter.abstention_rules()
        jobs.append(Job(adapter, texts, samples, method, 1000 + i, rules, max(host.token_counts(texts))))
    return jobs


def test_a_step_mixing_50_adapters_and_3_methods_answers_each_as_alone(tiny_base: Path, fifty: Path) -> None:
    async def run() -> tuple[list[JobResult], list[JobResult]]:
        host = ModelHost(str(tiny_base))
        registry = AdapterRegistry(host, BundleStore(fifty), budget_bytes=1 << 30)
        assert await registry.load_store() == []
        engine = Engine(host, BatchingConfig(max_batch_rows=100_000, step_tokens=10**9), Metrics())
        engine.start()
        try:
            together = await asyncio.gather(*(engine.submit(job) for job in _jobs(registry, host)))
            alone = [await engine.submit(job) for job in _jobs(registry, host)]
        finally:
            await engine.close()
        return together, alone

    together, alone = asyncio.run(run())
    assert {r.batch_requests for r in together} == {50} and {r.batch_requests for r in alone} == {1}
    for mixed, single in zip(together, alone, strict=True):
        torch.testing.assert_close(mixed.pred.sample_probs, single.pred.sample_probs, rtol=1e-5, atol=1e-6)
        for name in PREDICTIVE_FIELDS:
            values = mixed.values[name]
            torch.testing.assert_close(torch.tensor(values), torch.tensor(single.values[name]), rtol=1e-5, atol=1e-6)
        assert (mixed.abstain, mixed.reasons) == (single.abstain, single.reasons)
        assert (mixed.ood_score is None) == (single.ood_score is None)
        if mixed.ood_score is not None:
            torch.testing.assert_close(torch.tensor(mixed.ood_score), torch.tensor(single.ood_score))
            assert mixed.ood_pvalue == single.ood_pvalue
    assert sum(r.ood_score is not None for r in together) == 10
    sampled = together[0].pred.sample_probs  # request 0 samples the posterior: its samples differ
    assert sampled.shape[0] == 3 and not torch.allclose(sampled[0], sampled[1])


def test_the_admitted_cost_kept_by_admission_is_what_the_jobs_have_left(tiny_base: Path, fifty: Path) -> None:
    """Admission keeps the queue's cost up instead of summing every waiting job per request; after every
    admission, drop and step it equals the sum counted afresh."""

    async def run() -> list[tuple[int, int]]:
        host = ModelHost(str(tiny_base))
        registry = AdapterRegistry(host, BundleStore(fifty), budget_bytes=1 << 30)
        await registry.load_store()
        engine = Engine(host, BatchingConfig(step_tokens=64), Metrics())  # small steps: jobs run in pieces

        def afresh() -> int:
            return sum(job.progress.remaining_cost() for job in engine._jobs)

        checks = []
        finish = engine._finish

        def checked_finish(*args) -> None:  # on the event loop, between steps
            finish(*args)
            checks.append((engine.admitted_cost, afresh()))

        engine._finish = checked_finish  # type: ignore[method-assign]
        drop = engine._drop

        def checked_drop(job: Job) -> None:  # before a step
            drop(job)
            checks.append((engine.admitted_cost, afresh()))

        engine._drop = checked_drop  # type: ignore[method-assign]
        jobs = _jobs(registry, host)[:20]
        waiting = [asyncio.ensure_future(engine.submit(job)) for job in jobs]
        await asyncio.sleep(0)  # all admitted; no worker yet
        checks.append((engine.admitted_cost, afresh()))
        jobs[3].future.cancel()  # abandoned: dropped before the first step
        engine.start()
        try:
            await asyncio.gather(*waiting, return_exceptions=True)
        finally:
            await engine.close()
        return checks

    checks = asyncio.run(run())
    assert len(checks) > 5 and checks[0][0] > checks[1][0] > 0 and checks[-1] == (0, 0)  # [1]: after the drop
    assert all(kept == fresh for kept, fresh in checks)


# ------------------------------------------------------------------- the step's size, from the base's speed


def test_the_step_holds_what_the_base_runs_in_step_ms(tiny_base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The marginal cost of a token, not the fixed cost of a forward, sets the step: a base that costs 1 ms per
    forward plus 2 µs per token runs 50,000 tokens in 100 ms; the fixed cost sets the padding worth a forward."""
    host = ModelHost(str(tiny_base))
    monkeypatch.setattr(host, "_timed_features", lambda batch: 1e-3 + batch["input_ids"].numel() * 2e-6)
    calibration = host.calibrate(100.0)
    assert calibration.step_tokens == 50_000
    assert calibration.seconds_per_token == pytest.approx(2e-6)
    assert calibration.seconds_per_forward == pytest.approx(1e-3 + 4 * 2e-6)  # one row of 4 tokens
    assert calibration.split_padding == host.split_padding == 504  # 1.008 ms of forward at 2 µs per token
    assert host.calibrate(1.0).step_tokens == STEP_TOKENS["cpu"]  # never below the measured CPU default
    assert host.calibrate(1e6).step_tokens == MAX_STEP_TOKENS


def test_the_server_calibrates_its_step_unless_given_one(tiny_base: Path, tmp_path: Path) -> None:
    make_bundle(tiny_base, tmp_path / "a", name="a")
    for settings, expected, calibrated in (
        ({"step_tokens": 777}, 777, True),  # a given step; the padding is still measured
        ({"warmup": False}, STEP_TOKENS["cpu"], False),
    ):
        app = running_app(tiny_base, tmp_path, **settings)
        try:
            info = app.get("/v1/info").json()
            assert info["step_tokens"] == expected
            assert (info["split_padding"] is not None) == calibrated
        finally:
            app.__exit__(None, None, None)
    app = running_app(tiny_base, tmp_path)  # the tiny base's tokens are nearly free: big steps
    try:
        assert STEP_TOKENS["cpu"] < app.get("/v1/info").json()["step_tokens"] <= MAX_STEP_TOKENS
        assert app.post("/v1/predict", json={"adapter": "a", "inputs": ["fine"]}).status_code == 200
    finally:
        app.__exit__(None, None, None)


# ---------------------------------------------------------------------------------------- who goes first


def _step_by_step(engine: Engine, steps: int, arriving: Callable[[], list[Job]]) -> list[list[Job]]:
    """The jobs of ``steps`` steps the engine forms (its pieces counted as run, without the model), with
    ``arriving()`` admitted before each."""

    async def run() -> list[list[Job]]:
        formed = []
        for _ in range(steps):
            for job in arriving():
                job.progress.plan(engine.config.step_tokens)
                engine._jobs.append(job)
            pieces = await engine._collect()
            for piece in pieces:
                piece.job.progress.next += 1
            engine._jobs = [job for job in engine._jobs if job.progress.remaining]
            formed.append(list(dict.fromkeys(piece.job for piece in pieces)))
        return formed

    return asyncio.run(run())


def test_a_job_passed_over_by_smaller_ones_goes_first_after_two_steps(tiny_base: Path, fifty: Path) -> None:
    """Small jobs fill each step whole; a bigger one waiting beside them used to get only the room they left,
    none under a steady stream of them. Passed over twice, its pieces go first."""
    host = ModelHost(str(tiny_base))
    registry = AdapterRegistry(host, BundleStore(fifty), budget_bytes=1 << 30)
    asyncio.run(registry.load_store())
    adapter = registry.entry("a1").resident
    text = [TextInput("a gorgeous, witty, seductive movie.", None, adapter.max_length)]
    tokens = max(host.token_counts(text))
    engine = Engine(host, BatchingConfig(step_tokens=10 * tokens, max_wait_ms=0), Metrics())
    big: list[Job] = []

    def arriving() -> list[Job]:  # the big job first, then ten small ones before every step: a full step
        small = [Job(adapter, text, 1, PredictiveMode.MAP, 0, [], tokens) for _ in range(10)]
        if not big:
            big.append(Job(adapter, text, 16, PredictiveMode.SAMPLE, 0, [], tokens))  # 16 rows: 2 pieces
            return big + small
        return small

    formed = _step_by_step(engine, 6, arriving)
    assert [big[0] in jobs for jobs in formed] == [False, False, True, True, False, False]
    assert not big[0].progress.remaining and all(len(jobs) == 10 for jobs in formed[4:])  # then small ones fill
