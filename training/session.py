"""The shared state of a training run (:class:`Session`): data, base model with LoRA-XS, the MAP; and the
posterior a method produced (:class:`Fitted`)."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from adapters import (
    InputMoments,
    LoraXSClassifier,
    LoraXSConfig,
    Posterior,
    base_fingerprint,
    compute_projections,
    inject_lora_xs,
    target_names,
)
from adapters.config import DEFAULT_TARGETS
from adapters.defaults import CORE_INIT_STD, prepare_tokenizer
from adapters.embedded import resolve_model
from adapters.model import default_pooling
from adapters.projections import spec_needs_data
from adapters.tasks import letter_token_ids
from training.config import WSVD_BATCHES, ConfigError, TrainConfig
from training.data import (
    Columns,
    Example,
    TaskData,
    fingerprint,
    load_ood,
    load_shift,
    load_task,
)
from training.encoding import Encoder, make_loader, model_inputs
from training.evaluate import Linearisation, Outputs, linearise, predict
from training.map_training import MapResult, MapSchedule, train_map
from training.objectives import AdapterDropout


@dataclass
class Stage:
    """Wall time of each pipeline stage (recorded in the bundle)."""

    seconds: dict[str, float] = field(default_factory=dict)
    _start: float = field(default_factory=time.perf_counter)

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._start, 1)
        self._start = now


def subset(examples: list, limit: int | None, seed: int) -> list:
    if limit is None or len(examples) <= limit:
        return examples
    chosen = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in chosen]


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
    prepare_tokenizer(tokenizer)
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
        if fitted.predictive == "map":  # the model's own parameters: the cached MAP logits
            return self.map_outputs(split, examples)
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
    train = subset(task.train, config.train_limit, config.split_seed)
    validation = subset(task.validation, config.eval_limit, config.split_seed)
    test = subset(task.test, config.eval_limit, config.split_seed)
    shift = (shift[0], subset(shift[1], config.shift_limit, config.split_seed)) if shift else None
    ood = (ood[0], subset(ood[1], config.ood_limit, config.split_seed)) if ood else None
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


def _input_moments(base, names, train: list[Example], encoder: Encoder, config: TrainConfig):
    """W-SVD needs each layer's input second moment under the pretrained model (padding excluded)."""
    if not spec_needs_data(config.projection):
        return None, None
    examples = subset(train, WSVD_BATCHES * config.batch_size, config.seed)
    with InputMoments(base, names) as moments, torch.no_grad():
        for batch in make_loader(examples, encoder, config.batch_size, shuffle=False):
            moments.set_mask(batch["attention_mask"])
            base(**model_inputs(batch))
        result = moments.moments()
        tokens = max(moments.num_tokens.values())
    return result, {"dataset": config.dataset, "examples": len(examples), "tokens": tokens}


def data_card(session: Session) -> dict[str, Any]:
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
