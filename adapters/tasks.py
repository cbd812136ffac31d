"""Multiple choice with a causal LM as a C-way classifier (docs/methods.md, predictive distributions),
shared by training and serving.

Two scorings (:class:`~adapters.vocab.ChoiceScoring`, chosen by :class:`ChoiceFormat`): **cloze** scores each
choice's text after the question (:mod:`adapters.cloze`); **letter** renders the question and its choices as
one prompt, and the logits of the answer-letter tokens at its last position are the classifier's logits.
Choices keep the item's own order (letters A, B, C, ...; an item keyed "1"–"4" is mapped through its labels),
and an item with fewer choices than the bundle's most masks the ones it lacks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from adapters.defaults import DEFAULT_CLOZE_NORMALISATION
from adapters.vocab import ChoiceScoring, ClozeNormalisation

LETTERS = ("A", "B", "C", "D", "E")
DEFAULT_TEMPLATE = (
    "Select one of the choices that answers the following question: {question} Choices: {choices} Answer:"
)
DEFAULT_CLOZE_TEMPLATE = "Question: {question}\nAnswer:"


@dataclass(frozen=True)
class ChoiceFormat:
    """How multiple-choice items are put to a causal LM.

    Attributes:
        scoring: cloze (each choice's text after the question) or letter (one prompt, the answer letters).
        template: the prompt, with ``{question}`` and ``{choices}`` (rendered ``A. … B. …``); ``None``: the
            scoring's default (:data:`DEFAULT_CLOZE_TEMPLATE`, :data:`DEFAULT_TEMPLATE`).
        normalisation: cloze: what a choice's log-likelihood is divided by.
    """

    scoring: ChoiceScoring = ChoiceScoring.CLOZE
    template: str | None = None
    normalisation: ClozeNormalisation = DEFAULT_CLOZE_NORMALISATION

    @property
    def prompt_template(self) -> str:
        return self.template or (DEFAULT_CLOZE_TEMPLATE if self.cloze else DEFAULT_TEMPLATE)

    @property
    def cloze(self) -> bool:
        return self.scoring == ChoiceScoring.CLOZE

    def prompt(self, question: str, choices: Sequence[str]) -> str:
        """The item's prompt (cloze: the text its choices continue)."""
        return format_prompt(question, choices, self.prompt_template)


def format_prompt(question: str, choices: Sequence[str], template: str | None = None) -> str:
    """The prompt for one item: ``{question}`` and ``{choices}`` (rendered ``A. … B. …``) filled in
    ``template`` (:data:`DEFAULT_TEMPLATE` when ``None``)."""
    if not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"a multiple-choice item needs 2 to {len(LETTERS)} choices, got {len(choices)}")
    rendered = " ".join(f"{letter}. {choice.strip()}" for letter, choice in zip(LETTERS, choices, strict=False))
    return (template or DEFAULT_TEMPLATE).format(question=question.strip(), choices=rendered)


def letter_token_ids(tokenizer, letters: Sequence[str] = LETTERS) -> list[int]:
    """The token that follows ``Answer:`` for each letter (``" A"``, with its leading space); each must be a
    single token."""
    ids = []
    for letter in letters:
        encoded = tokenizer(f" {letter}", add_special_tokens=False).input_ids
        if len(encoded) != 1:
            raise ValueError(f"the answer letter {letter!r} is not one token for this tokenizer: {encoded}")
        ids.append(encoded[0])
    return ids


def mask_choices(logits: Tensor, num_choices: Sequence[int | None]) -> Tensor:
    """``logits (..., N, C)`` with each multiple-choice item's missing letters at ``-inf``; unchanged when no
    item is multiple choice (every count ``None``)."""
    if all(count is None for count in num_choices):
        return logits
    classes = logits.shape[-1]
    mask = choice_mask([classes if count is None else count for count in num_choices], classes)
    return logits + mask.to(logits.device, logits.dtype)


def valid_labels(num_choices: Sequence[int | None], classes: int) -> Tensor | None:
    """``(N, classes)`` bool: the labels each input can take (a multiple-choice item's own letters, every label of
    a classification input); ``None`` when no input is multiple choice."""
    if all(count is None for count in num_choices):
        return None
    counts = torch.tensor([classes if count is None else count for count in num_choices]).reshape(-1, 1)
    return torch.arange(classes).reshape(1, -1) < counts


def choice_mask(num_choices: Tensor | Sequence[int], num_letters: int = len(LETTERS)) -> Tensor:
    """Additive logit mask ``(N, num_letters)``: 0 for an item's own letters, ``-inf`` for the rest."""
    counts = torch.as_tensor(num_choices).reshape(-1, 1)
    positions = torch.arange(num_letters, device=counts.device).reshape(1, -1)
    mask = torch.zeros(counts.shape[0], num_letters, device=counts.device)
    return mask.masked_fill(positions >= counts, float("-inf"))
