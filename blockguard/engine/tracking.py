"""Change tracking of one protected volume, tied to the generations it describes.

(One thing at ~430 lines: a volume's tracker tied to its generations, and its backend choice.)

Each volume has a :class:`~blockguard.storage.tracking.ChangeTracker` (thin for LVM thin
volumes, era for other block devices when device-mapper is available, scan otherwise) in
``STATE_DIR/volumes/NAME/tracker``, and ``roles.json`` beside it saying which tracker
reference stands for which generation: ``last-backup`` (the newest generation) and
``last-full`` (the newest full). The roles file is written after the pool committed the
generation and after the tracker holds the new reference, so after a crash anywhere a
role either still names the generation its reference describes, or it names an older one
than the pool's newest — then the role is not trusted and the next backup is a full.

Era tracking keeps its metadata on an LV of the volume's lvm pool (see ``poolspace``);
with a ``dir`` pool it is not offered (scan is chosen instead, and asking for era is
refused). A backup's point in time is a copy from :mod:`blockguard.storage.snapshot`
(:meth:`VolumeTracking.begin_point`); table swaps run under the runner's exclusive
section (see ``cmdguard``).
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from blockguard.core import vocab
from blockguard.core.vocab import TrackingKind
from blockguard.engine.cmdguard import exclusive
from blockguard.errors import (
    BlockguardError,
    CorruptMetadata,
    EnvironmentProblem,
    InvalidInput,
    MetadataSnapshotBusy,
    NotFound,
)
from blockguard.storage import dm
from blockguard.storage import snapshot as pit
from blockguard.storage.blockdev import device_rdev, sync_written, write_count
from blockguard.storage.dm import DeviceMapper
from blockguard.storage.lvm import Lvm
from blockguard.storage.manifest import write_atomic
from blockguard.storage.runner import Runner
from blockguard.storage.tracking import ChangeSet, ChangeTracker, ChunkHashes
from blockguard.storage.tracking.scan import ScanTracker

log = logging.getLogger(__name__)

#: Held while a thin pool's metadata snapshot is reserved (see change_sets).
_THIN_METADATA = threading.Lock()
ROLES_FILE = "roles.json"
LAST_BACKUP = "last-backup"
LAST_FULL = "last-full"


def dm_targets(cmd: Runner) -> set[str]:
    """The device-mapper targets the kernel offers (empty without device-mapper)."""
    if not dm.driver_loaded():
        return set()
    try:
        return DeviceMapper(cmd).targets()
    except BlockguardError:
        return set()


def _thin_lv(device: str, cmd: Runner) -> tuple[str, str] | None:
    """``(vg, lv)`` if ``device`` is an LVM thin volume."""
    try:
        rows = Lvm(cmd).lvs("vg_name,lv_name,segtype", device, check=False)
    except BlockguardError:
        return None
    if rows is not None and len(rows) == 1 and len(rows[0]) == 3 and rows[0][2] == "thin":
        return rows[0][0], rows[0][1]
    return None


def choose_backend(device: str, asked: str | None, cmd: Runner, era_space: bool = True) -> str:
    """The tracking backend for ``device``: as asked, or thin > era > scan by availability.

    :param era_space: the volume's pool can hold dm-era metadata (an lvm pool); without
        it era is refused when asked and not chosen by itself.
    :raises InvalidInput: an unknown backend.
    :raises EnvironmentProblem: era or thin asked where device-mapper cannot provide it.
    """
    if asked is not None:
        vocab.check_choice("tracking backend", asked, vocab.TRACKING_BACKENDS)
    if asked == TrackingKind.SCAN:
        return asked
    targets = dm_targets(cmd)
    if asked == TrackingKind.ERA and "era" not in targets:
        raise EnvironmentProblem(
            detail="the era tracking backend needs device-mapper with the era target, "
            "which this kernel does not offer; use scan"
        )
    if asked == TrackingKind.ERA and not era_space:
        raise EnvironmentProblem(
            detail="era tracking keeps its metadata on an lvm pool, and the volume's pool "
            "is not one: use scan, or create an lvm pool first"
        )
    if asked == TrackingKind.THIN and _thin_lv(device, cmd) is None:
        raise InvalidInput(detail=f"{device} is not an LVM thin volume: thin tracking needs one")
    if asked is not None:
        return asked
    if "thin" in targets and _thin_lv(device, cmd) is not None:
        return "thin"
    return "era" if "era" in targets and era_space else "scan"


@dataclass(frozen=True)
class Role:
    """A tracker reference and the generation (pool id) whose content it describes."""

    ref: str
    generation: str


@dataclass
class PointInTime:
    """What a backup reads, and the tracker reference it becomes once committed.

    :ivar copy: the point-in-time copy ``source`` belongs to (None: the live volume,
        where device-mapper cannot make one).
    """

    source: str
    ref: str
    copy: pit.PointInTime | None = None


class VolumeTracking:
    """A volume's tracker and its roles (see the module docstring).

    :param directory: ``STATE_DIR/volumes/NAME``.
    :param tracker: the opened tracker.
    """

    def __init__(self, directory: Path, tracker: ChangeTracker, cmd: Runner) -> None:
        self.directory = directory
        self.tracker = tracker
        self.cmd = cmd
        self._reading = threading.Lock()
        #: reference -> its change set at the last poll that could read it (thin)
        self._polled: dict[str, ChangeSet] = {}
        #: reference -> its change set as a backup of ours just read it (thin)
        self._at_point: dict[str, ChangeSet] = {}
        #: the answer of the first poll after a committed backup (thin; see commit_point)
        self._after_backup: dict[str, ChangeSet] = {}
        #: the running backup's plan checked the tracker's state (see commit_point)
        self._checked_at_point = False
        #: a committed backup checked the thin tracker's LVs (see commit_point)
        self._checked_by_backup = False
        #: the volume's write count (blockdev.write_count) when the newest committed
        #: point was taken, and the running backup's (thin; see may_be_unchanged)
        self._writes_at_ref: int | None = None
        self._writes_at_point: int | None = None

    @property
    def backend(self) -> str:
        return self.tracker.backend

    # --- creating and opening ------------------------------------------------------

    @classmethod
    def create(
        cls,
        directory: Path,
        device: str,
        backend: str,
        chunk_size: int,
        cmd: Runner,
        era_metadata: str | None = None,
    ) -> VolumeTracking:
        """Start tracking ``device`` (nothing has to be undone if this raises)."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        state = directory / "tracker"
        tracker: ChangeTracker
        if backend == TrackingKind.SCAN:
            tracker = ScanTracker(device, state, chunk_size)
        elif backend == TrackingKind.ERA:
            from blockguard.storage.tracking.era import EraTracker

            if era_metadata is None:
                raise EnvironmentProblem(detail="era tracking needs metadata space on the pool")
            with exclusive(cmd):
                tracker = EraTracker.protect(
                    device, era_metadata, state, chunk_size, name=directory.name, runner=cmd
                )
        else:
            from blockguard.storage.tracking.thin import ThinTracker

            vg_lv = _thin_lv(device, cmd)
            if vg_lv is None:
                raise InvalidInput(detail=f"{device} is not an LVM thin volume")
            tracker = ThinTracker.protect(vg_lv[0], vg_lv[1], state, chunk_size, runner=cmd)
        tracking = cls(directory, tracker, cmd)
        tracking.save_roles({})
        return tracking

    @classmethod
    def open(
        cls, directory: Path, device: str, backend: str, chunk_size: int, cmd: Runner
    ) -> VolumeTracking:
        """Continue tracking after a daemon restart; references no role names are dropped
        (a crash between a tracker update and the roles file leaves such orphans)."""
        state = directory / "tracker"
        tracker: ChangeTracker
        if backend == TrackingKind.SCAN:
            tracker = ScanTracker(device, state, chunk_size)
        elif backend == TrackingKind.ERA:
            from blockguard.storage.tracking.era import EraTracker

            with exclusive(cmd):
                tracker = EraTracker.open(state, cmd)
                _resume_if_suspended(tracker.device, cmd)
        elif backend == TrackingKind.THIN:
            from blockguard.storage.tracking.thin import ThinTracker

            tracker = ThinTracker.open(state, cmd)
        else:
            raise CorruptMetadata(what=f"volume state {directory}", detail=f"backend {backend}")
        tracking = cls(directory, tracker, cmd)
        tracking.drop_orphans()
        return tracking

    def remove(self) -> None:
        """Stop tracking and delete the state (dm devices of era are taken away).

        A thin tracker's reference snapshots go first, each by the exact name its state
        saved (the state is their only record); one that cannot be removed is named in
        a warning, as it stays in the volume group once the state is gone."""
        if self.backend == TrackingKind.THIN:
            for ref in self.tracker.references():
                try:
                    self.tracker.drop_reference(ref, later=True)  # type: ignore[call-arg]
                except BlockguardError as exc:
                    log.warning("dropping reference %s: %s", ref, exc)
        self.tidy()  # the snapshots a backup doomed go with the state that names them
        left = self.tracker.doomed() if hasattr(self.tracker, "doomed") else []
        if left:
            log.warning(
                "snapshots of %s stay behind (remove by hand: lvremove %s)",
                self.directory.name,
                " ".join(left),
            )
        detach = getattr(self.tracker, "detach", None)
        if detach is not None:
            try:
                with exclusive(self.cmd):
                    detach()
            except BlockguardError as exc:
                log.warning("detaching the tracker of %s: %s", self.directory.name, exc)
        shutil.rmtree(self.directory, ignore_errors=True)

    # --- roles ----------------------------------------------------------------------

    def roles(self) -> dict[str, Role]:
        path = self.directory / ROLES_FILE
        try:
            doc = json.loads(path.read_text())
            return {k: Role(v["ref"], v["generation"]) for k, v in doc["roles"].items()}
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError) as exc:
            log.error("roles of %s are unreadable (%s): a full backup follows", path, exc)
            return {}

    def save_roles(self, roles: dict[str, Role]) -> None:
        doc = {"format": 1, "roles": {k: vars(v) for k, v in sorted(roles.items())}}
        write_atomic(self.directory / ROLES_FILE, json.dumps(doc, indent=1).encode())

    def drop_orphans(self, *, later: bool = False) -> None:
        """Drop the references no role names.

        :param later: a thin reference's snapshot is only doomed, removed by :meth:`tidy`.
        """
        used = {r.ref for r in self.roles().values()}
        later = later and self.backend == TrackingKind.THIN
        for ref in self.tracker.references():
            if ref not in used:
                try:
                    if later:
                        self.tracker.drop_reference(ref, later=True)  # type: ignore[call-arg]
                    else:
                        self.tracker.drop_reference(ref)
                except BlockguardError as exc:
                    log.warning("dropping reference %s: %s", ref, exc)

    def tidy(self) -> None:
        """What a backup left for after it reported: the removal of the thin snapshots
        no reference needs (an ``lvremove`` each, 0.4-0.7 s under TCG). Their names are
        saved in the tracker's state, so a crash before this only delays it to the next
        call or start. Nothing for the other backends; errors are logged."""
        remove = getattr(self.tracker, "remove_doomed", None)
        if remove is None:
            return
        try:
            remove()
        except BlockguardError as exc:
            log.warning("removing the old snapshots of %s: %s", self.directory.name, exc)

    def trusted(self, newest: str | None, newest_full: str | None) -> tuple[dict[str, str], str]:
        """Role -> reference for the roles that describe the pool's newest generations.

        :returns: the trusted roles and, if one is not, why (for TrackingLost).
        """
        roles = self.roles()
        refs = set(self.tracker.references())
        trusted: dict[str, str] = {}
        problems = []
        for role, want in ((LAST_BACKUP, newest), (LAST_FULL, newest_full)):
            have = roles.get(role)
            if want is None:
                continue
            if have is None or have.ref not in refs:
                problems.append(f"no tracker reference for {role} ({want})")
            elif have.generation != want:
                problems.append(
                    f"{role} reference describes generation {have.generation}, "
                    f"the pool's is {want} (interrupted backup)"
                )
            else:
                trusted[role] = have.ref
        checked, self._checked_by_backup = self._checked_by_backup, False
        if not checked:
            self._checked_at_point = True  # for commit_point: this look asked LVM
        state = self.tracker.state(recheck=False) if checked else self.tracker.state()  # type: ignore[call-arg]
        if not state.is_exact:
            problems.append(state.reason)
            trusted = {}
        return trusted, "; ".join(problems)

    def change_sets(self, refs: dict[str, str], source: str | None = None) -> dict[str, ChangeSet]:
        """Role -> chunks changed since its reference (one read for the scan backend).

        :param source: a backup's point-in-time copy: the scan backend compares *its*
            content (the copy is what the backup reads); era and thin answer for the live
            volume, a superset of the changes up to the copy.
        """
        if not refs:  # nothing is trusted: no reference to ask about, and no read to do
            return {}
        tracker = self.tracker
        if source is not None and isinstance(tracker, ScanTracker) and source != tracker.volume:
            tracker = ScanTracker(source, tracker.state_dir, tracker.chunk_size)
        # dm holds one metadata snapshot at a time: per era device, and per thin pool (which
        # thin volumes share); a second reservation fails with EBUSY.
        names = sorted(set(refs.values()))
        if self.backend != TrackingKind.THIN:
            with self._reading:
                by_ref = tracker.changed_many(names)
        elif source is None:
            by_ref = self._poll_thin(names)
        else:
            with _THIN_METADATA:
                by_ref = tracker.changed_many(names)
            self._at_point = dict(by_ref)
        return {role: by_ref[ref] for role, ref in refs.items()}

    def listen(self) -> None:
        """What a poll of a thin tracker must do first and may take seconds (listening for
        another user of the pool's metadata snapshot): call it holding no lock. Nothing
        for the other backends."""
        listen = getattr(self.tracker, "listen", None)
        if listen is None:
            return
        try:
            listen()
        except BlockguardError as exc:
            log.debug("listening before a poll of %s: %s", self.directory.name, exc)

    def _poll_thin(self, names: list[str]) -> dict[str, ChangeSet]:
        """A poll of a thin tracker (no backup waits for it): when another process holds
        the pool's metadata snapshot, or a backup of ours waits for it, the poll is
        skipped and the sets of the last poll stand (empty for a reference made since:
        a backup just copied everything up to it). The numbers are an estimate for the
        status and the changed-bytes trigger; a backup always reads exact sets."""
        tracker = self.tracker
        after, self._after_backup = self._after_backup, {}
        if names and all(n in after for n in names):
            self._polled = {n: after[n] for n in names}
            return dict(self._polled)
        try:
            if not _THIN_METADATA.acquire(blocking=False):
                raise MetadataSnapshotBusy(pool=f"of {tracker.volume}", waited=" (by a backup)")
            try:
                by_ref = tracker.changed_many(names, poll=True)  # type: ignore[call-arg]
            finally:
                _THIN_METADATA.release()
        except MetadataSnapshotBusy as exc:
            log.debug("poll of %s skipped: %s", self.directory.name, exc)
            size: int = tracker.volume_size  # type: ignore[attr-defined]
            return {n: self._polled.get(n) or ChangeSet(tracker.chunk_size, size) for n in names}
        self._polled = dict(by_ref)
        return by_ref

    # --- a backup's point in time ----------------------------------------------------

    def begin_point(
        self, device: str, serial: int, cow: Callable[[int], pit.CowStore] | None, cow_size: int
    ) -> PointInTime:
        """Start a backup: a point-in-time copy to read, and the reference it becomes.

        thin: a thin snapshot taken now (it is the reference). era: a dm-snapshot under
        the era device, taken while it is suspended (the resume starts the reference
        era). scan: a dm-snapshot of a dm volume of linear segments; any other device
        is read live (no snapshot without device-mapper: the content is consistent only
        if nobody writes during the backup). Exception stores come from ``cow`` (pool
        space, ``cow_size`` bytes); without one, an era volume cannot be backed up.

        :raises EnvironmentProblem: era tracking with no exception store to be had.
        """
        ref = f"b{serial}"
        self._checked_by_backup = self._checked_at_point = False
        if self.backend == TrackingKind.THIN:
            copy: pit.PointInTime = pit.ThinPointInTime(self.tracker, ref)  # type: ignore[arg-type]
            # Counted after the snapshot: the writes of its frozen file system are in it.
            self._writes_at_point = _write_count(device)
            return PointInTime(copy.source, ref, copy)
        if self.backend == TrackingKind.ERA:
            if cow is None:
                raise EnvironmentProblem(
                    detail="a point-in-time copy of an era-tracked volume needs an exception "
                    "store on an lvm pool"
                )
            era = self.tracker
            store = cow(cow_size)
            with exclusive(self.cmd):
                copy = pit.DmSnapshotPointInTime(
                    era.device,  # type: ignore[attr-defined]
                    store,
                    tracker=era,  # type: ignore[arg-type]
                    name=ref,
                    runner=self.cmd,
                )
            return PointInTime(copy.source, ref, copy)
        if cow is not None and _linear_dm(device, self.cmd):
            store = cow(cow_size)
            with exclusive(self.cmd):
                copy = pit.DmSnapshotPointInTime(device, store, runner=self.cmd)
            return PointInTime(copy.source, ref, copy)
        return PointInTime(device, ref)

    # --- a backup that finds nothing changed (thin) -----------------------------------

    def may_be_unchanged(self, device: str) -> bool:
        """Whether a backup should first ask if the volume changed at all since the
        newest committed point (:meth:`begin_unchanged`): thin tracking only, and only
        when the kernel counted no write or discard on the volume since that point was
        taken (unknown after a restart: then it asks). A hint that saves the question
        where the answer is surely "changed"; the answer itself is thin_delta's."""
        if self.backend != TrackingKind.THIN:
            return False
        return self._writes_at_ref is None or _write_count(device) == self._writes_at_ref

    def begin_unchanged(self, device: str) -> None:
        """Before the question of :meth:`may_be_unchanged`: what the volume's file systems
        and page cache hold is written onto it (the snapshot's suspend would freeze them),
        so that the question is asked of everything written before now. The caller then
        takes the change sets against the live volume (:meth:`change_sets` with ``source``
        the volume): when the one of the last backup is empty, :meth:`unchanged_point`
        is this backup's point; otherwise nothing is left to undo.

        :raises DeviceIOError: the write-back failed.
        """
        self._checked_by_backup = self._checked_at_point = False
        self._writes_at_point = _write_count(device)
        sync_written(device)

    def unchanged_point(self, device: str) -> PointInTime:
        """The point of a backup that found no chunk changed since the last backup's
        reference (on a metadata snapshot of the pool taken after :meth:`begin_unchanged`):
        the volume then was that reference's content, so the reference describes the new
        (empty incremental) generation as well and stays; no snapshot is taken or removed.
        Nothing is read from ``device``."""
        return PointInTime(device, self.roles()[LAST_BACKUP].ref)

    def commit_point(
        self, point: PointInTime, generation: str, full: bool, hashes: ChunkHashes | None
    ) -> None:
        """After the pool committed ``generation`` (and the copy was committed, which for
        era made the point's era the reference): the point becomes its reference."""
        if self.backend == TrackingKind.SCAN:
            scan: ScanTracker = self.tracker  # type: ignore[assignment]
            if hashes is not None:
                scan.add_reference(point.ref, replace=True, hashes=hashes)
            else:
                scan.add_reference(point.ref, replace=True, source=point.source)
        elif self.backend == TrackingKind.ERA and point.copy is None:
            self.tracker.commit_reference(point.ref, replace=True)  # type: ignore[attr-defined]
        roles = self.roles()
        roles[LAST_BACKUP] = Role(point.ref, generation)
        if full:
            roles[LAST_FULL] = Role(point.ref, generation)
        self.save_roles(roles)
        # The snapshot of the reference the new one replaces is removed after the job
        # reported (tidy): its lvremove is no part of the backup.
        self.drop_orphans(later=True)
        if self.backend == TrackingKind.THIN:
            # The refresh that follows the backup polls every role: its answer is known
            # without a second reservation and thin_delta. The point's reference has
            # the changes since the point (the backup copied everything up to it: none,
            # give or take writes during the copy, as a skipped poll says); an older
            # reference kept by a role has the set the backup just read. An estimate,
            # as every poll is; the next poll reads the pool again and no backup uses it.
            size: int = self.tracker.volume_size  # type: ignore[attr-defined]
            known = {point.ref: ChangeSet(self.tracker.chunk_size, size), **self._at_point}
            self._after_backup = {r.ref: known[r.ref] for r in roles.values() if r.ref in known}
            # The same refresh asks whether the volume and the reference snapshots are
            # there: this backup's plan asked LVM before the copy (an lvs, 0.3-0.9 s
            # under TCG), and since then only this tracker made and removed snapshots.
            # Used once, by the next look (the refresh that follows); a new backup clears it.
            self._checked_by_backup = self._checked_at_point
            self._writes_at_ref = self._writes_at_point
        self._at_point = {}

    def end_point(self, point: PointInTime) -> None:
        """Release the copy (always, committed or not): the volume gets its table back."""
        if point.copy is not None:
            with exclusive(self.cmd):
                point.copy.release()

    def abort_point(self, point: PointInTime) -> None:
        """After a failed backup: release the copy and drop the reference it would be."""
        self._at_point = {}
        try:
            self.end_point(point)
        finally:
            if point.ref in self.tracker.references() and point.ref not in {
                r.ref for r in self.roles().values()
            }:
                try:
                    self.tracker.drop_reference(point.ref)
                except (BlockguardError, NotFound) as exc:
                    log.warning("dropping reference %s: %s", point.ref, exc)

    def stored_hashes(self, ref: str) -> ChunkHashes | None:
        """The content hashes of a scan reference (None for other backends)."""
        if isinstance(self.tracker, ScanTracker):
            return self.tracker.stored_hashes(ref)
        return None


def _write_count(device: str) -> int | None:
    try:
        return write_count(device_rdev(device))
    except BlockguardError:
        return None


def _linear_dm(device: str, cmd: Runner) -> bool:
    """``device`` is a dm device of linear or striped segments only (an LVM thick LV):
    its table can be moved under a snapshot-origin."""
    dm = DeviceMapper(cmd)
    try:
        name = dm.name_of(device_rdev(device))
        if name is None:
            return False
        table = dm.table(name)
    except BlockguardError:
        return False
    kinds = {line.split()[2] for line in table.splitlines() if len(line.split()) > 2}
    return bool(kinds) and kinds <= {"linear", "striped"}


def _resume_if_suspended(device: str, cmd: Runner) -> None:
    """A daemon killed between a suspend and its resume leaves the volume suspended
    (writers hang): resume it. The new era it starts only adds changes."""
    dm = DeviceMapper(cmd)
    name = dm.name_of(device_rdev(device))
    info = None if name is None else dm.info(name)
    if info is not None and info.suspended:
        log.warning("resuming %s, left suspended by an interrupted backup", name)
        dm.resume(info.name)
