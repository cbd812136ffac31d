"""The training pipeline: data → LoRA-XS → MAP → posterior → calibration → evaluation → bundle."""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from adapters import (
    Bundle,
    DropoutPosterior,
    EnsemblePosterior,
    InputMoments,
    LoraXSClassifier,
    LoraXSConfig,
    MapPosterior,
    Posterior,
    base_fingerprint,
    compute_projections,
    inject_lora_xs,
    load_bundle,
    save_bundle,
    target_names,
)
from adapters.config import DEFAULT_TARGETS
from adapters.embedded import resolve_model
from adapters.errors import CaveatError
from adapters.manifest import (
    MANIFEST_FILE,
    AbstentionSpec,
    AdapterSpec,
    BaseModelSpec,
    BundleManifest,
    CalibrationSpec,
    HeadSpec,
    PosteriorSpec,
    ProjectionSpecRecord,
    TaskSpec,
)
from adapters.model import HEAD_BIAS, HEAD_WEIGHT, default_pooling
from adapters.projections import spec_needs_data
from adapters.tasks import DEFAULT_TEMPLATE, letter_token_ids
from training.calibration import fit_abstention, fit_temperature
from training.data import (
    MULTIPLE_CHOICE_SETS,
    Columns,
    Example,
    TaskData,
    fingerprint,
    load_ood,
    load_shift,
    load_task,
)
from training.encoding import Encoder, make_loader, model_inputs
from training.evaluate import Linearisation, Outputs, labels_of, linearise, ood_metrics, predict, split_metrics
from training.laplace_fit import STRUCTURES, fit_laplace
from training.map_training import MapResult, MapSchedule, train_map
from training.metrics import nll
from training.objectives import AdapterDropout
from training.report import render_report, write_reliability_png
from training.swag import SwagSchedule, fit_swag
from training.variational import ViSchedule, fit_vi

SAMPLED_METHODS = ("swag", "vi", "ensemble", "mc-dropout")  # predictive by network samples only
POSTERIORS = ("map", *STRUCTURES, *SAMPLED_METHODS)
PRIORS = ("marglik", "grid")
PREDICTIVES = ("glm", "sample")
DEFAULT_SAMPLES = {"sample": 16, "glm": 256}  # GLM draws are in logit space (no network passes): cheap
# Validation grid for δ, in decades above the marglik value (for a sampled predictive the marglik prior is too
# weak, never too strong); the best coarse point is then refined by half decades on each side.
GRID_DECADES = (-1.0, 0.0, 1.0, 2.0, 3.0)
GRID_VALIDATION, GRID_SAMPLES = 300, 8
WSVD_BATCHES = 32
CORE_INIT_STD = 1e-5
TASKS = ("classification", "multiple-choice")
CLASSIFICATION_MAX_LENGTH, MC_MAX_LENGTH = 64, 256


class ConfigError(CaveatError, ValueError):
    """The training configuration is inconsistent or points at something unusable."""


@dataclass
class TrainConfig:
    """Everything ``caveat-train`` does; the CLI flags map one-to-one onto these fields."""

    out: str = ""
    base_model: str = "minilm"
    dataset: str = "sst2"
    task: str | None = None  # classification or multiple-choice (default: from the dataset)
    prompt_template: str | None = None  # multiple choice; default adapters.tasks.DEFAULT_TEMPLATE
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    validation_file: str | None = None
    test_file: str | None = None
    validation_size: int = 1000
    shift: str | None = None
    ood: str | None = None
    shift_limit: int | None = 500
    ood_limit: int | None = 500
    train_limit: int | None = None
    eval_limit: int | None = None
    projection: str = "svd"
    rank: int = 16
    alpha: float = 32.0
    targets: list[str] | None = None
    pooling: str | None = None
    epochs: int = 3
    lr: float = 5e-3
    head_lr: float = 5e-3
    weight_decay: float = 0.0
    batch_size: int = 32
    max_length: int | None = None  # default: 64 tokens for classification, 256 for multiple choice
    patience: int = 2
    select_by: str = "nll"
    seed: int = 0
    data_seed: int | None = None  # default: --seed; fix it to vary only initialisation and shuffling
    posterior: str = "laplace-kron"
    predictive: str = "glm"
    prior: str = "marglik"
    posterior_head: bool = False
    prior_structure: str = "scalar"
    laplace_limit: int | None = 1500
    swag_epochs: int = 1
    swag_lr: float = 1e-3
    swag_snapshots: int = 20
    swag_rank: int = 10
    swag_scale: float = 0.5
    vi_epochs: int = 1
    vi_lr: float = 1e-3
    vi_std_lr: float = 0.05
    vi_init_std: float = 0.01
    vi_rank: int = 0  # low-rank part of q's covariance; 0: mean-field
    vi_prior_precision: float | None = None  # None: learned (the ELBO's closed-form optimum)
    vi_kl_weight: float = 1.0
    members: int = 5
    member_bundles: list[str] | None = None
    adapter_dropout: float = 0.1
    num_samples: int | None = None  # default: 16 network samples, or 256 logit draws for the GLM
    temperature_scaling: bool = False
    target_risk: float | None = None
    target_coverage: float | None = None
    abstain_on: list[str] = field(default_factory=lambda: ["max_prob", "mutual_information"])
    mi_coverage: float = 0.95
    mixed_precision: str = "no"
    name: str | None = None
    version: str | None = None
    overwrite: bool = False
    progress: bool = True

    @property
    def multiple_choice(self) -> bool:
        return (self.task or ("multiple-choice" if self.dataset in MULTIPLE_CHOICE_SETS else "")) == "multiple-choice"

    @property
    def tokens(self) -> int:
        """The maximum input length in effect."""
        return self.max_length or (MC_MAX_LENGTH if self.multiple_choice else CLASSIFICATION_MAX_LENGTH)

    @property
    def split_seed(self) -> int:
        """The seed of the data splits and subsets."""
        return self.seed if self.data_seed is None else self.data_seed

    def validate(self, needs_out: bool = True) -> None:
        if needs_out and not self.out:
            raise ConfigError("--out is required: the directory the bundle is written to")
        if self.posterior not in POSTERIORS:
            raise ConfigError(f"unknown --posterior {self.posterior!r}; choose one of {list(POSTERIORS)}")
        if self.predictive not in PREDICTIVES:
            raise ConfigError(f"unknown --predictive {self.predictive!r}; choose one of {list(PREDICTIVES)}")
        if self.prior not in PRIORS:
            raise ConfigError(f"unknown --prior {self.prior!r}; choose one of {list(PRIORS)}")
        if self.target_risk is not None and self.target_coverage is not None:
            raise ConfigError("give --target-risk or --target-coverage, not both")
        if self.task not in (None, *TASKS):
            raise ConfigError(f"unknown --task {self.task!r}; choose one of {list(TASKS)}")
        if self.multiple_choice and self.posterior_head:
            raise ConfigError("--posterior-head: a multiple-choice head is the frozen LM head (answer letters)")
        if self.posterior in ("vi", "mc-dropout") and self.posterior_head:
            raise ConfigError(f"--posterior-head is not available for --posterior {self.posterior} (cores only)")
        if not 0 < self.adapter_dropout < 1:
            raise ConfigError("--adapter-dropout must be in (0, 1)")
        for name in (
            "rank", "epochs", "batch_size", "max_length", "num_samples", "validation_size", "swag_epochs",
            "swag_snapshots", "vi_epochs", "members",
        ):  # fmt: skip
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.vi_rank == 1 or self.vi_rank < 0:
            raise ConfigError("--vi-rank must be 0 (mean-field) or at least 2")
        if self.swag_rank < 2 or self.swag_snapshots < self.swag_rank:
            raise ConfigError("--swag-rank must be at least 2 and at most --swag-snapshots")
        if not 0 < self.mi_coverage <= 1:
            raise ConfigError("--mi-coverage must be in (0, 1]")


@dataclass
class Stage:
    """Wall time of each pipeline stage (recorded in the bundle)."""

    seconds: dict[str, float] = field(default_factory=dict)
    _start: float = field(default_factory=time.perf_counter)

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._start, 1)
        self._start = now


def prepare_output(out: Path, overwrite: bool) -> None:
    """Refuse to write into a directory that holds something else, or over a bundle unless asked."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MANIFEST_FILE).is_file():
            raise ConfigError(f"--out {out} holds other files; choose an empty or new directory")
        if not overwrite:
            raise ConfigError(f"--out {out} already holds a bundle; pass --overwrite to replace it")


def load_base(name_or_path: str, multiple_choice: bool = False) -> tuple[Any, torch.nn.Module, Tensor | None]:
    """Tokenizer, base model and, for multiple choice, the answer letters' rows of the LM head ``(C, H)``.

    A multiple-choice base is loaded as a causal LM; its decoder is the base and the letters' output
    embeddings become the (frozen) classifier head. Its prompts are truncated from the left, so the
    ``Answer:`` they end with is always kept.
    """
    path = resolve_model(name_or_path)
    if (path.startswith((".", "/", "~")) or Path(path).suffix) and not Path(path).expanduser().exists():
        raise ConfigError(f"--base-model {name_or_path}: no such path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if multiple_choice:
            causal = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        else:
            base = AutoModel.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--base-model {name_or_path} cannot be loaded: {exc}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # batched rows and "last" pooling need right padding
    if not multiple_choice:
        return tokenizer, base, None
    tokenizer.truncation_side = "left"
    try:
        letters = letter_token_ids(tokenizer)
    except ValueError as exc:
        raise ConfigError(f"--base-model {name_or_path}: {exc}") from exc
    head = causal.get_output_embeddings().weight.detach()[letters].clone()
    return tokenizer, causal.base_model, head


def default_targets(base) -> list[str]:
    model_type = base.config.model_type
    if model_type not in DEFAULT_TARGETS:
        raise ConfigError(f"no default --targets for a {model_type!r} model; name the linear layers to adapt")
    return list(DEFAULT_TARGETS[model_type])


def _limit(examples: list, limit: int | None, seed: int) -> list:
    if limit is None or len(examples) <= limit:
        return examples
    chosen = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in chosen]


@dataclass
class Fitted:
    """A posterior and how its predictive is computed.

    Attributes:
        method: the ``--posterior`` value that produced it.
        predictive: ``glm`` (linearised, Laplace only), ``sample`` (network samples) or ``map``.
        num_samples: draws of the predictive (logit draws for ``glm``).
        info: what the fit records in the bundle (prior precision, schedule, diagnostics).
        seconds: wall time of the fit, training beyond the MAP included.
    """

    method: str
    posterior: Posterior
    predictive: str
    num_samples: int
    info: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class Session:
    """Everything the stages share: data, the model being trained, and cached MAP outputs."""

    config: TrainConfig
    task: TaskData
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    shift: tuple[str, list[Example]] | None
    ood: tuple[str, list[Example]] | None
    model: LoraXSClassifier
    encoder: Encoder
    patterns: list[str]
    names: list[str]
    fingerprint: str
    projection_data: dict[str, Any] | None
    accelerator: Accelerator
    stage: Stage
    map_result: MapResult | None = None
    _map_outputs: dict[str, Outputs] = field(default_factory=dict)
    _linearisations: dict[str, Linearisation] = field(default_factory=dict)

    def say(self, message: str) -> None:
        self.accelerator.print(message)

    def splits(self) -> dict[str, list[Example]]:
        """Evaluation splits by name: test, and shift / OOD when configured (OOD texts as examples)."""
        splits = {"test": self.test}
        if self.shift is not None:
            splits["shift"] = self.shift[1]
        if self.ood is not None:
            splits["ood"] = self.ood[1]
        return splits

    def map_outputs(self, split: str, examples: list[Example]) -> Outputs:
        """MAP logits of a split (computed once: they do not depend on the posterior)."""
        if split not in self._map_outputs:
            self._map_outputs[split] = predict(
                self.model,
                examples,
                self.encoder,
                batch_size=self.config.batch_size,
                desc=f"{split} (MAP)",
                progress=self.config.progress,
            )
        return self._map_outputs[split]

    def forget_outputs(self) -> None:
        """Drop cached MAP outputs and linearisations (after the model was retrained)."""
        self._map_outputs.clear()
        self._linearisations.clear()

    def linearisation(self, split: str, examples: list[Example]) -> Linearisation:
        """A split linearised at the MAP (computed once: it serves every prior precision and family)."""
        if split not in self._linearisations:
            self._linearisations[split] = linearise(
                self.model, examples, self.encoder, include_head=self.config.posterior_head,
                batch_size=self.config.batch_size, desc=f"{split} (Jacobians)", progress=self.config.progress,
            )  # fmt: skip
        return self._linearisations[split]

    def sampled_outputs(self, fitted: Fitted, split: str, examples: list[Example]) -> Outputs:
        """The posterior predictive's per-draw logits, the way the bundle's server computes them."""
        if fitted.predictive == "glm":
            return self.linearisation(split, examples).outputs(fitted.posterior, fitted.num_samples, self.config.seed)
        return predict(
            self.model,
            examples,
            self.encoder,
            posterior=fitted.posterior,
            num_samples=fitted.num_samples,
            seed=self.config.seed,
            batch_size=self.config.batch_size,
            desc=f"{split} (posterior)",
            progress=self.config.progress,
        )


def prepare(config: TrainConfig) -> Session:
    """Load data and base model, inject LoRA-XS (projections fitted on the pretrained weights)."""
    config.validate(needs_out=False)
    torch.manual_seed(config.seed)  # the head's initialisation draws from the global generator
    stage = Stage()
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    columns = Columns(config.text_column, config.label_column, config.text_pair_column)
    task = load_task(
        config.dataset,
        columns=columns,
        validation_file=config.validation_file,
        test_file=config.test_file,
        validation_size=config.validation_size,
        seed=config.split_seed,
        prompt_template=config.prompt_template,
    )
    shift = load_shift(config.shift, task.labels, columns, config.prompt_template) if config.shift else None
    ood = load_ood(config.ood, config.text_column, config.prompt_template) if config.ood else None
    if config.multiple_choice != all(e.num_choices is not None for e in task.train):
        kind = "multiple-choice" if config.multiple_choice else "classification"
        raise ConfigError(f"--dataset {config.dataset} is not a {kind} task (--task)")
    train = _limit(task.train, config.train_limit, config.split_seed)
    validation = _limit(task.validation, config.eval_limit, config.split_seed)
    test = _limit(task.test, config.eval_limit, config.split_seed)
    shift = (shift[0], _limit(shift[1], config.shift_limit, config.split_seed)) if shift else None
    ood = (ood[0], _limit(ood[1], config.ood_limit, config.split_seed)) if ood else None
    accelerator.print(
        f"data: {task.name} train {len(train)}, validation {len(validation)}, test {len(test)}, labels {task.labels}"
    )
    stage.done("data")

    tokenizer, base, letter_head = load_base(config.base_model, config.multiple_choice)
    patterns = config.targets or default_targets(base)
    names = target_names(base, patterns)
    fingerprint_value = base_fingerprint(base, names)
    lora = LoraXSConfig(config.rank, config.alpha, tuple(patterns), config.projection, config.seed)
    encoder = Encoder(tokenizer, config.tokens)
    moments, projection_data = _input_moments(base, names, train, encoder, config)
    projections = compute_projections(base, names, lora, moments)
    report = inject_lora_xs(base, patterns, projections, alpha=config.alpha, init_std=CORE_INIT_STD, seed=config.seed)
    pooling = config.pooling or default_pooling(base.config)
    if letter_head is None:
        model = LoraXSClassifier(base, num_labels=len(task.labels), pooling=pooling)
    else:  # the LM's own next-token logits of the answer letters: a fixed head, no dropout in front of it
        model = LoraXSClassifier(base, num_labels=len(task.labels), pooling="last", dropout=0.0, train_head=False)
        with torch.no_grad():
            model.head.weight.copy_(letter_head)
            model.head.bias.zero_()
    model = model.to(accelerator.device)
    accelerator.print(f"LoRA-XS: {report}, rank {config.rank}, {len(names) * config.rank**2} core parameters")
    stage.done("setup")
    return Session(
        config, task, train, validation, test, shift, ood, model, encoder, list(patterns), names,
        fingerprint_value, projection_data, accelerator, stage,
    )  # fmt: skip


def map_schedule(config: TrainConfig, seed: int | None = None) -> MapSchedule:
    return MapSchedule(
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        head_lr=config.head_lr,
        weight_decay=config.weight_decay,
        patience=config.patience,
        select_by=config.select_by,
        mixed_precision=config.mixed_precision,
        seed=config.seed if seed is None else seed,
    )


def train(session: Session, dropout: bool | None = None) -> MapResult:
    """MAP training (with MC dropout on the adapter input for ``--posterior mc-dropout``)."""
    config = session.config
    dropout = config.posterior == "mc-dropout" if dropout is None else dropout
    session.map_result = train_map(
        session.model, session.train, session.validation, session.encoder, map_schedule(config),
        session.accelerator, progress=config.progress,
        objective=AdapterDropout(config.adapter_dropout) if dropout else None,
    )  # fmt: skip
    session.stage.done("map_training")
    return session.map_result


def fit_posterior(session: Session, method: str) -> Fitted:
    """The posterior of ``method`` around (or from) the trained MAP in the session's model."""
    config, model = session.config, session.model
    start = time.perf_counter()
    draws = config.num_samples or DEFAULT_SAMPLES["sample"]
    if method == "map":
        posterior = MapPosterior({n: p.detach().clone() for n, p in model.posterior_parameters().items()})
        fitted = Fitted(method, posterior, "map", 1)
    elif method in STRUCTURES:
        fitted = _fit_laplace(session, method)
    elif method == "swag":
        schedule = SwagSchedule(
            epochs=config.swag_epochs, lr=config.swag_lr, snapshots=config.swag_snapshots, rank=config.swag_rank,
            scale=config.swag_scale, batch_size=config.batch_size, seed=config.seed,
        )  # fmt: skip
        posterior, info = fit_swag(
            model, session.train, session.encoder, schedule, config.posterior_head, progress=config.progress
        )
        fitted = Fitted(method, posterior, "sample", draws, info)
    elif method == "vi":
        schedule = ViSchedule(
            epochs=config.vi_epochs, batch_size=config.batch_size, lr=config.vi_lr, std_lr=config.vi_std_lr,
            init_std=config.vi_init_std, rank=config.vi_rank, prior_precision=config.vi_prior_precision,
            kl_weight=config.vi_kl_weight, seed=config.seed,
        )  # fmt: skip
        posterior, info = fit_vi(model, session.train, session.encoder, schedule, config.progress)
        fitted = Fitted(method, posterior, "sample", draws, info)
    elif method == "ensemble":
        posterior, info = train_ensemble(session)
        fitted = Fitted(method, posterior, "sample", posterior.num_members, info)  # each member once
    elif method == "mc-dropout":
        cores = {n: p.detach().clone() for n, p in model.posterior_parameters().items()}
        posterior = DropoutPosterior(cores, config.adapter_dropout)
        fitted = Fitted(method, posterior, "sample", draws, {"rate": config.adapter_dropout})
    else:
        raise ConfigError(f"unknown --posterior {method!r}; choose one of {list(POSTERIORS)}")
    fitted.seconds = round(time.perf_counter() - start, 1)
    if method != "map":
        session.say(f"posterior {method}: {fitted.posterior} in {fitted.seconds:.0f} s")
    return fitted


def _fit_laplace(session: Session, method: str) -> Fitted:
    """A Laplace structure around the MAP (curvature on a subset, scaled to N); δ by marglik or grid."""
    config = session.config
    curvature_data = _limit(session.train, config.laplace_limit, config.seed)
    loader = make_loader(curvature_data, session.encoder, config.batch_size, shuffle=False)
    fit = fit_laplace(
        session.model,
        loader,
        STRUCTURES[method],
        include_head=config.posterior_head,
        n_data=len(session.train),
        prior_structure=config.prior_structure,
        progress=config.progress,
    )
    fitted = Fitted(
        method, fit.posterior, config.predictive, config.num_samples or DEFAULT_SAMPLES[config.predictive], fit.info
    )
    if config.prior == "grid":
        fitted.posterior, fitted.info = _grid_prior(session, fit, fitted)
    session.say(f"posterior {method}: prior precision {fitted.info['prior_precision']} ({config.prior})")
    return fitted


def train_ensemble(session: Session) -> tuple[EnsemblePosterior, dict[str, Any]]:
    """M members: the session's MAP, members loaded from ``--member-bundles``, and the rest trained here
    with seeds ``seed+1, seed+2, ...`` (same data, new initialisation and shuffling). Every member brings its
    own head, so the ensemble covers the head. The model is left holding the first member."""
    config, model = session.config, session.model
    first = {n: p.detach().clone() for n, p in model.posterior_parameters(include_head=True).items()}
    members, seconds = [first], [session.map_result.seconds if session.map_result else 0.0]
    for path in config.member_bundles or []:
        member, member_seconds = _member_from_bundle(session, Path(path))
        members.append(member)
        seconds.append(member_seconds)
    seed = config.seed
    while len(members) < config.members:
        seed += 1
        session.say(f"ensemble member {len(members) + 1}/{config.members} (seed {seed})")
        reinitialise(model, seed)
        result = train_map(
            model, session.train, session.validation, session.encoder, map_schedule(config, seed),
            session.accelerator, progress=config.progress,
        )  # fmt: skip
        members.append({n: p.detach().clone() for n, p in model.posterior_parameters(include_head=True).items()})
        seconds.append(result.seconds)
    with torch.no_grad():
        for name, param in model.posterior_parameters(include_head=True).items():
            param.copy_(first[name])
    stacked = {name: torch.stack([m[name] for m in members]) for name in first}
    info = {
        "members": len(members),
        "loaded": list(config.member_bundles or []),
        "member_training_seconds": [round(v, 1) for v in seconds],
    }
    return EnsemblePosterior(stacked), info


def reinitialise(model: LoraXSClassifier, seed: int) -> None:
    """Fresh cores (``N(0, 1e-5²)``, as at injection) and a fresh trainable head, from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.lora_layers.values():
            weight = layer.core.weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * CORE_INIT_STD)
        if model.train_head:  # a multiple-choice head is the LM's, shared by every member
            torch.manual_seed(seed)
            model.head.reset_parameters()


def _member_from_bundle(session: Session, path: Path) -> tuple[dict[str, Tensor], float]:
    """A trained member's cores and head from its bundle, after checking it saw the same data and base."""
    try:
        bundle = load_bundle(path)
    except (CaveatError, OSError) as exc:
        raise ConfigError(f"--member-bundles {path}: {exc}") from exc
    manifest = bundle.manifest
    card = manifest.eval.get("data", {})
    if manifest.base_model.fingerprint != session.fingerprint or manifest.adapter.modules != session.names:
        raise ConfigError(f"--member-bundles {path}: adapts another base model or other modules")
    if card.get("sha256", {}) != _data_card(session)["sha256"]:
        raise ConfigError(f"--member-bundles {path}: trained on other data splits (give it the same --data-seed)")
    if manifest.adapter.rank != session.config.rank:
        raise ConfigError(f"--member-bundles {path}: rank {manifest.adapter.rank}, not {session.config.rank}")
    device = next(session.model.parameters()).device
    member = {name: core.to(device) for name, core in bundle.cores.items()}
    member[HEAD_WEIGHT], member[HEAD_BIAS] = bundle.head_weight.to(device), bundle.head_bias.to(device)
    seconds = manifest.eval.get("training", {}).get("stage_seconds", {}).get("map_training", 0.0)
    return member, float(seconds)


def _grid_prior(session: Session, fit, fitted: Fitted) -> tuple[Posterior, dict[str, Any]]:
    """δ by validation NLL of the predictive: decades around the marglik value, then half decades.

    With the GLM predictive every point reuses one linearisation of the whole validation split; with
    network sampling each point is a sampled pass over a validation subset.
    """
    config = session.config
    if isinstance(fit.info["prior_precision"], list):
        raise ConfigError("--prior grid needs a scalar prior (--prior-structure scalar)")
    glm = config.predictive == "glm"
    examples = session.validation if glm else _limit(session.validation, GRID_VALIDATION, config.seed)
    labels = labels_of(examples)
    marglik = fit.info["prior_precision"]
    scores: dict[float, float] = {}

    def score(decade: float) -> None:
        delta = marglik * 10**decade
        if glm:
            linearised = session.linearisation("validation", examples)
            outputs = linearised.outputs(fit.at(delta), fitted.num_samples, config.seed)
        else:
            outputs = predict(  # the same seed at every δ: common random numbers make the comparison fair
                session.model, examples, session.encoder, posterior=fit.at(delta),
                num_samples=min(fitted.num_samples, GRID_SAMPLES), seed=config.seed, batch_size=config.batch_size,
                desc=f"prior grid δ={delta:.3g}", progress=config.progress,
            )  # fmt: skip
        scores[decade] = nll(outputs.predictive().probs, labels)

    for decade in GRID_DECADES:
        score(decade)
    coarse = min(scores, key=scores.get)
    for decade in (coarse - 0.5, coarse + 0.5):
        score(decade)
    best = min(scores, key=scores.get)
    info = fit.info | {
        "prior_precision": marglik * 10**best,
        "prior_method": "validation grid",
        "marglik_prior_precision": marglik,
        "grid_validation_nll": {f"{marglik * 10**d:.6g}": round(v, 6) for d, v in sorted(scores.items())},
    }
    return fit.at(marglik * 10**best), info


def calibrate(
    session: Session, fitted: Fitted, temperature_scaling: bool | None = None
) -> tuple[float, list[AbstentionSpec]]:
    """Temperature (``--temperature-scaling``, or as asked) and abstention thresholds, fitted on validation."""
    config = session.config
    scale = config.temperature_scaling if temperature_scaling is None else temperature_scaling
    outputs = session.sampled_outputs(fitted, "validation", session.validation)
    labels = labels_of(session.validation)
    temperature = fit_temperature(outputs.logits, labels) if scale else 1.0
    pred = outputs.predictive(temperature)
    target_risk = config.target_risk
    if target_risk is None and config.target_coverage is None:
        target_risk = 0.05
    rules = []
    for kind in config.abstain_on:
        if kind == "mutual_information":  # an epistemic alarm: answer the usual in-distribution range
            rules.append(fit_abstention(pred, labels, kind, target_coverage=config.mi_coverage))
        else:
            rules.append(
                fit_abstention(pred, labels, kind, target_risk=target_risk, target_coverage=config.target_coverage)
            )
    return temperature, rules


def evaluate(session: Session, fitted: Fitted, temperature: float) -> tuple[dict[str, Any], dict]:
    """MAP and posterior metrics on test, shift and OOD; the reliability-diagram panels."""
    with_mi = fitted.predictive != "map"
    evaluation: dict[str, Any] = {
        "method": fitted.method,
        "num_samples": fitted.num_samples,
        "predictive": fitted.predictive,
        "temperature": temperature,
    }
    preds, panels = {}, {}
    for split, examples in session.splits().items():
        preds[split] = {
            "MAP": session.map_outputs(split, examples).predictive(),
            "posterior": session.sampled_outputs(fitted, split, examples).predictive(temperature),
        }
        if split == "ood":
            continue
        labels = labels_of(examples)
        evaluation[split] = {
            "size": len(examples),
            "map": split_metrics(preds[split]["MAP"], labels),
            "posterior": split_metrics(preds[split]["posterior"], labels),
        }
        title = "test" if split == "test" else f"shift: {session.shift[0]}"
        panels[title] = {method: (pred.probs, labels) for method, pred in preds[split].items()}
    if session.shift is not None:
        evaluation["shift"]["dataset"] = session.shift[0]
    if session.ood is not None:
        evaluation["ood"] = {
            "dataset": session.ood[0],
            "size": len(session.ood[1]),
            "map": ood_metrics(preds["test"]["MAP"], preds["ood"]["MAP"], with_mi=False),
            "posterior": ood_metrics(preds["test"]["posterior"], preds["ood"]["posterior"], with_mi=with_mi),
        }
    return evaluation, panels


def write_bundle(
    session: Session,
    out: Path,
    fitted: Fitted,
    calibration: tuple[float, list[AbstentionSpec]],
    evaluation: dict[str, Any],
    panels: dict,
) -> Path:
    config, model, base = session.config, session.model, session.model.base
    posterior = fitted.posterior
    temperature, rules = calibration
    manifest = BundleManifest(
        name=config.name or _bundle_name(out),
        version=config.version or datetime.now(UTC).strftime("%Y%m%d.%H%M%S"),
        task=TaskSpec(
            type="multiple-choice" if config.multiple_choice else "sequence-classification",
            labels=session.task.labels,
            pooling=model.pooling,
            text_pair=session.task.text_pair,
            max_length=config.tokens,
            prompt_template=(config.prompt_template or DEFAULT_TEMPLATE) if config.multiple_choice else None,
        ),
        base_model=BaseModelSpec(
            name_or_path=config.base_model,
            fingerprint=session.fingerprint,
            dtype="float32",
            architecture=base.config.model_type,
            hidden_size=base.config.hidden_size,
        ),
        adapter=AdapterSpec(
            rank=config.rank,
            alpha=config.alpha,
            target_modules=session.patterns,
            modules=session.names,
            projection=ProjectionSpecRecord(spec=config.projection, seed=config.seed, data=session.projection_data),
        ),
        head=HeadSpec(in_features=base.config.hidden_size, num_labels=len(session.task.labels)),
        posterior=PosteriorSpec(
            family=posterior.family,
            prior_precision=fitted.info.get("prior_precision"),
            default_num_samples=fitted.num_samples,
            covers_head=HEAD_WEIGHT in posterior.names and posterior.family != "map",
            predictive="glm" if fitted.predictive == "glm" else "sample",
        ),
        calibration=CalibrationSpec(temperature=temperature, abstention=rules),
        eval=evaluation | {"data": _data_card(session)},
    )
    map_result = session.map_result
    record = {
        "config": asdict(config),
        "map": asdict(map_result) if map_result else None,
        "posterior": {"method": fitted.method, "seconds": fitted.seconds, **fitted.info},
        "stage_seconds": session.stage.seconds,
        "summary": (
            f"{map_result.best_epoch} of {len(map_result.history)} epochs kept (validation {config.select_by}); "
            f"{sum(session.stage.seconds.values()):.0f} s in all ({_stage_list(session.stage.seconds)})."
        ),
    }
    manifest.eval["training"] = {k: v for k, v in record.items() if k != "config"}
    bundle = Bundle.from_classifier(model, posterior, manifest)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"  # the old bundle survives a failed write
    shutil.rmtree(staging, ignore_errors=True)
    save_bundle(bundle, staging)
    write_reliability_png(staging / "reliability.png", panels)
    manifest_dict = json.loads((staging / MANIFEST_FILE).read_text())
    (staging / "report.md").write_text(render_report(manifest_dict, record))
    (staging / "training.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    _replace_directory(staging, out)
    session.say(f"bundle written to {out} ({bundle_size_kb(out):.0f} kB without projections)")
    return out


def _replace_directory(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an existing (empty or bundle) ``target`` is removed only after the move."""
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def run(config: TrainConfig) -> Path:
    """Train, fit the posterior, calibrate, evaluate and write a bundle; returns its directory."""
    config.validate()
    out = Path(config.out)
    prepare_output(out, config.overwrite)
    session = prepare(config)
    train(session)
    if not session.accelerator.is_main_process:  # under `accelerate launch`, one process finishes the job
        return out
    fitted = fit_posterior(session, config.posterior)
    session.stage.done("posterior")
    calibration = calibrate(session, fitted)
    session.stage.done("calibration")
    evaluation, panels = evaluate(session, fitted, calibration[0])
    session.stage.done("evaluation")
    return write_bundle(session, out, fitted, calibration, evaluation, panels)


def _input_moments(base, names, train: list[Example], encoder: Encoder, config: TrainConfig):
    """W-SVD needs each layer's input second moment under the pretrained model (padding excluded)."""
    if not spec_needs_data(config.projection):
        return None, None
    examples = _limit(train, WSVD_BATCHES * config.batch_size, config.seed)
    with InputMoments(base, names) as moments, torch.no_grad():
        for batch in make_loader(examples, encoder, config.batch_size, shuffle=False):
            moments.set_mask(batch["attention_mask"])
            base(**model_inputs(batch))
        result = moments.moments()
        tokens = max(moments.num_tokens.values())
    return result, {"dataset": config.dataset, "examples": len(examples), "tokens": tokens}


def _data_card(session: Session) -> dict[str, Any]:
    task = session.task
    card = {
        "task": task.name,
        "provenance": task.provenance,
        "sizes": {"train": len(session.train), "validation": len(session.validation), "test": len(session.test)},
        "sha256": {
            "train": fingerprint(session.train),
            "validation": fingerprint(session.validation),
            "test": fingerprint(session.test),
        },
    }
    if session.shift is not None:
        card["shift"] = {
            "dataset": session.shift[0],
            "size": len(session.shift[1]),
            "sha256": fingerprint(session.shift[1]),
        }
    if session.ood is not None:
        texts = [e.text for e in session.ood[1]]
        card["ood"] = {"dataset": session.ood[0], "size": len(texts), "sha256": fingerprint(texts)}
    return card


def _stage_list(seconds: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items())


def _bundle_name(out: Path) -> str:
    name = "".join(c if c.isalnum() or c in "._-" else "-" for c in out.resolve().name).strip("-._")
    return name or "bundle"


def bundle_size_kb(directory: Path) -> float:
    """Size of bundle.json, adapter and posterior files (projections may be shared across bundles)."""
    files = ["bundle.json", "adapter.safetensors", "posterior.safetensors"]
    return sum((directory / f).stat().st_size for f in files) / 1024
