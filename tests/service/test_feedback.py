"""Labels back from production: ids on every answer, the join, its refusals, the bounded store, the online metrics
against an offline recomputation, and the durable log."""

from __future__ import annotations

import asyncio
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from adapters.feedback import FeedbackLog, LabelledAnswer, read_feedback
from service.errors import ConflictError, GoneError, NotFoundError
from service.feedback import AnswerStore, Feedback, ServedAnswer
from service.metrics import Metrics
from tests.service.bundles import TOKEN, make_bundle, running_app
from training.metrics import accuracy, ece, nll

TEXTS = ["good film", "boring plot and dull acting", "the music", "loved it, hated the ending", "plot", "great cast"]


@pytest.fixture(scope="module")
def served(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("feedback")
    make_bundle(tiny_base, root / "adapters" / "lac", name="lac", seed=1, variance=0.3, conformal="lac")
    make_bundle(tiny_base, root / "adapters" / "plain", name="plain", seed=3, labels=("a", "b", "c"))
    client = running_app(tiny_base, root / "adapters", feedback_dir=root / "log", max_feedback=50)
    yield client, root
    client.__exit__(None, None, None)


def predict(client, adapter: str, texts: list[str], **body) -> list[dict]:
    response = client.post("/v1/predict", json={"adapter": adapter, "inputs": texts, "seed": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()["results"]


def send(client, items: list[dict], **kwargs):
    return client.post("/v1/feedback", json={"feedback": items}, **kwargs)


def series(text: str, name: str, **labels: str) -> dict[str, float]:
    """Samples of one metric whose labels include ``labels``, by their full label string."""
    out = {}
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            out[match.group(1)] = float(match.group(2))
    return out


def test_every_answer_has_a_fresh_id(served) -> None:
    client, _ = served
    ids = [r["id"] for r in predict(client, "lac", TEXTS) + predict(client, "lac", TEXTS)]
    assert len(set(ids)) == len(ids) == 2 * len(TEXTS)


def test_online_metrics_equal_the_offline_ones_on_the_same_labelled_stream(served) -> None:
    client, root = served
    results = predict(client, "lac", TEXTS * 3, method="sample", num_samples=3) + predict(
        client, "lac", TEXTS, coverage=0.5, abstain={"max_prob": 0.8}
    )
    labels = [i % 2 for i in range(len(results))]
    items = [{"id": r["id"], "label": ["negative", "positive"][y]} for r, y in zip(results, labels, strict=True)]
    assert send(client, items).json() == {"accepted": len(items)}
    text = client.get("/metrics").text
    version = {"adapter": "lac", "version": "1"}
    probs, truth = torch.tensor([r["probs"] for r in results], dtype=torch.float64), torch.tensor(labels)
    labelled = sum(series(text, "caveat_feedback_labelled_total", **version).values())
    correct = sum(series(text, "caveat_feedback_correct_total", **version).values())
    assert labelled == len(results) and correct / labelled == pytest.approx(accuracy(probs, truth), abs=1e-12)
    (nll_sum,) = series(text, "caveat_feedback_nll_total", **version).values()
    assert nll_sum / labelled == pytest.approx(nll(probs, truth), abs=1e-12)
    confidence = series(text, "caveat_feedback_bin_confidence_total", **version)
    hits = series(text, "caveat_feedback_bin_correct_total", **version)
    gaps = [abs(value - hits.get(key, 0.0)) for key, value in confidence.items()]
    assert sum(gaps) / labelled == pytest.approx(ece(probs, truth), abs=1e-12)  # the same 15 bins
    abstained = series(text, "caveat_feedback_labelled_total", **version, abstained="true")
    assert sum(abstained.values()) == sum(r["abstain"] for r in results)
    cut = 3 * len(TEXTS)
    for target, part in (("0.9", slice(0, cut)), ("0.5", slice(cut, None))):
        pairs = zip(results[part], labels[part], strict=True)
        covered = sum(["negative", "positive"][y] in r["prediction_set"] for r, y in pairs)
        assert list(series(text, "caveat_feedback_covered_total", **version, target=target).values()) == [covered]
        assert list(series(text, "caveat_feedback_sets_total", **version, target=target).values()) == [
            len(results[part])
        ]
    records, torn = read_feedback(root / "log")
    assert torn == 0 and [r.id for r in records][-len(items) :] == [i["id"] for i in items]
    last = records[-1]
    assert last.input == TEXTS[-1] and last.probs == results[-1]["probs"] and last.coverage == 0.5
    sampled = records[-len(items) :][:cut]  # method sample, S = 3
    assert all(len(r.sample_probs) == 3 for r in sampled)  # the draws, for recalibration
    draws = torch.tensor([r.sample_probs for r in sampled], dtype=torch.float64).mean(dim=1)
    torch.testing.assert_close(draws, torch.tensor([r.probs for r in sampled], dtype=torch.float64))


def test_a_labelled_answer_carries_its_served_ood_pvalue(tiny_base: Path, tmp_path: Path) -> None:
    make_bundle(tiny_base, tmp_path / "adapters" / "far", name="far", ood_method="mahalanobis", variance=0.3)
    client = running_app(tiny_base, tmp_path / "adapters", feedback_dir=tmp_path / "log")
    try:
        results = predict(client, "far", TEXTS[:3], method="map")
        assert send(client, [{"id": r["id"], "label": "negative"} for r in results]).status_code == 200
        records, _ = read_feedback(tmp_path / "log")
        assert [r.ood_pvalue for r in records] == [r["uncertainty"]["ood_pvalue"] for r in results]
        assert all(r.sample_probs is None for r in records)  # the MAP has no draws to keep
    finally:
        client.__exit__(None, None, None)


def test_refusals_name_the_item_and_record_nothing(served) -> None:
    client, root = served
    before = len(read_feedback(root / "log")[0])
    (first, second) = predict(client, "plain", TEXTS[:2])
    cases = [
        ([{"id": "nope-0", "label": "a"}], 404, "nope-0"),
        ([{"id": first["id"], "label": "z"}], 422, "feedback[0].label"),
        ([{"id": first["id"], "label": "a"}, {"id": first["id"], "label": "b"}], 409, "feedback[1].id"),
        ([{"id": second["id"], "label": "a"}, {"id": "nope-1", "label": "a"}], 404, "nope-1"),
    ]
    for items, status, named in cases:
        response = send(client, items)
        assert response.status_code == status and named in response.text, (items, response.text)
    assert len(read_feedback(root / "log")[0]) == before  # the batch that held a good item recorded nothing
    assert send(client, [{"id": second["id"], "label": "c"}]).status_code == 200
    again = send(client, [{"id": second["id"], "label": "c"}])
    assert again.status_code == 409 and "already has a label" in again.text
    assert send(client, [{"id": f"x-{i}", "label": "a"} for i in range(51)]).status_code == 413
    assert send(client, []).status_code == 422


def test_feedback_needs_a_token(served, tiny_base: Path, tmp_path: Path) -> None:
    client, _ = served
    result = predict(client, "plain", TEXTS[:1])[0]
    response = client.post("/v1/feedback", json={"feedback": [{"id": result["id"], "label": "a"}]},
                           headers={"Authorization": "Bearer wrong"})  # fmt: skip
    assert response.status_code == 401
    make_bundle(tiny_base, tmp_path / "adapters" / "plain", name="plain", seed=3)
    own = running_app(tiny_base, tmp_path / "adapters", feedback_token="labels", feedback_dir=tmp_path / "log")
    try:
        result = own.post("/v1/predict", json={"adapter": "plain", "inputs": ["x"]}).json()["results"][0]
        item = {"feedback": [{"id": result["id"], "label": "positive"}]}
        assert own.post("/v1/feedback", json=item).status_code == 401  # the admin token is not the feedback token
        response = own.post("/v1/feedback", json=item, headers={"Authorization": "Bearer labels"})
        assert response.status_code == 200, response.text
    finally:
        own.__exit__(None, None, None)
    assert TOKEN != "labels"


def answer(label: int = 0) -> ServedAnswer:
    return ServedAnswer("a", "1", "", ["x", "y"], "text", [0.7, 0.3], 0, None, None, False, "map", time.time())


def test_the_store_drops_the_oldest_beyond_its_bound_and_answers_410_for_them() -> None:
    store = AnswerStore(size=3, ttl_s=100)
    store.add([f"id-{i}" for i in range(5)], [answer() for _ in range(5)])
    assert len(store) == 3 and store.dropped == 2
    for dropped in ("id-0", "id-1"):
        with pytest.raises(GoneError, match="no longer held"):
            store.get(dropped)
    assert store.get("id-4")[0].probs == [0.7, 0.3]
    with pytest.raises(NotFoundError):
        store.get("id-9")


def test_answers_expire_after_their_time() -> None:
    now = [0.0]
    store = AnswerStore(size=10, ttl_s=5, clock=lambda: now[0])
    store.add(["old"], [answer()])
    now[0] = 3.0
    store.add(["new"], [answer()])
    now[0] = 6.0
    with pytest.raises(GoneError):
        store.get("old")
    assert store.get("new") is not None


def record(i: int, padding: int = 0) -> LabelledAnswer:
    return LabelledAnswer(
        id=f"r{i}", adapter="a", version="1", input="t" * padding, label=i % 2, label_name="y", probs=[0.5, 0.5],
        predicted=0, served_at=0.0, labelled_at=1.0,
    )  # fmt: skip


def test_the_log_rotates_and_a_torn_line_is_skipped_without_losing_the_next_batches(tmp_path: Path) -> None:
    log = FeedbackLog(tmp_path, max_bytes=2_000)
    for batch in range(4):
        log.append([record(10 * batch + i, padding=100) for i in range(3)])
    files = sorted(tmp_path.glob("feedback-*.jsonl"))
    assert len(files) > 1
    with files[-1].open("ab") as handle:  # a crash in the middle of a batch
        handle.write(b'{"id": "torn", "adap')
    log.append([record(99)])
    records, torn = read_feedback(tmp_path)
    assert [r.id for r in records] == [f"r{10 * b + i}" for b in range(4) for i in range(3)] + ["r99"]
    assert torn == 1


WRITER = """
import sys
from adapters.feedback import FeedbackLog, LabelledAnswer
log = FeedbackLog(sys.argv[1])
batch = 0
while True:
    log.append([LabelledAnswer(id=f"b{batch}-{i}", adapter="a", version="1", input="x" * 500, label=0,
                               label_name="y", probs=[1.0, 0.0], predicted=0, served_at=0, labelled_at=0)
                for i in range(400)])
    batch += 1
"""


def test_a_process_killed_mid_write_loses_at_most_its_last_batch(tmp_path: Path) -> None:
    for delay in (0.3, 0.55, 0.8):
        directory = tmp_path / f"log-{delay}"
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(directory)], env=env)
        deadline = time.monotonic() + 60
        while not any(directory.glob("*.jsonl")) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(delay)
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        records, torn = read_feedback(directory)  # every line before the last is whole
        batches = math.ceil(len(records) / 400)
        assert batches >= 1 and torn <= 1
        ids = [r.id for r in records]
        assert ids == [f"b{b}-{i}" for b in range(batches) for i in range(400)][: len(ids)]
        whole = len(ids) - len(ids) % 400
        FeedbackLog(directory).append([record(7)])  # appending after the crash keeps everything before it
        after, _ = read_feedback(directory)
        assert [r.id for r in after][:whole] == ids[:whole] and after[-1].id == "r7"


def test_a_log_that_cannot_be_written_answers_503_and_counts_nothing(tiny_base: Path, tmp_path: Path) -> None:
    make_bundle(tiny_base, tmp_path / "adapters" / "plain", name="plain", seed=3)
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the log directory should be")
    client = running_app(tiny_base, tmp_path / "adapters", feedback_dir=blocked)
    try:
        result = predict(client, "plain", TEXTS[:1])[0]
        response = send(client, [{"id": result["id"], "label": "positive"}])
        assert response.status_code == 503 and "nothing of this batch was recorded" in response.text
        assert not series(client.get("/metrics").text, "caveat_feedback_labelled_total")
        assert send(client, [{"id": result["id"], "label": "positive"}]).status_code == 503  # still unlabelled
    finally:
        client.__exit__(None, None, None)


def test_two_concurrent_batches_with_one_id_count_it_once(tmp_path: Path) -> None:
    """The second batch arrives while the first is being written (fsync): it is refused, not counted twice."""

    class SlowLog(FeedbackLog):
        def append(self, answers):
            time.sleep(0.2)
            return super().append(answers)

    feedback = Feedback(AnswerStore(10, 100), Metrics(), SlowLog(tmp_path))
    feedback.remember(["a-0"], [answer()])

    async def both():
        return await asyncio.gather(feedback.record([("a-0", "x")]), feedback.record([("a-0", "y")]),
                                    return_exceptions=True)  # fmt: skip

    first, second = asyncio.run(both())
    assert first == 1 and isinstance(second, ConflictError)
    assert [r.label_name for r in read_feedback(tmp_path)[0]] == ["x"]


def test_a_store_of_size_0_keeps_nothing_and_says_so(tiny_base: Path, tmp_path: Path) -> None:
    make_bundle(tiny_base, tmp_path / "adapters" / "plain", name="plain", seed=3)
    client = running_app(tiny_base, tmp_path / "adapters", feedback_store_size=0, feedback_dir=tmp_path / "log")
    try:
        result = predict(client, "plain", TEXTS[:1])[0]
        response = send(client, [{"id": result["id"], "label": "positive"}])
        assert response.status_code == 404 and "keeps no answers" in response.text
        assert not (tmp_path / "log").exists()
    finally:
        client.__exit__(None, None, None)


def test_two_stores_on_one_file_share_answers_and_claims(tmp_path: Path) -> None:
    """The stores of two ``--workers`` processes: an answer one added is found by the other, and claimed once."""
    first, second = (AnswerStore(10, 100, path=tmp_path / "answers.sqlite") for _ in range(2))
    first.add(["a-0", "a-1"], [answer(), answer()])
    assert second.get("a-1")[0].probs == [0.7, 0.3] and len(second) == 2
    assert second.claim(["a-0"]) == []
    assert first.claim(["a-1", "a-0"]) == ["a-0"] and not first.get("a-1")[1]  # all or none
    second.release(["a-0"])
    assert first.claim(["a-0", "a-1"]) == []
    second.add([f"b-{i}" for i in range(10)], [answer() for _ in range(10)])
    with pytest.raises(GoneError):
        first.get("a-0")
