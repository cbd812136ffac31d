"""What ``caveat-train`` does: :class:`TrainConfig`, a tree of sections whose fields carry their own help.

Every leaf field is one command-line flag (:func:`flags` lists them; ``training.cli`` builds the parser from
it). A flag's name is the field's, with its section's ``flag_prefix`` (``posterior.swag.epochs`` →
``--swag-epochs``) unless the field names its own (``posterior.method`` → ``--posterior``). The same flat
names are the keys of a ``--config`` file and of the JSON records (:meth:`TrainConfig.flat`).

This module imports nothing from ``training``: the data and methods packages read it, not the reverse.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

from adapters.conformal import DEFAULT_ALPHA
from adapters.errors import CaveatError
from adapters.options import scalar_type
from adapters.tasks import ChoiceFormat
from adapters.vocab import (
    AbstentionKind,
    ChoiceScoring,
    ClozeNormalisation,
    ConformalScore,
    OodMethod,
    PredictiveMode,
)


class ConfigError(CaveatError, ValueError):
    """The training configuration is inconsistent or points at something unusable."""


class HeadCoverage(StrEnum):
    """Whether a posterior method can cover the classifier head as well as the cores (``--posterior-head``)."""

    OPTIONAL = "optional"  # --posterior-head decides
    ALWAYS = "always"  # whatever --posterior-head says: every ensemble member trains its own head
    NEVER = "never"  # cores only: --posterior-head is refused


class PosteriorMethod(StrEnum):
    """``--posterior``: how the posterior over the cores is obtained (one module each in ``training.methods``).

    Each member declares what the flags say about it: a description for the ``--posterior`` help (none where
    the name says it) and its :class:`HeadCoverage`, so a new method needs no edit of the help or the checks.
    """

    description: str
    head: HeadCoverage

    def __new__(cls, value: str, description: str = "", head: HeadCoverage = HeadCoverage.OPTIONAL) -> PosteriorMethod:
        member = str.__new__(cls, value)
        member._value_ = value
        member.description = description
        member.head = head
        return member

    MAP = "map"
    LAPLACE_DIAG = "laplace-diag"
    LAPLACE_KRON = "laplace-kron"
    LAPLACE_FULL = "laplace-full"
    SWAG = "swag"
    VI = "vi", "mean-field variational", HeadCoverage.NEVER
    ENSEMBLE = "ensemble", "", HeadCoverage.ALWAYS
    MC_DROPOUT = "mc-dropout", "dropout on the adapter input, also during MAP training", HeadCoverage.NEVER
    BAYESIAN_LORA = "bayesian-lora", "a matrix-normal variational posterior per core", HeadCoverage.NEVER


class Task(StrEnum):
    """``--task``: what the head predicts."""

    CLASSIFICATION = "classification"  # a pooled linear head over the labels
    MULTIPLE_CHOICE = "multiple-choice"  # a causal LM scores each item's choices (--mc-scoring)


class Prior(StrEnum):
    """``--prior``: how Laplace chooses the prior precision δ."""

    CHECKED = "marglik-checked"  # marglik, narrowed towards the MAP until validation NLL and ECE are no worse
    MARGLIK = "marglik"  # the Laplace marginal likelihood (the published setting)
    GRID = "grid"  # validation NLL of the predictive, around the marglik value


class PriorStructure(StrEnum):
    """``--prior-structure``: one δ, or one per layer (marglik only)."""

    SCALAR = "scalar"  # one δ for every core
    LAYERWISE = "layerwise"  # one δ per adapted layer


class SelectBy(StrEnum):
    """``--select-by``: the validation score that keeps the best epoch."""

    NLL = "nll"  # the lowest validation NLL (calibration-aware)
    ACCURACY = "accuracy"  # the highest validation accuracy
    LAST = "last"  # the last epoch, no early stopping (the published long-run protocol)


class CalibrationChoice(StrEnum):
    """``--calibration``: which predictive the bundle serves by default, and with which temperature."""

    AUTO = "auto"  # the validation rule: MAP, MAP + temperature, posterior or posterior + temperature
    POSTERIOR = "posterior"  # the posterior predictive as fitted (a temperature only with --temperature-scaling)


class MixedPrecision(StrEnum):
    """``--mixed-precision``: accelerate's autocast (GPU)."""

    NO = "no"
    FP16 = "fp16"
    BF16 = "bf16"


# ``--ood-method``: the feature-space OOD scores (``adapters.vocab.OodMethod``), or none
OodChoice = StrEnum("OodChoice", {**{m.name: m.value for m in OodMethod}, "NONE": "none"})
NO_OOD = OodChoice.NONE  # no OOD score, no ood rule
# ``--abstain-on``: the rules the trainer adds: those fitted on validation, and ``ambiguous`` (the conformal set's
# size; the OOD score's own rule comes with --ood-method)
AbstainOn = StrEnum("AbstainOn", {k.name: k.value for k in AbstentionKind if k != AbstentionKind.OOD})


MULTIPLE_CHOICE_SETS = (
    "arc-easy",
    "arc-challenge",
    "openbookqa",
)  # embedded sets that are multiple choice (training.data)
CLASSIFICATION_MAX_LENGTH, MC_MAX_LENGTH = 128, 256
ENSEMBLE_PROJECTIONS = (
    "--train-projections with an ensemble: a bundle holds one set of projections, and each member would train its own"
)
# The max_prob / entropy rules answer this fraction of validation inputs unless told otherwise: a coverage, not
# a risk, so the default bundle answers ordinary inputs (a 5% risk target left SST-2 answering 37%).
DEFAULT_TARGET_COVERAGE = 0.90
WSVD_BATCHES = 32  # batches of training inputs for the W-SVD input moments


def _one_of(names: list[str]) -> str:
    """``a, b or c``."""
    return f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else "".join(names)


def _posterior_help() -> str:
    """The ``--posterior`` help: every method, with its description where it has one."""
    return _one_of([f"{m} ({m.description})" if m.description else str(m) for m in PosteriorMethod])


def _posterior_head_help() -> str:
    """The ``--posterior-head`` help: which methods always cover the head and which never can."""
    always = [str(m) for m in PosteriorMethod if m.head == HeadCoverage.ALWAYS]
    never = [str(m) for m in PosteriorMethod if m.head == HeadCoverage.NEVER]
    return (
        "include the classifier head in the posterior (always for "
        f"{_one_of(always)}; not available for {_one_of(never)}: cores only)"
    )


def option(
    default: Any, help: str, *, flag: str | None = None, at_least: float | None = None, choices: tuple = ()
) -> Any:
    """A config field with its help; ``flag`` overrides the generated name, ``at_least`` bounds it below and
    ``choices`` narrows an enum's members."""
    metadata = {"help": help, "flag": flag, "at_least": at_least, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def section(cls: type) -> Any:
    return field(default_factory=cls)


@dataclass
class DataConfig:
    """Which data, how it is split and how long its inputs are."""

    dataset: str = option(
        "sst2",
        "embedded name (sst2; arc-easy, multiple choice), a local .csv/.tsv/.json/.jsonl/.parquet file, a "
        "directory written by save_to_disk, or a Hugging Face hub id (read by the datasets library)",
    )
    dataset_config: str | None = option(None, "the hub dataset's configuration (subset) name")
    train_split: str = option("train", "split of a saved or hub dataset to train on")
    validation_split: str | None = option(
        None, "split to validate on (default: 'validation' when the dataset has one, else carved from training)"
    )
    test_split: str | None = option(
        None, "split to test on (default: 'test' when the dataset has one, else carved from training)"
    )
    task: Task | None = option(
        None, "classification or multiple-choice (default: multiple-choice for arc-easy, else classification)"
    )
    mc_scoring: ChoiceScoring = option(
        ChoiceFormat().scoring,
        "multiple choice: cloze (each choice's text after the question, its length-normalised log-likelihood) or "
        "letter (the choices lettered in one prompt, the answer letters' next-token logits)",
    )
    cloze_normalisation: ClozeNormalisation = option(
        ChoiceFormat().normalisation,
        "cloze: divide a choice's log-likelihood by nothing (none: the summed log-likelihood), its tokens (tokens) "
        "or its characters (chars)",
    )
    prompt_template: str | None = option(
        None,
        "multiple choice: the prompt, with {question} and {choices} (rendered 'A. … B. …'; default: "
        "'Question: {question}\\nAnswer:' for cloze, a lettered prompt ending 'Answer:' for letter)",
    )
    text_column: str = option("text", "text column")
    text_pair_column: str | None = option(None, "second text column for sentence-pair tasks")
    label_column: str = option("label", "label column (a ClassLabel column's names become the labels)")
    validation_file: str | None = option(None, "separate validation file (default: carved from the training data)")
    test_file: str | None = option(None, "separate test file (default: carved from the training data)")
    validation_size: float = option(
        0.1,
        "examples carved for validation when there is no validation split or file: a count (≥ 1), or a fraction "
        "of the training data (< 1; at least 100, at most 1000)",
    )
    shift: str | None = option(
        None,
        "labelled set in the same label space, only for evaluation under shift (embedded: drugreviews; openbookqa "
        "or arc-challenge for multiple choice)",
    )
    ood: str | None = option(
        None, "texts only for out-of-distribution detection (embedded: bbcnews; openbookqa for multiple choice)"
    )
    shift_limit: int | None = option(500, "evaluate on at most this many shift examples (seeded subset)")
    ood_limit: int | None = option(500, "evaluate on at most this many OOD texts (seeded subset)")
    train_limit: int | None = option(None, "train on at most this many examples (seeded subset; for quick runs)")
    eval_limit: int | None = option(
        None, "validate and test on at most this many examples (seeded subset; for quick runs)"
    )
    max_length: int | None = option(
        None,
        "tokens per example (default 128; 256 for multiple choice, whose prompts lose their start)",
        at_least=1,
    )


DEFAULT_BASE_MODEL = "minilm"


@dataclass
class AdapterConfig:
    """The frozen base and the LoRA-XS adapter on it."""

    base_model: str | None = option(
        None,
        "Hugging Face id, local path, or an embedded name: 'minilm', 'smollm2' (a causal LM, for multiple choice) "
        f"(default: {DEFAULT_BASE_MODEL!r}; with --from-peft, the LoRA's own base_model_name_or_path when it is "
        "found here)",
    )
    projection: str = option("svd", "projection family: svd, wsvd, dct, random, or a hybrid such as dct-1/2_svd")
    rank: int = option(16, "LoRA-XS rank r (the core is r×r)", at_least=1)
    alpha: float = option(32.0, "scaling numerator (the update is scaled by alpha/rank)")
    targets: list[str] | None = option(
        None, "comma-separated module-name patterns (default per architecture; 're:<regex>' allowed)"
    )
    from_peft: str | None = option(
        None,
        "a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors, the head in modules_to_save) to "
        "import as the MAP, converted exactly: no MAP training; the posterior, OOD score, calibration and "
        "evaluation are fitted around it (rank, alpha, targets and pooling come from it)",
    )
    pooling: str | None = option(
        None,
        "mean, cls, last, or pooler (the first token through the base's own pooler and tanh, as BERT's "
        "sequence-classification head reads it; exports to PEFT) (default: mean for encoders, last for decoders)",
    )


@dataclass
class OptimisationConfig:
    """MAP training of the cores and the head."""

    epochs: int = option(3, "maximum MAP epochs", at_least=1)
    lr: float = option(5e-3, "learning rate of the cores")
    head_lr: float = option(5e-3, "learning rate of the classifier head")
    weight_decay: float = option(0.0, "AdamW weight decay")
    batch_size: int = option(32, "examples per batch", at_least=1)
    patience: int = option(2, "stop after this many epochs without validation improvement")
    select_by: SelectBy = option(
        SelectBy.NLL, "validation score that picks the checkpoint: nll, accuracy, or last (train every epoch)"
    )
    checkpoint_epochs: list[int] | None = option(
        None,
        "comma-separated epochs (e.g. 10,25): train to --epochs without early stopping and fit the posterior, "
        "calibration and evaluation at each of them, one bundle per epoch under --out (epoch-10, epoch-25)",
    )
    mixed_precision: MixedPrecision = option(MixedPrecision.NO, "autocast precision (GPU)")
    train_projections: bool = option(
        False,
        "L-LoRA-S: train every adapted layer's A and B with the cores in the MAP phase (initialised from "
        "--projection, frozen again afterwards; the posterior stays over the cores)",
    )
    projection_lr: float = option(
        1e-4, "L-LoRA-S: learning rate of A and B (small: they start at the base's own factors)", at_least=0
    )


@dataclass
class LaplaceConfig:
    """Laplace (``laplace-diag``, ``laplace-kron``, ``laplace-full``)."""

    prior: Prior = option(
        Prior.CHECKED,
        "prior precision: marglik-checked (the marginal likelihood's, raised towards the MAP until the "
        "predictive's validation NLL is no worse than the MAP's and its ECE no more than --prior-ece-slack above), "
        "marglik (the marginal likelihood's) or grid (validation NLL around it)",
    )
    ece_slack: float = option(
        0.005,
        "marglik-checked: the validation ECE the posterior may add to the MAP's (1: check the NLL only)",
        flag="prior-ece-slack",
        at_least=0.0,
    )
    prior_structure: PriorStructure = option(PriorStructure.SCALAR, "scalar or layerwise prior precision")
    limit: int | None = option(1500, "fit the curvature on at most this many training examples", flag="laplace-limit")


@dataclass
class SwagConfig:
    """SWAG: training continues from the MAP at a constant learning rate, collecting snapshots."""

    flag_prefix: ClassVar[str] = "swag-"
    epochs: int = option(
        1, "SWAG: epochs at a constant learning rate after the MAP (the MAP training is the burn-in)", at_least=1
    )
    lr: float = option(1e-3, "SWAG: the constant learning rate")
    snapshots: int = option(20, "SWAG: snapshots of the cores, spread evenly over the SWAG epochs", at_least=1)
    rank: int = option(10, "SWAG: K, the deviations kept for the low-rank part of the covariance")
    scale: float = option(0.5, "SWAG: λ, the covariance scale when sampling")


@dataclass
class ViConfig:
    """Variational inference: a Gaussian over the cores trained with the ELBO from the MAP."""

    flag_prefix: ClassVar[str] = "vi-"
    epochs: int = option(1, "VI: epochs of ELBO training after the MAP", at_least=1)
    lr: float = option(1e-3, "VI: learning rate of the variational means")
    std_lr: float = option(0.05, "VI: learning rate of log σ")
    init_std: float = option(0.01, "VI: initial σ of every core entry")
    rank: int = option(0, "VI: rank k of a low-rank part of the covariance shared by all cores (0: mean-field)")
    prior_precision: float | None = option(
        None, "VI: precision δ of the N(0, δ⁻¹ I) prior (default: learned, the ELBO's optimum)"
    )
    kl_weight: float = option(1.0, "VI: β, the KL weight per example is β/N (1: the ELBO)")


@dataclass
class BayesianLoraConfig:
    """Bayesian-LoRA: a matrix-normal variational posterior per core trained with the ELBO from the MAP."""

    flag_prefix: ClassVar[str] = "blora-"
    epochs: int = option(1, "bayesian-lora: epochs of ELBO training after the MAP", at_least=1)
    lr: float = option(1e-3, "bayesian-lora: learning rate of the means M (the cores)", at_least=0)
    factor_lr: float = option(
        # chosen on validation (docs/results.md, issue #14): at 0.01 the KL widens q until accuracy drops 9 points
        0.001,
        "bayesian-lora: learning rate of the row and column Cholesky factors and of λ",
        at_least=0,
    )
    kl_weight: float = option(1.0, "bayesian-lora: β, the KL weight per example is β/N (1: the ELBO)", at_least=0)
    prior_std: float = option(1.0, "bayesian-lora: σ_p of the zero-mean N(0, σ_p² I) prior on every core entry")
    init_std: float = option(
        0.01, "bayesian-lora: initial L_row = L_col = √s·I, so the Kronecker part's entry std starts at s"
    )
    noise_init: float = option(0.001, "bayesian-lora: initial λ, the isotropic noise scale")
    noise_cap: float = option(0.01, "bayesian-lora: λ stays below this cap (λ = cap · sigmoid(ρ))")
    samples: int = option(1, "bayesian-lora: posterior draws per training example and step", at_least=1)


@dataclass
class EnsembleConfig:
    """Deep ensembles: independently seeded MAPs."""

    members: int = option(5, "ensemble: number of members M (independently seeded MAPs)", at_least=1)
    member_bundles: list[str] | None = option(
        None, "ensemble: comma-separated bundles of already trained members (same data and base)"
    )


@dataclass
class DropoutConfig:
    """MC dropout on the adapter input (also during MAP training)."""

    rate: float = option(
        0.1,
        "mc-dropout: probability of dropping a rank direction of each layer's adapter input",
        flag="adapter-dropout",
    )


@dataclass
class PosteriorConfig:
    """Which posterior, how its predictive is computed, and one section per method."""

    method: PosteriorMethod = option(PosteriorMethod.LAPLACE_KRON, _posterior_help(), flag="posterior")
    predictive: PredictiveMode = option(
        PredictiveMode.GLM,
        "glm (linearised network: one forward and C backward passes per input; the published Laplace predictive, "
        "default) or sample (posterior samples through the network)",
        choices=(PredictiveMode.GLM, PredictiveMode.SAMPLE),
    )
    head: bool = option(False, _posterior_head_help(), flag="posterior-head")
    num_samples: int | None = option(
        None,
        "posterior draws for evaluation and the bundle's default (16 network samples; 256 GLM logit draws; an "
        "ensemble always uses each member once)",
        at_least=1,
    )
    laplace: LaplaceConfig = section(LaplaceConfig)
    swag: SwagConfig = section(SwagConfig)
    vi: ViConfig = section(ViConfig)
    bayesian_lora: BayesianLoraConfig = section(BayesianLoraConfig)
    ensemble: EnsembleConfig = section(EnsembleConfig)
    mc_dropout: DropoutConfig = section(DropoutConfig)


@dataclass
class CalibrationConfig:
    """Temperature and abstention thresholds, fitted on validation."""

    choice: CalibrationChoice = option(
        CalibrationChoice.AUTO,
        "auto: serve whichever of the MAP, the MAP with a temperature, the posterior and the posterior with a "
        "temperature is best on validation NLL by more than twice its standard error (simplest first); posterior: "
        "the posterior predictive as fitted",
        flag="calibration",
    )
    temperature_scaling: bool = option(
        False, "fit a temperature on the validation split to the posterior predictive (implies --calibration posterior)"
    )
    target_risk: float | None = option(
        None, "fit the max_prob and entropy thresholds for this selective risk on validation instead of a coverage"
    )
    target_coverage: float | None = option(
        None,
        f"fit the max_prob and entropy thresholds to answer this fraction of validation inputs (default "
        f"{DEFAULT_TARGET_COVERAGE})",
    )
    abstain_on: list[AbstainOn] = option(
        [AbstainOn.MAX_PROB],
        "comma-separated rules: max_prob, entropy, mutual_information (thresholds fitted on validation); ambiguous "
        "(abstain unless the conformal set at --conformal-alpha is one label)",
    )
    mi_coverage: float = option(0.95, "the mutual-information rule answers this fraction of validation inputs")


@dataclass
class ConformalConfig:
    """Split-conformal prediction sets over the served predictive, calibrated on validation."""

    flag_prefix: ClassVar[str] = "conformal-"
    alpha: float = option(
        DEFAULT_ALPHA,
        "the sets' miscoverage: they hold the true label with probability ≥ 1 − alpha (exchangeable "
        "inputs); requests may ask for another level",
    )
    score: ConformalScore = option(
        ConformalScore.LAC, "lac (1 − p_y: the smallest sets) or aps (the mass ranked at or above y: adaptive sets)"
    )
    class_conditional: bool = option(
        False, "one threshold per label, from that label's validation examples (coverage per label, larger sets)"
    )


@dataclass
class OodConfig:
    """The feature-space OOD score: fitted on the frozen base's features of a training subset, p-values and the
    ``ood`` rule on validation."""

    flag_prefix: ClassVar[str] = "ood-"
    method: OodChoice = option(
        OodChoice.MAHALANOBIS,
        "mahalanobis (class-conditional Gaussians, tied shrunk covariance; default), relative-mahalanobis, knn, "
        "or none (no OOD score, no ood rule)",
    )
    train_size: int = option(3000, "fit the OOD score on at most this many training inputs (seeded subset)", at_least=1)
    shrinkage: float | None = option(None, "covariance shrinkage in [0, 1] (default: the Ledoit–Wolf estimate)")
    rank: int | None = option(
        None, "covariance eigenpairs kept (default: dense if it fits --ood-budget, else the most that fit)", at_least=1
    )
    k: int = option(10, "knn: which neighbour's distance is the score", at_least=1)
    budget: int = option(
        2_000_000, "bytes the stored OOD score may take (its validation reference included)", at_least=1
    )
    fraction: float = option(0.01, "the ood rule abstains on this fraction of validation inputs")
    length_buckets: int = option(
        0,
        "length-aware p-values: also compare an input with the validation inputs of its own token-length bucket "
        "(this many, at validation quantiles) and read the smaller p-value; 0: against all validation inputs",
        at_least=0,
    )


@dataclass
class BundleConfig:
    """Where the bundle goes and what it is called."""

    out: str = option("", "directory for the bundle (new or empty; an existing bundle needs --overwrite)")
    name: str | None = option(None, "bundle name (default: the output directory's name)")
    version: str | None = option(None, "bundle version (default: a UTC timestamp)")
    overwrite: bool = option(False, "replace an existing bundle in --out")


@dataclass
class TrainConfig:
    """Everything ``caveat-train`` does."""

    data: DataConfig = section(DataConfig)
    adapter: AdapterConfig = section(AdapterConfig)
    optimisation: OptimisationConfig = section(OptimisationConfig)
    posterior: PosteriorConfig = section(PosteriorConfig)
    calibration: CalibrationConfig = section(CalibrationConfig)
    conformal: ConformalConfig = section(ConformalConfig)
    ood: OodConfig = section(OodConfig)
    bundle: BundleConfig = section(BundleConfig)
    seed: int = option(0, "seed of data splits, initialisation, shuffling and sampling")
    data_seed: int | None = option(
        None,
        "seed of the data splits and subsets only (default: --seed); fixing it while varying --seed changes only "
        "initialisation, shuffling and sampling",
    )
    progress: bool = option(True, "show progress bars")

    @classmethod
    def from_flat(cls, **values: Any) -> TrainConfig:
        """A config from flag-named values (``rank=4, swag_epochs=2``); the rest keep their defaults."""
        config = cls()
        leaves = {flag.key: flag for flag in flags()}
        unknown = sorted(set(values) - set(leaves))
        if unknown:
            raise ConfigError(f"unknown settings {unknown}")
        for key, value in values.items():
            leaves[key].set(config, value)
        return config

    def flat(self) -> dict[str, Any]:
        """Flag-named values (what ``--config`` files and JSON records hold)."""
        return {flag.key: flag.get(self) for flag in flags()}

    @property
    def multiple_choice(self) -> bool:
        task = self.data.task or (Task.MULTIPLE_CHOICE if self.data.dataset in MULTIPLE_CHOICE_SETS else None)
        return task == Task.MULTIPLE_CHOICE

    def _check_checkpoint_epochs(self) -> None:
        optimisation = self.optimisation
        epochs = optimisation.checkpoint_epochs
        if epochs is None:
            return
        if not epochs or len(set(epochs)) != len(epochs) or min(epochs) < 1:
            raise ConfigError(f"--checkpoint-epochs must name distinct epochs from 1 on, got {epochs}")
        if max(epochs) > optimisation.epochs:
            raise ConfigError(f"--checkpoint-epochs {max(epochs)} is beyond --epochs {optimisation.epochs}")
        if self.posterior.method == PosteriorMethod.ENSEMBLE:
            raise ConfigError("--checkpoint-epochs: an ensemble trains its members to their own selected epochs")

    def _check_import(self) -> None:
        """What an imported LoRA (``--from-peft``, no MAP training) cannot be combined with."""
        if self.adapter.from_peft is None:
            return
        refused = {
            "--posterior ensemble (an ensemble trains its members; an import is one model)": (
                self.posterior.method == PosteriorMethod.ENSEMBLE
            ),
            "--posterior mc-dropout (it trains the MAP with adapter dropout)": (
                self.posterior.method == PosteriorMethod.MC_DROPOUT
            ),
            "--checkpoint-epochs (nothing is trained)": self.optimisation.checkpoint_epochs is not None,
            "--train-projections (the LoRA's subspace is the projection)": self.optimisation.train_projections,
            "--pooling (the architecture's own head decides)": self.adapter.pooling is not None,
        }
        for option, applies in refused.items():
            if applies:
                raise ConfigError(f"--from-peft cannot be combined with {option}")

    @property
    def choice_format(self) -> ChoiceFormat:
        """How multiple-choice items are put to the LM (``--mc-scoring``, ``--prompt-template``, normalisation)."""
        data = self.data
        return ChoiceFormat(data.mc_scoring, data.prompt_template, data.cloze_normalisation)

    @property
    def max_tokens(self) -> int:
        """The maximum input length in effect (``--max-length`` or the task's default)."""
        return self.data.max_length or (MC_MAX_LENGTH if self.multiple_choice else CLASSIFICATION_MAX_LENGTH)

    @property
    def split_seed(self) -> int:
        """The seed of the data splits and subsets."""
        return self.seed if self.data_seed is None else self.data_seed

    def validate(self, needs_out: bool = True) -> None:
        """Coerce option names to their enums and check what one field cannot check alone."""
        for flag in flags():
            flag.check(flag.get(self))
            flag.set(self, flag.coerce(flag.get(self)))
        posterior, calibration = self.posterior, self.calibration
        if needs_out and not self.bundle.out:
            raise ConfigError("--out is required: the directory the bundle is written to")
        if calibration.target_risk is not None and calibration.target_coverage is not None:
            raise ConfigError("give --target-risk or --target-coverage, not both")
        laplace = posterior.laplace
        self._check_checkpoint_epochs()
        self._check_import()
        if laplace.prior_structure == PriorStructure.LAYERWISE and laplace.prior != Prior.MARGLIK:
            raise ConfigError("--prior-structure layerwise needs --prior marglik (the checks scale a scalar δ)")
        if self.multiple_choice and posterior.head:
            raise ConfigError("--posterior-head: a multiple-choice head is the frozen LM head (answer letters)")
        if posterior.method.head == HeadCoverage.NEVER and posterior.head:
            raise ConfigError(f"--posterior-head is not available for --posterior {posterior.method} (cores only)")
        if not 0 < posterior.mc_dropout.rate < 1:
            raise ConfigError("--adapter-dropout must be in (0, 1)")
        if posterior.vi.rank == 1 or posterior.vi.rank < 0:
            raise ConfigError("--vi-rank must be 0 (mean-field) or at least 2")
        if posterior.swag.rank < 2 or posterior.swag.snapshots < posterior.swag.rank:
            raise ConfigError("--swag-rank must be at least 2 and at most --swag-snapshots")
        blora = posterior.bayesian_lora
        if not (blora.prior_std > 0 and blora.init_std > 0 and 0 < blora.noise_init < blora.noise_cap):
            raise ConfigError(
                "--blora-prior-std and --blora-init-std must be positive and 0 < --blora-noise-init < --blora-noise-cap"
            )
        if self.optimisation.train_projections and posterior.method == PosteriorMethod.ENSEMBLE:
            raise ConfigError(ENSEMBLE_PROJECTIONS)
        if not 0 < self.ood.fraction < 1:
            raise ConfigError("--ood-fraction must be in (0, 1)")
        if self.ood.length_buckets == 1:
            raise ConfigError("--ood-length-buckets must be 0 (pooled p-values) or at least 2")
        if not 0 < self.conformal.alpha < 1:
            raise ConfigError("--conformal-alpha must be in (0, 1)")
        if self.ood.shrinkage is not None and not 0 <= self.ood.shrinkage <= 1:
            raise ConfigError("--ood-shrinkage must be in [0, 1]")
        fractions = {
            "target-risk": calibration.target_risk,
            "target-coverage": calibration.target_coverage,
            "mi-coverage": calibration.mi_coverage,
        }
        for name, value in fractions.items():
            if value is not None and not 0 < value <= 1:
                raise ConfigError(f"--{name} must be in (0, 1]")


# ------------------------------------------------------------------------------------------ the flags


@dataclass(frozen=True)
class Flag:
    """One leaf of the tree: its flag name, path of attributes, type and help."""

    name: str  # without the dashes: "swag-epochs"
    path: tuple[str, ...]  # ("posterior", "swag", "epochs")
    kind: type  # the scalar type (a list's item type)
    is_list: bool
    optional: bool
    help: str
    at_least: float | None
    default: Any
    narrowed: tuple = ()  # the enum members allowed, when not all are

    @property
    def key(self) -> str:
        """The flat key: the flag name with underscores (``swag_epochs``)."""
        return self.name.replace("-", "_")

    @property
    def choices(self) -> list[str] | None:
        if not (isinstance(self.kind, type) and issubclass(self.kind, StrEnum)):
            return None
        return [c.value for c in (self.narrowed or self.kind)]

    def get(self, config: TrainConfig) -> Any:
        value: Any = config
        for name in self.path:
            value = getattr(value, name)
        return value

    def set(self, config: TrainConfig, value: Any) -> None:
        owner: Any = config
        for name in self.path[:-1]:
            owner = getattr(owner, name)
        setattr(owner, self.path[-1], value)

    def check(self, value: Any) -> None:
        """A clear error for a value outside the choices or below the bound."""
        values = value if self.is_list and value is not None else [value]
        if self.is_list and self.kind in (int, float):  # a comma-separated list arrives as strings
            for v in (v for v in values if v is not None):
                try:
                    self.kind(v)
                except (TypeError, ValueError):
                    raise ConfigError(f"--{self.name} takes {self.kind.__name__}s, got {v!r}") from None
        if self.choices is not None:
            bad = [v for v in values if v is not None and v not in self.choices]
            if bad:
                raise ConfigError(f"unknown --{self.name} {bad[0]!r}; choose one of {self.choices}")
        if self.at_least is not None and value is not None and value < self.at_least:
            raise ConfigError(f"--{self.name} must be at least {self.at_least:g}")

    def coerce(self, value: Any) -> Any:
        if value is None or (self.choices is None and not (self.is_list and self.kind in (int, float))):
            return value
        return [self.kind(v) for v in value] if self.is_list else self.kind(value)


def flags(cls: type = TrainConfig, path: tuple[str, ...] = (), prefix: str = "") -> Iterator[Flag]:
    """Every leaf field of the tree under ``cls``, in declaration order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from flags(hint, (*path, f.name), getattr(hint, "flag_prefix", ""))
            continue
        kind, is_list, optional = scalar_type(hint)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        name = f.metadata["flag"] or prefix + f.name.replace("_", "-")
        meta = f.metadata
        yield Flag(
            name, (*path, f.name), kind, is_list, optional, meta["help"], meta["at_least"], default, meta["choices"]
        )
