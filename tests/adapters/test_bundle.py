"""Bundle round trip, and a typed error for every way a bundle can be damaged or mismatched."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters import (
    Bundle,
    ChecksumMismatchError,
    FingerprintMismatchError,
    KronFactors,
    KronPosterior,
    LoraXSClassifier,
    LoraXSConfig,
    ManifestError,
    MapPosterior,
    MissingFileError,
    NotSafetensorsError,
    RowBlock,
    SchemaVersionError,
    ShapeMismatchError,
    base_fingerprint,
    compute_projections,
    inject_lora_xs,
    load_bundle,
    lora_xs_layers,
    save_bundle,
    target_names,
)
from adapters.manifest import (
    ADAPTER_FILE,
    MANIFEST_FILE,
    POSTERIOR_FILE,
    AdapterSpec,
    BaseModelSpec,
    BundleManifest,
    HeadSpec,
    PosteriorSpec,
    TaskSpec,
)
from tests.conftest import random_batch, tiny_bert, tiny_llama

PATTERNS = ("query", "value")


def _trained_classifier(base: torch.nn.Module) -> tuple[LoraXSClassifier, list[str]]:
    config = LoraXSConfig(rank=4, alpha=8.0, target_modules=PATTERNS)
    names = target_names(base, PATTERNS)
    inject_lora_xs(base, PATTERNS, compute_projections(base, names, config), alpha=config.alpha)
    model = LoraXSClassifier(base, num_labels=3).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora_xs_layers(base).values():
            layer.core.weight.copy_(torch.randn(4, 4, generator=g))
    return model, names


def _kron_posterior(model: LoraXSClassifier) -> KronPosterior:
    mean = {n: p.detach().clone() for n, p in model.posterior_parameters().items()}
    factors = {n: KronFactors.from_matrices(torch.eye(4) * 2, torch.eye(4) * 3) for n in mean}
    return KronPosterior(mean, factors, scale=10.0, prior_precision=1.0)


def _manifest(base: torch.nn.Module, names: list[str]) -> BundleManifest:
    return BundleManifest(
        name="tiny",
        version="1",
        task=TaskSpec(labels=["a", "b", "c"]),
        base_model=BaseModelSpec(name_or_path="tiny-bert", fingerprint=base_fingerprint(base, names), hidden_size=32),
        adapter=AdapterSpec(rank=4, alpha=8.0, target_modules=list(PATTERNS), modules=names),
        head=HeadSpec(in_features=32, num_labels=3),
        posterior=PosteriorSpec(family="kron", default_num_samples=8),
    )


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Bundle, Path, LoraXSClassifier, list[str]]:
    model, names = _trained_classifier(tiny_bert())
    bundle = Bundle.from_classifier(model, _kron_posterior(model), _manifest(model.base, names))
    return bundle, save_bundle(bundle, tmp_path / "bundle"), model, names


def _layer_shapes(base: torch.nn.Module, names: list[str]) -> dict[str, tuple[int, int]]:
    modules = dict(base.named_modules())
    return {n: (modules[n].out_features, modules[n].in_features) for n in names}


def test_round_trip_reproduces_tensors_exactly(saved) -> None:
    bundle, path, model, names = saved
    loaded = load_bundle(
        path,
        base_fingerprint=base_fingerprint(model.base, names),
        layer_shapes=_layer_shapes(model.base, names),
        hidden_size=32,
    )
    assert loaded.manifest == bundle.manifest and loaded.sha256 == bundle.sha256 and len(loaded.sha256) == 64
    for name in names:
        assert torch.equal(loaded.projections[name].A, bundle.projections[name].A)
        assert torch.equal(loaded.projections[name].B, bundle.projections[name].B)
        assert torch.equal(loaded.cores[name], bundle.cores[name])
    assert torch.equal(loaded.head_weight, bundle.head_weight) and torch.equal(loaded.head_bias, bundle.head_bias)
    original, params = bundle.posterior.state()
    again, params_again = loaded.posterior.state()
    assert params == params_again and all(torch.equal(original[k], again[k]) for k in original)
    assert loaded.posterior.family == "kron" and loaded.manifest.posterior.params["scale"] == 10.0


def test_loaded_bundle_serves_like_the_trained_model(saved) -> None:
    """MAP through the batched-rows path of a host model equals the trained model's own forward."""
    _, path, model, _ = saved
    loaded = load_bundle(path).to("cpu")
    host_base = tiny_bert()
    inject_lora_xs(host_base, PATTERNS)
    host = LoraXSClassifier(host_base, num_labels=None).eval()
    batch = random_batch(4)
    means = {n: t.unsqueeze(0) for n, t in loaded.posterior.mean().items()}
    with torch.no_grad():
        (logits,) = host.forward_rows(batch, [RowBlock(loaded.adapter_weights(), means, torch.arange(4))])
        expected = model(**batch)
    torch.testing.assert_close(logits[0], expected, atol=1e-5, rtol=0)


def test_map_bundle_round_trip(tmp_path: Path) -> None:
    model, names = _trained_classifier(tiny_bert())
    manifest = _manifest(model.base, names)
    manifest.posterior = PosteriorSpec(family="map", default_num_samples=1)
    mean = {n: p.detach().clone() for n, p in model.posterior_parameters(include_head=True).items()}
    manifest.posterior.covers_head = True
    save_bundle(Bundle.from_classifier(model, MapPosterior(mean), manifest), tmp_path / "b")
    loaded = load_bundle(tmp_path / "b")
    assert isinstance(loaded.posterior, MapPosterior) and "head.weight" in loaded.posterior.names


# ----------------------------------------------------------------------------------------- corruption


def _rewrite_manifest(path: Path, **changes) -> None:
    data = json.loads((path / MANIFEST_FILE).read_text())
    data.update(changes)
    (path / MANIFEST_FILE).write_text(json.dumps(data))


def _replace_file(path: Path, name: str, data: bytes) -> None:
    """Replace a tensor file and record its new checksum, so only the content is wrong."""
    import hashlib

    (path / name).write_bytes(data)
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["files"][name] = hashlib.sha256(data).hexdigest()
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.mark.parametrize("missing", [MANIFEST_FILE, ADAPTER_FILE, POSTERIOR_FILE, "projections.safetensors"])
def test_missing_file(saved, missing) -> None:
    _, path, _, _ = saved
    (path / missing).unlink()
    with pytest.raises(MissingFileError, match=missing):
        load_bundle(path)


def test_checksum_mismatch(saved) -> None:
    _, path, _, _ = saved
    data = bytearray((path / POSTERIOR_FILE).read_bytes())
    data[-1] ^= 0xFF
    (path / POSTERIOR_FILE).write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match=POSTERIOR_FILE):
        load_bundle(path)


def test_unknown_schema_version(saved) -> None:
    _, path, _, _ = saved
    _rewrite_manifest(path, schema_version=99)
    with pytest.raises(SchemaVersionError, match="99"):
        load_bundle(path)


def test_manifest_not_json_or_not_schema(saved) -> None:
    _, path, _, _ = saved
    _rewrite_manifest(path, adapter={"rank": "eight"})
    with pytest.raises(ManifestError, match="adapter"):
        load_bundle(path)
    (path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_bundle(path)


def test_file_names_cannot_leave_the_bundle(saved) -> None:
    _, path, _, _ = saved
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["files"]["../outside.safetensors"] = "0" * 64
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="plain name"):
        load_bundle(path)


def test_tensor_shape_mismatch_inside_the_bundle(saved) -> None:
    _, path, _, names = saved
    tensors = load_file(path / ADAPTER_FILE)
    tensors[f"{names[0]}::core"] = torch.zeros(5, 5)
    save_file(tensors, path / "tmp.safetensors")
    _replace_file(path, ADAPTER_FILE, (path / "tmp.safetensors").read_bytes())
    with pytest.raises(ShapeMismatchError, match="rank 4"):
        load_bundle(path)


def test_posterior_tensor_missing_is_a_shape_error(saved) -> None:
    _, path, _, names = saved
    tensors = load_file(path / POSTERIOR_FILE)
    del tensors[f"{names[1]}::eigvecs_in"]
    save_file(tensors, path / "tmp.safetensors")
    _replace_file(path, POSTERIOR_FILE, (path / "tmp.safetensors").read_bytes())
    with pytest.raises(ShapeMismatchError, match="eigvecs_in"):
        load_bundle(path)


def test_shape_mismatch_against_the_running_base(saved) -> None:
    _, path, _, names = saved
    llama = tiny_llama()
    with pytest.raises(ShapeMismatchError, match="no adapted layer"):
        load_bundle(path, layer_shapes={"model.layers.0.self_attn.q_proj": (32, 32)})
    shapes = {n: (16, 32) for n in names}
    with pytest.raises(ShapeMismatchError, match="base layer"):
        load_bundle(path, layer_shapes=shapes)
    with pytest.raises(ShapeMismatchError, match="features"):
        load_bundle(path, hidden_size=llama.config.hidden_size * 2)


def test_base_fingerprint_mismatch(saved) -> None:
    _, path, _, names = saved
    other = tiny_bert(seed=1)
    inject_lora_xs(other, PATTERNS)
    with pytest.raises(FingerprintMismatchError, match="tiny-bert"):
        load_bundle(path, base_fingerprint=base_fingerprint(other, names))


class _Payload:
    """Unpickling this would create a file: proof that loading never unpickles."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_non_safetensors_payload_is_refused_without_unpickling(saved, tmp_path: Path) -> None:
    _, path, _, _ = saved
    payload = _Payload()
    payload.marker = tmp_path / "unpickled"
    _replace_file(path, ADAPTER_FILE, pickle.dumps(payload))
    with pytest.raises(NotSafetensorsError, match=ADAPTER_FILE):
        load_bundle(path)
    assert not payload.marker.exists()


def test_bundles_written_with_the_unused_revision_field_still_load(saved) -> None:
    """``base_model.revision`` was always null; new manifests leave it out, older ones keep loading."""
    _, path, _, _ = saved
    raw = json.loads((path / "bundle.json").read_text())
    assert "revision" not in raw["base_model"]
    raw["base_model"]["revision"] = None  # as every bundle written before carries it
    (path / "bundle.json").write_text(json.dumps(raw))
    assert load_bundle(path).manifest.base_model.revision is None
