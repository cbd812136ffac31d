"""The entry points: a task, a shift set or an OOD set by embedded name or local file path.

``load_task`` gives train / validation / test splits and the label names; ``load_shift`` a labelled set in
the same label space, used only for evaluation under domain shift; ``load_ood`` inputs used only for
out-of-distribution detection. Hub ids are refused: this machine class reaches no model hub. Every problem
with the input is a :class:`DataError` with a message that says what to change.
"""

from __future__ import annotations

from pathlib import Path

from training.config import MULTIPLE_CHOICE_SETS
from training.data.embedded import bbc_news, drug_reviews, sst2_task
from training.data.examples import DataError, Example, TaskData
from training.data.files import Columns, file_task, read_rows, rows_to_examples, text_column
from training.data.multiple_choice import arc_easy_task, multiple_choice_set

EMBEDDED_TASKS = ("sst2", "arc-easy")
EMBEDDED_SHIFT = ("drugreviews", "openbookqa")
EMBEDDED_OOD = ("bbcnews", "openbookqa")
DEFAULT_COLUMNS = Columns()


def load_task(
    dataset: str,
    *,
    columns: Columns = DEFAULT_COLUMNS,
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
    name: str, labels: list[str], columns: Columns = DEFAULT_COLUMNS, prompt_template: str | None = None
) -> tuple[str, list[Example]]:
    """A labelled set in the task's label space, for evaluation under domain shift."""
    if name == "drugreviews":
        return name, drug_reviews(labels)
    if name in MULTIPLE_CHOICE_SETS:
        return name, multiple_choice_set(name, prompt_template)
    if not Path(name).suffix:
        raise DataError(f"unknown shift dataset {name!r}: use {', '.join(EMBEDDED_SHIFT)} or a local file")
    known = list(labels)
    examples = rows_to_examples(read_rows(Path(name)), columns, known, name)
    if len(known) > len(labels):
        raise DataError(f"{name} has labels {known[len(labels) :]} that the task does not have ({labels})")
    return Path(name).stem, examples


def load_ood(name: str, column: str = "text", prompt_template: str | None = None) -> tuple[str, list[Example]]:
    """Inputs for out-of-distribution detection (labels are not used: texts get label 0)."""
    if name in MULTIPLE_CHOICE_SETS:
        return name, multiple_choice_set(name, prompt_template)
    if name == "bbcnews":
        texts = bbc_news()
    elif Path(name).suffix:
        name, texts = Path(name).stem, text_column(Path(name), column)
    else:
        raise DataError(f"unknown OOD dataset {name!r}: use {', '.join(EMBEDDED_OOD)} or a local file")
    return name, [Example(text, 0) for text in texts]
