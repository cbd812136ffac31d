"""Tokenisation and length-grouped batches.

On a CPU the forward is compute-bound, so padding is pure waste: batches are formed from examples of
similar length (shuffled within mega-batches for training, sorted for evaluation) and padded to the
longest example in the batch.
"""

from __future__ import annotations

import random
from collections import UserDict
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from adapters import cloze
from adapters.defaults import DEFAULT_CLOZE_NORMALISATION
from adapters.tasks import choice_mask
from training.data import Example

MEGA_BATCH = 50  # batches per shuffled mega-batch when grouping by length


class Encoder:
    """Turns examples into a padded batch: ``input_ids``, ``attention_mask`` (+ ``token_type_ids``), ``labels``;
    cloze multiple-choice examples (with ``choices``) packed (:mod:`adapters.cloze`).

    Args:
        tokenizer: the base's.
        max_length: tokens of an input (a packed item's prompt and choices together).
        normalisation: cloze: what a choice's log-likelihood is divided by.
        max_choices: cloze: the most choices an item may have (the task's labels).
    """

    def __init__(
        self,
        tokenizer,
        max_length: int,
        normalisation: str = DEFAULT_CLOZE_NORMALISATION,
        max_choices: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.normalisation = normalisation
        self.max_choices = max_choices

    def __call__(self, examples: Sequence[Example]) -> UserDict:
        if any(e.choices is not None for e in examples):
            batch = cloze.pad([self._pack(e) for e in examples], self.tokenizer.pad_token_id)
        else:
            texts = [e.text for e in examples]
            pairs = [e.text_pair or "" for e in examples] if any(e.text_pair is not None for e in examples) else None
            batch = self.tokenizer(
                texts, pairs, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
        batch = UserDict(dict(batch))  # laplace-torch recognises a MutableMapping as a Hugging Face batch
        batch["labels"] = torch.tensor([e.label for e in examples], dtype=torch.long)
        if any(e.num_choices is not None for e in examples):
            batch["num_choices"] = torch.tensor([e.num_choices for e in examples], dtype=torch.long)
        return batch

    def _pack(self, example: Example) -> dict[str, list]:
        if example.choices is None:
            raise ValueError("a batch mixes cloze multiple-choice examples with others")
        return cloze.pack(
            self.tokenizer, example.text, example.choices, self.max_length, self.normalisation, self.max_choices
        )

    def lengths(self, examples: Sequence[Example]) -> list[int]:
        """Token counts (truncated at max_length) used to group batches."""
        if any(e.choices is not None for e in examples):
            return [len(self._pack(e)["input_ids"]) for e in examples]
        encoded = self.tokenizer(
            [e.text for e in examples],
            [e.text_pair or "" for e in examples] if any(e.text_pair is not None for e in examples) else None,
            truncation=True,
            max_length=self.max_length,
        )
        return [len(ids) for ids in encoded["input_ids"]]


class _ListDataset(Dataset):
    def __init__(self, examples: Sequence[Example]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


class LengthGroupedSampler(Sampler[list[int]]):
    """Batches of indices with similar lengths.

    ``shuffle=True`` (training): a new seeded permutation each epoch, sorted by length within mega-batches of
    ``MEGA_BATCH`` batches, batch order shuffled. ``shuffle=False`` (evaluation): sorted by length.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, shuffle: bool, seed: int = 0) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        order = list(range(len(self.lengths)))
        if not self.shuffle:
            order.sort(key=lambda i: self.lengths[i])
            yield from (order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size))
            return
        rng = random.Random(self.seed + self.epoch)
        rng.shuffle(order)
        mega = self.batch_size * MEGA_BATCH
        batches = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start : start + mega], key=lambda i: self.lengths[i])
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        rng.shuffle(batches)
        yield from batches


def make_loader(
    examples: Sequence[Example], encoder: Encoder, batch_size: int, *, shuffle: bool, seed: int = 0
) -> DataLoader:
    """A DataLoader of encoded, length-grouped batches (in sorted order when not shuffled)."""
    sampler = LengthGroupedSampler(encoder.lengths(examples), batch_size, shuffle, seed)
    return DataLoader(_ListDataset(examples), batch_sampler=sampler, collate_fn=encoder)


def model_inputs(batch: UserDict | dict) -> dict[str, Tensor]:
    """The tensors a model forward takes (everything but the labels and the choice counts)."""
    return {k: v for k, v in batch.items() if k not in ("labels", "num_choices")}


def batch_logits(model: torch.nn.Module, batch: UserDict | dict) -> Tensor:
    """The model's logits ``(N, C)`` for a batch; for multiple choice, the letters an item lacks masked."""
    logits = model(**model_inputs(batch))
    if "num_choices" in batch:
        logits = logits + choice_mask(batch["num_choices"], logits.shape[-1]).to(logits.dtype)
    return logits
