"""Posterior-predictive cost on the embedded MiniLM: deterministic vs per-sample loop vs batched rows.

For a batch of real review snippets and S posterior samples (a Kronecker-factored posterior over the
LoRA-XS cores of query/value at r=8), three ways to get predictive probabilities, timed in one run:

* deterministic: one forward with the MAP cores (what a non-Bayesian adapter costs);
* loop: S forwards, loading each sampled core into the layers first (how public code does it);
* batched: one batched-rows forward over batch×S rows (Caveat's serving path);
* batched, chunked: the same rows in forwards of at most ``--token-budget`` tokens (rows × padded length),
  what the server does on a CPU, where very large forwards fall out of cache.

Both sampling paths draw their samples inside the timed region. Usage::

    python benchmarks/sampling.py --json OUT.json [--samples 1 4 16 64] [--batch-size 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: benchmarks.harness importable

from adapters import (
    KronFactors,
    KronPosterior,
    LoraXSClassifier,
    LoraXSConfig,
    RowBlock,
    compute_projections,
    inject_lora_xs,
    lora_xs_layers,
    make_generator,
    target_names,
)
from adapters.batching import AdapterWeights
from adapters.embedded import resolve_model
from benchmarks.harness import write_results
from training.data import rotten_tomatoes_snippets


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the results here (a list of objects)")
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (pinned)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats; the median is reported")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--token-budget", type=int, default=4096, help="tokens per forward for the chunked column")
    return parser.parse_args()


def median_ms(fn: Callable[[], torch.Tensor], repeats: int, device: torch.device) -> tuple[float, torch.Tensor]:
    result = fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), result


def build(device: torch.device, batch_size: int, max_length: int):
    path = resolve_model("minilm")
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = LoraXSConfig(rank=8, alpha=16.0, target_modules=("query", "value"))
    single_base = AutoModel.from_pretrained(path).eval()
    host_base = AutoModel.from_pretrained(path).eval()
    names = target_names(single_base, config.target_modules)
    projections = compute_projections(single_base, names, config)
    inject_lora_xs(single_base, config.target_modules, projections, alpha=config.alpha)
    inject_lora_xs(host_base, config.target_modules)
    single = LoraXSClassifier(single_base, num_labels=2).eval().to(device)
    host = LoraXSClassifier(host_base, num_labels=None).eval().to(device)

    g = torch.Generator().manual_seed(0)
    mean = {n: 0.05 * torch.randn(8, 8, generator=g) for n in names}
    factors = {n: KronFactors.from_matrices(torch.eye(8), torch.eye(8)) for n in names}
    posterior = KronPosterior(mean, factors, scale=400.0, prior_precision=1.0).to(device)
    adapter = AdapterWeights(
        {n: p.to(device) for n, p in projections.items()},
        config.scaling,
        single.head.weight.detach(),
        single.head.bias.detach(),
    )
    with torch.no_grad():
        for name, layer in lora_xs_layers(single_base).items():
            layer.core.weight.copy_(mean[name])
    texts = [e.text for e in rotten_tomatoes_snippets()[:batch_size]]
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return single, host, posterior, adapter, {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    single, host, posterior, adapter, batch = build(device, args.batch_size, args.max_length)
    layers = lora_xs_layers(single.base)
    inputs = torch.arange(args.batch_size, device=device)

    def deterministic() -> torch.Tensor:
        return torch.softmax(single(**batch), dim=-1)

    def loop(num_samples: int, seed: int) -> torch.Tensor:
        generator = make_generator(seed, device)
        probs = []
        for _ in range(num_samples):
            sample = posterior.sample(1, generator)
            for name, layer in layers.items():
                layer.core.weight.copy_(sample[name][0])
            probs.append(torch.softmax(single(**batch), dim=-1))
        return torch.stack(probs)

    def batched(num_samples: int, seed: int, token_budget: int | None = None) -> torch.Tensor:
        samples = posterior.sample(num_samples, make_generator(seed, device))
        (logits,) = host.forward_rows(batch, [RowBlock(adapter, samples, inputs)], token_budget=token_budget)
        return torch.softmax(logits, dim=-1)

    max_rows = max(1, args.token_budget // batch["input_ids"].shape[1])

    deterministic_ms, _ = median_ms(deterministic, args.repeats, device)
    results = []
    for num_samples in args.samples:
        loop_ms, loop_probs = median_ms(lambda s=num_samples: loop(s, 7), args.repeats, device)
        batched_ms, batched_probs = median_ms(lambda s=num_samples: batched(s, 7), args.repeats, device)
        chunked_ms, _ = median_ms(lambda s=num_samples: batched(s, 7, args.token_budget), args.repeats, device)
        # Same seed, but the loop draws one sample per call: compare the predictive only statistically.
        diff = (loop_probs.mean(0) - batched_probs.mean(0)).abs().max().item()
        results.append(
            {
                "S": num_samples,
                "deterministic_ms": round(deterministic_ms, 2),
                "loop_ms": round(loop_ms, 2),
                "batched_ms": round(batched_ms, 2),
                "batched_chunked_ms": round(chunked_ms, 2),
                "speedup": round(loop_ms / min(batched_ms, chunked_ms), 2),
                "max_abs_diff_predictive": round(diff, 4),
            }
        )
    machine = describe_machine(device, args.threads)
    length = batch["input_ids"].shape[1]
    print(f"MiniLM-L6 (r=8, query+value, kron posterior), {args.batch_size} real snippets padded to {length} tokens")
    print(f"{machine}; chunked = at most {max_rows} rows ({args.token_budget} tokens) per forward")
    print(f"{'S':>4} {'deterministic ms':>17} {'loop ms':>10} {'batched ms':>11} {'chunked ms':>11} {'loop/best':>10}")
    for row in results:
        print(
            f"{row['S']:>4} {row['deterministic_ms']:>17.2f} {row['loop_ms']:>10.2f} "
            f"{row['batched_ms']:>11.2f} {row['batched_chunked_ms']:>11.2f} {row['speedup']:>9.2f}x"
        )
    write_results(args.json, results)


def describe_machine(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"CPU {platform.processor() or platform.machine()}, {threads} torch threads, torch {torch.__version__}"


if __name__ == "__main__":
    main()
