"""What the serving benchmark and the server tests share: synthetic bundles and a server process.

Synthetic bundles have real projections from a base model's weights, random cores and head, and a real
posterior. What serving costs does not depend on what the cores learned, so they stand in when no trained
bundle is at hand (or when the base differs from the one a bundle was trained on, e.g. a converted copy on
another machine). :class:`ServerProcess` runs ``caveat-serve`` as its own process on 127.0.0.1.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from transformers import AutoModel, AutoTokenizer, BertConfig

from adapters import LoraXSClassifier, LoraXSConfig, compute_projections, inject_lora_xs, target_names
from adapters.bundle import Bundle, conformal_spec, save_bundle
from adapters.conformal import DEFAULT_ALPHA, ConformalCalibration
from adapters.embedded import resolve_model
from adapters.fingerprint import base_fingerprint
from adapters.injection import lora_xs_layers
from adapters.manifest import (
    AbstentionSpec,
    AdapterSpec,
    BaseModelSpec,
    BundleManifest,
    CalibrationSpec,
    HeadSpec,
    OodSpec,
    PosteriorSpec,
    ProjectionSpecRecord,
    TaskSpec,
)
from adapters.ood import DEFAULT_BUDGET_BYTES, DEFAULT_FRACTION, fit_ood_score
from adapters.ood.features import default_feature_layers
from adapters.posteriors import (
    DiagPosterior,
    KronFactors,
    KronPosterior,
    MapPosterior,
    MatrixNormalFactors,
    MatrixNormalPosterior,
    Posterior,
)
from adapters.vocab import ConformalScore
from training.data import Example
from training.encoding import Encoder
from training.inference import base_features


def synthetic_bundle(
    base_dir: str | Path,
    out: Path,
    *,
    name: str,
    version: str = "1",
    targets: Sequence[str] = ("query", "value"),
    rank: int = 4,
    family: str = "diag",
    seed: int = 0,
    labels: Sequence[str] = ("negative", "positive"),
    variance: float = 0.5,
    core_scale: float = 1.0,
    abstain_mi: float | None = None,
    max_length: int = 64,
    num_samples: int = 8,
    base: torch.nn.Module | None = None,
    ood_method: str | None = None,
    projection: str = "svd",
    text_pair: bool = False,
    pooling: str = "mean",
    conformal: str | None = None,
    ood_length_buckets: int = 0,
) -> Path:
    """Write a bundle for the base at ``base_dir`` (or the already loaded ``base``) into ``out``; with
    ``ood_method``, an OOD score fitted by the trainer's own code on :func:`synthetic_texts` and its ``ood`` rule;
    ``projection``: the projection spec (``random`` projections differ per ``seed``, ``svd`` ones never);
    ``text_pair``: the task takes text pairs; ``pooling``: the base's (``last`` for a decoder); ``conformal``: a
    conformal score (lac, aps) calibrated on random probabilities, for prediction sets at α = 0.1;
    ``ood_length_buckets``: length-aware OOD p-values with this many buckets."""
    base = AutoModel.from_pretrained(base_dir).eval() if base is None else base
    config = LoraXSConfig(rank=rank, alpha=2.0 * rank, target_modules=tuple(targets), seed=seed, projection=projection)
    names = target_names(base, targets)
    adapted = copy.deepcopy(base)
    inject_lora_xs(adapted, targets, compute_projections(adapted, names, config), alpha=config.alpha, seed=seed)
    hidden = base.config.hidden_size
    model = LoraXSClassifier(adapted, num_labels=len(labels), pooling=pooling)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_xs_layers(adapted).values():
            layer.core.weight.copy_(core_scale * torch.randn(rank, rank, generator=generator))
        model.head.weight.copy_(torch.randn(len(labels), hidden, generator=generator))
    mean = {n: p.detach().clone() for n, p in model.posterior_parameters().items()}
    rules = [AbstentionSpec(kind="max_prob", threshold=0.55)]
    if abstain_mi is not None:
        rules.append(AbstentionSpec(kind="mutual_information", threshold=abstain_mi))
    manifest = BundleManifest(
        name=name,
        version=version,
        task=TaskSpec(labels=list(labels), max_length=max_length, text_pair=text_pair, pooling=pooling),
        base_model=BaseModelSpec(
            name_or_path=str(base_dir), fingerprint=base_fingerprint(base, names), hidden_size=hidden
        ),
        adapter=AdapterSpec(
            rank=rank,
            alpha=config.alpha,
            target_modules=list(targets),
            modules=names,
            projection=ProjectionSpecRecord(spec=projection, seed=seed),
        ),
        head=HeadSpec(in_features=hidden, num_labels=len(labels)),
        posterior=PosteriorSpec(family=family, default_num_samples=num_samples),
        calibration=CalibrationSpec(abstention=rules),
    )
    posterior = _posterior(family, mean, variance)
    bundle = Bundle.from_classifier(model, posterior, manifest)
    if ood_method is not None:
        _add_ood_score(bundle, model, base_dir, ood_method, len(labels), ood_length_buckets)
    if conformal is not None:
        probs = torch.softmax(2 * torch.randn(200, len(labels), generator=generator), dim=-1)
        truth = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        bundle.conformal = ConformalCalibration.fit(probs, truth, ConformalScore(conformal))
        manifest.conformal = conformal_spec(bundle.conformal, DEFAULT_ALPHA)
    return save_bundle(bundle, out)


def synthetic_texts(count: int, seed: int = 0) -> list[str]:
    """Short review-like sentences from a small vocabulary (what synthetic OOD scores are fitted on)."""
    words = [
        "good",
        "bad",
        "film",
        "plot",
        "acting",
        "great",
        "boring",
        "loved",
        "hated",
        "music",
        "story",
        "slow",
        "funny",
        "dull",
        "moving",
        "cast",
    ]
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 12, (count,), generator=generator).tolist()
    return [" ".join(words[i] for i in torch.randint(len(words), (n,), generator=generator).tolist()) for n in lengths]


def _add_ood_score(
    bundle: Bundle, model: LoraXSClassifier, base_dir: str | Path, method: str, classes: int, length_buckets: int = 0
) -> None:
    """Fit ``method`` on the frozen base's features of synthetic texts as ``caveat-train`` does (training.ood),
    calibrated on others (per length bucket too with ``length_buckets``); the bundle gains the score, its record
    and the default ``ood`` rule."""
    layers = default_feature_layers(model.base.config.num_hidden_layers)
    encoder = Encoder(AutoTokenizer.from_pretrained(base_dir), bundle.manifest.task.max_length)
    train = [Example(text, i % classes) for i, text in enumerate(synthetic_texts(96, seed=1))]
    validation = [Example(text, 0) for text in synthetic_texts(64, seed=2)]
    features = base_features(model, train, encoder, layers, progress=False)
    options = {"k": 3} if method == "knn" else {}
    score = fit_ood_score(method, features, torch.tensor([e.label for e in train]), **options)
    lengths = torch.tensor(encoder.lengths(validation))
    score.calibrate(base_features(model, validation, encoder, layers, progress=False), lengths, length_buckets)
    bundle.ood = score
    manifest = bundle.manifest
    manifest.ood = OodSpec(
        method=method, layers=list(layers), pooling=model.pooling, budget_bytes=DEFAULT_BUDGET_BYTES,
        fraction=DEFAULT_FRACTION, train_size=len(train),
    )  # fmt: skip
    rule = AbstentionSpec(kind="ood", threshold=score.threshold(), target={"validation_fraction": DEFAULT_FRACTION})
    manifest.calibration.abstention.append(rule)


def _posterior(family: str, mean: dict[str, torch.Tensor], variance: float) -> Posterior:
    if family == "map":
        return MapPosterior(mean)
    if family == "diag":
        return DiagPosterior(mean, {n: torch.full_like(t, variance) for n, t in mean.items()})
    if family == "kron":
        r = next(iter(mean.values())).shape[0]
        factors = {n: KronFactors.from_matrices(torch.eye(r), torch.eye(r)) for n in mean}
        return KronPosterior(mean, factors, scale=0.0, prior_precision=1.0 / variance)
    if family == "matrix_normal":  # half the variance correlated (lower-triangular factors), half isotropic
        return MatrixNormalPosterior(mean, {n: _correlated_factors(t, variance / 2) for n, t in mean.items()})
    raise ValueError(f"synthetic bundles have map, diag, kron or matrix_normal posteriors, not {family!r}")


def _correlated_factors(mean: torch.Tensor, variance: float) -> MatrixNormalFactors:
    """``L_row = L_col = v^{1/4} (I + ½ strictly-lower ones)``: correlated entries of variance ≥ v; ``λ² = v``."""
    r = mean.shape[0]
    factor = variance**0.25 * (torch.eye(r) + 0.5 * torch.ones(r, r).tril(-1))
    return MatrixNormalFactors(factor, factor.clone(), torch.tensor(variance**0.5))


def save_tiny_bert(
    directory: Path, hidden_size: int = 32, intermediate_size: int = 48, max_positions: int = 128, seed: int = 0
) -> Path:
    """A random 2-layer BERT built with ``from_config`` (4 heads) and MiniLM's real tokenizer, saved as a local
    model directory: a base whose forward costs almost nothing."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=intermediate_size, max_position_embeddings=max_positions,
    )  # fmt: skip
    AutoModel.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


REPO = Path(__file__).resolve().parents[1]


@dataclass
class ServerProcess:
    """A ``caveat-serve`` process on 127.0.0.1 (``python -m service.cli``)."""

    process: subprocess.Popen
    url: str
    adapter_dir: Path
    log: Path
    admin_token: str

    @classmethod
    def start(
        cls,
        base: str | Path,
        adapter_dir: Path,
        log: Path,
        *flags: str,
        admin_token: str = "admin",
        timeout_s=180,
        entry: Sequence[str] = ("-m", "service.cli"),
    ) -> ServerProcess:
        """Start the server (``python <entry> <flags>``) and wait until ``/health/ready`` answers 200."""
        port = free_port()
        command = [
            sys.executable, *entry, "--base-model", str(base), "--adapter-dir", str(adapter_dir),
            "--port", str(port), "--admin-token", admin_token, "--log-level", "warning", *flags,
        ]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        server = cls(process, f"http://127.0.0.1:{port}", adapter_dir, log, admin_token)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{server.url}/health/ready", timeout=2).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        server.stop()
        raise RuntimeError(f"server not ready within {timeout_s} s:\n{log.read_text()}")

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)

    def admin(self) -> httpx.Client:
        return self.client(headers={"Authorization": f"Bearer {self.admin_token}"})

    def stop(self) -> None:
        """SIGTERM (graceful), then kill if it does not exit within 30 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


def write_results(path: Path | None, results: dict) -> None:
    """Write a benchmark's results as indented JSON to ``path`` (its folder made), if a path is given."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
