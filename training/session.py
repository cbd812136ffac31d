"""The shared state of a training run (:class:`Session`): data, the base model with LoRA-XS, the MAP, and
cached MAP outputs and linearisations. Posterior methods (``training.methods``) start from it."""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from accelerate import Accelerator
from torch import Tensor

from adapters import (
    InputMoments,
    LoraXSClassifier,
    LoraXSConfig,
    base_fingerprint,
    cloze,
    compute_projections,
    inject_lora_xs,
    linear_suffixes,
    load_bundle,
    target_names,
)
from adapters.architectures import default_pooling, default_targets
from adapters.base_model import BaseModelError, LoadedBase, load_base
from adapters.cloze import ClozeReadout
from adapters.defaults import CORE_INIT_STD
from adapters.errors import CaveatError
from adapters.eval_card import DataCard
from adapters.heads import HEAD_BIAS, HEAD_WEIGHT
from adapters.manifest import ImportSpec, fingerprinted_modules
from adapters.peft_lora import PeftLora, read_peft_lora
from adapters.pooling import BASE_POOLER, DenseTanhPooler
from adapters.projections import Projection, spec_needs_data
from adapters.vocab import Pooling
from training import hub, peft_import
from training.config import DEFAULT_BASE_MODEL, WSVD_BATCHES, ConfigError, TrainConfig
from training.data import (
    Columns,
    Example,
    SplitNames,
    TaskData,
    fingerprint,
    load_ood,
    load_shift,
    load_task,
    subset,
)
from training.encoding import Encoder, make_loader, model_inputs
from training.inference import Linearisation, Outputs, linearise, predict
from training.map_training import MapResult, train_map
from training.objectives import Objective


@dataclass
class Stage:
    """Wall time of each pipeline stage (recorded in the bundle)."""

    seconds: dict[str, float] = field(default_factory=dict)
    _start: float = field(default_factory=time.perf_counter)

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._start, 1)
        self._start = now


def load_training_base(name_or_path: str, multiple_choice: bool = False) -> LoadedBase:
    """The base model as :func:`adapters.base_model.load_base` loads it for the server too; a hub id is looked
    up only when the hub answers (else at once from the cache), and a problem names ``--base-model``."""
    try:
        return load_base(name_or_path, multiple_choice=multiple_choice, hub_offline=_hub_offline_reason)
    except BaseModelError as exc:
        raise ConfigError(f"--base-model {exc}") from exc


def _hub_offline_reason() -> str:
    """Why the hub is not used (``""`` when it is); the libraries are switched offline when it is not."""
    return hub.offline_reason() if hub.offline() else ""


def quiet_libraries() -> None:
    """``--no-progress``: no bars from ``datasets`` (file reading) or ``transformers`` (weight loading), and
    not laplace-torch's reminder about ``link_approx`` (the bundle's predictive does not use laplace-torch's)."""
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="By default `link_approx`", category=UserWarning)


def targets_or_defaults(base, targets: list[str] | None) -> list[str]:
    """``--targets`` if given, else the architecture's defaults; refused when it has none."""
    patterns = targets or default_targets(base.config)
    if not patterns:
        raise ConfigError(
            f"no default --targets for a {base.config.model_type!r} model; name the linear layers to adapt with "
            f"--targets. Linear module names end in: {linear_suffixes(base)}"
        )
    return list(patterns)


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
    initial_projections: dict[str, Projection] = field(default_factory=dict)  # before L-LoRA-S training
    imported: ImportSpec | None = None  # --from-peft: where the MAP came from, and how exactly it converts
    pooler_module: str | None = None  # the base's pooler layer a 'pooler' head reads through (fingerprinted)

    def log(self, message: str) -> None:
        """Print once (on the main process under ``accelerate launch``)."""
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
                batch_size=self.config.optimisation.batch_size,
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
                self.model, examples, self.encoder, include_head=self.config.posterior.head,
                batch_size=self.config.optimisation.batch_size, desc=f"{split} (Jacobians)",
                progress=self.config.progress,
            )  # fmt: skip
        return self._linearisations[split]


Splits = tuple[TaskData, list[Example], list[Example], list[Example], tuple | None, tuple | None]


def load_splits(config: TrainConfig) -> Splits:
    """The task and the run's splits, limits applied: ``(task, train, validation, test, shift, ood)`` (shift and
    ood as ``(name, examples)`` or ``None``)."""
    data, seed = config.data, config.split_seed
    columns = Columns(data.text_column, data.label_column, data.text_pair_column)
    task = load_task(
        data.dataset,
        columns=columns,
        validation_file=data.validation_file,
        test_file=data.test_file,
        validation_size=data.validation_size,
        seed=seed,
        choice_format=config.choice_format,
        dataset_config=data.dataset_config,
        splits=SplitNames(data.train_split, data.validation_split, data.test_split),
    )
    shift = load_shift(data.shift, task.labels, columns, config.choice_format) if data.shift else None
    ood = load_ood(data.ood, data.text_column, config.choice_format) if data.ood else None
    if config.multiple_choice != all(e.num_choices is not None for e in task.train):
        kind = "multiple-choice" if config.multiple_choice else "classification"
        raise ConfigError(f"--dataset {data.dataset} is not a {kind} task (--task)")
    train = subset(task.train, data.train_limit, seed)
    validation = subset(task.validation, data.eval_limit, seed)
    test = subset(task.test, data.eval_limit, seed)
    shift = (shift[0], subset(shift[1], data.shift_limit, seed)) if shift else None
    ood = (ood[0], subset(ood[1], data.ood_limit, seed)) if ood else None
    return task, train, validation, test, shift, ood


def prepare(config: TrainConfig) -> Session:
    """Load data and base model, inject LoRA-XS (projections fitted on the pretrained weights)."""
    config.validate(needs_out=False)
    if not config.progress:
        quiet_libraries()
    torch.manual_seed(config.seed)  # the head's initialisation draws from the global generator
    stage = Stage()
    accelerator = Accelerator(mixed_precision=config.optimisation.mixed_precision)
    task, train, validation, test, shift, ood = load_splits(config)
    accelerator.print(
        f"data: {task.name} train {len(train)}, validation {len(validation)}, test {len(test)}, labels {task.labels}"
    )
    carved = task.provenance.get("carved")
    if carved:
        accelerator.print(
            "carved from the training data: "
            + ", ".join(f"{split} {size}" for split, size in carved.items())
            + f" (--validation-size {config.data.validation_size:g}; --validation-file/--test-file to give your own)"
        )
    stage.done("data")

    adapter = config.adapter
    lora = read_peft_lora(adapter.from_peft) if adapter.from_peft else None
    adapter.base_model = adapter.base_model or _imported_base(lora) or DEFAULT_BASE_MODEL
    loaded = load_training_base(adapter.base_model, config.multiple_choice)
    tokenizer, base = loaded.tokenizer, loaded.model
    if config.multiple_choice and not config.choice_format.cloze:
        tokenizer.truncation_side = "left"  # a long lettered prompt keeps the "Answer:" its letters follow
    encoder = Encoder(tokenizer, config.max_tokens, config.choice_format.normalisation, len(task.labels))
    if lora is not None:
        splits = (task, train, validation, test, shift, ood)
        return _imported_session(config, loaded, lora, encoder, splits, accelerator, stage)
    patterns = targets_or_defaults(base, adapter.targets)
    names = target_names(base, patterns)
    pooling = adapter.pooling or default_pooling(base.config)
    pooler_module = BASE_POOLER if pooling == Pooling.POOLER and not config.multiple_choice else None
    fingerprint_value = base_fingerprint(base, fingerprinted_modules(names, pooler_module))
    lora_xs = LoraXSConfig(adapter.rank, adapter.alpha, tuple(patterns), adapter.projection, config.seed)
    moments, projection_data = _input_moments(base, names, train, encoder, config)
    projections = compute_projections(base, names, lora_xs, moments)
    report = inject_lora_xs(base, patterns, projections, alpha=adapter.alpha, init_std=CORE_INIT_STD, seed=config.seed)
    model = _classifier(loaded, config, len(task.labels), pooling)
    model = model.to(accelerator.device)
    accelerator.print(f"LoRA-XS: {report}, rank {adapter.rank}, {len(names) * adapter.rank**2} core parameters")
    stage.done("setup")
    session = Session(
        config, task, train, validation, test, shift, ood, model, encoder, list(patterns), names,
        fingerprint_value, projection_data, accelerator, stage,
    )  # fmt: skip
    session.initial_projections = projections
    session.pooler_module = pooler_module
    return session


def _imported_base(lora: PeftLora | None) -> str | None:
    """The LoRA's own base, when it names one that is a folder here (a hub id must be given with --base-model:
    it may name a hub model the cache holds another revision of)."""
    name = lora.base_model if lora is not None else None
    return name if name and Path(name).expanduser().is_dir() else None


def _imported_session(
    config: TrainConfig,
    loaded: LoadedBase,
    lora: PeftLora,
    encoder: Encoder,
    splits: Splits,
    accelerator: Accelerator,
    stage: Stage,
) -> Session:
    """The session around an imported PEFT LoRA (``--from-peft``): converted exactly, checked against PEFT's own
    logits on validation inputs, and kept as the MAP (nothing is trained)."""
    task, train, validation, test, shift, ood = splits
    directory = Path(config.adapter.from_peft)
    imported = peft_import.convert(lora, directory, loaded, len(task.labels), causal_lm=config.multiple_choice)
    if imported.causal_lm:  # multiple choice: the LM's own scores of the choices or letters, around the LoRA
        peft_import.inject(loaded, imported)
        model = _classifier(loaded, config, len(task.labels), Pooling.LAST)
        model.freeze_base()
    else:
        model = peft_import.build_model(loaded, imported, len(task.labels))
    model = model.to(accelerator.device)
    record = peft_import.check_against_peft(model, loaded, imported, directory, validation, encoder)
    adapter = config.adapter
    adapter.rank, adapter.alpha = imported.rank, float(imported.rank)  # LoRA-XS scaling 1: the cores hold the rest
    adapter.projection = peft_import.PROJECTION_SPEC
    names = imported.names
    accelerator.print(
        f"imported {directory}: {len(names)} LoRA modules converted exactly (rank {imported.rank}), logits within "
        f"{record.max_abs_logit_diff:.1e} of PEFT's own on {record.checked_inputs} validation inputs"
    )
    stage.done("import")
    session = Session(
        config, task, train, validation, test, shift, ood, model, encoder, list(names), names,
        base_fingerprint(loaded.model, fingerprinted_modules(names, imported.pooler_module)), None, accelerator, stage,
    )  # fmt: skip
    session.imported, session.pooler_module = record, imported.pooler_module
    return session


def _classifier(loaded: LoadedBase, config: TrainConfig, num_labels: int, pooling: str) -> LoraXSClassifier:
    """The training model: a pooled head for classification; for multiple choice, the LM's own scores of the
    choices (cloze) or of the answer letters (a fixed head of the LM's letter rows), no dropout in front."""
    if not config.multiple_choice:
        if pooling != Pooling.POOLER:
            return LoraXSClassifier(loaded.model, num_labels=num_labels, pooling=pooling)
        pooler = DenseTanhPooler.of_base(loaded.model)
        if pooler is None:
            raise ConfigError(f"--pooling pooler: a {loaded.model.config.model_type!r} base has no {BASE_POOLER} layer")
        return LoraXSClassifier(loaded.model, num_labels, pooling=default_pooling(loaded.model.config), readout=pooler)
    if config.choice_format.cloze:
        readout = ClozeReadout(loaded.output_embeddings, num_labels)
        return LoraXSClassifier(loaded.model, num_labels, pooling="last", dropout=0.0, readout=readout)
    try:
        letter_head = loaded.letter_head()
    except BaseModelError as exc:
        raise ConfigError(f"--mc-scoring letter: {exc}") from exc
    model = LoraXSClassifier(loaded.model, num_labels, pooling="last", dropout=0.0, train_head=False)
    with torch.no_grad():
        model.head.weight.copy_(letter_head)
        model.head.bias.zero_()
    return model


def fit_map(
    session: Session, *, objective: Objective | None = None, seed: int | None = None, record: bool = True
) -> MapResult:
    """MAP training of the session's model (from its current cores, with ``seed`` or ``--seed``); ``record``
    keeps the result as the session's MAP and closes the ``map_training`` stage."""
    config = session.config
    result = train_map(
        session.model, session.train, session.validation, session.encoder, config.optimisation,
        seed=config.seed if seed is None else seed, accelerator=session.accelerator, progress=config.progress,
        objective=objective,
    )  # fmt: skip
    if record:
        session.map_result = result
        session.stage.done("map_training")
    return result


def reinitialise(model: LoraXSClassifier, seed: int, projections: Mapping[str, Projection] | None = None) -> None:
    """Fresh cores (``N(0, CORE_INIT_STD²)``, as at injection) and a fresh trainable head, from ``seed``; the
    given ``projections`` put back into the layers (undoing L-LoRA-S training)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, projection in (projections or {}).items():
            layer = model.lora_layers[name]
            layer.lora_A.copy_(projection.A)
            layer.lora_B.copy_(projection.B)
        for layer in model.lora_layers.values():
            weight = layer.core.weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * CORE_INIT_STD)
        if model.train_head:  # a multiple-choice head is the LM's, shared by every member
            torch.manual_seed(seed)
            model.head.reset_parameters()


def _input_moments(base, names, train: list[Example], encoder: Encoder, config: TrainConfig):
    """W-SVD needs each layer's input second moment under the pretrained model (padding excluded)."""
    if not spec_needs_data(config.adapter.projection):
        return None, None
    batch_size = config.optimisation.batch_size
    examples = subset(train, WSVD_BATCHES * batch_size, config.seed)
    with InputMoments(base, names) as moments, torch.no_grad():
        for batch in make_loader(examples, encoder, batch_size, shuffle=False):
            moments.set_mask(batch["attention_mask"])
            base(**cloze.decoder_inputs(model_inputs(batch), base.dtype))
        result = moments.moments()
        tokens = max(moments.num_tokens.values())
    return result, {"dataset": config.data.dataset, "examples": len(examples), "tokens": tokens}


def data_card(session: Session) -> DataCard:
    """Sizes and fingerprints of the session's splits, and where they came from."""
    task = session.task
    card = DataCard(
        task=task.name,
        provenance=task.provenance,
        sizes={"train": len(session.train), "validation": len(session.validation), "test": len(session.test)},
        sha256={
            "train": fingerprint(session.train),
            "validation": fingerprint(session.validation),
            "test": fingerprint(session.test),
        },
    )
    if session.shift is not None:
        card.shift = {
            "dataset": session.shift[0],
            "size": len(session.shift[1]),
            "sha256": fingerprint(session.shift[1]),
        }
    if session.ood is not None:
        texts = [e.text for e in session.ood[1]]
        card.ood = {"dataset": session.ood[0], "size": len(texts), "sha256": fingerprint(texts)}
    return card


def bundle_parameters(session: Session, path: Path, flag: str) -> tuple[dict[str, Tensor], float]:
    """The cores and head of a bundle trained with the session's base, modules, data split and rank (checked;
    ``flag`` names the option in errors), and its MAP training seconds."""
    try:
        bundle = load_bundle(path)
    except (CaveatError, OSError) as exc:
        raise ConfigError(f"{flag} {path}: {exc}") from exc
    manifest, rank = bundle.manifest, session.config.adapter.rank
    if manifest.base_model.fingerprint != session.fingerprint or manifest.adapter.modules != session.names:
        raise ConfigError(f"{flag} {path}: adapts another base model or other modules")
    if manifest.eval.data is None or manifest.eval.data.sha256 != data_card(session).sha256:
        raise ConfigError(f"{flag} {path}: trained on other data splits (give it the same --data-seed)")
    if manifest.adapter.rank != rank:
        raise ConfigError(f"{flag} {path}: rank {manifest.adapter.rank}, not {rank}")
    device = next(session.model.parameters()).device
    member = {name: core.to(device) for name, core in bundle.cores.items()}
    member[HEAD_WEIGHT], member[HEAD_BIAS] = bundle.head_weight.to(device), bundle.head_bias.to(device)
    training = manifest.eval.training
    seconds = training.stage_seconds.get("map_training", 0.0) if training else 0.0
    return member, float(seconds)
