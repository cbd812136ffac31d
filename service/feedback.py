"""Labels back from production: recent answers kept by id, joined to the labels ``POST /v1/feedback`` brings, counted
in the online metrics and appended to the durable log (``adapters.feedback``).

The store holds the last ``feedback_store_size`` answers for ``feedback_ttl_s`` seconds (oldest dropped first, and
counted); ids it dropped are remembered (as many again, ids only) so that a late label is told 410 Gone, not 404.
A batch is checked whole before anything is recorded: an unknown id (404), a dropped or expired one (410), one
labelled before or twice in the batch (409), or a label the adapter does not have (422) refuses the batch, so a
client can fix it and send it again without counting anything twice.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.feedback import FeedbackLog, LabelledAnswer
from service.errors import ConflictError, FeedbackLogError, GoneError, InvalidLabelError, NotFoundError
from service.metrics import Metrics

log = logging.getLogger("caveat.serve")


@dataclass
class ServedAnswer:
    """What the store keeps of one answer: enough to score it against its label and to recalibrate on it."""

    adapter: str
    version: str
    sha256: str
    labels: list[str]
    input: str | dict[str, Any]
    probs: list[float]
    predicted: int
    prediction_set: list[int] | None
    coverage: float | None
    abstained: bool
    method: str
    served_at: float
    num_choices: int | None = None
    labelled: bool = False


def answer_ids(count: int) -> list[str]:
    """Fresh ids for a request's answers: a random token per request and the input's index."""
    token = secrets.token_hex(8)
    return [f"{token}-{i}" for i in range(count)]


class AnswerStore:
    """Recent answers by id, bounded in count and age (``clock``: monotonic seconds)."""

    def __init__(self, size: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.size, self.ttl_s, self.clock = size, ttl_s, clock
        self._answers: OrderedDict[str, tuple[float, ServedAnswer]] = OrderedDict()
        self._gone: OrderedDict[str, None] = OrderedDict()
        self.dropped = 0  # answers dropped unlabelled to keep the bound

    def __len__(self) -> int:
        return len(self._answers)

    def add(self, ids: Sequence[str], answers: Sequence[ServedAnswer]) -> None:
        now = self.clock()
        for answer_id, answer in zip(ids, answers, strict=True):
            self._answers[answer_id] = (now, answer)
        while len(self._answers) > self.size:
            _, (_, old) = self._forget(next(iter(self._answers)))
            self.dropped += not old.labelled

    def get(self, answer_id: str) -> ServedAnswer:
        """The answer of ``answer_id``; 404 when never held, 410 when dropped or expired."""
        self._expire()
        held = self._answers.get(answer_id)
        if held is not None:
            return held[1]
        if answer_id in self._gone:
            raise GoneError(
                f"answer {answer_id!r} is no longer held (answers are kept for {self.ttl_s:g} s, at most {self.size})"
            )
        raise NotFoundError(f"no answer has id {answer_id!r}")

    def _expire(self) -> None:
        cutoff = self.clock() - self.ttl_s
        while self._answers and next(iter(self._answers.values()))[0] < cutoff:
            self._forget(next(iter(self._answers)))

    def _forget(self, answer_id: str) -> tuple[str, tuple[float, ServedAnswer]]:
        held = self._answers.pop(answer_id)
        self._gone[answer_id] = None
        while len(self._gone) > self.size:
            self._gone.popitem(last=False)
        return answer_id, held


class Feedback:
    """The server's feedback side: the answer store, the online metrics and the durable log."""

    def __init__(self, store: AnswerStore, metrics: Metrics, log: FeedbackLog) -> None:
        self.store, self.metrics, self.log = store, metrics, log
        self._writing = asyncio.Lock()  # one batch at a time reaches the log, in arrival order

    @classmethod
    def from_settings(cls, size: int, ttl_s: float, directory: Path, max_bytes: int, metrics: Metrics) -> Feedback:
        return cls(AnswerStore(size, ttl_s), metrics, FeedbackLog(directory, max_bytes))

    def remember(self, ids: Sequence[str], answers: Sequence[ServedAnswer]) -> None:
        if self.store.size == 0:  # feedback switched off
            return
        dropped = self.store.dropped
        self.store.add(ids, answers)
        self.metrics.feedback_store.set(len(self.store))
        if self.store.dropped > dropped:
            self.metrics.feedback_dropped.inc(self.store.dropped - dropped)

    async def record(self, items: Sequence[tuple[str, str]]) -> int:
        """Join ``(id, label)`` pairs to their answers, all checked first; log them (fsync'd), then count them.

        The answers are marked labelled before the log is written, so that a concurrent batch with the same id is
        refused (409) rather than counted twice; a failed write unmarks them."""
        joined = self._join(items)
        for _, answer, _ in joined:
            answer.labelled = True
        now = time.time()
        records = [_labelled(answer_id, answer, label, now) for answer_id, answer, label in joined]
        async with self._writing:
            try:
                await asyncio.to_thread(self.log.append, records)
            except OSError as exc:
                for _, answer, _ in joined:
                    answer.labelled = False
                log.error("feedback log %s: %s", self.log.directory, exc)
                raise FeedbackLogError(
                    f"the feedback log cannot be written ({exc.strerror or exc}); nothing of this batch was recorded"
                ) from None
        for record in records:
            self.metrics.observe_feedback(record)
        return len(records)

    def _join(self, items: Sequence[tuple[str, str]]) -> list[tuple[str, ServedAnswer, int]]:
        if self.store.size == 0:
            raise NotFoundError("this server keeps no answers for feedback (feedback_store_size is 0)")
        seen: set[str] = set()
        joined = []
        for index, (answer_id, label) in enumerate(items):
            if answer_id in seen:
                raise ConflictError(f"feedback[{index}].id: {answer_id!r} appears twice in this batch")
            seen.add(answer_id)
            answer = self.store.get(answer_id)
            if answer.labelled:
                raise ConflictError(f"feedback[{index}].id: answer {answer_id!r} already has a label")
            allowed = answer.labels[: answer.num_choices] if answer.num_choices else answer.labels
            if label not in allowed:
                raise InvalidLabelError(
                    f"feedback[{index}].label: {label!r} is not a label of answer {answer_id!r} "
                    f"(adapter {answer.adapter!r}: {', '.join(allowed)})"
                )
            joined.append((answer_id, answer, allowed.index(label)))
        return joined


def _labelled(answer_id: str, answer: ServedAnswer, label: int, now: float) -> LabelledAnswer:
    return LabelledAnswer(
        id=answer_id, adapter=answer.adapter, version=answer.version, sha256=answer.sha256, input=answer.input,
        label=label, label_name=answer.labels[label], probs=answer.probs, predicted=answer.predicted,
        prediction_set=answer.prediction_set, coverage=answer.coverage, abstained=answer.abstained,
        method=answer.method, served_at=answer.served_at, labelled_at=now,
    )  # fmt: skip
