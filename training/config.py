"""What ``caveat-train`` does: :class:`TrainConfig` (every CLI flag is one of its fields) and its limits."""

from __future__ import annotations

from dataclasses import dataclass, field

from adapters.errors import CaveatError
from training.data import MULTIPLE_CHOICE_SETS
from training.laplace_fit import STRUCTURES

SAMPLED_METHODS = ("swag", "vi", "ensemble", "mc-dropout")  # predictive by network samples only
POSTERIORS = ("map", *STRUCTURES, *SAMPLED_METHODS)
PRIORS = ("marglik", "grid")
PREDICTIVES = ("glm", "sample")
# Validation grid for δ, in decades above the marglik value (for a sampled predictive the marglik prior is too
# weak, never too strong); the best coarse point is then refined by half decades on each side.
GRID_DECADES = (-1.0, 0.0, 1.0, 2.0, 3.0)
GRID_VALIDATION, GRID_SAMPLES = 300, 8
WSVD_BATCHES = 32
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
