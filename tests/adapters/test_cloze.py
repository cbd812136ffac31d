"""Cloze scoring of multiple choice: packed items (the prompt once, every choice after it) score exactly as one
forward per choice would, alone and in batched rows beside ordinary inputs."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from adapters import LoraXSClassifier, LoraXSConfig, RowBlock, compute_projections, inject_lora_xs, target_names
from adapters.batching import AdapterWeights
from adapters.cloze import ClozeInputError, ClozeReadout, pack, pad
from adapters.embedded import resolve_model
from adapters.injection import lora_xs_layers
from adapters.projections import Projection
from adapters.vocab import ClozeNormalisation

ITEMS = [
    ("Question: Which gas do plants take in?\nAnswer:", ["carbon dioxide", "oxygen"]),
    ("Question: What melts ice?\nAnswer:", ["heat", "a cold wind from the north", "salt water"]),
    ("Question: Pick one.\nAnswer:", ["a", "bb", "the third choice", "four", "five and more words"]),
]
K = 5


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model("smollm2"))


@pytest.fixture(scope="module")
def lm(tokenizer):
    """A 2-layer random LLaMA causal LM with LoRA-XS (random cores) on its attention projections."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).eval()
    patterns = ("q_proj", "v_proj")
    adapter = LoraXSConfig(rank=3, alpha=6.0, target_modules=patterns)
    projections = compute_projections(model.model, target_names(model.model, patterns), adapter)
    inject_lora_xs(model.model, patterns, projections, alpha=adapter.alpha)
    g = torch.Generator().manual_seed(1)
    for layer in lora_xs_layers(model.model).values():
        layer.core.weight.data.copy_(torch.randn(3, 3, generator=g))
    return model


def classifier(lm) -> LoraXSClassifier:
    readout = ClozeReadout(lm.get_output_embeddings().weight.detach(), K)
    return LoraXSClassifier(lm.model, num_labels=K, pooling="last", dropout=0.0, readout=readout).eval()


def oracle(lm, tokenizer, prompt: str, choices: list[str], normalisation: str) -> torch.Tensor:
    """Each choice's normalised log-likelihood from a forward of the prompt and that choice alone."""
    scores = torch.zeros(K)
    prompt_ids = tokenizer(prompt).input_ids
    for k, choice in enumerate(choices):
        text = " " + choice
        ids = tokenizer(text, add_special_tokens=False).input_ids
        with torch.no_grad():
            log_probs = lm(torch.tensor([prompt_ids + ids])).logits[0].log_softmax(-1)
        total = sum(log_probs[len(prompt_ids) + j - 1, t] for j, t in enumerate(ids))
        length = {"tokens": len(ids), "chars": len(text), "none": 1}[normalisation]
        scores[k] = total / length
    return scores


@pytest.mark.parametrize("normalisation", list(ClozeNormalisation))
def test_packed_scores_equal_one_forward_per_choice(lm, tokenizer, normalisation: str) -> None:
    """Items of 2, 3 and 5 choices in one padded batch; missing choices score 0."""
    model = classifier(lm)
    batch = pad([pack(tokenizer, p, c, 128, normalisation) for p, c in ITEMS], tokenizer.pad_token_id)
    with torch.no_grad():
        scores = model(**batch)
    for row, (prompt, choices) in enumerate(ITEMS):
        torch.testing.assert_close(
            scores[row], oracle(lm, tokenizer, prompt, choices, normalisation), atol=1e-5, rtol=1e-5
        )


def test_a_long_prompt_is_cut_from_the_left_and_the_choices_kept(tokenizer) -> None:
    prompt = "Question: " + "very " * 200 + "long?\nAnswer:"
    packed = pack(tokenizer, prompt, ["yes", "no"], 40)
    assert len(packed["input_ids"]) == 40
    end = tokenizer(prompt).input_ids[-(40 - 2) :]
    assert packed["input_ids"][:38] == end and packed["cloze_segments"][38:] == [1, 2]
    assert packed["position_ids"][38:] == [38, 38]  # each choice starts where the prompt ends


@pytest.mark.parametrize(
    ("choices", "max_length", "message"),
    [(["only one"], 64, "needs 2 to 5 choices, got 1"), (["a"] * 6, 64, "needs 2 to 5 choices, got 6"),
     (["fine", "  "], 64, "choice 1 is empty"), (["word " * 30, "no"], 16, "leaving none of the max length 16")],
)  # fmt: skip
def test_items_that_cannot_be_packed_say_why(tokenizer, choices, max_length: int, message: str) -> None:
    with pytest.raises(ClozeInputError, match=message):
        pack(tokenizer, "Question: q?\nAnswer:", choices, max_length, max_choices=5)


def test_batched_rows_mix_cloze_and_pooled_blocks(lm, tokenizer) -> None:
    """A cloze block (two sampled core sets) and a pooled classification block (its own head) in one forward:
    each row equals the single-mode model under that sample's cores; the ordinary input's logits equal a
    forward without packed inputs beside it."""
    model = classifier(lm)
    layers = lora_xs_layers(lm.model)
    packed = [pack(tokenizer, p, c, 128) for p, c in ITEMS[:2]]
    text = tokenizer("an ordinary sentence to classify").input_ids
    batch = pad([*packed, {"input_ids": text, "attention_mask": [1] * len(text)}], tokenizer.pad_token_id)
    g = torch.Generator().manual_seed(2)
    samples = {n: torch.randn(2, 3, 3, generator=g) for n in layers}
    cloze_adapter = model.own_adapter()
    projections = {n: Projection(layer.lora_A, layer.lora_B) for n, layer in layers.items()}
    head = torch.randn(3, 32, generator=g), torch.randn(3, generator=g)
    pooled_adapter = AdapterWeights(projections, cloze_adapter.scaling, *head)
    mine = {n: layer.core.weight.detach().clone()[None] for n, layer in layers.items()}
    blocks = [RowBlock(cloze_adapter, samples, torch.tensor([0, 1])), RowBlock(pooled_adapter, mine, torch.tensor([2]))]
    with torch.no_grad():
        cloze_logits, pooled_logits = model.forward_rows(batch, blocks)
        for s in range(2):
            for name, layer in layers.items():
                layer.core.weight.copy_(samples[name][s])
            expected = model(**{k: v[:2] for k, v in batch.items()})
            torch.testing.assert_close(cloze_logits[s], expected, atol=1e-5, rtol=1e-5)
        for name, layer in layers.items():
            layer.core.weight.copy_(mine[name][0])
        alone = {"input_ids": torch.tensor([text]), "attention_mask": torch.ones(1, len(text), dtype=torch.long)}
        features = model._read(model.hidden_states(alone), alone, None)
    torch.testing.assert_close(pooled_logits[0], features @ head[0].T + head[1], atol=1e-5, rtol=1e-5)


def test_cloze_jacobians_equal_dense_autograd(lm, tokenizer) -> None:
    """The GLM's per-item Jacobians of the choice logits w.r.t. every core (batched rows, one backward per
    choice) equal ``torch.autograd`` on the single-mode model, item by item; a missing choice's row is 0."""
    model = classifier(lm)
    batch = pad([pack(tokenizer, p, c, 128) for p, c in ITEMS], tokenizer.pad_token_id)
    cores = {n: p.detach().clone()[None] for n, p in model.posterior_parameters().items()}
    block = RowBlock(model.own_adapter(), cores, torch.arange(len(ITEMS)))
    ((logits, jacobians),) = model.forward_rows_jacobians(batch, [block])
    params = model.posterior_parameters()
    for k, (_, choices) in enumerate(ITEMS):
        single = {key: v[k : k + 1, : int(batch["attention_mask"][k].sum())] for key, v in batch.items()}
        out = model(**single)[0]
        torch.testing.assert_close(logits[k], out.detach(), atol=1e-5, rtol=1e-5)
        for c in range(K):
            if c >= len(choices):
                assert all(jacobians[name][k, c].abs().max() == 0 for name in params)
                continue
            grads = torch.autograd.grad(out[c], list(params.values()), retain_graph=True)
            for name, grad in zip(params, grads, strict=True):
                torch.testing.assert_close(jacobians[name][k, c], grad, atol=1e-5, rtol=1e-4)
