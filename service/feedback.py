"""Labels back from production: recent answers kept by id, joined to the labels ``POST /v1/feedback`` brings, counted
in the online metrics and appended to the durable log (``adapters.feedback``).

The store holds the last ``feedback_store_size`` answers for ``feedback_ttl_s`` seconds (oldest dropped first, and
counted); ids it dropped are remembered (as many again, ids only) so that a late label is told 410 Gone, not 404.
The worker processes of one server share it (:class:`AnswerStore`).
A batch is checked whole before anything is recorded: an unknown id (404), a dropped or expired one (410), one
labelled before or twice in the batch (409), or a label the adapter does not have (422) refuses the batch, so a
client can fix it and send it again without counting anything twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
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
    sample_probs: list[list[float]] | None = None  # a posterior predictive's first draws, for recalibration
    ood_pvalue: float | None = None  # how far out the input was (adapters with an OOD score)


def answer_ids(count: int) -> list[str]:
    """Fresh ids for a request's answers: a random token per request and the input's index."""
    token = secrets.token_hex(8)
    return [f"{token}-{i}" for i in range(count)]


class AnswerStore:
    """Recent answers by id, bounded in count and age (``clock``: monotonic seconds, one clock for every process of
    a machine on Linux).

    The answers live in SQLite: in memory for one process, or in the file ``path`` that the processes of
    ``caveat-serve --workers N`` share, so that an answer one worker served takes its label through any other. Rows
    are numbered in arrival order (``seq``); the last ``size`` are held, the ``size`` before them are remembered as
    dropped (their answer erased), older rows are deleted. Every change is one transaction, so a label is claimed
    by one request only, whichever process it reaches.
    """

    def __init__(
        self, size: int, ttl_s: float, clock: Callable[[], float] = time.monotonic, path: Path | None = None
    ) -> None:
        self.size, self.ttl_s, self.clock = size, ttl_s, clock
        self.dropped = 0  # answers this process's additions dropped unlabelled to keep the bound
        self._db = sqlite3.connect(
            ":memory:" if path is None else path, isolation_level=None, check_same_thread=False, timeout=10
        )
        if path is not None:  # the answers are a cache: no fsync, and readers never wait for the writer
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=OFF")
        with self._transaction():
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS answers (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, "
                "at REAL NOT NULL, labelled INTEGER NOT NULL DEFAULT 0, answer TEXT)"
            )
            self._db.execute("CREATE INDEX IF NOT EXISTS answers_at ON answers (at)")

    def __len__(self) -> int:
        """Answers held and not expired."""
        last = self._db.execute("SELECT max(seq) FROM answers").fetchone()[0]
        if last is None:
            return 0
        first = self._db.execute(
            "SELECT seq FROM answers WHERE at >= ? ORDER BY at LIMIT 1", (self.clock() - self.ttl_s,)
        ).fetchone()
        return 0 if first is None else last - max(first[0], last - self.size + 1) + 1

    def add(self, ids: Sequence[str], answers: Sequence[ServedAnswer]) -> None:
        now = self.clock()
        rows = [(i, now, json.dumps(a.__dict__)) for i, a in zip(ids, answers, strict=True)]  # asdict: 10x slower
        with self._transaction() as db:
            db.executemany("INSERT INTO answers (id, at, answer) VALUES (?, ?, ?)", rows)
            last = db.execute("SELECT max(seq) FROM answers").fetchone()[0]
            bound = last - self.size  # rows up to here are no longer held; those of this batch's arrival are new
            newly = (bound - len(rows), bound)
            self.dropped += db.execute(
                "SELECT count(*) FROM answers WHERE seq > ? AND seq <= ? AND labelled = 0 AND answer IS NOT NULL "
                "AND at >= ?",
                (*newly, now - self.ttl_s),
            ).fetchone()[0]
            db.execute("UPDATE answers SET answer = NULL WHERE seq > ? AND seq <= ?", newly)
            db.execute("DELETE FROM answers WHERE seq <= ?", (bound - self.size,))

    def get(self, answer_id: str) -> tuple[ServedAnswer, bool]:
        """The answer of ``answer_id`` and whether it has its label; 404 when never held, 410 when dropped or
        expired."""
        row = self._db.execute("SELECT at, labelled, answer FROM answers WHERE id = ?", (answer_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no answer has id {answer_id!r}")
        at, labelled, answer = row
        if answer is None or at < self.clock() - self.ttl_s:
            raise GoneError(
                f"answer {answer_id!r} is no longer held (answers are kept for {self.ttl_s:g} s, at most {self.size})"
            )
        return ServedAnswer(**json.loads(answer)), bool(labelled)

    def claim(self, ids: Sequence[str]) -> list[str]:
        """Mark the answers of ``ids`` labelled, all or none: the ids labelled already (nothing marked then)."""
        marks = ",".join("?" * len(ids))
        with self._transaction() as db:
            taken = [r[0] for r in db.execute(f"SELECT id FROM answers WHERE labelled = 1 AND id IN ({marks})", ids)]
            if not taken:
                db.execute(f"UPDATE answers SET labelled = 1 WHERE id IN ({marks})", ids)
        return taken

    def release(self, ids: Sequence[str]) -> None:
        """Undo :meth:`claim` (the labels could not be recorded)."""
        with self._transaction() as db:
            db.execute(f"UPDATE answers SET labelled = 0 WHERE id IN ({','.join('?' * len(ids))})", ids)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taking the write lock at once (so that a check and its change see one state)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")


class Feedback:
    """The server's feedback side: the answer store, the online metrics and the durable log."""

    def __init__(self, store: AnswerStore, metrics: Metrics, log: FeedbackLog) -> None:
        self.store, self.metrics, self.log = store, metrics, log
        self._writing = asyncio.Lock()  # one batch at a time reaches the log, in arrival order

    @classmethod
    def from_settings(
        cls, size: int, ttl_s: float, directory: Path, max_bytes: int, metrics: Metrics, shared: Path | None = None
    ) -> Feedback:
        """``shared``: the answer store's file when several processes serve (``--workers``)."""
        return cls(AnswerStore(size, ttl_s, path=shared), metrics, FeedbackLog(directory, max_bytes))

    @property
    def enabled(self) -> bool:
        """Whether answers are kept (``feedback_store_size`` 0 switches feedback off)."""
        return self.store.size > 0

    def remember(self, ids: Sequence[str], answers: Sequence[ServedAnswer]) -> None:
        if not self.enabled:
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
        ids = [answer_id for answer_id, _, _ in joined]
        taken = self.store.claim(ids)
        if taken:  # labelled by a concurrent batch (of this process or another) since the check
            raise ConflictError(f"feedback[{ids.index(taken[0])}].id: answer {taken[0]!r} already has a label")
        now = time.time()
        records = [_labelled(answer_id, answer, label, now) for answer_id, answer, label in joined]
        async with self._writing:
            try:
                await asyncio.to_thread(self.log.append, records)
            except OSError as exc:
                self.store.release(ids)
                log.error("feedback log %s: %s", self.log.directory, exc)
                raise FeedbackLogError(
                    f"the feedback log cannot be written ({exc.strerror or exc}); nothing of this batch was recorded"
                ) from None
        for record in records:
            self.metrics.observe_feedback(record)
        return len(records)

    def _join(self, items: Sequence[tuple[str, str]]) -> list[tuple[str, ServedAnswer, int]]:
        if not self.enabled:
            raise NotFoundError("this server keeps no answers for feedback (feedback_store_size is 0)")
        seen: set[str] = set()
        joined = []
        for index, (answer_id, label) in enumerate(items):
            if answer_id in seen:
                raise ConflictError(f"feedback[{index}].id: {answer_id!r} appears twice in this batch")
            seen.add(answer_id)
            answer, labelled = self.store.get(answer_id)
            if labelled:
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
        method=answer.method, served_at=answer.served_at, labelled_at=now, sample_probs=answer.sample_probs,
        ood_pvalue=answer.ood_pvalue,
    )  # fmt: skip
