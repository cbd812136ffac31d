"""Bring your LoRA: a PEFT LoRA imported exactly (its logits are PEFT's own), served with a posterior fitted after
the fact, and exported back to PEFT (its logits are the bundle's MAP); each unreadable LoRA refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    RobertaConfig,
    RobertaModel,
)

from adapters import LoraXSClassifier, inject_lora_xs, load_bundle
from adapters.base_model import load_base
from adapters.batching import RowBlock
from adapters.peft_lora import CONFIG_FILE, WEIGHTS_FILE, read_peft_lora
from adapters.pooling import DenseTanhPooler
from adapters.vocab import Pooling
from tests.service.bundles import make_bundle, running_app, save_tiny_base, save_tiny_llama
from training import peft_import
from training.cli import main
from training.recalibrate import Recalibration, write

TEXTS = ["a fine film", "the worst plot I have seen in years", "ok", "neither good nor bad, just long and slow"]
SLICE = ["--validation-size", "40", "--eval-limit", "40", "--no-progress", "--ood-train-size", "40"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    bert = save_tiny_base(root / "bert")
    tokenizer = AutoTokenizer.from_pretrained(bert)
    torch.manual_seed(1)
    roberta = RobertaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=48, max_position_embeddings=140,
                            pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    RobertaModel(roberta).save_pretrained(root / "roberta")
    tokenizer.save_pretrained(root / "roberta")
    llama = save_tiny_llama(root / "llama")
    torch.manual_seed(2)
    gpt2 = GPT2Config(vocab_size=len(AutoTokenizer.from_pretrained(llama)), n_embd=32, n_layer=2, n_head=4,
                      n_positions=140)  # fmt: skip
    GPT2LMHeadModel(gpt2).save_pretrained(root / "gpt2")
    AutoTokenizer.from_pretrained(llama).save_pretrained(root / "gpt2")
    return {"bert": bert, "roberta": root / "roberta", "llama": llama, "gpt2": root / "gpt2"}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    words = ["good", "bad", "fine", "awful", "great", "dull"]
    path.write_text("text,label\n" + "".join(f"a {words[i % 6]} film number {i},{i % 2}\n" for i in range(160)))
    return path


def saved_lora(base: Path, out: Path, seed: int = 0, perturb: tuple[str, ...] = (), **options) -> Path:
    """A PEFT LoRA for sequence classification of ``base`` (random factors, a head that differs from the base's)."""
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    model.config.pad_token_id = AutoTokenizer.from_pretrained(base).pad_token_id
    targets = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn", "c_fc"]}.get(base.name, ["query", "value"])
    options.setdefault("target_modules", targets)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, task_type="SEQ_CLS", init_lora_weights=False, **options))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "modules_to_save" in name or any(p in name for p in perturb):
                param.add_(0.5 * torch.randn_like(param))
    peft.save_pretrained(out)
    return out


def peft_logits(base: Path, lora: Path, texts: list[str] = TEXTS) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    model.config.pad_token_id = tokenizer.pad_token_id
    model = PeftModel.from_pretrained(model, lora).eval()
    with torch.no_grad():
        return model(**tokenizer(texts, return_tensors="pt", padding=True)).logits


def converted_logits(base: Path, lora: Path, texts: list[str] = TEXTS) -> torch.Tensor:
    loaded = load_base(str(base))
    imported = peft_import.convert(read_peft_lora(lora), lora, loaded, 2)
    model = peft_import.build_model(loaded, imported, 2).eval()
    with torch.no_grad():
        return model(**loaded.tokenizer(texts, return_tensors="pt", padding=True))


def served_map_logits(base: Path, bundle_dir: Path, texts: list[str] = TEXTS) -> torch.Tensor:
    """A bundle's MAP through the server's batched-rows path on a fresh copy of the base."""
    bundle = load_bundle(bundle_dir)
    loaded = load_base(str(base))
    inject_lora_xs(loaded.model, bundle.manifest.adapter.modules)
    pooling = Pooling.LAST if bundle.manifest.task.pooling == Pooling.LAST else Pooling.MEAN
    host = LoraXSClassifier(loaded.model, num_labels=None, pooling=pooling).eval()
    module = bundle.manifest.head.pooler_module  # the base's own pooler, or none (the bundle's own, or no pooler)
    weights = bundle.adapter_weights(DenseTanhPooler.of_base(loaded.model, module) if module else None)
    batch = dict(loaded.tokenizer(texts, return_tensors="pt", padding=True))
    cores = {name: core.unsqueeze(0) for name, core in bundle.cores.items()}
    with torch.no_grad():
        (logits,) = host.forward_rows(batch, [RowBlock(weights, cores, torch.arange(len(texts)))])
    return logits[0]


CASES = {
    "bert, per-module ranks and alphas": ("bert", {"rank_pattern": {"layer.1.attention.self.value": 2},
                                                   "alpha_pattern": {"query": 3}}),
    "bert, rsLoRA, the pooler trained too": ("bert", {"use_rslora": True, "modules_to_save": ["pooler"]}),
    "roberta, dense + out_proj head": ("roberta", {}),
    "llama, score at the last token": ("llama", {"rank_pattern": {"q_proj": 2}}),
    "gpt2, Conv1D layers (fan_in_fan_out)": ("gpt2", {"fan_in_fan_out": True}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_the_converted_model_computes_peft_s_own_logits(bases: dict[str, Path], tmp_path: Path, case: str) -> None:
    kind, options = CASES[case]
    lora = saved_lora(bases[kind], tmp_path / "lora", **options)
    theirs = peft_logits(bases[kind], lora)
    assert theirs.std() > 0.05  # a head and LoRA that move the logits: the comparison can fail
    torch.testing.assert_close(converted_logits(bases[kind], lora), theirs, atol=1e-5, rtol=0)


def test_an_imported_lora_gets_a_posterior_without_retraining(
    bases: dict[str, Path], data: Path, tmp_path: Path
) -> None:
    lora = saved_lora(bases["bert"], tmp_path / "lora", rank_pattern={"layer.0.attention.self.query": 2},
                      modules_to_save=["pooler"])  # fmt: skip
    out = tmp_path / "bundle"
    argv = ["--from-peft", str(lora), "--dataset", str(data), "--out", str(out), "--posterior", "laplace-kron", *SLICE]
    assert main(argv) == 0
    bundle = load_bundle(out)
    manifest = bundle.manifest
    assert manifest.base_model.name_or_path == str(bases["bert"])  # the LoRA's own base, found here
    assert manifest.imported.max_abs_logit_diff <= 1e-5 and manifest.imported.checked_inputs == 40
    assert manifest.imported.config["rank_pattern"] == {"layer.0.attention.self.query": 2}
    assert manifest.eval.training.map is None and "not trained" in manifest.eval.training.summary
    assert manifest.adapter.rank == 4 and manifest.adapter.scaling == 1.0 and manifest.task.pooling == "pooler"
    assert manifest.posterior.family == "kron" and manifest.adapter.projection.trained
    theirs = peft_logits(bases["bert"], lora)
    torch.testing.assert_close(served_map_logits(bases["bert"], out), theirs, atol=1e-5, rtol=0)
    recalibrated = Recalibration(1.5, [], None, before={}, after={}, fitted_on=10, held_out=5)
    write(bundle, recalibrated, tmp_path / "recalibrated", "2", tmp_path / "log")  # a new version keeps every tensor
    assert torch.equal(load_bundle(tmp_path / "recalibrated").pooler.weight, bundle.pooler.weight)


def test_a_caveat_bundle_exports_to_peft_and_imports_back(bases: dict[str, Path], data: Path, tmp_path: Path) -> None:
    base, out = bases["bert"], tmp_path / "adapters" / "trained"
    train = ["--base-model", str(base), "--dataset", str(data), "--out", str(out), "--pooling", "pooler",
             "--targets", "query,value", "--rank", "4", "--epochs", "2", "--posterior", "laplace-diag",
             *SLICE]  # fmt: skip
    assert main(train) == 0
    bundle_map = served_map_logits(base, out)
    assert main(["export-peft", str(out), str(tmp_path / "peft")]) == 0
    config = json.loads((tmp_path / "peft" / CONFIG_FILE).read_text())
    assert config["r"] == config["lora_alpha"] == 4 and config["modules_to_save"] == ["classifier"]  # base's pooler
    bundle = load_bundle(out)
    assert bundle.pooler is None and bundle.manifest.head.pooler_module == "pooler.dense"
    torch.testing.assert_close(peft_logits(base, tmp_path / "peft"), bundle_map, atol=1e-5, rtol=0)
    client = running_app(base, out.parent)  # the server reads the head through its own base's pooler
    try:
        answer = client.post("/v1/predict", json={"adapter": "trained", "inputs": TEXTS, "method": "map"})
    finally:
        client.__exit__(None, None, None)
    served = torch.tensor([result["probs"] for result in answer.json()["results"]])
    torch.testing.assert_close(served, bundle_map.softmax(-1), atol=1e-5, rtol=0)
    again = ["--from-peft", str(tmp_path / "peft"), "--dataset", str(data), "--out", str(tmp_path / "again"), *SLICE]
    assert main(again) == 0
    torch.testing.assert_close(served_map_logits(base, tmp_path / "again"), bundle_map, atol=1e-5, rtol=0)


def test_an_imported_decoder_exports_as_it_came(bases: dict[str, Path], data: Path, tmp_path: Path) -> None:
    lora = saved_lora(bases["llama"], tmp_path / "lora")
    bundle = tmp_path / "bundle"
    argv = ["--from-peft", str(lora), "--dataset", str(data), "--out", str(bundle), "--posterior", "map", *SLICE]
    assert main(argv) == 0
    assert main(["export-peft", str(bundle), str(tmp_path / "peft")]) == 0
    assert json.loads((tmp_path / "peft" / CONFIG_FILE).read_text())["modules_to_save"] == ["score"]
    theirs = peft_logits(bases["llama"], lora)
    torch.testing.assert_close(peft_logits(bases["llama"], tmp_path / "peft"), theirs, atol=1e-5, rtol=0)


def _fails(capsys, argv: list[str], message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("caveat-train: error:") and message in err[-1], err


def test_what_cannot_be_imported_is_named_and_nothing_is_written(
    bases: dict[str, Path], data: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    run = ["--dataset", str(data), "--out", str(out), *SLICE]
    _fails(capsys, ["--from-peft", str(tmp_path), *run], "no adapter_config.json")
    lora = saved_lora(bases["bert"], tmp_path / "lora")
    config = json.loads((lora / CONFIG_FILE).read_text())
    for change, message in [({"peft_type": "IA3"}, "peft_type 'IA3'"), ({"use_dora": True}, "use_dora")]:
        (lora / CONFIG_FILE).write_text(json.dumps({**config, **change}))
        _fails(capsys, ["--from-peft", str(lora), *run], message)
    (lora / CONFIG_FILE).write_text(json.dumps(config))
    llama_lora = saved_lora(bases["llama"], tmp_path / "llama-lora")
    _fails(capsys, ["--from-peft", str(llama_lora), "--base-model", str(bases["bert"]), *run], "is not a linear layer")
    weights = load_file(lora / WEIGHTS_FILE)
    key = next(k for k in weights if k.endswith("query.lora_A.weight"))
    partner = key.replace("lora_A", "lora_B")
    wide = {**weights, key: torch.randn(4, 40), partner: torch.randn(40, 4)}
    save_file(wide, lora / WEIGHTS_FILE)
    _fails(capsys, ["--from-peft", str(lora), *run], "is 40×40, the base's layer 32×32")
    save_file({**weights, key: torch.full_like(weights[key], float("nan"))}, lora / WEIGHTS_FILE)
    _fails(capsys, ["--from-peft", str(lora), *run], "holds NaN")
    save_file(weights, lora / WEIGHTS_FILE)
    _fails(capsys, ["--from-peft", str(lora), "--posterior", "ensemble", *run], "--posterior ensemble")
    quantised = tmp_path / "quantised"
    shutil.copytree(bases["bert"], quantised)
    config = json.loads((quantised / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantised / "config.json").write_text(json.dumps(config))
    _fails(capsys, ["--from-peft", str(lora), "--base-model", str(quantised), *run], "is quantised")
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_a_head_peft_initialised_at_random_is_refused(
    bases: dict[str, Path], data: Path, tmp_path: Path, capsys
) -> None:
    lora = saved_lora(bases["bert"], tmp_path / "lora")
    weights = load_file(lora / WEIGHTS_FILE)
    save_file({k: v for k, v in weights.items() if "classifier" not in k}, lora / WEIGHTS_FILE)
    argv = ["--from-peft", str(lora), "--dataset", str(data), "--out", str(tmp_path / "out"), *SLICE]
    _fails(capsys, argv, "classifier is not in the LoRA's modules_to_save")


def test_a_head_without_a_hugging_face_form_is_not_exported(tmp_path: Path, capsys) -> None:
    base = save_tiny_base(tmp_path / "base")
    bundle = make_bundle(base, tmp_path / "mean-pooled")  # a mean-pooled head
    assert main(["export-peft", str(bundle), str(tmp_path / "peft")]) == 2
    assert "train with --pooling pooler" in capsys.readouterr().err
    assert not (tmp_path / "peft").exists()


def test_a_causal_lm_lora_imports_for_multiple_choice_and_exports_back(bases: dict[str, Path], tmp_path: Path) -> None:
    llama = bases["llama"]
    torch.manual_seed(3)
    lm = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        rank_pattern={"layers.1.self_attn.v_proj": 2}, task_type="CAUSAL_LM")  # fmt: skip
    get_peft_model(lm, config).save_pretrained(tmp_path / "lora")
    arc = ["--dataset", "arc-easy", "--train-limit", "16", "--validation-size", "24", "--eval-limit", "8",
           "--max-length", "128", "--no-progress", "--ood-train-size", "16"]  # fmt: skip
    out = tmp_path / "bundle"
    assert main(["--from-peft", str(tmp_path / "lora"), "--base-model", str(llama), "--out", str(out), *arc]) == 0
    manifest = load_bundle(out).manifest
    assert manifest.task.type == "multiple-choice" and manifest.task.choice_scoring == "cloze"
    assert manifest.imported.max_abs_logit_diff <= 1e-5 and manifest.eval.training.map is None
    assert main(["export-peft", str(out), str(tmp_path / "peft")]) == 0
    tokenizer = AutoTokenizer.from_pretrained(llama)
    batch = tokenizer(["Which gas do plants take in?", "Is the sun a star? yes"], return_tensors="pt", padding=True)

    def lm_logits(lora: Path) -> torch.Tensor:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32), lora)
        with torch.no_grad():
            return model.eval()(**batch).logits[batch["attention_mask"].bool()]

    torch.testing.assert_close(lm_logits(tmp_path / "peft"), lm_logits(tmp_path / "lora"), atol=1e-5, rtol=0)
