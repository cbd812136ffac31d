"""Reading and validating a bundle: ``adapters.bundle.load_bundle`` on a bundle of the embedded default's shape.

The server runs this for every ``POST /v1/adapters`` (and for every reload of an evicted adapter) before the
bundle's tensors move to the device: checksums, shapes, finiteness of every tensor, the posterior's ranges
and the OOD score's consistency. The bundle is synthetic, with the default's shape: MiniLM, r = 16 on every
attention and feed-forward map, Kronecker posterior, a Mahalanobis OOD score (768 wide, 2 MB). Usage::

    python benchmarks/bundle_load.py --repeats 30 --json OUT.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: benchmarks.harness importable

from adapters.architectures import BERT_TARGETS
from adapters.bundle import load_bundle
from adapters.embedded import resolve_model
from benchmarks.harness import synthetic_bundle, write_results
from benchmarks.serve import machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "main"
        synthetic_bundle(
            resolve_model("minilm"), bundle, name="main", targets=BERT_TARGETS, rank=16, family="kron",
            variance=1e-3, num_samples=16, max_length=128, ood_method="mahalanobis",
        )  # fmt: skip
        load_bundle(bundle)  # warm: imports, page cache
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            load_bundle(bundle)
            times.append(1000 * (time.perf_counter() - start))
    result = {
        "median_ms": round(statistics.median(times), 2),
        "min_ms": round(min(times), 2),
        "times_ms": [round(t, 2) for t in times],
        "machine": machine(),
    }
    print(f"load_bundle: median {result['median_ms']} ms, min {result['min_ms']} ms over {args.repeats}")
    write_results(args.json, result)


if __name__ == "__main__":
    main()
