"""A pool on a backup target over SSH: the protected host's generation store there
(issue 11, docs/design/remote.md, "The store interface").

The target keeps opaque bytes: sealed packs and a sealed manifest per generation, under
the key ``VOLUME_ID@GENERATION_ID`` (the volume id is an HMAC of the name: the target
never learns a volume's name). Everything is sealed and opened here with the master key,
which never leaves this host. The target is the source of truth: :meth:`RemotePool.scan`
lists what it committed and opens each manifest; one that fails to open is reported
damaged, never dropped.

It is built from plain values (a session factory, the key, the names), not from a
catalog: registration (``target add``) is the engine's and makes the factory.

A transfer cut by the link keeps what the target stored: the next writer of the same
generation spec (the same volume, kind, references and changed set) on this pool object
resumes it on a new session, sending only the packs the target lacks.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyroaring import BitMap

from blockguard.errors import (
    AlreadyExists,
    CorruptMetadata,
    DataError,
    EnvironmentProblem,
    WireCorrupt,
)
from blockguard.storage.manifest import (
    Manifest,
    check_component,
    generation_clock,
    generation_id_time,
    new_generation_id,
    sequence_numbers,
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
from blockguard.storage.remote.packvalues import GenerationState
from blockguard.storage.remote.remotegen import (
    PackLayout,
    RemoteGenerationReader,
    RemoteGenerationWriter,
    generation_key,
)
from blockguard.storage.remote.seal import BlobAAD, open_blob, seal_blob
from blockguard.storage.remote.session import RemoteGeneration, RemoteSession
from blockguard.storage.remote.synthgen import (
    SynthesizedFullWriter,
    can_synthesize_from,
    pack_origins,
)

if TYPE_CHECKING:
    from blockguard.storage.pool.registration import DiskAdmission

log = logging.getLogger(__name__)

#: What a generation's ``meta`` on the target says (plain text there: nothing secret).
META_FORMAT = 1

SessionFactory = Callable[[], RemoteSession]


class RemotePool(PoolBackend):
    """The generations of this host on one target area.

    :param name: the pool's name here.
    :param sessions: makes a new session with the target (``RemoteSession.connect``
        with the registered address and keys); called again after the link broke.
    :param key: the master key (sub-keys seal the packs, manifests and volume ids).
    :param target: the target's id here (named in devices and errors).
    :param area: the pool's name on the target (the client's area there).
    :param volume_names: the names of the volumes the caller knows (the engine: its
        catalog's), asked only to name a generation whose manifest does not open by its
        volume instead of the volume id the target knows it by.
    """

    kind = "remote"

    def __init__(
        self,
        name: str,
        sessions: SessionFactory,
        key: MasterKey,
        *,
        target: str,
        area: str,
        alert: AlertCallback | None = None,
        volume_names: Callable[[], Iterable[str]] | None = None,
    ) -> None:
        super().__init__(name, alert)
        self.target = target
        self.area = area
        self._volume_names = volume_names
        #: Volume id -> name, of every manifest this pool opened (and names it was asked).
        self._names: dict[str, str] = {}
        self._sessions = sessions
        self._key = key
        self._blob_key = key.blob_key()
        self._session: RemoteSession | None = None
        self._lock = threading.RLock()
        self._open_drafts: dict[tuple[Any, ...], Manifest] = {}
        #: Specs of :meth:`expect_resume`: which packs their cut writer linked is unknown.
        self._unknown_links: set[tuple[Any, ...]] = set()
        #: What this pool knows of a volume's generations there (volume id -> its last
        #: scan, with this pool's own commits and removals since): a backup takes its
        #: sequence number and synthesis source from it instead of listing and opening
        #: every manifest of the volume each time. Every scan refreshes it (the target
        #: stays the source of truth for what is listed, retained and damaged).
        self._known: dict[str, PoolScan] = {}
        #: False once the target turned out to predate ``link`` (protocol version 1).
        self._can_link = True
        #: The writer begun last: what it sent, for the transfer's result and the link row.
        self.last_writer: RemoteGenerationWriter | None = None

    @property  # type: ignore[override]  # per target, not per class
    def can_clone_full(self) -> bool:
        """True while the target links packs (a full is then synthesized there from the
        previous full and the changed packs; an older target lacks ``link``)."""
        return self._can_link

    # --- the session ----------------------------------------------------------------------

    def call(self, fn: Callable[[RemoteSession], Any]) -> Any:
        """Run ``fn`` on the session (made on first use and after a broken link); one
        caller at a time."""
        with self._lock:
            if self._session is None or not self._session.alive:
                self._session = self._sessions()
            session = self._session
            try:
                return fn(session)
            finally:
                if not session.alive:
                    self._session = None

    def close(self) -> None:
        with self._lock:
            if self._session is not None and self._session.alive:
                self._session.close()
            self._session = None

    # --- devices and space ----------------------------------------------------------------

    def devices(self) -> list[PoolDevice]:
        space = self.call(lambda s: s.space())
        return [PoolDevice(f"{self.target}:{self.area}", "", space.total, self.area)]

    def add_device(self, path: str, admission: DiskAdmission | None = None) -> PoolDevice:
        raise EnvironmentProblem(
            detail=f"pool {self.name} is on target {self.target}: the target allocates its "
            f"space, no disk {path} can be added here"
        )

    def capacity(self) -> PoolCapacity:
        space = self.call(lambda s: s.space())
        return PoolCapacity(space.total, max(0, space.total - space.free), space.free)

    # --- generations ------------------------------------------------------------------------

    def begin_generation(self, spec: GenerationSpec) -> GenerationWriter:
        volume = spec.volume
        vid = self._key.volume_id(volume.name)
        spec_key = _spec_key(spec)
        previous = self._synthesis_source(spec, vid)
        draft = self._open_drafts.get(spec_key)
        meta = {"format": META_FORMAT, "volume": vid}
        stored = None
        if draft is not None:
            # A resume (or an id the caller named): the layout follows today's source.
            cut = draft
            draft = self._draft(spec, cut.generation_id, previous)
            self._open_drafts[spec_key] = draft
            key = generation_key(vid, draft.generation_id)
            try:
                stored = self.call(lambda s: s.begin(key, meta))
                stored = self._without_stale_links(spec, vid, cut, draft, stored)
            except AlreadyExists:
                # The cut came after its commit point: that one is committed, this
                # writer makes a new generation (numbered after it: list again).
                self._open_drafts.pop(spec_key, None)
                self._known.pop(vid, None)
                draft = None
        if draft is None:
            draft = self._draft(spec, previous=previous)
            stores = len(draft.changed)
            if previous is not None:
                # Every pack not linked is sent whole, however few of its chunks changed.
                layout = PackLayout.of(draft, vid)
                stores = min(stores, (layout.data_packs - len(layout.origins)) * layout.pack_chunks)
            needed = self.estimate_bytes(volume, stores, spec.chunk_size)
            key = generation_key(vid, draft.generation_id)
            stored = self.call(lambda s: s.begin(key, meta, needed))
            self._open_drafts[spec_key] = draft
        assert stored is not None

        def finished(done: bool, committed: Manifest | None) -> None:
            if done:
                self._open_drafts.pop(spec_key, None)
            if committed is not None:
                self._remember(vid, committed)
            else:
                # A cut may have come after the target's commit point: ask it next time.
                self._known.pop(vid, None)

        writer_args: dict[str, Any] = {
            "volume_id": vid,
            "pack_key": self._key.pack_key(vid, draft.generation_id),
            "call": self.call,
            "seal_manifest": self._seal_manifest,
            "stored": stored,
            "finished": finished,
        }
        origins = PackLayout.of(draft, vid).origins
        if previous is None or not origins:
            self.last_writer = RemoteGenerationWriter(draft, **writer_args)
            return self.last_writer
        source = generation_key(vid, previous.generation_id)
        linked = self.call(lambda s: s.link(key, source, [(p, p) for p in sorted(origins)]))
        if linked is None:  # the session agreed on the version link needs: cannot be
            raise WireCorrupt(peer=f"target {self.target}", detail="link refused at version 2")
        assert spec.changed is not None
        self.last_writer = SynthesizedFullWriter(
            draft,
            previous=previous,
            changed=spec.changed,
            linked=linked,
            open_previous=lambda: self.open_generation(previous),
            **writer_args,
        )
        return self.last_writer

    def _without_stale_links(
        self,
        spec: GenerationSpec,
        vid: str,
        cut: Manifest,
        draft: Manifest,
        stored: GenerationState,
    ) -> GenerationState:
        """What a resumed writer may take as stored of what the target holds: not a pack
        the cut writer linked from an earlier full that is sealed here now (its source
        full gone since, say). That pack is sealed under another generation's key: the
        same plaintext seals to the same size here, so the writer would take it by its
        size and the commit would refuse it. Left out, it is sent again (``put`` replaces
        the link; the earlier full's own name of the file is not touched)."""
        linked_now = set(PackLayout.of(draft, vid).origins)
        spec_key = _spec_key(spec)
        if spec_key in self._unknown_links:
            # A writer of another pool object (another daemon run): any data pack it may
            # have linked, if it synthesized this full, is suspect.
            self._unknown_links.discard(spec_key)
            maybe = range(PackLayout.of(draft, vid).data_packs) if spec.clone_from else ()
            linked_then = set(maybe)
        else:
            linked_then = set(PackLayout.of(cut, vid).origins)
        stale = (linked_then - linked_now) & set(stored.packs)
        if not stale:
            return stored
        log.info(
            "pool %s: generation %s resumes without the target's source full: packs %s, "
            "linked by the cut transfer, are sent again",
            self.name,
            draft.generation_id,
            sorted(stale),
        )
        packs = {n: size for n, size in stored.packs.items() if n not in stale}
        return GenerationState(stored.generation, stored.committed, packs, stored.meta)

    def _synthesis_source(self, spec: GenerationSpec, vid: str) -> Manifest | None:
        """The previous full a new full ``spec`` is synthesized from on the target: the
        one it names to clone, committed there, of the same chunks; else None (sent whole)."""
        if not (spec.is_full and spec.clone_from and spec.changed is not None and self._can_link):
            return None
        if not self.call(lambda s: s.can_link):
            # An older target (protocol 1): this full, and every later one, is sent whole.
            log.warning(
                "pool %s: target %s cannot link packs: fulls are sent whole", self.name, self.target
            )
            self._can_link = False
            return None
        for manifest in self._known_scan(spec.volume.name).manifests:
            if manifest.generation_id == spec.clone_from:
                if can_synthesize_from(manifest, vid, spec.chunk_size, spec.volume.size):
                    return manifest
                break
        log.info(
            "pool %s: full %s is not there to synthesize from: the full is sent whole",
            self.name,
            spec.clone_from,
        )
        return None

    def expect_resume(self, spec: GenerationSpec, generation_id: str) -> None:
        """Let the next writer of ``spec`` continue ``generation_id``, which a cut left
        open on the target (the caller kept its id, e.g. across a restart of this host's
        daemon; within one pool object this happens by itself).

        The data must be the same as the cut writer's (the same point-in-time copy): a
        pack that differs is re-sent, and one that differs at the same size makes the
        target refuse the commit (``DataError``), never commits wrong data.
        """
        check_component(generation_id, "generation id")
        self._open_drafts[_spec_key(spec)] = self._draft(spec, generation_id)
        self._unknown_links.add(_spec_key(spec))

    def _draft(
        self,
        spec: GenerationSpec,
        generation_id: str | None = None,
        previous: Manifest | None = None,
    ) -> Manifest:
        """The manifest to be; a full synthesized from ``previous`` takes from it every
        data pack no changed chunk falls in (its ``origins``)."""
        volume, chunk_size = spec.volume, spec.chunk_size
        created = generation_clock()
        if generation_id is not None:
            stamped = generation_id_time(generation_id)
            created = created if stamped is None else stamped
        draft = Manifest(
            generation_id=generation_id or new_generation_id(created),
            volume=volume,
            chunk_size=chunk_size,
            kind=spec.kind,
            base_id=None if spec.is_full else spec.base_id,
            parent_id=None if spec.is_full else spec.parent_id,
            changed=BitMap() if spec.changed is None else BitMap(spec.changed),
            created=created,
            sequence=self.next_sequence(volume.name),
        )
        origins: dict[int, str] = {}
        if draft.is_full:
            # A full holds every chunk, also a synthesized one (some in earlier packs).
            draft = draft.with_(changed=BitMap(range(draft.chunks)))
            if previous is not None and spec.changed is not None:
                origins = pack_origins(previous, self._key.volume_id(volume.name), spec.changed)
        slots = len(draft.changed)
        return draft.with_(storage=PackLayout.new_storage(chunk_size, slots, origins))

    def next_sequence(self, volume: str) -> int:
        # From what this pool knows (no listing per backup), as the base class counts.
        found = self._known_scan(volume)
        readable = found.manifests + [d.manifest for d in found.damaged if d.manifest]
        return max(sequence_numbers(readable).values(), default=0) + 1

    def _known_scan(self, volume: str) -> PoolScan:
        """The generations of ``volume`` as this pool knows them; listed when it knows
        nothing of the volume yet."""
        found = self._known.get(self._key.volume_id(volume))
        return self.scan(volume) if found is None else found

    def _remember(self, vid: str, committed: Manifest) -> None:
        """Add a generation this pool committed to what it knows (if it knows the
        volume: else the next backup lists it)."""
        found = self._known.get(vid)
        if found is not None:
            good = [m for m in found.manifests if m.generation_id != committed.generation_id]
            good.append(committed)
            good.sort(key=lambda m: (m.created, m.generation_id))
            self._known[vid] = PoolScan(good, found.damaged)

    def _forget(self, vid: str, generation_id: str) -> None:
        """Drop a generation this pool removed from what it knows."""
        found = self._known.get(vid)
        if found is not None:
            self._known[vid] = PoolScan(
                [m for m in found.manifests if m.generation_id != generation_id],
                [d for d in found.damaged if d.generation_id != generation_id],
            )

    def _seal_manifest(self, manifest: Manifest) -> bytes:
        vid = self._key.volume_id(manifest.volume.name)
        aad = BlobAAD("manifest", vid, manifest.generation_id)
        return seal_blob(self._blob_key, aad, manifest.to_json())

    def generations(self, volume: str | None = None) -> list[Manifest]:
        return manifests_of(self.scan(volume))

    def scan(self, volume: str | None = None) -> PoolScan:
        wanted = None
        if volume is not None:
            wanted = self._key.volume_id(volume)
            self._names[wanted] = volume
        listed: list[RemoteGeneration] = self.call(lambda s: s.list())
        unopened: list[tuple[str, str, str]] = []
        by_volume: dict[str, PoolScan] = {} if wanted is None else {wanted: PoolScan([])}
        for entry in listed:
            vid, _, gid = entry.generation.partition("@")
            if wanted is not None and vid != wanted:
                continue
            found = by_volume.setdefault(vid, PoolScan([]))
            try:
                manifest = self._open_manifest(entry, vid, gid)
            except DataError as exc:
                log.error("pool %s: generation %s: %s", self.name, entry.generation, exc)
                unopened.append((vid, gid, f"its manifest does not open: {exc}"))
                continue
            self._names[vid] = manifest.volume.name
            if entry.problem:
                found_on_use = entry.problem.startswith("marked damaged")
                found.damaged.append(
                    DamagedGeneration(
                        manifest.volume.name, gid, entry.problem, manifest, found_on_use
                    )
                )
            else:
                found.manifests.append(manifest)
        for vid, gid, reason in unopened:
            by_volume[vid].damaged.append(DamagedGeneration(self._volume_name(vid), gid, reason))
        for found in by_volume.values():
            found.manifests.sort(key=lambda m: (m.created, m.generation_id))
            found.damaged.sort(key=lambda d: d.generation_id)
        if wanted is None:
            self._known = by_volume
        else:
            self._known[wanted] = by_volume[wanted]
        good = [m for found in by_volume.values() for m in found.manifests]
        damaged = [d for found in by_volume.values() for d in found.damaged]
        good.sort(key=lambda m: (m.created, m.generation_id))
        damaged.sort(key=lambda d: d.generation_id)
        return PoolScan(good, damaged)

    def _volume_name(self, vid: str) -> str:
        """The name of the volume a target knows by ``vid``, for a generation whose
        manifest does not open: from another of its manifests, or the caller's names;
        else it says the volume is unknown (the id alone would look like a name)."""
        if vid not in self._names and self._volume_names is not None:
            for name in self._volume_names():
                self._names.setdefault(self._key.volume_id(name), name)
        name = self._names.get(vid)
        return name if name is not None else f"unknown volume (id {vid})"

    def _open_manifest(self, entry: RemoteGeneration, vid: str, gid: str) -> Manifest:
        """The manifest of a listed generation, opened and checked against its key.

        :raises DataError: it does not open, or is not the generation its key names.
        """
        if not vid or not gid:
            raise CorruptMetadata(
                what=f"generation {entry.generation}", detail="its key is not VOLUME_ID@ID"
            )
        plain = open_blob(self._blob_key, BlobAAD("manifest", vid, gid), entry.manifest)
        manifest = Manifest.from_json(plain, f"manifest of {entry.generation}")
        if manifest.generation_id != gid or self._key.volume_id(manifest.volume.name) != vid:
            raise CorruptMetadata(
                what=f"manifest of {entry.generation}", detail="it names another generation"
            )
        PackLayout.of(manifest, vid)
        return manifest

    def open_generation(self, manifest: Manifest) -> GenerationReader:
        vid = self._key.volume_id(manifest.volume.name)
        return RemoteGenerationReader(
            manifest,
            PackLayout.of(manifest, vid),
            lambda gid: self._key.pack_key(vid, gid),
            self.call,
        )

    def remove_generation(self, volume: str, generation_id: str) -> FreedGeneration:
        target = self._removable(volume, generation_id)
        vid = self._key.volume_id(volume)
        self.call(lambda s: s.remove(generation_key(vid, generation_id)))
        self._forget(vid, generation_id)
        return FreedGeneration(generation_id, target.kind.value, target.bytes_stored)

    def mark_damaged(
        self, volume: str, generation_id: str, reason: str, chunk: int | None = None
    ) -> bool:
        vid = self._key.volume_id(volume)
        self.call(lambda s: s.mark_damaged(generation_key(vid, generation_id), reason, chunk))
        self._known.pop(vid, None)
        return True

    def swap_in(self, full: Manifest, label: str) -> SwapInVolume:
        raise EnvironmentProblem(
            detail=f"pool {self.name} is on target {self.target}: a generation there is "
            "restored by copy, never swapped in"
        )

    def record_dirs(self) -> list[Path]:
        # Volume records on a target are not built yet (design, open question 5).
        return []


def _spec_key(spec: GenerationSpec) -> tuple[Any, ...]:
    """What makes a later writer the same generation as one a cut left open: the volume
    (its name, which its id on the target is made of, and its size) and what the
    generation is to hold. Not the volume's device id: a device numbered anew after a
    reboot (``MAJ:MIN``) is the same volume, and its cut transfer resumes."""
    changed = None if spec.changed is None else spec.changed.serialize()
    return (
        spec.volume.name,
        spec.volume.size,
        spec.kind,
        spec.chunk_size,
        changed,
        spec.base_id,
        spec.parent_id,
        spec.clone_from,
    )
