"""Adapter registry: name → the version currently served, with validation, atomic replace and LRU eviction, over a
bundle store (:mod:`adapters.store`), the one source of truth.

A request resolves its adapter once, at admission, to an immutable :class:`AdapterVersion` and keeps it
until it is answered, so a replace never changes the version under a request in flight: the old tensors
live until its last request finishes. Identical projections (same digest) are stored once on the device
and shared as one *object*, which is what lets the batched forward compute ``A x`` once for all adapters
that share them. Device memory for adapter tensors stays under a byte budget: loading beyond it evicts
least-recently-used unpinned adapters, which reload from the store on their next request. An adapter the
registry does not know is looked up in the store on its first request and loaded (the request waits up to
``miss_wait_s``, then gets a 503 with Retry-After while the load goes on); the admin changes write the store, and
:meth:`AdapterRegistry.sync` (every ``store_poll_s``) brings every replica to the store's current versions.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor

from adapters.batching import AdapterWeights
from adapters.bundle import Bundle, load_bundle, parse_manifest
from adapters.cloze import ClozeReadout
from adapters.errors import BundleError
from adapters.manifest import MANIFEST_FILE, BundleManifest, FarTemperature
from adapters.pooling import DenseTanhPooler
from adapters.predictive import AbstentionRule
from adapters.predictives import Predictor, PredictorUnavailableError, predictor_for
from adapters.projections import Projection
from adapters.store import (
    NAME_PATTERN,
    BundleStore,
    StoredVersion,
    StoreError,
    VersionConflictError,
    VersionNotFoundError,
)
from adapters.vocab import Pooling
from service.errors import (
    AdapterLoadingError,
    AdapterNotFoundError,
    BundleRejectedError,
    ConflictError,
    InvalidRequestError,
    ServiceError,
    StoreUnavailableError,
)
from service.host import ModelHost
from service.schemas import RepositoryIndexEntry

log = logging.getLogger("caveat.serve")
T = TypeVar("T")


@dataclass(eq=False)
class AdapterVersion:
    """One loaded version of an adapter on the serving device; never changes once visible.

    Attributes:
        name: the name it is served under.
        bundle: the bundle, tensors on the device (projections in the base's dtype; cores, head and
            posterior in float32).
        weights: the fixed tensors of a batched forward, with interned projections.
        path: the bundle directory.
        own_bytes: device bytes of everything but the (shareable) projections.
    """

    name: str
    bundle: Bundle
    weights: AdapterWeights
    path: Path
    own_bytes: int
    loaded_at: float = field(default_factory=time.time)
    _points: dict = field(default_factory=dict, init=False, repr=False)  # the predictive modes' shared points

    @property
    def manifest(self) -> BundleManifest:
        return self.bundle.manifest

    @property
    def version(self) -> str:
        return self.bundle.version

    @property
    def sha256(self) -> str:
        return self.bundle.sha256

    @property
    def labels(self) -> list[str]:
        return self.manifest.task.labels

    @property
    def max_length(self) -> int:
        return self.manifest.task.max_length

    @property
    def temperature(self) -> float:
        return self.manifest.calibration.temperature

    @property
    def far_temperature(self) -> FarTemperature | None:
        return self.manifest.calibration.far_temperature if self.bundle.ood is not None else None

    def predictor(self, method: str | None = None) -> Predictor:
        """The predictive mode a request asking for ``method`` runs with (``None``: the one the bundle was evaluated
        and calibrated with; a MAP bundle always predicts with the MAP).

        Raises:
            InvalidRequestError: an unknown mode, or one the bundle's posterior does not have.
        """
        try:
            return predictor_for(method, self.bundle.posterior, self.manifest.posterior.predictive)
        except PredictorUnavailableError as exc:
            raise InvalidRequestError(f"adapter {self.name!r}: {exc}") from None
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from None

    def default_num_samples(self, predictor: Predictor) -> int:
        """The bundle's draws for its own predictive, else the mode's default."""
        if predictor.mode == self.manifest.posterior.predictive:
            return self.manifest.posterior.default_num_samples
        return predictor.default_draws

    @property
    def ood_layers(self) -> list[int] | None:
        """The base layers the bundle's OOD score reads (``None``: it has no score)."""
        return None if self.bundle.ood is None or self.manifest.ood is None else self.manifest.ood.layers

    def abstention_rules(self) -> list[AbstentionRule]:
        return [AbstentionRule(rule.kind, rule.threshold) for rule in self.manifest.calibration.abstention]

    def draw(self, num_samples: int, seed: int, predictor: Predictor) -> dict[str, Tensor]:
        """``(S_rows, ...)`` cores of every posterior block for one request (:meth:`Predictor.draw_many`)."""
        return self.draw_many([(num_samples, seed)], predictor)[0]

    def draw_many(self, requests: Sequence[tuple[int, int]], predictor: Predictor) -> list[dict[str, Tensor]]:
        """:meth:`draw` for several requests ``(S, seed)`` of one mode at once: each request's noise from its own
        seeded generator (the same samples as alone); a shared point (MAP, GLM) is one dict for all."""
        return predictor.draw_many(self.bundle.posterior, self.bundle.cores, requests, self._points)


@dataclass
class AdapterEntry:
    """A registered adapter: where it comes from and, when resident, the version on the device.

    Attributes:
        path: the local directory its version is read from (a local store's own, or a cached copy).
        stored: the store's record of that version (``None``: loaded from a path outside the store's layout).
    """

    name: str
    path: Path
    manifest: BundleManifest
    sha256: str
    pinned: bool
    resident: AdapterVersion | None
    last_used: float = field(default_factory=time.monotonic)
    stored: StoredVersion | None = None

    @property
    def state(self) -> str:
        return "ready" if self.resident is not None else "evicted"


class AdapterRegistry:
    """Loads, replaces, removes and evicts adapters for one :class:`ModelHost`, from a :class:`BundleStore`.

    Changes are serialised by one lock; lookups of resident adapters take no lock. ``on_load`` hears of every
    load attempt: its seconds (``None`` when refused before reading, e.g. a path outside the directory) and
    whether it succeeded. ``adapter_dir`` is where the admin API's bundle paths are found (a local store's root by
    default); ``miss_wait_s`` how long a request for an adapter that is not loaded waits for its load.
    """

    def __init__(
        self,
        host: ModelHost,
        store: BundleStore,
        budget_bytes: int,
        pinned: set[str] | None = None,
        on_change: Callable[[], None] | None = None,
        on_load: Callable[[float | None, bool], None] | None = None,
        adapter_dir: Path | None = None,
        miss_wait_s: float = 2.0,
    ) -> None:
        self.host = host
        self.store = store
        self.adapter_dir = Path(adapter_dir if adapter_dir is not None else store.root).resolve()
        self.budget_bytes = budget_bytes
        self.miss_wait_s = miss_wait_s
        self._pinned = set(pinned or ())
        self._entries: dict[str, AdapterEntry] = {}
        self._loading: dict[str, asyncio.Task[AdapterEntry]] = {}
        self._forgotten: set[str] = set()  # legacy directories removed by the admin API (they cannot be withdrawn)
        self._projections: weakref.WeakValueDictionary[str, Projection] = weakref.WeakValueDictionary()
        self._lock = asyncio.Lock()
        self._on_change = on_change or (lambda: None)
        self._on_load = on_load or (lambda seconds, ok: None)

    # ------------------------------------------------------------------------------------------ lookups

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def entries(self) -> list[AdapterEntry]:
        return sorted(self._entries.values(), key=lambda e: e.name)

    def entry(self, name: str) -> AdapterEntry:
        if name not in self._entries:
            known = ", ".join(sorted(self._entries)) or "none"
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded (loaded: {known})")
        return self._entries[name]

    async def acquire(self, reference: str) -> AdapterVersion:
        """The version to serve ``name`` or ``name@version`` with, reloading an evicted adapter and loading one the
        registry does not know from the store (:meth:`load_on_miss`)."""
        name, _, wanted = reference.partition("@")
        entry = self._entries.get(name) or await self.load_on_miss(name)
        if entry.resident is None:
            async with self._lock:
                if entry.resident is None:
                    await self._reload(entry)
        version = entry.resident
        if wanted and version.version != wanted:
            raise AdapterNotFoundError(f"adapter {name!r} serves version {version.version!r}, not {wanted!r}")
        entry.last_used = time.monotonic()
        return version

    async def load_on_miss(self, name: str) -> AdapterEntry:
        """Load ``name`` from the store: 404 when the store has no current version of it; the load's own error
        when it fails; 503 with Retry-After when it takes longer than ``miss_wait_s`` (it goes on: a retry finds
        it loaded). Concurrent requests for one name share one load."""
        if not NAME_PATTERN.match(name):
            raise AdapterNotFoundError(f"adapter {name[:64]!r} is not loaded and cannot be in the store (not a name)")
        task = self._loading.get(name)
        if task is None:
            task = asyncio.create_task(self._load_from_store(name), name=f"caveat-load-{name}")
            self._loading[name] = task
            task.add_done_callback(lambda _: self._loading.pop(name, None))
        done, _ = await asyncio.wait({task}, timeout=self.miss_wait_s)
        if not done:
            retry = max(1, round(self.miss_wait_s))
            raise AdapterLoadingError(f"adapter {name!r} is being loaded from the store; retry shortly", retry)
        return task.result()

    def used_bytes(self, extra: AdapterVersion | None = None, without: str | None = None) -> int:
        """Device bytes of resident adapters (projections counted once), optionally with/without one."""
        versions = [e.resident for e in self._entries.values() if e.resident is not None and e.name != without]
        if extra is not None:
            versions.append(extra)
        unique = {id(p): p for v in versions for p in v.weights.projections.values()}
        return sum(v.own_bytes for v in versions) + sum(_projection_bytes(p) for p in unique.values())

    # ------------------------------------------------------------------------------------------ changes

    def resolve_path(self, path: str | Path) -> Path:
        """A bundle path (relative to the adapter directory, or absolute) that must stay inside it, links
        followed. Every refusal counts as a failed load."""
        try:
            return self._resolve(path)
        except ServiceError:
            self._on_load(None, False)
            raise

    def _resolve(self, path: str | Path) -> Path:
        shown = str(path)[:200]
        try:
            candidate = Path(path)
            resolved = (candidate if candidate.is_absolute() else self.adapter_dir / candidate).resolve()
            has_manifest = (resolved / MANIFEST_FILE).is_file()
        except (ValueError, OSError) as exc:  # a NUL byte, a name longer than the file system takes, a link loop
            raise InvalidRequestError(f"bundle path {shown!r} is not a usable path ({_reason(exc)})") from None
        if not resolved.is_relative_to(self.adapter_dir):
            raise InvalidRequestError(f"bundle path {shown!r} is outside the adapter directory")
        if not has_manifest:
            raise BundleRejectedError(f"no bundle at {shown!r} (no {MANIFEST_FILE} there)")
        return resolved

    async def add(self, path: str | Path, name: str | None = None, pin: bool = False) -> AdapterEntry:
        """Load a new adapter from a bundle directory and publish it to the store as that adapter's current
        version; 409 if the name is taken (replace it with :meth:`replace`)."""
        directory = self.resolve_path(path)
        async with self._lock:
            if name is not None and name in self._entries:
                raise ConflictError(f"adapter {name!r} is already loaded; PUT /v1/adapters/{name} replaces it")
            version = await self._load(directory, name)
            if version.name in self._entries:
                raise ConflictError(
                    f"adapter {version.name!r} is already loaded; PUT /v1/adapters/{version.name} replaces it"
                )
            stored, local = await self._publish(directory, version)
            return self._register(version, local, stored, pin)

    async def replace(
        self, name: str, path: str | Path | None = None, version: str | None = None
    ) -> tuple[str | None, AdapterEntry]:
        """Atomically serve ``name`` from a bundle directory (published to the store as its new current version),
        from a stored ``version`` (made current), or, with neither, from the store's current version re-read.

        Requests admitted before the swap finish on the old version. Returns the old version and the entry.
        """
        async with self._lock:
            entry = self.entry(name)
            if path is not None:
                directory = self.resolve_path(path)
                loaded = await self._load(directory, name)
                stored, local = await self._publish(directory, loaded)
            else:
                if version is not None:
                    await asyncio.to_thread(self._store_call, self.store.set_current, name, version)
                stored, local = await self._current(name)
                loaded = await self._load(local, name)
            return self._swap(entry, loaded, local, stored)

    async def remove(self, name: str) -> AdapterEntry:
        """Stop serving ``name``: withdrawn from the store (its versions stay) and unregistered here."""
        async with self._lock:
            entry = self.entry(name)
            withdrawn = entry.stored is not None and not entry.stored.legacy
            if withdrawn:
                await asyncio.to_thread(self._store_call, self.store.withdraw, name)
            # a legacy directory cannot be withdrawn: this server forgets it until it is added again
            return self._drop(entry, forget=not withdrawn)

    async def repository_index(self) -> list[RepositoryIndexEntry]:
        """Every adapter of the store and of this server, with its state here (the V2 repository index)."""
        stored = await asyncio.to_thread(self._store_call, self.store.adapters)
        index = {}
        for name, version in stored.items():
            reason = "unloaded from this server" if name in self._forgotten else "not loaded on this server yet"
            index[name] = RepositoryIndexEntry(name=name, version=version.version, state="UNAVAILABLE", reason=reason)
        for entry in self._entries.values():
            ready = entry.resident is not None
            index[entry.name] = RepositoryIndexEntry(
                name=entry.name, version=entry.manifest.version, state="READY" if ready else "UNAVAILABLE",
                reason="" if ready else "evicted (memory budget): loads on its next request",
            )  # fmt: skip
        return [index[name] for name in sorted(index)]

    async def load(self, name: str) -> AdapterEntry:
        """Serve the store's current version of ``name`` here (V2 repository ``load``): loaded, or re-read."""
        self._forgotten.discard(name)
        if name in self._entries:
            return (await self.replace(name))[1]
        stored = await self._stored_current(name)
        if stored is None:
            raise AdapterNotFoundError(f"adapter {name[:64]!r} is not in the store")
        return await self._load_stored(name, stored)

    async def unload(self, name: str) -> AdapterEntry:
        """Drop ``name`` from this server only (V2 repository ``unload``): the store still serves it elsewhere; here
        a request for it is refused until it is loaded again."""
        async with self._lock:
            return self._drop(self.entry(name), forget=True)

    async def release(self, name: str) -> None:
        """Drop ``name`` here until its next request loads it from the store again (Ray Serve's multiplexer evicted
        it from this replica); pinned adapters and names not loaded stay as they are."""
        async with self._lock:
            entry = self._entries.get(name)
            if entry is not None and not entry.pinned and entry.stored is not None:
                self._drop(entry, forget=False)

    async def load_store(self) -> list[str]:
        """Load every adapter the store serves; returns the problems (serving goes on).

        Any entry that cannot be loaded (refused, a link out of the store, unreadable) is logged, counted and
        reported, and the others load. Legacy bundle directories that claim the same name are all refused: which
        one a directory listing puts first is no way to choose what serves.
        """
        try:
            current = await asyncio.to_thread(self.store.adapters)
            rivals = await asyncio.to_thread(self.store.legacy_rivals)
        except (OSError, StoreError) as exc:
            log.error("bundle store %s cannot be read: %s", self.store.uri, exc)
            return [f"the bundle store cannot be read ({_reason(exc)})"]
        problems = []
        for name, keys in rivals.items():
            if name in current:  # a versioned entry serves the name: the legacy claims do not matter
                continue
            for _ in keys:  # each refused directory is a failed load
                self._on_load(None, False)
            message = (
                f"bundles {sorted(keys)} are all named {name!r}; none is loaded (rename or remove all but one, or "
                "load one under another name with POST /v1/adapters)"
            )
            log.error("skipped %s: %s", name, message)
            problems += [f"{key}: {message}" for key in sorted(keys)]
        for name, stored in current.items():
            try:
                entry = await self._load_stored(name, stored)
                log.info("loaded adapter %s version %s from %s", entry.name, entry.manifest.version, stored.key)
            except ServiceError as exc:
                log.error("skipped %s: %s", stored.key, exc.message)
                problems.append(f"{stored.key}: {exc.message}")
            except Exception as exc:  # one unloadable entry never stops the others
                log.exception("skipped %s", stored.key)
                self._on_load(None, False)
                problems.append(f"{stored.key}: cannot be loaded ({type(exc).__name__}); see the server log")
        return problems

    async def sync(self) -> list[str]:
        """Bring this registry to the store: adapters whose current version changed are swapped in, withdrawn ones
        removed (adapters not loaded here load on their first request). Returns what changed."""
        try:
            current = await asyncio.to_thread(self.store.adapters)
        except (OSError, StoreError) as exc:
            log.warning("bundle store %s cannot be read: %s", self.store.uri, exc)
            return []
        changes = []
        for entry in list(self._entries.values()):
            stored = current.get(entry.name)
            if entry.stored is None or (entry.stored.legacy and (stored is None or stored.legacy)):
                continue  # a legacy directory changes in place (PUT re-reads it) and cannot be withdrawn
            if stored is None:
                async with self._lock:
                    if self._entries.get(entry.name) is entry:
                        self._drop(entry, forget=False)
                        changes.append(f"{entry.name}: withdrawn")
            elif stored.key != entry.stored.key:
                try:
                    old, _ = await self.replace(entry.name)
                    changes.append(f"{entry.name}: {old} → {stored.version}")
                except ServiceError as exc:
                    log.error("adapter %s: the store's version %s cannot be served: %s", entry.name, stored.version,
                              exc.message)  # fmt: skip
        for change in changes:
            log.info("store sync: %s", change)
        return changes

    # ------------------------------------------------------------------------------------------ internals

    async def _load_from_store(self, name: str) -> AdapterEntry:
        if name in self._forgotten:
            raise AdapterNotFoundError(
                f"adapter {name!r} was removed or unloaded on this server; POST /v1/adapters or "
                f"/v2/repository/models/{name}/load serves it again"
            )
        stored = await self._stored_current(name)
        if stored is None:
            known = ", ".join(sorted(self._entries)) or "none"
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded and not in the store (loaded: {known})")
        return await self._load_stored(name, stored)

    async def _load_stored(self, name: str, stored: StoredVersion) -> AdapterEntry:
        local = await asyncio.to_thread(self._store_call, self.store.local_path, stored)
        async with self._lock:
            if name in self._entries:  # loaded meanwhile (an admin add, another path)
                return self._entries[name]
            version = await self._load(local, name)
            return self._register(version, local, stored, pin=False)

    async def _publish(self, directory: Path, version: AdapterVersion) -> tuple[StoredVersion, Path]:
        """Make the (validated) bundle at ``directory`` its adapter's current version in the store; returns the
        stored version and the local directory it is read from from now on (reloads after eviction)."""

        def publish() -> tuple[StoredVersion, Path]:
            stored = self.store.publish(directory, version.name, version.version)
            return stored, self.store.local_path(stored)

        return await asyncio.to_thread(self._store_call, publish)

    async def _stored_current(self, name: str) -> StoredVersion | None:
        """The store's current version of ``name`` (``None``: it has none, or ``name`` could not be one)."""
        if not NAME_PATTERN.match(name):
            return None
        return await asyncio.to_thread(self._store_call, self.store.current, name)

    async def _current(self, name: str) -> tuple[StoredVersion, Path]:
        stored = await self._stored_current(name)
        if stored is None:
            raise ConflictError(f"adapter {name!r} has no current version in the store (withdrawn?)")
        return stored, await asyncio.to_thread(self._store_call, self.store.local_path, stored)

    def _register(self, version: AdapterVersion, local: Path, stored: StoredVersion | None, pin: bool) -> AdapterEntry:
        self._make_room(version, without=None)
        pinned = pin or version.name in self._pinned
        entry = AdapterEntry(version.name, local, version.manifest, version.sha256, pinned, version, stored=stored)
        self._entries[version.name] = entry
        self._forgotten.discard(version.name)
        self._on_change()
        return entry

    def _drop(self, entry: AdapterEntry, forget: bool) -> AdapterEntry:
        """Unregister ``entry`` (requests in flight finish on their version); ``forget``: a request for it is not
        loaded from the store again on this server until it is added or loaded again."""
        self._entries.pop(entry.name)
        if forget:
            self._forgotten.add(entry.name)
        self._on_change()
        return entry

    def _swap(
        self, entry: AdapterEntry, version: AdapterVersion, local: Path, stored: StoredVersion | None
    ) -> tuple[str | None, AdapterEntry]:
        self._make_room(version, without=entry.name)
        old = entry.resident.version if entry.resident is not None else entry.manifest.version
        entry.path, entry.manifest, entry.sha256, entry.resident, entry.stored = (
            local, version.manifest, version.sha256, version, stored,
        )  # fmt: skip
        entry.last_used = time.monotonic()
        self._on_change()
        return old, entry

    def _store_call(self, function: Callable[..., T], *args) -> T:
        """A store operation, its failures as the API's errors (a store that cannot be reached: 503)."""
        try:
            return function(*args)
        except VersionConflictError as exc:
            raise ConflictError(str(exc)) from None
        except VersionNotFoundError as exc:
            raise AdapterNotFoundError(str(exc)) from None
        except StoreError as exc:
            raise InvalidRequestError(str(exc)) from None
        except OSError as exc:
            raise StoreUnavailableError(f"the bundle store cannot be reached ({_reason(exc)}); retry shortly") from None

    def _root(self, directory: Path) -> Path:
        """The directory every file of a bundle at ``directory`` must resolve inside (links out are refused)."""
        if directory.is_relative_to(self.adapter_dir):
            return self.adapter_dir
        return Path(self.store.root).resolve() if self.store.local else self.store.cache_dir.resolve()

    async def _reload(self, entry: AdapterEntry) -> None:
        version = await self._load(entry.path, entry.name)
        if version.sha256 != entry.sha256:
            raise ConflictError(
                f"adapter {entry.name!r} was evicted and its bundle at {entry.path.name} changed on disk since "
                f"it was loaded; PUT /v1/adapters/{entry.name} to serve the new version"
            )
        self._make_room(version, without=entry.name)
        entry.resident = version
        self._on_change()

    async def _load(self, directory: Path, name: str | None) -> AdapterVersion:
        start = time.perf_counter()
        try:
            version = await asyncio.to_thread(self._read_version, directory, name)
        except Exception:
            self._on_load(time.perf_counter() - start, False)
            raise
        self._on_load(time.perf_counter() - start, True)
        return version

    def _read_version(self, directory: Path, name: str | None) -> AdapterVersion:
        """Read, validate against the running base, and move to the device (blocking: a worker thread)."""
        try:
            manifest = parse_manifest((directory / MANIFEST_FILE).read_bytes(), directory)
            self._check_task(manifest, directory)
            fingerprint = self.host.fingerprint(manifest.fingerprinted_modules)
            if fingerprint is None:
                unknown = [m for m in manifest.fingerprinted_modules if m not in self.host.layer_shapes]
                raise BundleRejectedError(
                    f"bundle {directory.name!r} adapts modules the running base ({self.host.name}) does not have: "
                    f"{unknown[:3]}"
                )
            bundle = load_bundle(
                directory,
                base_fingerprint=fingerprint,
                layer_shapes=self.host.layer_shapes,
                hidden_size=self.host.hidden_size,
                root=self._root(directory),
            )
        except BundleError as exc:
            raise BundleRejectedError(
                f"bundle {directory.name!r} refused ({type(exc).__name__}): {exc.reason}"
            ) from exc
        except OSError as exc:
            raise BundleRejectedError(f"bundle {directory.name!r} cannot be read: {_reason(exc)}") from exc
        return self._place(bundle, name or manifest.name, directory)

    def _check_task(self, manifest: BundleManifest, directory: Path) -> None:
        ood = manifest.ood
        if ood is not None and (ood.pooling != self.host.pooling or max(ood.layers) > self.host.num_layers):
            raise BundleRejectedError(
                f"bundle {directory.name!r}'s OOD score reads layers {ood.layers} pooled by {ood.pooling!r}; this "
                f"server's base has {self.host.num_layers} layers and pools by {self.host.pooling!r}"
            )
        choice_format = manifest.task.choice_format
        if choice_format is not None and choice_format.cloze and self.host.output_embeddings is None:
            raise BundleRejectedError(
                f"bundle {directory.name!r} scores multiple choice with the LM head (cloze); this server's base has "
                "none (an encoder)"
            )
        if manifest.task.pooling not in (self.host.pooling, Pooling.POOLER):  # a pooler travels in the bundle
            raise BundleRejectedError(
                f"bundle {directory.name!r} pools by {manifest.task.pooling!r}; this server's base pools by "
                f"{self.host.pooling!r}"
            )

    def _place(self, bundle: Bundle, name: str, directory: Path) -> AdapterVersion:
        """Move to the device: projections interned in the base's dtype, the rest in float32."""
        device, dtype = self.host.device, self.host.dtype
        projections = {module: self._intern(p, device, dtype) for module, p in bundle.projections.items()}
        on_device = bundle.to(device, projections)
        own_bytes = bundle.tensor_bytes() - sum(_projection_bytes(p) for p in bundle.projections.values())
        return AdapterVersion(name, on_device, on_device.adapter_weights(self._readout(bundle)), directory, own_bytes)

    def _readout(self, bundle: Bundle) -> ClozeReadout | DenseTanhPooler | None:
        """A cloze adapter reads its choices' scores under the base's LM head; a pooler head reads the first token
        through the base's pooler layer, or its own (which the bundle supplies); any other pools."""
        if bundle.manifest.head.pooler_module:  # present: the fingerprint covered it
            return self.host.pooler(bundle.manifest.head.pooler_module)
        choice_format = bundle.manifest.task.choice_format
        if choice_format is None or not choice_format.cloze:
            return None
        return ClozeReadout(self.host.output_embeddings, len(bundle.manifest.task.labels))

    def _intern(self, projection: Projection, device: torch.device, dtype: torch.dtype) -> Projection:
        """One device copy per distinct projection (by digest of the float32 bytes)."""
        key = f"{projection.digest}:{dtype}"
        shared = self._projections.get(key)
        if shared is None:
            shared = projection.to(device=device, dtype=dtype)
            self._projections[key] = shared
        return shared

    def _make_room(self, version: AdapterVersion, without: str | None) -> None:
        """Evict least-recently-used unpinned adapters until ``version`` fits the budget."""
        while self.used_bytes(extra=version, without=without) > self.budget_bytes:
            candidates = [
                e for e in self._entries.values() if e.resident is not None and not e.pinned and e.name != without
            ]
            if not candidates:
                raise ConflictError(
                    f"adapter {version.name!r} needs {version.own_bytes / 2**20:.1f} MiB and the memory budget "
                    f"({self.budget_bytes / 2**20:.0f} MiB) is taken by pinned or in-use adapters"
                )
            victim = min(candidates, key=lambda e: e.last_used)
            victim.resident = None
            log.info("evicted adapter %s (memory budget)", victim.name)


def _rival_claims(directories: list[Path]) -> dict[Path, str]:
    """Directory → why it is refused, for every bundle whose manifest's name another bundle also claims."""
    claims: dict[str, list[Path]] = {}
    for directory in directories:
        try:
            name = json.loads((directory / MANIFEST_FILE).read_bytes()).get("name")
        except (OSError, ValueError, AttributeError):
            continue  # loading it will say what is wrong
        if isinstance(name, str):
            claims.setdefault(name, []).append(directory)
    return {
        directory: f"bundles {[d.name for d in same]} are all named {name!r}; none is loaded (rename or remove all "
        "but one, or load one under another name with POST /v1/adapters)"
        for name, same in claims.items()
        if len(same) > 1
        for directory in same
    }


def _reason(exc: BaseException) -> str:
    """An OS error's reason without the server path it names."""
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__


def _projection_bytes(projection: Projection) -> int:
    return sum(t.numel() * t.element_size() for t in (projection.A, projection.B))
