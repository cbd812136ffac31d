"""Local data files (CSV, TSV, JSONL, Parquet) and Arrow streams, read into rows and examples."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from training.data.examples import DataError, Example, TaskData
from training.data.splits import carve


@dataclass(frozen=True)
class Columns:
    text: str = "text"
    label: str = "label"
    text_pair: str | None = None


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a CSV, TSV, JSONL/JSON-lines or Parquet file as dicts."""
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            with path.open(newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ","))
        elif suffix in (".jsonl", ".ndjson", ".json"):
            with path.open(encoding="utf-8") as handle:
                rows = [json.loads(line) for line in handle if line.strip()]
        elif suffix == ".parquet":
            rows = pq.read_table(path).to_pylist()
        else:
            raise DataError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv, .jsonl or .parquet")
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error, OSError) as exc:
        raise DataError(f"{path} cannot be read: {exc}") from exc
    except pa.ArrowException as exc:  # a damaged parquet file
        raise DataError(f"{path} cannot be read as parquet: {exc}") from exc
    if not rows:
        raise DataError(f"{path} holds no rows")
    return rows


def arrow_stream_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of an Arrow IPC stream file (how Hugging Face ``datasets`` saves a split)."""
    return pa.ipc.open_stream(pa.memory_map(str(path))).read_all().to_pylist()


def rows_to_examples(rows: list[dict[str, Any]], columns: Columns, labels: list[str], where: str) -> list[Example]:
    """Convert rows; ``labels`` is extended with new label values in order of first appearance."""
    available = sorted(rows[0])
    for column in (columns.text, columns.label, columns.text_pair):
        if column is not None and column not in rows[0]:
            raise DataError(f"{where} has no column {column!r}; its columns are {available}")
    examples = []
    for number, row in enumerate(rows, start=1):
        text, label = row.get(columns.text), row.get(columns.label)
        if text is None or str(text).strip() == "" or label is None or str(label).strip() == "":
            raise DataError(f"{where}, row {number}: empty {columns.text!r} or {columns.label!r}")
        name = str(label).strip()
        if name not in labels:
            labels.append(name)
        pair = None if columns.text_pair is None else str(row.get(columns.text_pair) or "")
        examples.append(Example(str(text), labels.index(name), pair))
    return examples


def file_task(
    train_file: Path,
    columns: Columns,
    validation_file: Path | None,
    test_file: Path | None,
    validation_size: int,
    seed: int,
) -> TaskData:
    """A task from local files; missing validation/test splits are carved from the training file."""
    labels: list[str] = []
    examples = rows_to_examples(read_rows(train_file), columns, labels, str(train_file))
    if len(labels) < 2:
        raise DataError(f"{train_file} has a single label {labels}: a classifier needs at least two")
    test = rows_to_examples(read_rows(test_file), columns, labels, str(test_file)) if test_file else None
    validation = (
        rows_to_examples(read_rows(validation_file), columns, labels, str(validation_file)) if validation_file else None
    )
    if test is None:
        examples, test = carve(examples, max(validation_size, len(examples) // 10), seed + 1)
    if validation is None:
        examples, validation = carve(examples, validation_size, seed)
    if _label_strings_are_integers(labels):
        examples, validation, test, labels = _sort_integer_labels(labels, examples, validation, test)
    provenance = {"train": {"source": str(train_file)}, "test": {"source": str(test_file or train_file)}}
    return TaskData(train_file.stem, labels, examples, validation, test, provenance)


def text_column(path: Path, column: str) -> list[str]:
    """The non-empty values of one column of a local file (OOD texts)."""
    rows = read_rows(path)
    if column not in rows[0]:
        raise DataError(f"{path} has no column {column!r}; its columns are {sorted(rows[0])}")
    return [str(r[column]) for r in rows if str(r.get(column) or "").strip()]


def _label_strings_are_integers(labels: list[str]) -> bool:
    return all(re.fullmatch(r"-?\d+", name) for name in labels)


def _sort_integer_labels(labels: list[str], *splits: list[Example]) -> tuple[Any, ...]:
    """Integer labels ("0", "1", ...) keep their numeric order rather than order of appearance."""
    ordered = sorted(labels, key=int)
    remap = {labels.index(name): ordered.index(name) for name in labels}
    fixed = [[Example(e.text, remap[e.label], e.text_pair) for e in split] for split in splits]
    return (*fixed, ordered)
