"""Bundles: save and load a self-contained, versioned adapter directory.

Layout (docs/design.md §2)::

    bundle.json               manifest (adapters.manifest.BundleManifest), with the sha256 of each tensor file
    projections.safetensors   "<module>::A" (r×d_in), "<module>::B" (d_out×r)
    adapter.safetensors       "<module>::core" (r×r) MAP cores, "head.weight" (C×H), "head.bias" (C); schema 4,
                              with task.pooling "pooler": "pooler.weight" (H×H), "pooler.bias" (H)
    posterior.safetensors     the posterior family's tensors ("<block>::<field>", see adapters.posteriors)
    ood.safetensors           schema 2, optional: the OOD score's tensors (adapters.ood; its parameters in
                              bundle.json "ood")
    conformal.safetensors     schema 3, optional: "scores" (n,), "labels" (n,) of the conformal calibration
                              examples (adapters.conformal; its record in bundle.json "conformal"), and with
                              conformal.far "far_scores" (m,), "far_labels" (m,): those of far-out inputs
    report.md, reliability.png    optional, written by the trainer

Projections have a file of their own so that bundles sharing them (same base, rank and spec) are
recognised by checksum and stored once. Loading validates everything before returning; any problem is a
typed :class:`~adapters.errors.BundleError` and nothing is half-loaded. Tensor files are only ever parsed
as safetensors: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from adapters.batching import AdapterWeights, Readout
from adapters.conformal import ConformalCalibration
from adapters.errors import (
    ChecksumMismatchError,
    FingerprintMismatchError,
    InvalidValueError,
    ManifestError,
    MissingFileError,
    NotSafetensorsError,
    OodFileError,
    OodStateError,
    PosteriorValueError,
    SchemaVersionError,
    ShapeMismatchError,
    UnsafePathError,
)
from adapters.files import atomic_write
from adapters.finite import first_non_finite
from adapters.heads import HEAD_BIAS, HEAD_WEIGHT
from adapters.manifest import (
    ADAPTER_FILE,
    CONFORMAL_FILE,
    MANIFEST_FILE,
    OOD_FILE,
    POSTERIOR_FILE,
    PROJECTIONS_FILE,
    SCHEMA_VERSIONS,
    TENSOR_FILES,
    BundleManifest,
    ConformalSpec,
    FarConformalSpec,
)
from adapters.model import LoraXSClassifier
from adapters.ood import OodScore
from adapters.pooling import POOLER_BIAS, POOLER_WEIGHT, DenseTanhPooler
from adapters.posteriors import Posterior
from adapters.posteriors.base import KEY_SEP
from adapters.projections import Projection
from adapters.vocab import Pooling


@dataclass
class Bundle:
    """A loaded (or about to be saved) bundle; tensors on CPU until moved.

    Attributes:
        manifest: the parsed bundle.json.
        projections: module name → :class:`Projection`.
        cores: module name → MAP core ``(r, r)``.
        head_weight: ``(C, H)``; head_bias: ``(C,)``.
        posterior: the posterior over the cores (and the head when ``manifest.posterior.covers_head``).
        path: where it was loaded from (``None`` before saving).
        sha256: sha256 of bundle.json's bytes, which include every tensor file's checksum: the identity of
            this exact bundle.
        ood: the feature-space OOD score (on the CPU; ``manifest.ood`` says which features), or ``None``.
        conformal: the conformal calibration of the served predictive (on the CPU), or ``None``.
        far_conformal: the calibration of inputs far out by the OOD score (``conformal.far``), or ``None``.
        pooler: the frozen dense layer the head reads the first token through (``task.pooling`` ``pooler``), or
            ``None``.
    """

    manifest: BundleManifest
    projections: dict[str, Projection]
    cores: dict[str, Tensor]
    head_weight: Tensor
    head_bias: Tensor
    posterior: Posterior
    path: Path | None = None
    sha256: str = field(default="")
    ood: OodScore | None = None
    conformal: ConformalCalibration | None = None
    pooler: DenseTanhPooler | None = None
    far_conformal: ConformalCalibration | None = None

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @classmethod
    def from_classifier(cls, model: LoraXSClassifier, posterior: Posterior, manifest: BundleManifest) -> Bundle:
        """Collect a trained classifier's projections, MAP cores and head (copied to CPU), and its pooler unless the
        manifest names the base's own (``head.pooler_module``)."""
        own = model.own_adapter()
        own_pooler = isinstance(model.readout, DenseTanhPooler) and not manifest.head.pooler_module
        return cls(
            manifest=manifest,
            projections={name: p.to("cpu") for name, p in own.projections.items()},
            cores={n: layer.core.weight.detach().cpu().clone() for n, layer in model.lora_layers.items()},
            head_weight=own.head_weight.cpu().clone(),
            head_bias=own.head_bias.cpu().clone(),
            posterior=posterior.to("cpu"),
            pooler=model.readout.to("cpu") if own_pooler else None,
        )

    def adapter_weights(self, readout: Readout | None = None) -> AdapterWeights:
        """The fixed tensors a batched-rows forward needs (on the bundle's current device); ``readout``: how its
        rows' hidden states are read (``None``: pooled, or through the bundle's own pooler)."""
        scaling = self.manifest.adapter.scaling
        readout = self.pooler if readout is None else readout
        return AdapterWeights(self.projections, scaling, self.head_weight, self.head_bias, readout)

    def to(self, device: torch.device | str, projections: Mapping[str, Projection] | None = None) -> Bundle:
        """A copy with every tensor on ``device``; ``projections``, when given, are its projections already
        there (the server shares one device copy between bundles). The OOD score stays on the CPU: it is
        scored in float64 from features copied there."""
        if projections is None:
            projections = {n: p.to(device) for n, p in self.projections.items()}
        return Bundle(
            manifest=self.manifest,
            projections=dict(projections),
            cores={n: c.to(device) for n, c in self.cores.items()},
            head_weight=self.head_weight.to(device),
            head_bias=self.head_bias.to(device),
            posterior=self.posterior.to(device),
            path=self.path,
            sha256=self.sha256,
            ood=self.ood,
            conformal=self.conformal,
            pooler=None if self.pooler is None else self.pooler.to(device),
            far_conformal=self.far_conformal,
        )

    def tensor_bytes(self) -> int:
        """Bytes of all tensors (what the bundle costs in device memory)."""
        posterior_tensors, _ = self.posterior.state()
        tensors = [*self.cores.values(), self.head_weight, self.head_bias, *posterior_tensors.values()]
        tensors += [t for p in self.projections.values() for t in (p.A, p.B)]
        tensors += [] if self.pooler is None else list(self.pooler.state().values())
        return sum(t.numel() * t.element_size() for t in tensors)


FAR_PREFIX = "far_"  # conformal.safetensors: the far-out inputs' calibration examples

# ------------------------------------------------------------------------------------------------- save


def save_bundle(bundle: Bundle, directory: str | os.PathLike[str]) -> Path:
    """Write ``bundle`` into ``directory`` (created if needed); bundle.json is written last, atomically.

    Fills ``manifest.files``, ``manifest.posterior`` family/params, and returns the directory. The bundle's
    ``sha256`` and ``path`` are updated.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    posterior_tensors, posterior_params = bundle.posterior.state()
    payloads = {
        PROJECTIONS_FILE: {
            f"{name}{KEY_SEP}{key}": t for name, p in bundle.projections.items() for key, t in (("A", p.A), ("B", p.B))
        },
        ADAPTER_FILE: {
            **{f"{name}{KEY_SEP}core": t for name, t in bundle.cores.items()},
            HEAD_WEIGHT: bundle.head_weight,
            HEAD_BIAS: bundle.head_bias,
            **({} if bundle.pooler is None else bundle.pooler.state()),
        },
        POSTERIOR_FILE: posterior_tensors,
    }
    manifest = bundle.manifest
    if (bundle.pooler is not None) != (manifest.task.pooling == Pooling.POOLER and not manifest.head.pooler_module):
        raise ValueError("a bundle carries a pooler exactly when task.pooling is 'pooler' and not the base's own")
    if bundle.ood is not None:
        if manifest.ood is None:
            raise ValueError("a bundle with an OOD score needs its manifest's ood record (which features)")
        payloads[OOD_FILE], manifest.ood.params = bundle.ood.state()
    if bundle.conformal is not None:
        if manifest.conformal is None:
            raise ValueError("a bundle with conformal calibration needs its manifest's conformal record")
        payloads[CONFORMAL_FILE] = bundle.conformal.state()
        if (bundle.far_conformal is not None) != (manifest.conformal.far is not None):
            raise ValueError("a bundle carries a far-out conformal calibration exactly when conformal.far records it")
        if bundle.far_conformal is not None:
            payloads[CONFORMAL_FILE] |= {f"{FAR_PREFIX}{k}": v for k, v in bundle.far_conformal.state().items()}
    files = {}
    for file_name, tensors in payloads.items():
        data = save_safetensors({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
        (directory / file_name).write_bytes(data)
        files[file_name] = hashlib.sha256(data).hexdigest()
    manifest.files = files
    manifest.posterior.family = posterior_params.pop("family")
    manifest.posterior.params = posterior_params  # includes "names": the block order of θ
    text = manifest.model_dump_json(indent=2).encode()
    atomic_write(directory / MANIFEST_FILE, text)
    bundle.path, bundle.sha256 = directory, hashlib.sha256(text).hexdigest()
    return directory


# ------------------------------------------------------------------------------------------------- load


def load_bundle(
    directory: str | os.PathLike[str],
    *,
    base_fingerprint: str | None = None,
    layer_shapes: Mapping[str, tuple[int, int]] | None = None,
    hidden_size: int | None = None,
    root: Path | None = None,
) -> Bundle:
    """Load and validate a bundle (tensors on CPU): shapes, checksums, and that every number is possible.

    Args:
        directory: the bundle directory.
        base_fingerprint: when given, the running base model's fingerprint (``adapters.fingerprint.base_fingerprint``
            over the bundle's modules); a different one raises :class:`FingerprintMismatchError`.
        layer_shapes: when given, module name → ``(d_out, d_in)`` of the running base's linear layers.
        hidden_size: when given, the running base's feature size (the head's input).
        root: when given, a directory every file read must resolve inside (a link out of it is refused).

    Raises:
        MissingFileError, ManifestError, SchemaVersionError, ChecksumMismatchError, NotSafetensorsError,
        ShapeMismatchError, FingerprintMismatchError, InvalidValueError, UnsafePathError: each names the
        problem and the bundle.
    """
    directory = Path(directory)
    manifest_bytes = _read(directory, MANIFEST_FILE, root)
    manifest = parse_manifest(manifest_bytes, directory)
    if base_fingerprint is not None and manifest.base_model.fingerprint != base_fingerprint:
        raise FingerprintMismatchError(
            directory,
            f"bundle {manifest.name!r} was trained on base {manifest.base_model.name_or_path!r} "
            f"(fingerprint {manifest.base_model.fingerprint[:12]}…), not on the running base "
            f"(fingerprint {base_fingerprint[:12]}…)",
        )
    names = [*TENSOR_FILES, *((OOD_FILE,) if manifest.ood is not None else ())]
    names += [CONFORMAL_FILE] if manifest.conformal is not None else []
    tensors = {name: _read_tensor_file(directory, name, manifest.files, root) for name in names}
    bundle = _assemble(manifest, tensors, directory)
    bundle.path, bundle.sha256 = directory, hashlib.sha256(manifest_bytes).hexdigest()
    _check_against_base(bundle, layer_shapes, hidden_size)
    return bundle


def parse_manifest(data: bytes, directory: Path) -> BundleManifest:
    """Parse bundle.json bytes: unknown schema versions and invalid fields raise typed errors."""
    try:
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(directory, f"{MANIFEST_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ManifestError(directory, f"{MANIFEST_FILE} must hold a JSON object")
    version = raw.get("schema_version")
    if version not in SCHEMA_VERSIONS:
        raise SchemaVersionError(
            directory, f"unknown bundle schema version {version!r}; this Caveat reads versions {list(SCHEMA_VERSIONS)}"
        )
    try:
        return BundleManifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        raise ManifestError(directory, f"{MANIFEST_FILE} does not match the schema: {problems}") from exc


def _read(directory: Path, name: str, root: Path | None = None) -> bytes:
    path = directory / name
    if not path.is_file():
        raise MissingFileError(directory, f"missing file {name}")
    if root is not None and not path.resolve().is_relative_to(root.resolve()):
        raise UnsafePathError(directory, f"{name} links outside the directory bundles are loaded from")
    return path.read_bytes()


def _read_tensor_file(directory: Path, name: str, checksums: Mapping[str, str], root: Path | None) -> dict[str, Tensor]:
    if name not in checksums:
        raise ManifestError(directory, f"{MANIFEST_FILE} records no checksum for {name}")
    data = _read(directory, name, root)
    digest = hashlib.sha256(data).hexdigest()
    if digest != checksums[name]:
        raise ChecksumMismatchError(
            directory, f"{name} has sha256 {digest[:12]}…, bundle.json records {checksums[name][:12]}…"
        )
    try:
        return load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise NotSafetensorsError(directory, f"{name} is not a safetensors file ({exc}); refusing to load it") from exc


def _assemble(manifest: BundleManifest, tensors: Mapping[str, dict[str, Tensor]], directory: Path) -> Bundle:
    """Check shapes within the bundle and build it."""
    rank, modules = manifest.adapter.rank, manifest.adapter.modules
    projections, adapter = tensors[PROJECTIONS_FILE], tensors[ADAPTER_FILE]

    def get(file: Mapping[str, Tensor], key: str, file_name: str) -> Tensor:
        if key not in file:
            raise ShapeMismatchError(directory, f"{file_name} has no tensor {key!r}")
        return file[key]

    built: dict[str, Projection] = {}
    cores: dict[str, Tensor] = {}
    for module in modules:
        A = get(projections, f"{module}{KEY_SEP}A", PROJECTIONS_FILE)
        B = get(projections, f"{module}{KEY_SEP}B", PROJECTIONS_FILE)
        core = get(adapter, f"{module}{KEY_SEP}core", ADAPTER_FILE)
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != rank or B.shape[1] != rank or core.shape != (rank, rank):
            raise ShapeMismatchError(
                directory,
                f"{module}: A {tuple(A.shape)}, B {tuple(B.shape)}, core {tuple(core.shape)} do not fit rank {rank}",
            )
        built[module], cores[module] = Projection(A, B), core
    head_weight, head_bias = get(adapter, HEAD_WEIGHT, ADAPTER_FILE), get(adapter, HEAD_BIAS, ADAPTER_FILE)
    head = manifest.head
    expected_head = (head.num_labels, head.in_features)
    if tuple(head_weight.shape) != expected_head or tuple(head_bias.shape) != (head.num_labels,):
        raise ShapeMismatchError(
            directory, f"head {tuple(head_weight.shape)}/{tuple(head_bias.shape)} but the manifest says {expected_head}"
        )
    if head.num_labels != len(manifest.task.labels):
        raise ShapeMismatchError(
            directory, f"head has {head.num_labels} outputs for {len(manifest.task.labels)} labels"
        )
    posterior = _load_posterior(manifest, tensors[POSTERIOR_FILE], directory)
    values = {**cores, HEAD_WEIGHT: head_weight, HEAD_BIAS: head_bias}
    for block, shape in posterior.shapes.items():
        if block not in values or values[block].shape != shape:
            raise ShapeMismatchError(directory, f"posterior block {block!r} {tuple(shape)} matches no adapter tensor")
    _check_values(built, values, posterior, directory)
    ood = _load_ood(manifest, tensors.get(OOD_FILE), directory)
    conformal, far_conformal = _load_conformal(manifest, tensors.get(CONFORMAL_FILE), directory)
    pooler = _load_pooler(manifest, adapter, directory)
    return Bundle(
        manifest, built, cores, head_weight, head_bias, posterior, ood=ood, conformal=conformal, pooler=pooler,
        far_conformal=far_conformal,
    )  # fmt: skip


def _load_pooler(manifest: BundleManifest, adapter: Mapping[str, Tensor], directory: Path) -> DenseTanhPooler | None:
    """The head's pooler when the task pools by one of its own (shapes and values checked), else ``None`` (no
    pooler, or the base's)."""
    if manifest.task.pooling != Pooling.POOLER or manifest.head.pooler_module:
        return None
    size = manifest.head.in_features
    weight, bias = adapter.get(POOLER_WEIGHT), adapter.get(POOLER_BIAS)
    if weight is None or bias is None or tuple(weight.shape) != (size, size) or tuple(bias.shape) != (size,):
        raise ShapeMismatchError(
            directory, f"task.pooling 'pooler' needs {ADAPTER_FILE} tensors {POOLER_WEIGHT} ({size}×{size}) and "
            f"{POOLER_BIAS} ({size})",
        )  # fmt: skip
    bad = first_non_finite({POOLER_WEIGHT: weight, POOLER_BIAS: bias})
    if bad is not None:
        raise InvalidValueError(directory, f"{ADAPTER_FILE} {bad} holds NaN or infinite values")
    return DenseTanhPooler(weight, bias)


def conformal_spec(calibration: ConformalCalibration, alpha: float) -> ConformalSpec:
    """The manifest's record of a conformal calibration at the bundle's level ``alpha``."""
    thresholds = [None if math.isinf(t) else t for t in calibration.thresholds(alpha).tolist()]
    return ConformalSpec(
        score=calibration.score, alpha=alpha, class_conditional=calibration.class_conditional,
        size=calibration.scores.numel(), thresholds=thresholds,
    )  # fmt: skip


def far_conformal_spec(calibration: ConformalCalibration, alpha: float) -> FarConformalSpec:
    """The manifest's record of the far-out inputs' conformal calibration (``conformal.far``) at ``alpha``."""
    spec = conformal_spec(calibration, alpha)
    return FarConformalSpec(size=spec.size, thresholds=spec.thresholds)


def _load_conformal(
    manifest: BundleManifest, tensors: dict[str, Tensor] | None, directory: Path
) -> tuple[ConformalCalibration | None, ConformalCalibration | None]:
    """The conformal calibration and the far-out inputs' one (``conformal.far``, else ``None``), each checked
    against its record (the thresholds it gives must be the recorded ones)."""
    spec = manifest.conformal
    if spec is None or tensors is None:
        return None, None
    calibration = _conformal_examples(manifest, tensors, "", spec.size, spec.thresholds, directory)
    far = spec.far
    if far is None:
        return calibration, None
    return calibration, _conformal_examples(manifest, tensors, FAR_PREFIX, far.size, far.thresholds, directory)


def _conformal_examples(
    manifest: BundleManifest,
    tensors: dict[str, Tensor],
    prefix: str,
    size: int,
    thresholds: list[float | None],
    directory: Path,
) -> ConformalCalibration:
    """One calibration of conformal.safetensors: tensors ``{prefix}scores`` and ``{prefix}labels``."""
    spec = manifest.conformal
    scores, labels = tensors.get(f"{prefix}scores"), tensors.get(f"{prefix}labels")
    if scores is None or labels is None or scores.shape != (size,) or labels.shape != (size,):
        raise ShapeMismatchError(directory, f"{CONFORMAL_FILE} must hold {prefix}scores and {prefix}labels of "
                                            f"{size} examples")  # fmt: skip
    if not scores.is_floating_point() or not torch.isfinite(scores).all() or labels.is_floating_point():
        raise InvalidValueError(directory, f"{CONFORMAL_FILE}: {prefix}scores must be finite numbers and "
                                           f"{prefix}labels integers")  # fmt: skip
    if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < len(manifest.task.labels):
        raise InvalidValueError(directory, f"{CONFORMAL_FILE}: a label index is outside the bundle's labels")
    calibration = ConformalCalibration(
        spec.score, scores.double(), labels.long(), len(manifest.task.labels), spec.class_conditional
    )
    if conformal_spec(calibration, spec.alpha).thresholds != thresholds:
        raise InvalidValueError(directory, f"{CONFORMAL_FILE} gives other {prefix}thresholds than bundle.json records")
    return calibration


def _load_ood(manifest: BundleManifest, tensors: dict[str, Tensor] | None, directory: Path) -> OodScore | None:
    """The OOD score, checked against its record: ``OodFileError`` naming the file when anything is off."""
    spec = manifest.ood
    if spec is None or tensors is None:
        return None
    try:
        score = OodScore.from_state(tensors, spec.params)
    except OodStateError as exc:
        raise OodFileError(directory, f"{OOD_FILE} is damaged: {exc}") from exc
    if str(score.method) != spec.method:
        raise OodFileError(directory, f"{OOD_FILE} holds a {score.method} score, bundle.json says {spec.method}")
    if score.reference is None:
        raise OodFileError(directory, f"{OOD_FILE} has no validation reference for p-values")
    width = len(spec.layers) * manifest.base_model.hidden_size
    if score.dim != width:
        raise OodFileError(
            directory, f"{OOD_FILE} scores {score.dim} features; {len(spec.layers)} layers of the base give {width}"
        )
    return score


def _check_values(
    projections: Mapping[str, Projection], values: Mapping[str, Tensor], posterior: Posterior, directory: Path
) -> None:
    """Every tensor finite, the posterior's values in range, and its mean equal to the MAP where it is one."""
    named = {**values, **{f"{m}{KEY_SEP}{k}": t for m, p in projections.items() for k, t in (("A", p.A), ("B", p.B))}}
    for key, tensor in named.items():
        if not tensor.is_floating_point():
            raise InvalidValueError(directory, f"{key} has dtype {tensor.dtype}, not a floating-point type")
    if (key := first_non_finite(named)) is not None:
        raise InvalidValueError(directory, f"{key} holds NaN or infinite values")
    try:
        posterior.validate()
    except PosteriorValueError as exc:
        raise InvalidValueError(directory, str(exc)) from exc
    if posterior.mean_is_map:
        differ = [b for b, mean in posterior.mean().items() if not torch.equal(mean.to(values[b].dtype), values[b])]
        if differ:
            raise InvalidValueError(
                directory, f"the {posterior.family} posterior's mean must equal the MAP tensors; {differ[:3]} differ"
            )


def _load_posterior(manifest: BundleManifest, tensors: dict[str, Tensor], directory: Path) -> Posterior:
    spec = manifest.posterior
    expected = [*manifest.adapter.modules, *((HEAD_WEIGHT, HEAD_BIAS) if spec.covers_head else ())]
    names = spec.params.get("names", expected)
    if not isinstance(names, list) or sorted(map(str, names)) != sorted(expected):
        raise ShapeMismatchError(directory, f"posterior blocks {names} are not the adapter's blocks {expected}")
    params = {**spec.params, "family": spec.family, "names": names}
    try:
        return Posterior.from_state(tensors, params)
    except PosteriorValueError as exc:
        raise InvalidValueError(directory, str(exc)) from exc
    except KeyError as exc:
        raise ShapeMismatchError(directory, f"{POSTERIOR_FILE} lacks tensor or parameter {exc}") from exc
    except (ValueError, TypeError, RuntimeError) as exc:  # e.g. a parameter of the wrong JSON type
        raise ShapeMismatchError(directory, f"{POSTERIOR_FILE} is inconsistent: {exc}") from exc


def _check_against_base(
    bundle: Bundle, layer_shapes: Mapping[str, tuple[int, int]] | None, hidden_size: int | None
) -> None:
    where = bundle.path
    if layer_shapes is not None:
        for module, projection in bundle.projections.items():
            if module not in layer_shapes:
                raise ShapeMismatchError(where, f"the running base model has no adapted layer {module!r}")
            expected = tuple(layer_shapes[module])
            got = (projection.B.shape[0], projection.A.shape[1])
            if got != expected:
                raise ShapeMismatchError(
                    where, f"{module}: bundle projects {got[1]}→{got[0]}, base layer is {expected[1]}→{expected[0]}"
                )
    choice_format = bundle.manifest.task.choice_format
    reads_scores = choice_format is not None and choice_format.cloze  # its head reads the choices' scores
    if hidden_size is not None and not reads_scores and bundle.head_weight.shape[1] != hidden_size:
        raise ShapeMismatchError(
            where, f"head expects {bundle.head_weight.shape[1]} features, base gives {hidden_size}"
        )
