"""Data read through Hugging Face ``datasets``: local files (CSV, TSV, JSON, JSONL, Parquet), directories
written by ``save_to_disk`` and hub ids; Arrow streams of the embedded sets; rows to examples.

Every source becomes a mapping of split name → ``datasets.Dataset``. Labels are named by the training
split (a ``ClassLabel`` feature's names when it has one, else the values in order of first appearance,
integers in numeric order); every other split must stay inside that label space.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
from datasets import ClassLabel, Dataset, DatasetDict

from training import hub
from training.data.examples import DataError, Example

# suffix → (datasets builder, its options); CSV is read as utf-8-sig so a byte-order mark is not a name
BUILDERS: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", {"encoding": "utf-8-sig"}),
    ".tsv": ("csv", {"encoding": "utf-8-sig", "sep": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".ndjson": ("json", {}),
    ".parquet": ("parquet", {}),
}
SAVED_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")  # what save_to_disk writes

datasets.logging.set_verbosity(logging.CRITICAL)  # its own errors are re-raised as one-line DataErrors


@dataclass(frozen=True)
class Columns:
    text: str = "text"
    label: str = "label"
    text_pair: str | None = None


def read_file(path: Path) -> Dataset:
    """One local file as a ``Dataset`` (``datasets.load_dataset(<builder>, data_files=...)``)."""
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in BUILDERS:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use {', '.join(BUILDERS)}")
    builder, options = BUILDERS[suffix]
    if not path.read_bytes().strip():
        raise DataError(f"{path} holds no rows")
    if builder == "json":
        _check_json(path)
    try:
        data = datasets.load_dataset(builder, data_files=str(path), split="train", **options)
    except Exception as exc:  # datasets wraps the parser's error; its cause is the message a user can act on
        raise DataError(f"{path} cannot be read as {builder}: {_cause(exc)}") from exc
    if len(data) == 0:
        raise DataError(f"{path} holds no rows")
    return data


def load_saved(path: Path) -> DatasetDict:
    """A directory written by ``Dataset.save_to_disk`` (one ``train`` split) or ``DatasetDict.save_to_disk``."""
    try:
        data = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"{path} cannot be read as a saved dataset: {_cause(exc)}") from exc
    return data if isinstance(data, DatasetDict) else DatasetDict(train=data)


def load_hub(name: str, config_name: str | None) -> DatasetDict:
    """A hub dataset id (``owner/name``), from the hub or, offline, from the ``datasets`` cache."""
    offline = hub.offline()
    try:
        data = datasets.load_dataset(name, config_name)
    except (ConnectionError, FileNotFoundError) as exc:
        if offline:
            raise DataError(
                f"--dataset {name} is no embedded name, local file or save_to_disk directory, and as a hub id it "
                f"is not in the datasets cache while {hub.offline_reason()}"
            ) from exc
        raise DataError(f"--dataset {name} cannot be loaded: {_cause(exc)}") from exc
    except Exception as exc:  # an unknown config, a damaged cache entry, ...
        raise DataError(f"--dataset {name} cannot be loaded: {_cause(exc)}") from exc
    return data if isinstance(data, DatasetDict) else DatasetDict(train=data)


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / marker).is_file() for marker in SAVED_MARKERS)


def arrow_stream_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of an Arrow IPC stream file (how Hugging Face ``datasets`` saves a split)."""
    return pa.ipc.open_stream(pa.memory_map(str(path))).read_all().to_pylist()


def label_names(data: Dataset, columns: Columns, where: str) -> list[str]:
    """The training split's label names: its ``ClassLabel`` names, else its values (integers sorted)."""
    _check_columns(data, columns, where)
    feature = data.features[columns.label]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    names = list(dict.fromkeys(str(v).strip() for v in data[columns.label] if v is not None and str(v).strip()))
    if all(re.fullmatch(r"-?\d+", name) for name in names):
        names.sort(key=int)
    return names


def to_examples(data: Dataset, columns: Columns, labels: list[str], where: str) -> list[Example]:
    """A split's rows as examples; a label outside ``labels`` is refused, naming it and ``where``."""
    _check_columns(data, columns, where)
    feature = data.features[columns.label]
    own_names = feature.names if isinstance(feature, ClassLabel) else None
    index = {name: i for i, name in enumerate(labels)}
    examples = []
    for number, row in enumerate(data, start=1):
        text, label = row[columns.text], row[columns.label]
        if own_names is not None and label is not None:
            if not 0 <= label < len(own_names):
                raise DataError(
                    f"{where}, row {number}: label {label} is not one of its {len(own_names)} classes (an unlabelled "
                    "split? name another with --validation-split/--test-split)"
                )
            label = own_names[label]
        if text is None or str(text).strip() == "" or label is None or str(label).strip() == "":
            raise DataError(f"{where}, row {number}: empty {columns.text!r} or {columns.label!r}")
        name = str(label).strip()
        if name not in index:
            raise DataError(f"{where} has label {name!r} (row {number}), which the training data does not: {labels}")
        pair = None if columns.text_pair is None else str(row[columns.text_pair] or "")
        examples.append(Example(str(text), index[name], pair))
    return examples


def text_column(path: Path, column: str) -> list[str]:
    """The non-empty values of one column of a local file (OOD texts)."""
    data = read_file(path)
    if column not in data.column_names:
        raise DataError(f"{path} has no column {column!r}; its columns are {sorted(data.column_names)}")
    return [str(v) for v in data[column] if str(v or "").strip()]


def _check_columns(data: Dataset, columns: Columns, where: str) -> None:
    for column in (columns.text, columns.label, columns.text_pair):
        if column is not None and column not in data.column_names:
            raise DataError(f"{where} has no column {column!r}; its columns are {sorted(data.column_names)}")


def _check_json(path: Path) -> None:
    """A JSON file is one array of objects or one object per line; say which line breaks that."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text: {exc}") from exc
    if path.suffix.lower() == ".json" and text.lstrip().startswith("{"):
        try:  # one object (a dict of columns): datasets reads it whole
            json.loads(text)
            return
        except json.JSONDecodeError:
            pass  # else JSON lines under a .json name
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
        wrong = next((i for i, row in enumerate(rows, start=1) if not isinstance(row, dict)), None)
        if wrong is not None:
            raise DataError(f"{path}: item {wrong} of the JSON array is not an object (rows are objects)")
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {number}: invalid JSON (column {exc.colno}: {exc.msg})") from exc
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {number}: a {type(row).__name__}, not an object (one object per line)")


def _cause(exc: BaseException) -> str:
    """The innermost message: ``datasets`` wraps the parser's error in a generic one."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
