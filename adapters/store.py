"""Bundle stores: where adapters live, as immutable versions, and which version of each is current.

A store is a local directory or an object-store prefix (``s3://bucket/prefix``, any fsspec URL), read and written
through fsspec::

    <root>/<name>/<version>/bundle.json, *.safetensors, ...   one version: never changed once written
    <root>/<name>/CURRENT                                      the version served, one line

A bundle directory directly under the root (``<root>/<dir>/bundle.json``: what an adapter directory held before
stores) is an adapter too, named by its manifest at its manifest's version; it is the one place a bundle may be
changed in place. Names and versions are checked against the manifest's patterns before any path is built from
them, so nothing outside the root is ever named; a link out of a local store is refused where bundles are read
(``load_bundle(root=...)``). Remote versions are copied into a local cache once (they never change) and read from
there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from adapters.errors import CaveatError
from adapters.files import atomic_write, staged
from adapters.manifest import MANIFEST_FILE

CURRENT_FILE = "CURRENT"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # a manifest's name
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")


class StoreError(CaveatError, ValueError):
    """A store that cannot be read or written as asked; the message names the adapter and the store."""


class VersionConflictError(StoreError):
    """A version that exists with other contents (versions are immutable)."""


class VersionNotFoundError(StoreError):
    """A version, or a current version, the store does not have."""


@dataclass(frozen=True)
class StoredVersion:
    """One version of an adapter in a store.

    Attributes:
        name: the adapter; version: its version.
        key: the bundle directory, relative to the store's root (``name/version``, or a legacy directory).
        legacy: a bundle directly under the root (it may change in place).
    """

    name: str
    version: str
    key: str
    legacy: bool = False


class BundleStore:
    """A store at ``uri`` (a local path or an fsspec URL); ``cache_dir`` holds local copies of remote versions.

    ``storage_options`` go to fsspec (e.g. ``endpoint_url`` through ``client_kwargs`` for an S3-compatible server).
    """

    def __init__(self, uri: str | os.PathLike[str], cache_dir: Path | None = None, **storage_options) -> None:
        self.uri = str(uri)
        self.fs, root = fsspec.core.url_to_fs(self.uri, **storage_options)
        self.root = root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)
        self.cache_dir = cache_dir or Path(tempfile.gettempdir()) / "caveat-store-cache"

    def __repr__(self) -> str:
        return f"BundleStore({self.uri!r})"

    # ------------------------------------------------------------------------------------------ reading

    def adapters(self) -> dict[str, StoredVersion]:
        """Every adapter with a current version, by name. A versioned entry wins over a legacy directory claiming
        the same name; a name two legacy directories claim is left out (:meth:`legacy_rivals`): which one a listing
        puts first is no way to choose what serves."""
        versioned, claims = self._scan()
        found = {name: legacy[0] for name, legacy in claims.items() if len(legacy) == 1}
        return dict(sorted((found | {stored.name: stored for stored in versioned}).items()))

    def legacy_rivals(self) -> dict[str, list[str]]:
        """Names claimed by more than one legacy directory: name → the directories (none of them is served)."""
        _, claims = self._scan()
        return {name: [c.key for c in legacy] for name, legacy in claims.items() if len(legacy) > 1}

    def current(self, name: str) -> StoredVersion | None:
        """The current version of ``name`` (``None``: the store has none)."""
        _check_name(name)
        if self.fs.isfile(f"{self.root}/{name}/{CURRENT_FILE}"):
            return self._versioned(name)
        claims = self._scan()[1].get(name, [])
        return claims[0] if len(claims) == 1 else None

    def versions(self, name: str) -> list[str]:
        """Every stored version of ``name``, sorted."""
        _check_name(name)
        prefix = f"{self.root}/{name}"
        return sorted(
            child.rsplit("/", 1)[-1]
            for child in self._children(prefix)
            if self.fs.isfile(f"{child}/{MANIFEST_FILE}") and VERSION_PATTERN.match(child.rsplit("/", 1)[-1])
        )

    def local_path(self, stored: StoredVersion) -> Path:
        """A local directory holding the version's files: the store's own for a local store, else a cached copy
        (downloaded once, atomically; a version never changes, a legacy directory is fetched every time)."""
        if self.local:
            return Path(f"{self.root}/{stored.key}")
        target = self.cache_dir / _cache_key(self.uri) / stored.key
        if stored.legacy or not (target / MANIFEST_FILE).is_file():
            self._download(stored.key, target)
        return target

    # ------------------------------------------------------------------------------------------ writing

    def publish(self, directory: Path, name: str, version: str, make_current: bool = True) -> StoredVersion:
        """Copy the bundle at ``directory`` in as ``name/version`` (refused if that version exists with other
        contents: versions are immutable) and, by default, make it current."""
        _check_name(name)
        _check_version(version)
        key = f"{self.root}/{name}/{version}"
        manifest = (directory / MANIFEST_FILE).read_bytes()
        if self.fs.isfile(f"{key}/{MANIFEST_FILE}"):
            if self.fs.cat_file(f"{key}/{MANIFEST_FILE}") != manifest:
                raise VersionConflictError(
                    f"{self.uri}: {name} version {version} exists with other contents (versions are immutable)"
                )
        else:
            self._upload(directory, key)
        if make_current:
            self.set_current(name, version)
        return StoredVersion(name, version, f"{name}/{version}")

    def set_current(self, name: str, version: str) -> None:
        """Serve ``version`` of ``name`` (it must be stored)."""
        _check_name(name)
        _check_version(version)
        if not self.fs.isfile(f"{self.root}/{name}/{version}/{MANIFEST_FILE}"):
            raise VersionNotFoundError(f"{self.uri}: {name} has no version {version}")
        self._write_text(f"{self.root}/{name}/{CURRENT_FILE}", version + "\n")

    def withdraw(self, name: str) -> None:
        """Stop serving ``name``: its current pointer goes (its versions stay, immutable)."""
        _check_name(name)
        path = f"{self.root}/{name}/{CURRENT_FILE}"
        if not self.fs.isfile(path):
            raise VersionNotFoundError(f"{self.uri}: {name} has no current version")
        self.fs.rm_file(path)

    # ------------------------------------------------------------------------------------------ internals

    def _children(self, path: str) -> list[str]:
        """The directories (and links) directly under ``path``: a link is listed too, so that where bundles are read
        one that leaves the store is refused with its typed error rather than silently passed over."""
        try:
            entries = self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
        return [entry["name"].rstrip("/") for entry in entries if entry["type"] == "directory" or entry.get("islink")]

    def _versioned(self, name: str) -> StoredVersion:
        version = self.fs.cat_file(f"{self.root}/{name}/{CURRENT_FILE}").decode(errors="replace").strip()
        if not VERSION_PATTERN.match(version):
            raise StoreError(f"{self.uri}: {name}/{CURRENT_FILE} names no valid version ({version[:64]!r})")
        return StoredVersion(name, version, f"{name}/{version}")

    def _scan(self) -> tuple[list[StoredVersion], dict[str, list[StoredVersion]]]:
        """One listing of the root: the versioned adapters' current versions, and the legacy bundle directories by
        the name their manifest claims."""
        versioned: list[StoredVersion] = []
        claims: dict[str, list[StoredVersion]] = {}
        for entry in self._children(self.root):
            base = entry.rsplit("/", 1)[-1]
            if NAME_PATTERN.match(base) and self.fs.isfile(f"{entry}/{CURRENT_FILE}"):
                versioned.append(self._versioned(base))
            elif (stored := self._legacy(base)) is not None:
                claims.setdefault(stored.name, []).append(stored)
        return versioned, claims

    def _legacy(self, base: str) -> StoredVersion | None:
        """The legacy bundle directory ``base`` (``None``: no readable manifest there)."""
        try:
            manifest = json.loads(self.fs.cat_file(f"{self.root}/{base}/{MANIFEST_FILE}"))
            name, version = manifest["name"], manifest["version"]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # loading it will say what is wrong
        if not (isinstance(name, str) and NAME_PATTERN.match(name) and isinstance(version, str)):
            return None
        return StoredVersion(name, version, base, legacy=True)

    def _write_text(self, path: str, text: str) -> None:
        if not self.local:
            self.fs.pipe_file(path, text.encode())  # one object put: atomic for readers
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(path), text.encode())

    def _upload(self, directory: Path, key: str) -> None:
        """The bundle's files under ``key``, bundle.json last (a reader that sees it sees every file)."""
        files = sorted(p for p in directory.iterdir() if p.is_file())
        manifest = [p for p in files if p.name == MANIFEST_FILE]
        if not manifest:
            raise StoreError(f"{directory}: no {MANIFEST_FILE} (not a bundle)")
        if self.local:
            with staged(Path(key)) as staging:
                for path in files:
                    shutil.copy2(path, staging / path.name)
            return
        for path in [p for p in files if p.name != MANIFEST_FILE] + manifest:
            self.fs.put_file(str(path), f"{key}/{path.name}")

    def _download(self, key: str, target: Path) -> None:
        with staged(target) as staging:
            for remote in self.fs.ls(f"{self.root}/{key}", detail=False):
                base = remote.rstrip("/").rsplit("/", 1)[-1]
                if self.fs.isfile(remote) and not base.startswith("."):
                    self.fs.get_file(remote, str(staging / base))


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise StoreError(f"{str(name)[:64]!r} is not an adapter name (letters, digits, '.', '_', '-'; 128 at most)")


def _check_version(version: str) -> None:
    if not isinstance(version, str) or not VERSION_PATTERN.match(version):
        raise StoreError(f"{str(version)[:64]!r} is not a version (letters, digits, '.', '_', '+', '-'; 64 at most)")


def _cache_key(uri: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", uri)[:128]
