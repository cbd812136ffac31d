"""The embedded causal LM: SmolLM2-135M-Instruct converted once from its GGUF file into a bf16 cache."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapters.embedded import CACHE_ENV, EMBEDDED_GGUF, package_dir, resolve_model


@pytest.mark.slow
def test_smollm2_is_converted_once_and_matches_the_gguf_model(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    path = resolve_model("smollm2")
    assert (tmp_path / "smollm2" / "config.json").is_file() and path == str(tmp_path / "smollm2")
    start = time.perf_counter()
    assert resolve_model("smollm2") == path  # the second use reuses the cache
    assert time.perf_counter() - start < 1.0
    converted = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert getattr(converted.config, "quantization_config", None) is None
    assert converted.config.num_hidden_layers == 30 and converted.config.hidden_size == 576
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.pad_token == tokenizer.eos_token

    distribution, package, filename = EMBEDDED_GGUF["smollm2"]
    original = AutoModelForCausalLM.from_pretrained(
        package_dir(distribution, package), gguf_file=filename, dtype=torch.float32
    ).eval()
    batch = tokenizer(["Question: What do plants need to grow? Answer:"], return_tensors="pt")
    with torch.no_grad():
        ours, theirs = converted(**batch).logits[0, -1], original(**batch).logits[0, -1]
    assert ours.argmax() == theirs.argmax()
    torch.testing.assert_close(ours, theirs, atol=0.15 * float(theirs.std()), rtol=0)  # bf16 rounding only
