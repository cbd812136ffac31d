"""The model-side library shared by training and serving: LoRA-XS layers, projections, posteriors,
predictive maths and the bundle format. It imports neither ``training`` nor ``service``.

Typical use::

    from adapters import LoraXSConfig, LoraXSClassifier, compute_projections, find_targets, inject_lora_xs

    base = AutoModel.from_pretrained(path)
    config = LoraXSConfig(rank=8, alpha=16, target_modules=("query", "value"))
    names = [n for group in find_targets(base, config.target_modules).values() for n in group]
    report = inject_lora_xs(base, config.target_modules, compute_projections(base, names, config),
                            alpha=config.alpha, seed=config.seed)
    model = LoraXSClassifier(base, num_labels=2)
"""

from adapters.batching import AdapterWeights, RowBlock, RowPlan, apply_row_plan
from adapters.bundle import Bundle, load_bundle, save_bundle
from adapters.config import LoraXSConfig
from adapters.errors import (
    BundleError,
    CaveatError,
    ChecksumMismatchError,
    FingerprintMismatchError,
    InvalidValueError,
    ManifestError,
    MissingFileError,
    NotSafetensorsError,
    PosteriorValueError,
    ProjectionSpecError,
    SchemaVersionError,
    ShapeMismatchError,
    TargetNotFoundError,
    UnsafePathError,
)
from adapters.fingerprint import base_fingerprint
from adapters.injection import (
    InjectionReport,
    compute_projections,
    find_targets,
    inject_lora_xs,
    linear_suffixes,
    lora_xs_layers,
    target_names,
)
from adapters.layer import LoraXSLinear, RowGroup
from adapters.manifest import CAVEAT_VERSION
from adapters.model import LoraXSClassifier
from adapters.pooling import pool
from adapters.posteriors import (
    DiagPosterior,
    DropoutPosterior,
    EnsemblePosterior,
    FullPosterior,
    KronFactors,
    KronPosterior,
    LowRankDiagPosterior,
    MapPosterior,
    MatrixNormalPosterior,
    Posterior,
    make_generator,
)
from adapters.predictive import AbstentionRule, Predictive, abstain, entropy, predictive
from adapters.projections import InputMoments, Projection, build_projection

__version__ = CAVEAT_VERSION

__all__ = [
    "AbstentionRule",
    "AdapterWeights",
    "Bundle",
    "BundleError",
    "CaveatError",
    "ChecksumMismatchError",
    "DiagPosterior",
    "DropoutPosterior",
    "EnsemblePosterior",
    "FingerprintMismatchError",
    "FullPosterior",
    "InjectionReport",
    "InputMoments",
    "InvalidValueError",
    "KronFactors",
    "KronPosterior",
    "LoraXSClassifier",
    "LoraXSConfig",
    "LoraXSLinear",
    "LowRankDiagPosterior",
    "ManifestError",
    "MapPosterior",
    "MatrixNormalPosterior",
    "MissingFileError",
    "NotSafetensorsError",
    "Posterior",
    "PosteriorValueError",
    "Predictive",
    "Projection",
    "ProjectionSpecError",
    "RowBlock",
    "RowGroup",
    "RowPlan",
    "SchemaVersionError",
    "ShapeMismatchError",
    "TargetNotFoundError",
    "UnsafePathError",
    "abstain",
    "apply_row_plan",
    "base_fingerprint",
    "build_projection",
    "compute_projections",
    "entropy",
    "find_targets",
    "inject_lora_xs",
    "linear_suffixes",
    "load_bundle",
    "lora_xs_layers",
    "make_generator",
    "pool",
    "predictive",
    "save_bundle",
    "target_names",
]
