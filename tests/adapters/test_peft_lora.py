"""Reading PEFT LoRA directories: every module's factors and PEFT's own scaling (rank_pattern, alpha_pattern,
rsLoRA), the modules_to_save head; and each format this library refuses, named."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForSequenceClassification

from adapters.peft_lora import CONFIG_FILE, WEIGHTS_FILE, PeftFormatError, read_peft_lora
from tests.conftest import tiny_bert


def saved_lora(tmp_path: Path, **options) -> tuple[Path, torch.nn.Module]:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False, **options)
    model = get_peft_model(copy.deepcopy(tiny_bert(seed=2)), config)
    model.save_pretrained(tmp_path / "lora")
    return tmp_path / "lora", model


@pytest.mark.parametrize(
    "options", [{}, {"rank_pattern": {"value": 2}, "alpha_pattern": {"query": 3}}, {"use_rslora": True}]
)
def test_every_module_and_peft_s_own_scaling(tmp_path: Path, options: dict) -> None:
    directory, model = saved_lora(tmp_path, **options)
    lora = read_peft_lora(directory)
    layers = {n: m for n, m in model.base_model.model.named_modules() if hasattr(m, "lora_A") and m.lora_A}
    assert set(lora.modules) == set(layers) and lora.modules
    for name, module in lora.modules.items():
        layer = layers[name]
        assert torch.equal(module.A, layer.lora_A["default"].weight.detach())
        assert torch.equal(module.B, layer.lora_B["default"].weight.detach())
        assert module.scale == layer.scaling["default"] and module.rank == layer.r["default"]


def classifier_base() -> torch.nn.Module:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, num_labels=3)  # fmt: skip
    return BertForSequenceClassification(config).eval()


def test_a_classification_head_comes_from_modules_to_save(tmp_path: Path) -> None:
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["query"], modules_to_save=["classifier"],
                        init_lora_weights=False, task_type="SEQ_CLS")  # fmt: skip
    model = get_peft_model(classifier_base(), config)
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)  # trained: differs from base
    model.save_pretrained(tmp_path / "cls")
    lora = read_peft_lora(tmp_path / "cls")
    head = model.base_model.model.classifier.modules_to_save["default"]
    assert torch.equal(lora.saved["classifier.weight"], head.weight.detach())
    assert torch.equal(lora.saved["classifier.bias"], head.bias.detach())
    assert all(name.startswith("bert.") for name in lora.modules)
    reloaded = PeftModel.from_pretrained(classifier_base(), tmp_path / "cls")  # what we read is what PEFT loads
    assert torch.equal(reloaded.base_model.model.classifier.modules_to_save["default"].weight, head.weight)


def rewrite_config(directory: Path, **changes) -> None:
    config = json.loads((directory / CONFIG_FILE).read_text())
    config.update(changes)
    (directory / CONFIG_FILE).write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"peft_type": "IA3"}, "peft_type 'IA3'"),
        ({"use_dora": True}, "use_dora"),
        ({"bias": "all"}, "bias 'all'"),
        ({"lora_bias": True}, "lora_bias"),
    ],
)
def test_unsupported_settings_are_named(tmp_path: Path, change: dict, message: str) -> None:
    directory, _ = saved_lora(tmp_path)
    rewrite_config(directory, **change)
    with pytest.raises(PeftFormatError, match=message) as caught:
        read_peft_lora(directory)
    assert CONFIG_FILE in str(caught.value)


def test_broken_directories_are_named(tmp_path: Path) -> None:
    with pytest.raises(PeftFormatError, match=r"no adapter_config\.json"):
        read_peft_lora(tmp_path)
    directory, _ = saved_lora(tmp_path)
    weights = load_file(directory / WEIGHTS_FILE)
    key = next(k for k in weights if k.endswith("lora_A.weight"))
    nan = {**weights, key: torch.full_like(weights[key], float("nan"))}
    save_file(nan, directory / WEIGHTS_FILE)
    with pytest.raises(PeftFormatError, match="NaN"):
        read_peft_lora(directory)
    save_file({k: v for k, v in weights.items() if k != key}, directory / WEIGHTS_FILE)
    with pytest.raises(PeftFormatError, match="without its partner"):
        read_peft_lora(directory)
    bad = {**weights, key: weights[key][:, :-1].T.contiguous()}
    save_file(bad, directory / WEIGHTS_FILE)
    with pytest.raises(PeftFormatError, match="do not make a LoRA"):
        read_peft_lora(directory)
    (directory / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(PeftFormatError, match="not a safetensors file"):
        read_peft_lora(directory)


def test_lora_on_an_embedding_is_refused(tmp_path: Path) -> None:
    config = LoraConfig(r=2, target_modules=["word_embeddings"], init_lora_weights=False)
    get_peft_model(copy.deepcopy(tiny_bert(seed=3)), config).save_pretrained(tmp_path / "emb")
    with pytest.raises(PeftFormatError, match="LoRA on an embedding"):
        read_peft_lora(tmp_path / "emb")
