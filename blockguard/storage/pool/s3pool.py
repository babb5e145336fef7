"""A pool in an S3-compatible object store, shared by every host holding one master key
(issue 12; layout in docs/design/s3.md, "Layout in the bucket").

Chunks are deduplicated across generations, volumes and hosts of the key: a backup
stores only the chunks whose keyed id no pack of the store holds yet
(:mod:`blockguard.storage.remote.s3chunks`), then the generation's sealed manifest
``snapshots/HOST_ID/VOLUME_ID/GENERATION_ID`` last: the commit point. Chunks are shared
by every host, chains are not: a volume's place is keyed by the host (its client id) and
the volume name, so two hosts with a volume of one name have a chain each, and one host's
retention never touches another's generations. The store is the source of
truth: :meth:`S3Pool.scan` lists the manifests and opens each; one that fails to open is
reported damaged, never dropped. A new pool object with only the key, the endpoint and
the bucket finds every generation of its client id and restores it (a new host reads
another host's generations by registering the target with that host's client id).

Removing a generation removes its manifest only; the packs it alone referenced stay
until a garbage collection (:mod:`blockguard.storage.remote.s3gc`). Each writer holds a
lease in the bucket (:mod:`blockguard.storage.remote.s3lease`) from before it reads the
chunk index until its manifest is stored, so a collection never takes a chunk a running
backup reused, however long it runs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from pyroaring import BitMap

from blockguard.errors import CorruptMetadata, DataError, EnvironmentProblem, NotFound
from blockguard.storage.manifest import (
    Manifest,
    check_component,
    generation_clock,
    generation_id_time,
    new_generation_id,
)
from blockguard.storage.pool.base import (
    AlertCallback,
    DamagedGeneration,
    FreedGeneration,
    GenerationReader,
    GenerationSpec,
    GenerationWriter,
    PoolBackend,
    PoolCapacity,
    PoolDevice,
    PoolScan,
    SwapInVolume,
)
from blockguard.storage.pool.gendir import manifests_of
from blockguard.storage.remote.keys import MasterKey
from blockguard.storage.remote.objstore import ObjectStore
from blockguard.storage.remote.s3chunks import STORAGE_FORMAT, ChunkIndex, slots_of
from blockguard.storage.remote.s3gen import S3GenerationReader, S3GenerationWriter
from blockguard.storage.remote.s3lease import DEFAULT_LEASE_TIMEOUT, WriterLease
from blockguard.storage.remote.seal import BlobAAD, open_blob, seal_blob

if TYPE_CHECKING:
    from blockguard.storage.pool.registration import DiskAdmission

log = logging.getLogger(__name__)

SNAPSHOT_PREFIX = "snapshots/"
#: What :meth:`S3Pool.capacity` says: S3 has no "df" (design, open question 2).
UNBOUNDED = 1 << 60


#: The client id of a pool made without one (tests, benches).
DEFAULT_CLIENT = "host"


def manifest_key(place: str, generation_id: str) -> str:
    """``place`` is ``HOST_ID/VOLUME_ID``."""
    return f"{SNAPSHOT_PREFIX}{place}/{generation_id}"


class S3Pool(PoolBackend):
    """The generations of every host of one key in one bucket and prefix.

    :param name: the pool's name here.
    :param store: the bucket and prefix (an :class:`ObjectStore`).
    :param key: the master key (sub-keys make the chunk ids and seal packs, indexes and
        manifests).
    :param volume_names: names of volumes the caller knows, asked only to name a
        generation whose manifest does not open.
    :param client: this host's client id: the generations it writes, lists and removes
        are its own (``snapshots/HOST_ID/``); :meth:`scan` with ``every_host`` (the
        garbage collection) reads every host's.
    :param lease_timeout: seconds a writer's lease lives without a renewal.
    """

    kind = "s3"

    def __init__(
        self,
        name: str,
        store: ObjectStore,
        key: MasterKey,
        *,
        alert: AlertCallback | None = None,
        volume_names: Callable[[], Iterable[str]] | None = None,
        client: str = DEFAULT_CLIENT,
        lease_timeout: float = DEFAULT_LEASE_TIMEOUT,
    ) -> None:
        super().__init__(name, alert)
        self.store = store
        self._key = key
        self.client = client
        self.lease_timeout = lease_timeout
        self._host = key.host_id(client)
        self._blob_key = key.blob_key()
        self._pack_key = key.store_pack_key()
        self._id_key = key.chunk_id_key()
        self.index = ChunkIndex(store, self._blob_key)
        self._volume_names = volume_names
        self._names: dict[str, str] = {}
        self._lock = threading.RLock()
        #: Opened manifests by object key: a manifest is written once, never replaced.
        self._manifests: dict[str, Manifest] = {}
        #: The writer begun last (what it stored and reused).
        self.last_writer: S3GenerationWriter | None = None
        #: Volume name -> the id its next generation takes (:meth:`expect_resume`).
        self._named_ids: dict[str, str] = {}

    @property
    def host_id(self) -> str:
        """This host's id in the bucket (``MasterKey.host_id`` of its client id)."""
        return self._host

    @property
    def blob_key(self) -> bytes:
        """The key that seals manifests, indexes and marks (for the collection)."""
        return self._blob_key

    # --- devices and space ------------------------------------------------------------

    def devices(self) -> list[PoolDevice]:
        where = f"{self.store.endpoint}/{self.store.bucket}/{self.store.prefix}"
        return [PoolDevice(f"{self.store.target}:{where}", "", UNBOUNDED, self.store.prefix)]

    def add_device(self, path: str, admission: DiskAdmission | None = None) -> PoolDevice:
        raise EnvironmentProblem(
            detail=f"pool {self.name} is in object store {self.store.target}: the store "
            f"allocates its space, no disk {path} can be added here"
        )

    def capacity(self) -> PoolCapacity:
        return PoolCapacity(UNBOUNDED, 0, UNBOUNDED)

    # --- generations ------------------------------------------------------------------

    def begin_generation(self, spec: GenerationSpec) -> GenerationWriter:
        # The lease before the index: a collection that marks a pack after this point
        # waits for this writer (it may reuse the pack's chunks, read just below).
        lease = WriterLease(self.store, self._blob_key, self._host, self.client, self.lease_timeout)
        lease.acquire()
        try:
            # Chunks other hosts stored since the last backup are reused, not sent again.
            self.index.refresh()
            draft = self._draft(spec)
        except BaseException:
            lease.release()
            raise
        place = self._place(spec.volume.name)

        def commit(manifest: Manifest) -> int:
            key = manifest_key(place, manifest.generation_id)
            sealed = self._seal_manifest(manifest)
            self.store.put(key, sealed)
            with self._lock:
                self._manifests[key] = manifest
            return len(sealed)

        self.last_writer = S3GenerationWriter(
            draft,
            store=self.store,
            index=self.index,
            chunk_id_key=self._id_key,
            pack_key_bytes=self._pack_key,
            blob_key=self._blob_key,
            commit_manifest=commit,
            lease=lease,
        )
        return self.last_writer

    def expect_resume(self, spec: GenerationSpec, generation_id: str) -> None:
        """Give the next generation of ``spec``'s volume the id ``generation_id`` (a
        transfer's copy has the local generation's id and point in time). Nothing is
        resumed as such: a re-run after a cut finds the packs the cut run stored in the
        index and references them instead of storing them again.

        :raises InvalidInput: not a generation id.
        """
        check_component(generation_id, "generation id")
        self._named_ids[spec.volume.name] = generation_id

    def _draft(self, spec: GenerationSpec) -> Manifest:
        created = generation_clock()
        named = self._named_ids.pop(spec.volume.name, None)
        if named is not None:
            stamped = generation_id_time(named)
            created = created if stamped is None else stamped
        draft = Manifest(
            generation_id=named or new_generation_id(created),
            volume=spec.volume,
            chunk_size=spec.chunk_size,
            kind=spec.kind,
            base_id=None if spec.is_full else spec.base_id,
            parent_id=None if spec.is_full else spec.parent_id,
            changed=BitMap() if spec.changed is None else BitMap(spec.changed),
            created=created,
            sequence=self.next_sequence(spec.volume.name),
            storage={"format": STORAGE_FORMAT},
        )
        if draft.is_full:
            # A full holds every chunk (unchanged ones cost an id, not an upload).
            draft = draft.with_(changed=BitMap(range(draft.chunks)))
        return draft

    def _place(self, volume: str) -> str:
        """``HOST_ID/VOLUME_ID``: where this host keeps ``volume``'s generations (and what
        their manifests are sealed to: one moved to another place does not open)."""
        return f"{self._host}/{self._key.volume_id(volume)}"

    def _seal_manifest(self, manifest: Manifest) -> bytes:
        place = self._place(manifest.volume.name)
        aad = BlobAAD("manifest", place, manifest.generation_id)
        return seal_blob(self._blob_key, aad, manifest.to_json())

    def generations(self, volume: str | None = None) -> list[Manifest]:
        return manifests_of(self.scan(volume))

    def scan(self, volume: str | None = None, *, every_host: bool = False) -> PoolScan:
        """This host's generations (of ``volume``, or of every volume); with
        ``every_host``, those of every host of the bucket (what the garbage collection
        must keep), ``volume`` ignored."""
        prefix = f"{SNAPSHOT_PREFIX}{self._host}/"
        if every_host:
            prefix = SNAPSHOT_PREFIX
        elif volume is not None:
            self._names[self._key.volume_id(volume)] = volume
            prefix = f"{SNAPSHOT_PREFIX}{self._place(volume)}/"
        good: list[Manifest] = []
        damaged: list[DamagedGeneration] = []
        for info in self.store.list(prefix):
            place, _, gid = info.key[len(SNAPSHOT_PREFIX) :].rpartition("/")
            vid = place.rpartition("/")[2]
            try:
                manifest = self._manifest_of(info.key, place, gid)
            except NotFound:
                # Removed since the listing (a retention of its host): not there.
                continue
            except DataError as exc:
                log.error("pool %s: generation %s: %s", self.name, info.key, exc)
                damaged.append(
                    DamagedGeneration(
                        self._volume_name(vid),
                        gid or info.key,
                        f"its manifest does not open: {exc}",
                    )
                )
                continue
            self._names[vid] = manifest.volume.name
            good.append(manifest)
        good.sort(key=lambda m: (m.created, m.generation_id))
        damaged.sort(key=lambda d: d.generation_id)
        return PoolScan(good, damaged)

    def _manifest_of(self, key: str, place: str, gid: str) -> Manifest:
        """The manifest stored as ``key`` (at ``place``, ``HOST_ID/VOLUME_ID``), opened
        and checked against its key.

        :raises DataError: it does not open, or is not the generation its key names.
        """
        with self._lock:
            known = self._manifests.get(key)
        if known is not None:
            return known
        host, _, vid = place.partition("/")
        if not host or not vid or "/" in vid or not gid:
            raise CorruptMetadata(
                what=f"object {key}", detail="its key is not HOST_ID/VOLUME_ID/ID"
            )
        plain = open_blob(self._blob_key, BlobAAD("manifest", place, gid), self.store.get(key))
        manifest = Manifest.from_json(plain, f"manifest {key}")
        if manifest.generation_id != gid or self._key.volume_id(manifest.volume.name) != vid:
            raise CorruptMetadata(what=f"manifest {key}", detail="it names another generation")
        slots_of(manifest)
        with self._lock:
            self._manifests[key] = manifest
        return manifest

    def _volume_name(self, vid: str) -> str:
        if vid not in self._names and self._volume_names is not None:
            for name in self._volume_names():
                self._names.setdefault(self._key.volume_id(name), name)
        name = self._names.get(vid)
        return name if name is not None else f"unknown volume (id {vid})"

    def open_generation(self, manifest: Manifest) -> GenerationReader:
        return S3GenerationReader(manifest, self.store, self.index, self._pack_key)

    def remove_generation(self, volume: str, generation_id: str) -> FreedGeneration:
        target = self._removable(volume, generation_id)
        key = manifest_key(self._place(volume), generation_id)
        self.store.delete(key)
        with self._lock:
            self._manifests.pop(key, None)
        return FreedGeneration(generation_id, target.kind.value, target.bytes_stored)

    def swap_in(self, full: Manifest, label: str) -> SwapInVolume:
        raise EnvironmentProblem(
            detail=f"pool {self.name} is in object store {self.store.target}: a generation "
            "there is restored by copy, never swapped in"
        )

    def record_dirs(self) -> list[Path]:
        # Volume records in the store are not built yet (the engine step).
        return []
