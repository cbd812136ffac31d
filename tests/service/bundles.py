"""Test bundles: a tiny random BERT saved to disk (with MiniLM's real tokenizer), and bundles made for it
by :func:`benchmarks.harness.synthetic_bundle` (real projections and posterior, random cores): the
server tests are about serving, not accuracy."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from adapters.embedded import resolve_model
from benchmarks.harness import save_tiny_bert, synthetic_bundle
from service.app import create_app
from service.settings import Settings

TOKEN = "t"


def save_tiny_base(directory: Path, seed: int = 0) -> Path:
    """A 2-layer random BERT (hidden 32) with MiniLM's tokenizer, as a local model directory."""
    return save_tiny_bert(directory, seed=seed)


def save_tiny_llama(directory: Path, seed: int = 0) -> Path:
    """A 2-layer random LLaMA causal LM (hidden 32) with SmolLM2's tokenizer, as a local model directory."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_bundle(base_dir: Path, out: Path, *, name: str = "tiny", **options) -> Path:
    """A rank-4 bundle on query/value of the tiny base with a diagonal posterior (``options``: see
    :func:`synthetic_bundle`)."""
    return synthetic_bundle(base_dir, out, name=name, **options)


def running_app(base: Path, adapter_dir: Path, **settings) -> TestClient:
    """The server app in process (lifespan entered), ready; admin routes take ``TOKEN``."""
    settings.setdefault("feedback_dir", Path(adapter_dir).parent / "feedback-log")  # never the working directory
    app = create_app(Settings(base_model=str(base), adapter_dir=adapter_dir, admin_token=TOKEN, **settings))
    client = TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"})
    client.__enter__()
    deadline = time.monotonic() + 60
    while client.get("/health/ready").status_code != 200:
        assert time.monotonic() < deadline, client.get("/health/ready").json()
        time.sleep(0.05)
    return client
