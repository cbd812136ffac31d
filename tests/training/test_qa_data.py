"""The embedded multiple-choice sets and the prompt / letter / mask helpers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from adapters.embedded import resolve_model
from adapters.tasks import LETTERS, ChoiceFormat, choice_mask, format_prompt, letter_token_ids
from adapters.vocab import ChoiceScoring
from training.data.multiple_choice import arc_easy_train, arc_easy_validation, as_examples, openbookqa_validation


def test_arc_easy_and_openbookqa_load_with_answers_mapped_through_their_own_keys() -> None:
    train, validation, ood = arc_easy_train(), arc_easy_validation(), openbookqa_validation()
    assert (len(train), len(validation), len(ood)) == (2376, 570, 500)
    assert len({item.question for item in train}) > 2300
    assert {len(item.choices) for item in validation} == {3, 4, 5}  # variable numbers of choices
    assert all(0 <= item.answer < len(item.choices) for item in [*train, *validation, *ood])
    first = validation[0]
    assert first.question == "Which technology was developed most recently?" and first.answer == 0
    assert not train[0].question.startswith("Question:") and not train[0].question.endswith("Answer:")
    assert not {item.question for item in validation} & {item.question for item in train}


def test_prompt_letters_and_mask() -> None:
    prompt = format_prompt("What do plants need?", ["light", "noise"])
    assert prompt == (
        "Select one of the choices that answers the following question: What do plants need? "
        "Choices: A. light B. noise Answer:"
    )
    with pytest.raises(ValueError, match="2 to 5 choices"):
        format_prompt("q", ["only one"])
    examples = as_examples(arc_easy_validation()[:3], ChoiceFormat(ChoiceScoring.LETTER))
    assert examples[0].num_choices == 4 and examples[0].text.endswith("Answer:") and examples[0].choices is None
    cloze = as_examples(arc_easy_validation()[:3], ChoiceFormat())  # the question alone; the choices beside it
    assert cloze[0].text.startswith("Question: ") and cloze[0].text.endswith("\nAnswer:")
    assert cloze[0].choices is not None and len(cloze[0].choices) == cloze[0].num_choices == 4
    assert cloze[0].choices[0] not in cloze[0].text
    mask = choice_mask([3, 5])
    assert mask.shape == (2, 5) and torch.isinf(mask[0, 3:]).all() and (mask[1] == 0).all()
    probs = torch.softmax(torch.zeros(2, 5) + mask, -1)
    torch.testing.assert_close(probs[0], torch.tensor([1 / 3] * 3 + [0.0] * 2))


@pytest.mark.slow
def test_answer_letters_are_single_tokens_of_smollm2() -> None:
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    ids = letter_token_ids(tokenizer)
    assert len(set(ids)) == len(LETTERS)
    prompt = tokenizer(format_prompt("q", ["a", "b"]) + " B").input_ids
    assert prompt[-1] == ids[1]  # the letter after "Answer:" is exactly the token we read
