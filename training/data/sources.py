"""The entry points: a task, a shift set or an OOD set by embedded name, local file, ``save_to_disk``
directory or hub id.

``load_task`` gives train / validation / test splits and the label names; ``load_shift`` a labelled set in
the same label space, used only for evaluation under domain shift; ``load_ood`` inputs used only for
out-of-distribution detection. Every problem with the input is a :class:`DataError` with a message that
says what to change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, DatasetDict

from adapters.tasks import ChoiceFormat
from training.config import MULTIPLE_CHOICE_SETS
from training.data.embedded import bbc_news, drug_reviews, sst2_task
from training.data.examples import DataError, Example, TaskData
from training.data.files import (
    BUILDERS,
    Columns,
    is_saved_dataset,
    label_names,
    load_hub,
    load_saved,
    read_file,
    text_column,
    to_examples,
)
from training.data.multiple_choice import arc_easy_task, multiple_choice_set
from training.data.splits import carve, carved_size

EMBEDDED_TASKS = ("sst2", "arc-easy")
EMBEDDED_SHIFT = ("drugreviews", "openbookqa", "arc-challenge")
EMBEDDED_OOD = ("bbcnews", "openbookqa")
DEFAULT_COLUMNS = Columns()
DEFAULT_VALIDATION_SIZE = 0.1
HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


@dataclass(frozen=True)
class SplitNames:
    """Which splits of a saved or hub dataset to use; ``None``: the split of that name if there is one,
    else carved from the training split."""

    train: str = "train"
    validation: str | None = None
    test: str | None = None


def load_task(
    dataset: str,
    *,
    columns: Columns = DEFAULT_COLUMNS,
    validation_file: str | None = None,
    test_file: str | None = None,
    validation_size: float = DEFAULT_VALIDATION_SIZE,
    seed: int = 0,
    choice_format: ChoiceFormat | None = None,
    dataset_config: str | None = None,
    splits: SplitNames | None = None,
) -> TaskData:
    """Load a task by embedded name (``sst2``, ``arc-easy``), local file, saved directory or hub id."""
    if dataset == "sst2":
        task = sst2_task(validation_size, seed)
    elif dataset == "arc-easy":
        task = arc_easy_task(validation_size, seed, choice_format or ChoiceFormat())
    else:
        data = open_dataset(dataset, dataset_config)
        files = (Path(validation_file) if validation_file else None, Path(test_file) if test_file else None)
        task = dataset_task(dataset, data, columns, splits or SplitNames(), files, validation_size, seed)
    for split in ("train", "validation", "test"):
        if not getattr(task, split):
            raise DataError(f"{dataset}: the {split} split is empty")
    return task


def open_dataset(name: str, config_name: str | None = None) -> DatasetDict:
    """A local file (one ``train`` split), a ``save_to_disk`` directory, or a hub id."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not is_saved_dataset(path):
            raise DataError(f"--dataset {name} is a directory but not one written by Dataset(Dict).save_to_disk")
        return load_saved(path)
    if path.is_file() or path.suffix.lower() in BUILDERS or name.startswith((".", "/", "~")):
        return DatasetDict(train=read_file(path))
    if HUB_ID.fullmatch(name):
        return load_hub(name, config_name)
    raise DataError(
        f"unknown dataset {name!r}: use an embedded name ({', '.join(EMBEDDED_TASKS)}), a local "
        f"{'/'.join(BUILDERS)} file, a save_to_disk directory or a hub id"
    )


def dataset_task(
    name: str,
    data: DatasetDict,
    columns: Columns,
    splits: SplitNames,
    files: tuple[Path | None, Path | None],
    validation_size: float,
    seed: int,
) -> TaskData:
    """Train on the training split; validation and test from their files, their splits, or carved."""
    where = f"{name} [{splits.train}]" if len(data) > 1 else name
    train_split = _split(data, splits.train, name, "--train-split")
    labels = label_names(train_split, columns, where)
    if len(labels) < 2:
        raise DataError(f"{where} has a single label {labels}: a classifier needs at least two")
    train = to_examples(train_split, columns, labels, where)
    provenance: dict = {"train": {"source": name, "split": splits.train}, "carved": {}}
    held_out = {}
    for split, file, split_name in _held_out_sources(data, splits, files, name):
        if file is not None:
            held_out[split] = to_examples(read_file(file), columns, labels, str(file))
            provenance[split] = {"source": str(file)}
        elif split_name is not None:
            part = _split(data, split_name, name, f"--{split}-split")
            held_out[split] = to_examples(part, columns, labels, f"{name} [{split_name}]")
            provenance[split] = {"source": name, "split": split_name}
    if "test" not in held_out:
        size = max(carved_size(validation_size, len(train)), len(train) // 10)
        train, held_out["test"] = carve(train, size, seed + 1, "test")
        provenance["carved"]["test"] = size
    if "validation" not in held_out:
        size = carved_size(validation_size, len(train))
        train, held_out["validation"] = carve(train, size, seed)
        provenance["carved"]["validation"] = size
    stem = Path(name).stem if Path(name).suffix.lower() in BUILDERS else Path(name).name
    return TaskData(stem, labels, train, held_out["validation"], held_out["test"], provenance)


def load_shift(
    name: str, labels: list[str], columns: Columns = DEFAULT_COLUMNS, choice_format: ChoiceFormat | None = None
) -> tuple[str, list[Example]]:
    """A labelled set in the task's label space, for evaluation under domain shift."""
    if name == "drugreviews":
        return name, drug_reviews(labels)
    if name in MULTIPLE_CHOICE_SETS:
        return name, multiple_choice_set(name, choice_format or ChoiceFormat())
    if not Path(name).suffix:
        raise DataError(f"unknown shift dataset {name!r}: use {', '.join(EMBEDDED_SHIFT)} or a local file")
    return Path(name).stem, to_examples(read_file(Path(name)), columns, labels, name)


def load_ood(name: str, column: str = "text", choice_format: ChoiceFormat | None = None) -> tuple[str, list[Example]]:
    """Inputs for out-of-distribution detection (labels are not used: texts get label 0)."""
    if name in MULTIPLE_CHOICE_SETS:
        return name, multiple_choice_set(name, choice_format or ChoiceFormat())
    if name == "bbcnews":
        texts = bbc_news()
    elif Path(name).suffix:
        name, texts = Path(name).stem, text_column(Path(name), column)
    else:
        raise DataError(f"unknown OOD dataset {name!r}: use {', '.join(EMBEDDED_OOD)} or a local file")
    return name, [Example(text, 0) for text in texts]


def _held_out_sources(
    data: DatasetDict, splits: SplitNames, files: tuple[Path | None, Path | None], name: str
) -> list[tuple[str, Path | None, str | None]]:
    """(split, its file, its split name) for validation and test; a default split name is used only when it
    is there and no other role has it (``--test-split validation`` leaves validation to be carved)."""
    test = None if files[1] else splits.test or ("test" if "test" in data else None)
    validation = None if files[0] else splits.validation
    if validation is None and not files[0] and "validation" in data and test != "validation":
        validation = "validation"
    if validation is not None and validation in (test, splits.train):
        raise DataError(f"{name}: the validation split {validation!r} is also used for training or testing")
    if test is not None and test == splits.train:
        raise DataError(f"{name}: the test split {test!r} is also the training split")
    return [("validation", files[0], validation), ("test", files[1], test)]


def _split(data: DatasetDict, split: str, name: str, flag: str) -> Dataset:
    if split not in data:
        raise DataError(f"{name} has no split {split!r} ({flag}); its splits are {sorted(data)}")
    return data[split]
