"""The architecture table: known model types give their targets, pooling and blocks; a type outside it falls
back on its config (decoder or not) and on the block count (where its blocks are)."""

from __future__ import annotations

import pytest
from transformers import AutoConfig, AutoModel, BertConfig, BloomConfig, DistilBertConfig

from adapters.architectures import (
    ARCHITECTURES,
    architecture,
    blocks_by_count,
    default_pooling,
    default_targets,
    is_decoder,
    transformer_blocks,
)
from tests.conftest import tiny_bert, tiny_llama


def test_known_types_resolve_to_their_record() -> None:
    bert, llama = BertConfig(), AutoConfig.for_model("llama")
    assert architecture(bert).blocks == "encoder.layer" and architecture(llama).blocks == "layers"
    assert default_targets(bert) == ("query", "key", "value", "intermediate.dense", "output.dense")
    assert default_targets(llama) == ("q_proj", "v_proj")
    assert default_pooling(bert) == "mean" and default_pooling(llama) == "last"
    assert not is_decoder(bert) and is_decoder(llama)
    assert default_targets(AutoConfig.for_model("gpt2")) == ()  # known, but no default targets
    assert all(record.pooling == ("last" if record.decoder else "mean") for record in ARCHITECTURES.values())


def test_an_unknown_type_is_a_decoder_only_by_its_config() -> None:
    encoder = DistilBertConfig()
    assert architecture(encoder) is None and default_targets(encoder) == ()
    assert default_pooling(encoder) == "mean"
    assert default_pooling(BloomConfig(architectures=["BloomForCausalLM"])) == "last"
    assert default_pooling(BloomConfig(is_decoder=True)) == "last"
    assert default_pooling(BertConfig(is_decoder=True)) == "last"  # a known encoder type configured as a decoder


@pytest.mark.parametrize("make", [tiny_bert, tiny_llama])
def test_the_tables_blocks_are_the_ones_the_block_count_finds(make) -> None:
    base = make()
    assert transformer_blocks(base) is blocks_by_count(base)
    assert len(transformer_blocks(base)) == base.config.num_hidden_layers


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_every_tables_blocks_path_leads_to_the_blocks(model_type: str) -> None:
    config = AutoConfig.for_model(
        model_type, vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    base = AutoModel.from_config(config)
    assert transformer_blocks(base) is blocks_by_count(base) and len(transformer_blocks(base)) == 3


def test_an_unknown_types_blocks_are_found_by_their_count() -> None:
    config = DistilBertConfig(vocab_size=64, dim=16, hidden_dim=32, n_layers=2, n_heads=2, max_position_embeddings=32)
    base = AutoModel.from_config(config)
    assert transformer_blocks(base) is base.transformer.layer
