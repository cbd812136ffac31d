"""The training pipeline: data → LoRA-XS → MAP → posterior → calibration → evaluation → bundle."""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from transformers import AutoModel, AutoTokenizer

from adapters import (
    Bundle,
    InputMoments,
    LoraXSClassifier,
    LoraXSConfig,
    MapPosterior,
    base_fingerprint,
    compute_projections,
    inject_lora_xs,
    save_bundle,
    target_names,
)
from adapters.config import DEFAULT_TARGETS
from adapters.embedded import resolve_model
from adapters.errors import CaveatError
from adapters.manifest import (
    MANIFEST_FILE,
    AdapterSpec,
    BaseModelSpec,
    BundleManifest,
    CalibrationSpec,
    HeadSpec,
    PosteriorSpec,
    ProjectionSpecRecord,
    TaskSpec,
)
from adapters.projections import spec_needs_data
from training.calibration import fit_abstention, fit_temperature
from training.data import Columns, Example, TaskData, fingerprint, load_ood, load_shift, load_task
from training.encoding import Encoder, make_loader, model_inputs, texts_as_examples
from training.evaluate import Outputs, labels_of, ood_metrics, predict, split_metrics
from training.laplace_fit import STRUCTURES, fit_laplace
from training.map_training import MapSchedule, train_map
from training.report import render_report, write_reliability_png

POSTERIORS = ("map", *STRUCTURES)
WSVD_BATCHES = 32


class ConfigError(CaveatError, ValueError):
    """The training configuration is inconsistent or points at something unusable."""


@dataclass
class TrainConfig:
    """Everything ``caveat-train`` does; the CLI flags map one-to-one onto these fields."""

    out: str = ""
    base_model: str = "minilm"
    dataset: str = "sst2"
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    validation_file: str | None = None
    test_file: str | None = None
    validation_size: int = 1000
    shift: str | None = None
    ood: str | None = None
    shift_limit: int | None = None
    ood_limit: int | None = 1000
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
    max_length: int = 64
    patience: int = 2
    select_by: str = "nll"
    seed: int = 0
    posterior: str = "laplace-kron"
    prior: str = "marglik"
    posterior_head: bool = False
    prior_structure: str = "scalar"
    laplace_limit: int | None = None
    num_samples: int = 16
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

    def validate(self) -> None:
        if not self.out:
            raise ConfigError("--out is required: the directory the bundle is written to")
        if self.posterior not in POSTERIORS:
            raise ConfigError(f"unknown --posterior {self.posterior!r}; choose one of {list(POSTERIORS)}")
        if self.prior != "marglik":
            raise ConfigError("only --prior marglik is implemented (the validation grid is not yet)")
        if self.target_risk is not None and self.target_coverage is not None:
            raise ConfigError("give --target-risk or --target-coverage, not both")
        for name in ("rank", "epochs", "batch_size", "max_length", "num_samples", "validation_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
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


def load_base(name_or_path: str):
    path = resolve_model(name_or_path)
    if (path.startswith((".", "/", "~")) or Path(path).suffix) and not Path(path).expanduser().exists():
        raise ConfigError(f"--base-model {name_or_path}: no such path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        base = AutoModel.from_pretrained(path, dtype=torch.float32)
    except OSError as exc:
        raise ConfigError(f"--base-model {name_or_path} cannot be loaded: {exc}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, base


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


def run(config: TrainConfig) -> Path:
    """Train, evaluate and write a bundle; returns its directory."""
    config.validate()
    out = Path(config.out)
    prepare_output(out, config.overwrite)
    stage = Stage()
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    say = accelerator.print

    columns = Columns(config.text_column, config.label_column, config.text_pair_column)
    task = load_task(
        config.dataset,
        columns=columns,
        validation_file=config.validation_file,
        test_file=config.test_file,
        validation_size=config.validation_size,
        seed=config.seed,
    )
    train = _limit(task.train, config.train_limit, config.seed)
    test = _limit(task.test, config.eval_limit, config.seed)
    validation = _limit(task.validation, config.eval_limit, config.seed)
    shift = load_shift(config.shift, task.labels, columns) if config.shift else None
    ood = load_ood(config.ood, config.text_column) if config.ood else None
    say(f"data: {task.name} train {len(train)}, validation {len(validation)}, test {len(test)}, labels {task.labels}")
    stage.done("data")

    tokenizer, base = load_base(config.base_model)
    patterns = config.targets or default_targets(base)
    names = target_names(base, patterns)
    fingerprint_value = base_fingerprint(base, names)
    lora = LoraXSConfig(config.rank, config.alpha, tuple(patterns), config.projection, config.seed)
    encoder = Encoder(tokenizer, config.max_length)
    moments, projection_data = _input_moments(base, names, train, encoder, config)
    report = inject_lora_xs(
        base, patterns, compute_projections(base, names, lora, moments), alpha=config.alpha, seed=config.seed
    )
    pooling = config.pooling or ("last" if base.config.is_decoder or "llama" in base.config.model_type else "mean")
    model = LoraXSClassifier(base, num_labels=len(task.labels), pooling=pooling).to(accelerator.device)
    say(f"LoRA-XS: {report}, rank {config.rank}, {len(names) * config.rank**2} core parameters")
    stage.done("setup")

    schedule = MapSchedule(
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        head_lr=config.head_lr,
        weight_decay=config.weight_decay,
        patience=config.patience,
        select_by=config.select_by,
        mixed_precision=config.mixed_precision,
        seed=config.seed,
    )
    map_result = train_map(model, train, validation, encoder, schedule, accelerator, progress=config.progress)
    stage.done("map_training")

    laplace_info: dict[str, Any] = {}
    if config.posterior == "map":
        posterior = MapPosterior({n: p.detach().clone() for n, p in model.posterior_parameters().items()})
    else:
        curvature_data = _limit(train, config.laplace_limit, config.seed)
        loader = make_loader(curvature_data, encoder, config.batch_size, shuffle=False)
        fit = fit_laplace(
            model,
            loader,
            STRUCTURES[config.posterior],
            include_head=config.posterior_head,
            n_data=len(train),
            prior_structure=config.prior_structure,
            progress=config.progress,
        )
        posterior, laplace_info = fit.posterior, fit.info
        say(f"posterior {config.posterior}: prior precision {laplace_info['prior_precision']}")
    stage.done("posterior")

    def sampled(examples: list[Example], what: str) -> Outputs:
        return predict(
            model,
            examples,
            encoder,
            posterior=posterior,
            num_samples=config.num_samples if config.posterior != "map" else 1,
            seed=config.seed,
            batch_size=config.batch_size,
            desc=f"{what} (posterior)",
            progress=config.progress,
        )

    def outputs(examples: list[Example], what: str) -> tuple[Outputs, Outputs]:
        """MAP and posterior outputs of a split."""
        map_out = predict(
            model, examples, encoder, batch_size=config.batch_size, desc=f"{what} (MAP)", progress=config.progress
        )
        return map_out, sampled(examples, what)

    val_post = sampled(validation, "validation")
    val_labels = labels_of(validation)
    temperature = fit_temperature(val_post.logits, val_labels) if config.temperature_scaling else 1.0
    val_pred = val_post.predictive(temperature)
    target_risk = config.target_risk
    if target_risk is None and config.target_coverage is None:
        target_risk = 0.05
    rules = []
    for kind in config.abstain_on:
        if kind == "mutual_information":  # an epistemic alarm: answer the usual in-distribution range
            rules.append(fit_abstention(val_pred, val_labels, kind, target_coverage=config.mi_coverage))
        else:
            rules.append(
                fit_abstention(
                    val_pred, val_labels, kind, target_risk=target_risk, target_coverage=config.target_coverage
                )
            )
    stage.done("calibration")

    evaluation, panels = _evaluate(outputs, test, shift, ood, temperature, config)
    stage.done("evaluation")

    manifest = BundleManifest(
        name=config.name or _bundle_name(out),
        version=config.version or datetime.now(UTC).strftime("%Y%m%d.%H%M%S"),
        task=TaskSpec(labels=task.labels, pooling=pooling, text_pair=task.text_pair, max_length=config.max_length),
        base_model=BaseModelSpec(
            name_or_path=config.base_model,
            fingerprint=fingerprint_value,
            dtype="float32",
            architecture=base.config.model_type,
            hidden_size=base.config.hidden_size,
        ),
        adapter=AdapterSpec(
            rank=config.rank,
            alpha=config.alpha,
            target_modules=list(patterns),
            modules=names,
            projection=ProjectionSpecRecord(spec=config.projection, seed=config.seed, data=projection_data),
        ),
        head=HeadSpec(in_features=base.config.hidden_size, num_labels=len(task.labels)),
        posterior=PosteriorSpec(
            family=posterior.family,
            prior_precision=laplace_info.get("prior_precision"),
            default_num_samples=config.num_samples if config.posterior != "map" else 1,
            covers_head=config.posterior_head and config.posterior != "map",
        ),
        calibration=CalibrationSpec(temperature=temperature, abstention=rules),
        eval=evaluation | {"data": _data_card(task, train, validation, test, shift, ood)},
    )
    training_record = {
        "config": asdict(config),
        "map": asdict(map_result),
        "laplace": laplace_info,
        "stage_seconds": stage.seconds,
        "summary": (
            f"{map_result.best_epoch} of {len(map_result.history)} epochs kept (validation {config.select_by}); "
            f"{sum(stage.seconds.values()):.0f} s in all ({_stage_list(stage.seconds)})."
        ),
    }
    manifest.eval["training"] = {k: v for k, v in training_record.items() if k != "config"}
    bundle = Bundle.from_classifier(model, posterior, manifest)
    if out.is_dir() and config.overwrite:
        shutil.rmtree(out)
    save_bundle(bundle, out)
    write_reliability_png(out / "reliability.png", panels)
    manifest_dict = json.loads((out / MANIFEST_FILE).read_text())
    (out / "report.md").write_text(render_report(manifest_dict, training_record))
    (out / "training.json").write_text(json.dumps(training_record, indent=2, default=str) + "\n")
    say(f"bundle written to {out} ({bundle_size_kb(out):.0f} kB without projections)")
    return out


def _evaluate(outputs, test, shift, ood, temperature: float, config: TrainConfig):
    evaluation: dict[str, Any] = {"num_samples": config.num_samples, "temperature": temperature}
    test_map, test_post = outputs(test, "test")
    test_labels = labels_of(test)
    test_preds = {"MAP": test_map.predictive(), "posterior": test_post.predictive(temperature)}
    evaluation["test"] = {
        "size": len(test),
        "map": split_metrics(test_preds["MAP"], test_labels),
        "posterior": split_metrics(test_preds["posterior"], test_labels),
    }
    panels = {"test": {m: (p.probs, test_labels) for m, p in test_preds.items()}}
    if shift is not None:
        name, examples = shift
        examples = _limit(examples, config.shift_limit, config.seed)
        shift_map, shift_post = outputs(examples, "shift")
        labels = labels_of(examples)
        preds = {"MAP": shift_map.predictive(), "posterior": shift_post.predictive(temperature)}
        evaluation["shift"] = {
            "dataset": name,
            "size": len(examples),
            "map": split_metrics(preds["MAP"], labels),
            "posterior": split_metrics(preds["posterior"], labels),
        }
        panels[f"shift: {name}"] = {m: (p.probs, labels) for m, p in preds.items()}
    if ood is not None:
        name, texts = ood
        texts = _limit(texts, config.ood_limit, config.seed)
        ood_map, ood_post = outputs(texts_as_examples(texts), "OOD")
        evaluation["ood"] = {
            "dataset": name,
            "size": len(texts),
            "map": ood_metrics(test_preds["MAP"], ood_map.predictive(), with_mi=False),
            "posterior": ood_metrics(
                test_preds["posterior"], ood_post.predictive(temperature), with_mi=config.posterior != "map"
            ),
        }
    return evaluation, panels


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


def _data_card(task: TaskData, train, validation, test, shift, ood) -> dict[str, Any]:
    card = {
        "task": task.name,
        "provenance": task.provenance,
        "sizes": {"train": len(train), "validation": len(validation), "test": len(test)},
        "sha256": {"train": fingerprint(train), "validation": fingerprint(validation), "test": fingerprint(test)},
    }
    if shift is not None:
        card["shift"] = {"dataset": shift[0], "sha256": fingerprint(shift[1])}
    if ood is not None:
        card["ood"] = {"dataset": ood[0], "sha256": fingerprint(ood[1])}
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
