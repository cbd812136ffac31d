"""Multiple choice with a causal LM (issue #6): one training epoch and one batched 16-sample prediction.

Builds the pipeline's model (SmolLM2 by default, LoRA-XS on q_proj/v_proj, the LM's letter rows as the head)
on the embedded ARC-Easy split, then times, in one run:

* one MAP training epoch over ``--train-limit`` training questions (all by default);
* one batched posterior prediction: ``--questions`` questions × ``--samples`` core samples of a diagonal
  posterior in one batched-rows forward, against the same with S sequential forwards (the loop); each the
  median of ``--repeats`` after a warm-up, the GPU synchronised around every repeat.

Usage::

    python benchmarks/multiple_choice.py --json OUT.json [--base-model smollm2] [--train-limit N] [--threads 2]

It runs on the GPU when one is present (as caveat-train does), else on the CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: benchmarks.sampling importable

from adapters import DiagPosterior, RowBlock, make_generator
from benchmarks.harness import write_results
from benchmarks.sampling import median_ms
from training.config import TrainConfig
from training.encoding import Encoder
from training.map_training import train_map
from training.session import prepare


def _batch(encoder: Encoder, examples, device) -> dict:
    batch = encoder(examples)
    return {k: v.to(device) for k, v in batch.items() if k not in ("labels", "num_choices")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default="smollm2")
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = TrainConfig.from_flat(
        base_model=args.base_model, dataset="arc-easy", mc_scoring="letter", validation_size=300,
        train_limit=args.train_limit, eval_limit=args.questions, rank=args.rank, batch_size=args.batch_size,
        epochs=1, progress=True,
    )  # fmt: skip
    session = prepare(config)
    model, device = session.model, next(session.model.parameters()).device

    start = time.perf_counter()
    train_map(model, session.train, session.validation[:8], session.encoder, config.optimisation, progress=True)
    epoch_seconds = time.perf_counter() - start

    questions = session.test[: args.questions]
    batch = _batch(session.encoder, questions, device)
    cores = {n: p.detach() for n, p in model.posterior_parameters().items()}
    posterior = DiagPosterior(cores, {n: torch.full_like(c, 1e-4) for n, c in cores.items()})
    adapter, rows = model.own_adapter(), torch.arange(len(questions), device=device)

    def batched() -> None:
        samples = posterior.sample(args.samples, make_generator(0, device))
        model.forward_rows(batch, [RowBlock(adapter, samples, rows)])

    def loop() -> None:
        samples = posterior.sample(args.samples, make_generator(0, device))
        for s in range(args.samples):
            one = {name: value[s : s + 1] for name, value in samples.items()}
            model.forward_rows(batch, [RowBlock(adapter, one, rows)])

    with torch.inference_mode():  # median of --repeats after a warm-up, synchronised on a GPU
        timings = {
            name: median_ms(run, args.repeats, device)[0] / 1000 for name, run in (("batched", batched), ("loop", loop))
        }
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, device {device}",
        "base_model": args.base_model,
        "train_examples": len(session.train),
        "batch_size": args.batch_size,
        "epoch_seconds": round(epoch_seconds, 1),
        "questions": len(questions),
        "samples": args.samples,
        "repeats": args.repeats,
        "prediction_seconds": {k: round(v, 4) for k, v in timings.items()},
        "prompt_tokens": int(batch["attention_mask"].sum(dim=1).max()),
    }
    print(json.dumps(result, indent=2))
    write_results(args.json, result)


if __name__ == "__main__":
    main()
