"""Multiple choice by cloze scoring, shared by training and serving (docs/methods.md, multiple choice).

Each choice's logit is the adapted LM's log-likelihood of the choice's text (``" " + choice``) after the
question's prompt, divided by the choice's length (:class:`~adapters.vocab.ClozeNormalisation`); the ``K``
logits of an item are the predictive's logits.

**One question, one row.** An item is packed into one sequence: the prompt's tokens, then every choice's
tokens. Each choice is positioned as if it alone followed the prompt (its position ids restart where the
prompt ends) and attends only to the prompt and to itself (:func:`attention_bias`), so the prompt is encoded
once per question, in the same forward as all its choices, whatever the number of rows (posterior samples,
adapters) that read it. This is what sharing the prompt's past key/values among the choices computes, without
a second forward or a cache per sample, and an item stays one input of the batched-rows machinery.

A packed input carries three tensors besides ``input_ids`` and ``attention_mask`` (:data:`CLOZE_KEYS`):
``cloze_segments`` (``0`` the prompt, ``k`` choice ``k`` (1-based), ``-1`` padding), ``position_ids`` and
``cloze_weights`` (``1 / length`` of the choice on each of its tokens, ``0`` elsewhere). An ordinary input in
the same batch (another adapter's text) gets :func:`plain` values, under which the attention is the usual
causal one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from adapters.defaults import DEFAULT_CLOZE_NORMALISATION
from adapters.vocab import ClozeNormalisation

CLOZE_KEYS = ("cloze_segments", "position_ids", "cloze_weights")
PROMPT_SEGMENT, PADDING_SEGMENT = 0, -1
PAD_VALUES = {"cloze_segments": PADDING_SEGMENT}  # what padding holds beside 0 (input_ids: the pad token)
LOGIT_CHUNK = 1024  # choice tokens per LM-head product: bounds the (tokens, vocabulary) logits in memory


class ClozeInputError(ValueError):
    """A multiple-choice item that cannot be packed (an empty choice, choices longer than the max length)."""


def pack(
    tokenizer,
    prompt: str,
    choices: Sequence[str],
    max_length: int,
    normalisation: str = DEFAULT_CLOZE_NORMALISATION,
    max_choices: int | None = None,
) -> dict[str, list]:
    """One item as one packed input: lists of ``input_ids``, ``attention_mask`` and :data:`CLOZE_KEYS`.

    The prompt is truncated from the left when prompt and choices exceed ``max_length`` (its end, which the
    choices continue, is kept); choices are never truncated. Thread-safe: the tokenizer's settings are read,
    never changed.

    Raises:
        ClozeInputError: fewer than 2 choices or more than ``max_choices``, an empty choice, or choices that alone
            take ``max_length`` tokens or more.
    """
    if len(choices) < 2 or (max_choices is not None and len(choices) > max_choices):
        most = "" if max_choices is None else f" to {max_choices}"
        raise ClozeInputError(f"a multiple-choice item needs 2{most} choices, got {len(choices)}")
    continuations = []
    for k, choice in enumerate(choices):
        if not choice.strip():
            raise ClozeInputError(f"choice {k} is empty")
        continuations.append(" " + choice.strip())
    choice_ids = [tokenizer(text, add_special_tokens=False).input_ids for text in continuations]
    room = max_length - sum(len(ids) for ids in choice_ids)
    if room < 1:
        raise ClozeInputError(
            f"the choices take {max_length - room} tokens, leaving none of the max length {max_length} for the question"
        )
    prompt_ids = tokenizer(prompt).input_ids[-room:]
    start = len(prompt_ids)
    packed = {
        "input_ids": list(prompt_ids),
        "cloze_segments": [PROMPT_SEGMENT] * start,
        "position_ids": list(range(start)),
        "cloze_weights": [0.0] * start,
    }
    for k, (ids, text) in enumerate(zip(choice_ids, continuations, strict=True), start=1):
        packed["input_ids"] += ids
        packed["cloze_segments"] += [k] * len(ids)
        packed["position_ids"] += range(start, start + len(ids))
        packed["cloze_weights"] += [1.0 / _length(ids, text, normalisation)] * len(ids)
    packed["attention_mask"] = [1] * len(packed["input_ids"])
    return packed


def _length(ids: Sequence[int], text: str, normalisation: str) -> int:
    if normalisation == ClozeNormalisation.TOKENS:
        return len(ids)
    if normalisation == ClozeNormalisation.CHARS:
        return len(text)
    if normalisation == ClozeNormalisation.NONE:
        return 1
    raise ValueError(
        f"unknown cloze normalisation {normalisation!r}; choose one of {list(map(str, ClozeNormalisation))}"
    )


def plain(length: int) -> dict[str, list]:
    """The cloze keys of an ordinary (not packed) input of ``length`` tokens: all prompt, causal attention."""
    return {
        "cloze_segments": [PROMPT_SEGMENT] * length,
        "position_ids": list(range(length)),
        "cloze_weights": [0.0] * length,
    }


def pad(rows: Sequence[Mapping[str, Sequence]], pad_id: int) -> dict[str, Tensor]:
    """Right-padded tensors ``(N, T)`` of tokenised rows (each a dict of equal-length lists). When any row is
    packed, rows without the cloze keys get :func:`plain` ones."""
    rows = [dict(row) for row in rows]
    if any("cloze_segments" in row for row in rows):
        rows = [row if "cloze_segments" in row else row | plain(len(row["input_ids"])) for row in rows]
    width = max(len(row["input_ids"]) for row in rows)
    batch = {}
    for key in rows[0]:
        dtype = torch.float32 if key == "cloze_weights" else torch.long
        fill = pad_id if key == "input_ids" else PAD_VALUES.get(key, 0)
        batch[key] = torch.full((len(rows), width), fill, dtype=dtype)
        for i, row in enumerate(rows):
            batch[key][i, : len(row[key])] = torch.tensor(row[key], dtype=dtype)
    return batch


def is_packed(batch: Mapping[str, Tensor]) -> bool:
    return "cloze_segments" in batch


def attention_bias(segments: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive attention mask ``(N, 1, T, T)`` of packed rows ``segments (N, T)``: a token sees the earlier
    tokens of the prompt and of its own segment; padding sees only itself (no row is all masked)."""
    T = segments.shape[1]
    query, key = segments.unsqueeze(2), segments.unsqueeze(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    allowed = causal & (key != PADDING_SEGMENT) & ((key == PROMPT_SEGMENT) | (key == query))
    allowed |= torch.eye(T, dtype=torch.bool, device=segments.device)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)


def decoder_inputs(batch: Mapping[str, Tensor], dtype: torch.dtype) -> Mapping[str, Tensor]:
    """What the base's forward takes for a batch: a packed batch's block mask (in ``dtype``) in place of its
    ``attention_mask`` and its restarting ``position_ids``; any other batch as it is."""
    if not is_packed(batch):
        return batch
    inputs = {k: v for k, v in batch.items() if k not in CLOZE_KEYS and k != "attention_mask"}
    return inputs | {
        "attention_mask": attention_bias(batch["cloze_segments"], dtype),
        "position_ids": batch["position_ids"],
    }


def prompt_mask(batch: Mapping[str, Tensor]) -> Tensor | None:
    """``(N, T)`` the tokens features should pool: a packed row's prompt (the question, without its choices);
    an ordinary row's attention mask."""
    if not is_packed(batch):
        return batch.get("attention_mask")
    return (batch["cloze_segments"] == PROMPT_SEGMENT).long()


def choice_scores(hidden: Tensor, batch: Mapping[str, Tensor], output_embeddings: Tensor, num_choices: int) -> Tensor:
    """Cloze logits ``(N, K)``: each choice's normalised log-likelihood; ``0`` for choices an item lacks.

    Args:
        hidden: the decoder's last hidden states ``(N, T, H)`` of packed rows.
        batch: the rows' ``input_ids`` and :data:`CLOZE_KEYS` ``(N, T)``.
        output_embeddings: the LM head ``(V, H)``.
        num_choices: ``K``, the most choices an item may have.
    """
    segments = batch["cloze_segments"]
    T = segments.shape[1]
    # a choice's first token is predicted by the prompt's last token (packed index = its position - 1), every
    # later one by the token before it
    follows = torch.zeros_like(segments, dtype=torch.bool)
    follows[:, 1:] = segments[:, 1:] == segments[:, :-1]
    index = torch.arange(T, device=segments.device).expand_as(segments)
    source = torch.where(follows, index - 1, batch["position_ids"] - 1)
    rows, tokens = (segments > PROMPT_SEGMENT).nonzero(as_tuple=True)
    states = hidden[rows, source[rows, tokens]]
    targets = batch["input_ids"][rows, tokens]
    log_likelihood = (
        torch.cat(
            [
                _token_log_likelihoods(states[i : i + LOGIT_CHUNK], targets[i : i + LOGIT_CHUNK], output_embeddings)
                for i in range(0, len(targets), LOGIT_CHUNK)
            ]
        )
        if len(targets)
        else hidden.new_zeros(0, dtype=torch.float32)
    )
    weighted = log_likelihood * batch["cloze_weights"][rows, tokens].float()
    scores = torch.zeros(hidden.shape[0], num_choices, dtype=torch.float32, device=hidden.device)
    return scores.index_put((rows, segments[rows, tokens] - 1), weighted, accumulate=True)


def _token_log_likelihoods(states: Tensor, targets: Tensor, output_embeddings: Tensor) -> Tensor:
    """``log p(target | state)`` ``(M,)`` float32 under the LM head."""
    logits = (states @ output_embeddings.T).float()
    return logits.gather(1, targets.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=1)


@dataclass(frozen=True)
class ClozeReadout:
    """How a cloze adapter reads the decoder's hidden states: :func:`choice_scores` under the LM head.

    Attributes:
        output_embeddings: the LM head ``(V, H)`` (the base's, shared by every cloze adapter on it).
        num_choices: ``K``, the most choices an item may have (the adapter's label count).
    """

    output_embeddings: Tensor
    num_choices: int

    def __call__(self, hidden: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        return choice_scores(hidden, batch, self.output_embeddings, self.num_choices)
