"""Fault injection: damaged bundles offered to a running server (in process) while a client loop predicts on a
good adapter. Each is refused with its typed error (the library's class named in the 422), and the loop
sees no failure. Tensor damage keeps the checksums valid (recomputed), so only value validation can catch it."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters import errors
from adapters.bundle import load_bundle
from adapters.manifest import ADAPTER_FILE, MANIFEST_FILE, OOD_FILE, POSTERIOR_FILE, PROJECTIONS_FILE
from tests.service.bundles import make_bundle, running_app


def _tensors(name: str, change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    """Change tensors of one file, then record the new checksum (a consistent but impossible bundle)."""

    def damage(bundle: Path) -> None:
        tensors = load_file(bundle / name)
        change(tensors)
        save_file(tensors, bundle / name)
        _manifest(lambda m: m["files"].__setitem__(name, hashlib.sha256((bundle / name).read_bytes()).hexdigest()))(
            bundle
        )

    return damage


def _manifest(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(bundle: Path) -> None:
        manifest = json.loads((bundle / MANIFEST_FILE).read_text())
        change(manifest)
        (bundle / MANIFEST_FILE).write_text(json.dumps(manifest))  # json writes NaN as Python reads it

    return damage


def _set(key_part: str, value: float, where: Callable[[torch.Tensor], torch.Tensor] = lambda t: t):
    def change(tensors: dict[str, torch.Tensor]) -> None:
        key = next(k for k in tensors if key_part in k)
        where(tensors[key]).fill_(value)

    return change


def _first(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1)[:1]


def _flip_byte(bundle: Path) -> None:
    data = bytearray((bundle / ADAPTER_FILE).read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle / ADAPTER_FILE).write_bytes(bytes(data))


def _flip_ood_byte(bundle: Path) -> None:
    data = bytearray((bundle / OOD_FILE).read_bytes())
    data[-1] ^= 0x01
    (bundle / OOD_FILE).write_bytes(bytes(data))


def _truncate(bundle: Path) -> None:
    data = (bundle / POSTERIOR_FILE).read_bytes()
    (bundle / POSTERIOR_FILE).write_bytes(data[: len(data) // 2])


def _pickle(bundle: Path) -> None:
    torch.save({"x": torch.zeros(2)}, bundle / ADAPTER_FILE)  # a pickle, with its checksum recorded
    _manifest(
        lambda m: m["files"].__setitem__(ADAPTER_FILE, hashlib.sha256((bundle / ADAPTER_FILE).read_bytes()).hexdigest())
    )(bundle)


def _wrong_shape(tensors: dict[str, torch.Tensor]) -> None:
    key = next(k for k in tensors if k.endswith("::core"))
    tensors[key] = torch.zeros(3, 3)


def _wrong_ood_shape(tensors: dict[str, torch.Tensor]) -> None:
    key = next(k for k in tensors if k.endswith("eigenvectors"))
    tensors[key] = tensors[key][:-1]  # one feature short


def _link_file_out(bundle: Path) -> None:
    outside = bundle.parent.parent / "outside-file"
    shutil.copy(bundle / PROJECTIONS_FILE, outside)
    (bundle / PROJECTIONS_FILE).unlink()
    (bundle / PROJECTIONS_FILE).symlink_to(outside)


DAMAGES: dict[str, tuple[Callable[[Path], None], type[errors.BundleError], str]] = {
    # family "diag" unless noted; (damage, typed error, family of the bundle)
    "nan head bias": (_tensors(ADAPTER_FILE, _set("head.bias", math.nan)), errors.InvalidValueError, "diag"),
    "nan core": (_tensors(ADAPTER_FILE, _set("::core", math.nan, _first)), errors.InvalidValueError, "diag"),
    "inf projection": (_tensors(PROJECTIONS_FILE, _set("::A", math.inf, _first)), errors.InvalidValueError, "diag"),
    "nan variance": (_tensors(POSTERIOR_FILE, _set("variance", math.nan, _first)), errors.InvalidValueError, "diag"),
    "negative variance": (_tensors(POSTERIOR_FILE, _set("variance", -1.0, _first)), errors.InvalidValueError, "diag"),
    "nan prior_precision": (
        _manifest(lambda m: m["posterior"].__setitem__("prior_precision", math.nan)),
        errors.ManifestError,
        "diag",
    ),
    "negative prior_precision": (
        _manifest(lambda m: m["posterior"].__setitem__("prior_precision", -2.0)),
        errors.ManifestError,
        "diag",
    ),
    "nan threshold": (
        _manifest(lambda m: m["calibration"]["abstention"][0].__setitem__("threshold", math.nan)),
        errors.ManifestError,
        "diag",
    ),
    "max_prob threshold above 1": (
        _manifest(lambda m: m["calibration"]["abstention"][0].__setitem__("threshold", 1.5)),
        errors.ManifestError,
        "diag",
    ),
    "infinite temperature": (
        _manifest(lambda m: m["calibration"].__setitem__("temperature", math.inf)),
        errors.ManifestError,
        "diag",
    ),
    "negative kron eigenvalues": (
        _tensors(POSTERIOR_FILE, _set("eigvals_out", -1e6)),
        errors.InvalidValueError,
        "kron",
    ),
    "nan kron prior in params": (
        _manifest(lambda m: m["posterior"]["params"].__setitem__("prior_precision", math.nan)),
        errors.InvalidValueError,
        "kron",
    ),
    "kron mean is not the MAP": (
        _tensors(POSTERIOR_FILE, _set("::mean", 0.123, _first)),
        errors.InvalidValueError,
        "kron",
    ),
    "scale of the wrong JSON type": (
        _manifest(lambda m: m["posterior"]["params"].__setitem__("scale", {"a": 1})),
        errors.ShapeMismatchError,
        "kron",
    ),
    "truncated": (_truncate, errors.ChecksumMismatchError, "diag"),
    "flipped byte": (_flip_byte, errors.ChecksumMismatchError, "diag"),
    "not json": (lambda b: (b / MANIFEST_FILE).write_text("{nope"), errors.ManifestError, "diag"),
    "unknown schema": (_manifest(lambda m: m.__setitem__("schema_version", 99)), errors.SchemaVersionError, "diag"),
    "missing file": (lambda b: (b / POSTERIOR_FILE).unlink(), errors.MissingFileError, "diag"),
    "pickle": (_pickle, errors.NotSafetensorsError, "diag"),
    "wrong shapes": (_tensors(ADAPTER_FILE, _wrong_shape), errors.ShapeMismatchError, "diag"),
    "foreign fingerprint": (
        _manifest(lambda m: m["base_model"].__setitem__("fingerprint", "0" * 64)),
        errors.FingerprintMismatchError,
        "diag",
    ),
    "traversal in files": (
        _manifest(lambda m: m["files"].__setitem__("../adapter.safetensors", "0" * 64)),
        errors.ManifestError,
        "diag",
    ),
    "symlinked file out": (_link_file_out, errors.UnsafePathError, "diag"),
    # the OOD score (schema 2): bundles with a Mahalanobis score
    "nan ood means": (_tensors(OOD_FILE, _set("means", math.nan, _first)), errors.OodFileError, "ood"),
    "negative ood eigenvalue": (_tensors(OOD_FILE, _set("eigenvalues", -1.0, _first)), errors.OodFileError, "ood"),
    "wrong ood shape": (_tensors(OOD_FILE, _wrong_ood_shape), errors.OodFileError, "ood"),
    "ood reference unsorted": (_tensors(OOD_FILE, _set("reference", 1e9, _first)), errors.OodFileError, "ood"),
    "missing ood file": (lambda b: (b / OOD_FILE).unlink(), errors.MissingFileError, "ood"),
    "flipped ood byte": (_flip_ood_byte, errors.ChecksumMismatchError, "ood"),
    "ood layers of another width": (
        _manifest(lambda m: m["ood"].__setitem__("layers", [1])),
        errors.OodFileError,
        "ood",
    ),
    "ood score on schema 1": (_manifest(lambda m: m.__setitem__("schema_version", 1)), errors.ManifestError, "ood"),
}


@pytest.fixture(scope="module")
def served(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("faults")
    make_bundle(tiny_base, root / "adapters" / "good", name="good")
    for family in ("diag", "kron"):
        make_bundle(tiny_base, root / "pristine" / family, name="damaged", family=family)
    make_bundle(tiny_base, root / "pristine" / "ood", name="damaged", ood_method="mahalanobis")
    client = running_app(tiny_base, root / "adapters")
    yield client, root
    client.__exit__(None, None, None)


def test_damaged_bundles_are_refused_with_their_typed_error_while_serving_goes_on(served) -> None:
    client, root = served
    adapters = root / "adapters"
    stop, failures, answered = threading.Event(), [], []

    def client_loop() -> None:
        while not stop.is_set():
            response = client.post("/v1/predict", json={"adapter": "good", "inputs": ["fine"], "num_samples": 4})
            (answered if response.status_code == 200 else failures).append(response.status_code)

    fingerprint = json.loads((adapters / "good" / MANIFEST_FILE).read_text())["base_model"]["fingerprint"]
    loop = threading.Thread(target=client_loop)
    loop.start()
    try:
        refusals = {}
        for index, (kind, (damage, error, family)) in enumerate(DAMAGES.items()):
            bundle = adapters / f"damaged-{index}"
            shutil.copytree(root / "pristine" / family, bundle)
            damage(bundle)
            with pytest.raises(error):  # the library's typed error
                load_bundle(bundle, root=adapters, base_fingerprint=fingerprint)
            response = client.post("/v1/adapters", json={"path": bundle.name, "name": f"d{index}"})
            refusals[kind] = response
            assert response.status_code in (400, 422), (kind, response.text)
            assert error.__name__ in response.json()["error"]["message"], (kind, response.text)
            if error is errors.OodFileError:  # the message names the file
                assert OOD_FILE in response.json()["error"]["message"], (kind, response.text)
            assert str(root) not in response.text  # the server's paths stay on the server
        linked_dir = adapters / "linked-dir"
        linked_dir.symlink_to(root / "pristine" / "diag", target_is_directory=True)
        out = client.post("/v1/adapters", json={"path": "linked-dir"})
        assert out.status_code == 400 and "outside the adapter directory" in out.json()["error"]["message"]
    finally:
        stop.set()
        loop.join()
    assert not failures and len(answered) > 0
    assert len(refusals) == len(DAMAGES)
    assert [a["name"] for a in client.get("/v1/adapters").json()["adapters"]] == ["good"]


def test_symlinks_inside_the_adapter_directory_are_followed(served, tiny_base: Path) -> None:
    """A link that stays inside the adapter directory is fine (e.g. ``current -> v2``)."""
    client, root = served
    adapters = root / "adapters"
    make_bundle(tiny_base, adapters / "versions" / "v2", name="linked")
    (adapters / "current").symlink_to(adapters / "versions" / "v2", target_is_directory=True)
    shutil.copy(adapters / "versions" / "v2" / PROJECTIONS_FILE, adapters / "shared-projections")
    (adapters / "versions" / "v2" / PROJECTIONS_FILE).unlink()
    (adapters / "versions" / "v2" / PROJECTIONS_FILE).symlink_to(adapters / "shared-projections")
    response = client.post("/v1/adapters", json={"path": "current"})
    assert response.status_code == 201, response.text
