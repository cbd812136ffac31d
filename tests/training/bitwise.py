"""The runs whose bundle tensors must stay bit-identical across refactorings, and their reference hashes.

Each run trains a bundle with ``--seed 0`` on a small slice; :func:`tensor_hashes` records the sha256 of every
tensor (dtype, shape and bytes) in the bundle's safetensors files. The bits depend on the CPU as well as on
the code (torch and the BLAS pick vectorised kernels by CPU, and their rounding differs), so the reference,
``tests/training/fixtures/bitwise.json``, holds one set of hashes per machine class (:func:`machine_class`).
Regenerate this machine's set (only when a change of the numbers is intended, and say so in the commit; or to
add a machine class, from a commit whose numbers another class's set vouches for) with::

    .venv/bin/python -m tests.training.bitwise            # every run
    .venv/bin/python -m tests.training.bitwise tiny-swag  # some runs
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from adapters.manifest import TENSOR_FILES
from tests.service.bundles import save_tiny_base
from training.cli import main

REFERENCE = Path(__file__).with_name("fixtures") / "bitwise.json"

SLICE = [
    "--seed", "0", "--train-limit", "96", "--eval-limit", "32", "--validation-size", "96", "--epochs", "1",
    "--no-progress",
]  # fmt: skip
TINY = [*SLICE, "--rank", "2", "--targets", "query,value", "--laplace-limit", "32", "--max-length", "32"]
# the embedded default (MiniLM, SST-2, Laplace-Kronecker, GLM, MAP-checked prior) with its default adapter; the
# earlier default (query,value at 64 tokens, marglik prior: the published setting), whose hashes predate the
# change of defaults; and every other method on a tiny random BERT (cheap, through the same pipeline)
RUNS: dict[str, list[str]] = {
    "minilm-default": [*SLICE, "--laplace-limit", "48"],
    "minilm-marglik": [
        *SLICE,
        "--laplace-limit",
        "48",
        "--prior",
        "marglik",
        "--targets",
        "query,value",
        "--max-length",
        "64",
    ],
    "tiny-map": [*TINY, "--posterior", "map"],
    "tiny-laplace-diag": [*TINY, "--posterior", "laplace-diag", "--posterior-head", "--prior", "marglik"],
    "tiny-laplace-full-grid": [*TINY, "--posterior", "laplace-full", "--prior", "grid"],
    "tiny-swag": [*TINY, "--posterior", "swag", "--swag-snapshots", "4", "--swag-rank", "2"],
    "tiny-vi": [*TINY, "--posterior", "vi", "--vi-rank", "2"],
    "tiny-ensemble": [*TINY, "--posterior", "ensemble", "--members", "2"],
    "tiny-mc-dropout": [*TINY, "--posterior", "mc-dropout"],
    # the factor learning rate of the reference, from before the tuned default (issue #14)
    "tiny-bayesian-lora": [*TINY, "--posterior", "bayesian-lora", "--blora-samples", "2", "--blora-factor-lr", "0.01"],
    "tiny-llora-s-laplace-kron": [
        *TINY,
        "--posterior",
        "laplace-kron",
        "--train-projections",
        "--projection-lr",
        "1e-3",
    ],
}


def machine_class() -> str:
    """What decides the kernels' rounding: torch's CPU capability and the CPU's vendor, family and model."""
    cpuinfo = Path("/proc/cpuinfo")
    fields: dict[str, str] = {}
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        if not line.strip():
            break  # the first processor describes them all
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    cpu = " ".join(fields.get(k, "?") for k in ("vendor_id", "cpu family", "model"))
    return f"{torch.backends.cpu.get_cpu_capability()}, {cpu}"


def tensor_hashes(bundle: Path) -> dict[str, str]:
    """``file::tensor`` → sha256 of its dtype, shape and bytes."""
    hashes = {}
    for name in TENSOR_FILES:
        for key, tensor in sorted(load_file(bundle / name).items()):
            digest = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.contiguous().view(-1).view(dtype=torch.uint8).numpy().tobytes())
            hashes[f"{name}::{key}"] = digest.hexdigest()
    return hashes


def train(run: str, workdir: Path, tiny_base: Path | None = None) -> Path:
    """Train the bundle of ``run`` under ``workdir``; a tiny run needs ``tiny_base`` (made when absent)."""
    argv = ["--out", str(workdir / run), *RUNS[run]]
    if run.startswith("tiny-"):
        tiny_base = tiny_base or save_tiny_base(workdir / "tiny-base")
        argv += ["--base-model", str(tiny_base)]
    if main(argv) != 0:
        raise RuntimeError(f"run {run} failed")
    return workdir / run


def references() -> dict[str, dict[str, dict[str, str]]]:
    """Machine class → run → ``file::tensor`` → sha256."""
    return json.loads(REFERENCE.read_text()) if REFERENCE.is_file() else {}


def regenerate(runs: list[str]) -> None:
    """Train ``runs`` and store their hashes as this machine class's set (the other classes' are kept)."""
    reference = references()
    mine = reference.setdefault(machine_class(), {})
    with tempfile.TemporaryDirectory() as tmp:
        base = save_tiny_base(Path(tmp) / "tiny-base")
        for run in runs:
            mine[run] = tensor_hashes(train(run, Path(tmp), base))
    REFERENCE.write_text(json.dumps(reference, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("CAVEAT_TEST_THREADS", "2")))  # as under pytest (tests/conftest.py)
    regenerate(sys.argv[1:] or list(RUNS))
