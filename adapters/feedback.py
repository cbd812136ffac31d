"""The labelled-answer log: what the server appends when production labels come back (``POST /v1/feedback``) and
what ``caveat-train recalibrate`` reads.

One JSON object per line (:class:`LabelledAnswer`), in files ``feedback-<NNNNNN>.jsonl`` of one directory; a file
past its size limit is closed and the next one opened. Every batch is written with one ``write`` on a file opened
for appending and ``fsync``'d before the request is answered, so a crash loses at most the batch being written:
earlier lines are never rewritten, and a torn line (ended by the next append) is skipped by the reader.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

LOG_NAME = re.compile(r"feedback-(\d{6})\.jsonl")
DEFAULT_MAX_BYTES = 64 * 2**20
LOGGED_DRAWS = 64  # per-draw probabilities kept of a posterior answer (a GLM may draw 65,536)


class LabelledAnswer(BaseModel):
    """A served answer joined to the label that came back for it.

    ``input`` is the input as the request sent it (a text, ``{text, text_pair}`` or ``{question, choices}``), so
    that recalibration can run the bundle on it again; ``probs`` and the rest are what was served.
    """

    model_config = ConfigDict(extra="ignore")

    id: str
    adapter: str
    version: str
    sha256: str = ""
    input: str | dict[str, Any]
    label: int = Field(ge=0, description="the index of the true label among the adapter's labels")
    label_name: str
    probs: list[float]
    predicted: int
    prediction_set: list[int] | None = None
    coverage: float | None = Field(default=None, description="the level the set was served at")
    abstained: bool = False
    method: str = ""
    served_at: float = Field(description="UNIX time of the answer")
    labelled_at: float = Field(description="UNIX time the label came back")
    ood_pvalue: float | None = Field(
        default=None, description="the served OOD p-value (adapters with an OOD score): how far out the input was"
    )
    sample_probs: list[list[float]] | None = Field(
        default=None,
        description=f"a posterior predictive's per-draw probabilities (the first {LOGGED_DRAWS} draws, S × C): "
        "what a temperature over that predictive is refitted on; none for the MAP",
    )


class FeedbackLog:
    """Appends batches of :class:`LabelledAnswer` to rotated JSONL files in ``directory`` (created on first use).

    Thread- and process-safe: the server appends from worker threads, one batch at a time, and the processes of
    ``caveat-serve --workers`` append to one log (an exclusive ``flock`` on ``.lock`` in the directory).
    """

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()

    def append(self, answers: Sequence[LabelledAnswer]) -> Path:
        """Write ``answers`` as one batch and fsync it; returns the file written."""
        data = "".join(answer.model_dump_json() + "\n" for answer in answers).encode()
        with self._lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            with open(self.directory / ".lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
                return self._append(data)

    def _append(self, data: bytes) -> Path:
        path = self._current(len(data))
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size and not _ends_with_newline(fd):  # a torn line from a crash: end it
                data = b"\n" + data
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
        return path

    def _current(self, incoming: int) -> Path:
        files = log_files(self.directory)
        if not files:
            return self.directory / "feedback-000001.jsonl"
        last = files[-1]
        if last.stat().st_size and last.stat().st_size + incoming > self.max_bytes:
            number = int(LOG_NAME.fullmatch(last.name).group(1)) + 1
            return self.directory / f"feedback-{number:06d}.jsonl"
        return last


def _ends_with_newline(fd: int) -> bool:
    return os.pread(fd, 1, os.fstat(fd).st_size - 1) == b"\n"


def log_files(path: str | os.PathLike[str]) -> list[Path]:
    """The log files of a directory in write order, or ``[path]`` for a file."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    return sorted(p for p in path.iterdir() if LOG_NAME.fullmatch(p.name))


def read_feedback(path: str | os.PathLike[str]) -> tuple[list[LabelledAnswer], int]:
    """Every complete record of a log file or directory, in write order, and how many torn lines (the partial
    batch a crash left, ended by the next append) were skipped.

    Raises:
        ValueError: a line that is JSON but not a record (naming the file and line): not a feedback log.
    """
    records, torn = [], 0
    for file in log_files(path):
        for number, line in enumerate(file.read_bytes().split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError:
                torn += 1
                continue
            try:
                records.append(LabelledAnswer.model_validate(value))
            except ValueError as exc:
                raise ValueError(f"{file}:{number}: not a feedback record ({exc})") from None
    return records, torn
