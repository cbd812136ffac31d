"""Load-on-miss from the bundle store: from a bundle published to the store (as a release pipeline would, behind
the server's back) to its first answer, against the same request once the adapter is resident, side by side in one
run on a real ``caveat-serve`` process (issue #26's target: ≤ 250 ms for a MiniLM bundle on this CPU)::

    python -m benchmarks.store_miss [--adapters 8] [--json docs/benchmarks/store/miss-minilm-cpu.json]

The bundles are synthetic MiniLM bundles (rank 16 on every attention and MLP map, Laplace-Kronecker, with an OOD
score), each a renamed copy; every request is one input with ``method: map``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from adapters.architectures import BERT_TARGETS
from adapters.embedded import resolve_model
from adapters.store import BundleStore
from benchmarks.harness import ServerProcess, synthetic_bundle, write_results
from benchmarks.serve import machine, rename

TEXT = "a gorgeous, witty, seductive movie."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=8, help="adapters published and asked for, one by one")
    parser.add_argument("--base-model", default="minilm")
    parser.add_argument("--threads", type=int, default=2, help="the server's torch threads")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = root / "source" / "main"
        synthetic_bundle(resolve_model(args.base_model), source, name="main", targets=BERT_TARGETS, rank=16,
                         family="kron", variance=1e-3, max_length=128)  # fmt: skip
        names = [f"m{i}" for i in range(args.adapters)]
        for name in names:
            shutil.copytree(source, root / "source" / name)
            rename(root / "source" / name, name)
        store_dir = root / "store"
        store_dir.mkdir()
        server = ServerProcess.start(args.base_model, store_dir, root / "server.log", "--torch-threads",
                                     str(args.threads))  # fmt: skip
        store = BundleStore(store_dir)
        times: dict[str, list[float]] = {"first": [], "warm": []}
        try:
            with server.client() as client:
                for name in names:
                    store.publish(root / "source" / name, name, "1")
                    body = {"adapter": name, "inputs": [TEXT], "method": "map", "seed": 0}
                    for key in ("first", "warm"):
                        start = time.perf_counter()
                        answer = client.post("/v1/predict", json=body)
                        times[key].append(round(1000 * (time.perf_counter() - start), 1))
                        if answer.status_code != 200:
                            raise RuntimeError(f"{name}: {answer.status_code} {answer.text}")
        finally:
            server.stop()
    results = {
        "machine": machine(),
        "adapters": args.adapters,
        "ms": times,
        "median_ms": {key: round(statistics.median(values), 1) for key, values in times.items()},
        "median_load_ms": round(
            statistics.median(f - w for f, w in zip(times["first"], times["warm"], strict=True)), 1
        ),
    }
    print(f"first answer after publishing: median {results['median_ms']['first']} ms; the same request resident: "
          f"{results['median_ms']['warm']} ms; the load itself: {results['median_load_ms']:.1f} ms")  # fmt: skip
    write_results(args.json, results)


if __name__ == "__main__":
    main()
