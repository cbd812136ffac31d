"""Bundle stores: immutable versions and a current pointer, in a local directory and on a real S3-compatible server
(moto's, started as its own process); legacy bundle directories still read; names that would leave the store
refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from adapters import load_bundle
from adapters.store import BundleStore, StoredVersion, StoreError
from tests.service.bundles import make_bundle


@pytest.fixture(scope="module")
def bundles(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    return {
        "v1": make_bundle(tiny_base, root / "v1", name="sentiment", seed=1),
        "v2": make_bundle(tiny_base, root / "v2", name="sentiment", seed=2),
    }


def s3_store(endpoint: str, cache: Path, prefix: str) -> BundleStore:
    options = {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": endpoint, "region_name": "eu-west-1"}}
    store = BundleStore(f"s3://caveat/{prefix}", cache_dir=cache, **options)
    if not store.fs.exists("caveat"):
        store.fs.mkdir("caveat")
    return store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path: Path) -> BundleStore:
    if request.param == "local":
        return BundleStore(tmp_path / "store")
    return s3_store(request.getfixturevalue("s3_endpoint"), tmp_path / "cache", tmp_path.name)


def test_versions_are_immutable_and_one_is_current(store: BundleStore, bundles: dict[str, Path]) -> None:
    assert store.adapters() == {} and store.current("sentiment") is None
    first = store.publish(bundles["v1"], "sentiment", "1")
    assert first == StoredVersion("sentiment", "1", "sentiment/1") and store.current("sentiment") == first
    store.publish(bundles["v2"], "sentiment", "2", make_current=False)
    assert store.current("sentiment").version == "1" and store.versions("sentiment") == ["1", "2"]
    store.set_current("sentiment", "2")
    assert store.adapters() == {"sentiment": StoredVersion("sentiment", "2", "sentiment/2")}
    loaded = load_bundle(store.local_path(store.current("sentiment")))
    assert loaded.sha256 == load_bundle(bundles["v2"]).sha256  # every file arrived, checksums and all
    store.publish(bundles["v1"], "sentiment", "1")  # the same contents again: nothing to refuse
    with pytest.raises(StoreError, match="immutable"):
        store.publish(bundles["v2"], "sentiment", "1")
    with pytest.raises(StoreError, match="no version 9"):
        store.set_current("sentiment", "9")
    store.withdraw("sentiment")
    assert store.adapters() == {} and store.versions("sentiment") == ["1", "2"]  # the versions stay


@pytest.mark.parametrize("name", ["../outside", "a/b", "", ".hidden", "x" * 200])
def test_names_that_would_leave_the_store_are_refused(tmp_path: Path, bundles: dict[str, Path], name: str) -> None:
    store = BundleStore(tmp_path / "store")
    with pytest.raises(StoreError, match="not an adapter name"):
        store.publish(bundles["v1"], name, "1")
    with pytest.raises(StoreError, match="not a version"):
        store.publish(bundles["v1"], "ok", "../1")
    assert not (tmp_path / "outside").exists()


def test_a_legacy_bundle_directory_is_an_adapter_unless_two_claim_its_name(tmp_path: Path, bundles) -> None:
    root = tmp_path / "store"
    shutil.copytree(bundles["v1"], root / "old-layout")
    store = BundleStore(root)
    (current,) = store.adapters().values()
    assert current.name == "sentiment" and current.legacy and store.local_path(current) == root / "old-layout"
    shutil.copytree(bundles["v2"], root / "another")
    assert store.adapters() == {} and store.legacy_rivals() == {"sentiment": ["another", "old-layout"]}
    store.publish(bundles["v2"], "sentiment", "2")  # a versioned entry wins over legacy claims
    assert store.adapters()["sentiment"].key == "sentiment/2"


def test_a_remote_version_is_downloaded_once(s3_endpoint: str, tmp_path: Path, bundles) -> None:
    store = s3_store(s3_endpoint, tmp_path / "cache", "once")
    stored = store.publish(bundles["v1"], "sentiment", "1")
    path = store.local_path(stored)
    (path / "marker").write_text("kept")  # a second call must not fetch again: versions never change
    assert store.local_path(stored) == path and (path / "marker").read_text() == "kept"
