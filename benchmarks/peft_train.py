"""Train a plain PEFT LoRA the way a user would, to import into Caveat (``caveat-train --from-peft``).

The model is Hugging Face's own ``AutoModelForSequenceClassification`` of the base (BERT: pooler + classifier on
the first token) with a PEFT LoRA on ``query`` and ``value`` (PEFT's BERT defaults) and the head in
``modules_to_save``; the splits are a Caveat config's (``--config``), so the imported bundle is evaluated on the
same test, shift and OOD sets. The published long-run protocol is the default: a fixed number of epochs, the last
one kept, lr 1e-3 for the LoRA and 5e-3 for the head. Writes ``OUT`` (adapter_config.json +
adapter_model.safetensors) and ``OUT/training.json`` (loss per epoch, validation accuracy, seconds)::

    python -m benchmarks.peft_train --config training/configs/longrun-glue-sst2-minilm-2000.yaml \\
        --rank 8 --epochs 30 --out runs/peft-minilm-sst2-r8
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from adapters.embedded import resolve_model
from benchmarks.serve import machine
from training.cli import parse_config
from training.config import DEFAULT_BASE_MODEL
from training.session import load_splits


def encode(tokenizer, examples, max_length: int) -> dict[str, torch.Tensor]:
    pairs = [e.text_pair for e in examples] if examples and examples[0].text_pair is not None else None
    return tokenizer([e.text for e in examples], pairs, truncation=True, max_length=max_length, padding=True,
                     return_tensors="pt")  # fmt: skip


def accuracy(model, tokenizer, examples, max_length: int, batch_size: int = 64) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            logits = model(**encode(tokenizer, chunk, max_length)).logits
            correct += (logits.argmax(-1) == torch.tensor([e.label for e in chunk])).sum().item()
    return correct / len(examples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a caveat-train config: its data and base model")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--head-lr", type=float, default=5e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = parse_config(["--config", args.config])
    task, train, validation, *_ = load_splits(config)
    path = resolve_model(config.adapter.base_model or DEFAULT_BASE_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(args.seed)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(task.labels))
    lora = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=["query", "value"], lora_dropout=0.0,
                      modules_to_save=["classifier"], task_type="SEQ_CLS")  # fmt: skip
    model = get_peft_model(base, lora)
    head = [p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n]
    adapter = [p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" not in n]
    optimiser = torch.optim.AdamW([{"params": adapter, "lr": args.lr}, {"params": head, "lr": args.head_lr}])
    generator = torch.Generator().manual_seed(args.seed)
    history, start = [], time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(train), generator=generator).tolist()
        total = 0.0
        for begin in tqdm(range(0, len(order), args.batch_size), desc=f"epoch {epoch}", leave=False):
            chunk = [train[i] for i in order[begin : begin + args.batch_size]]
            out = model(**encode(tokenizer, chunk, config.max_tokens), labels=torch.tensor([e.label for e in chunk]))
            optimiser.zero_grad()
            out.loss.backward()
            optimiser.step()
            total += out.loss.item() * len(chunk)
        val = accuracy(model, tokenizer, validation, config.max_tokens)
        history.append({"epoch": epoch, "train_loss": total / len(train), "validation_accuracy": val})
        print(f"epoch {epoch}: train loss {total / len(train):.4f}, validation accuracy {val:.4f}", flush=True)
    model.save_pretrained(args.out)
    seconds = round(time.perf_counter() - start, 1)
    record = {"args": {k: str(v) for k, v in vars(args).items()}, "history": history, "seconds": seconds,
              "train": len(train), "validation": len(validation), "machine": machine()}  # fmt: skip
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"PEFT LoRA written to {args.out} ({record['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
