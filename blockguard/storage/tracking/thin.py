"""The thin backend: LVM thin snapshots as reference points, ``thin_delta`` between them.

Each reference point is a thin snapshot of the volume (``bgref-<lv>-<n>``), which
doubles as the point-in-time source a backup copies from. The change set of a reference
is ``thin_delta`` between its snapshot and the live volume, read from a metadata
snapshot of the pool (reserved and released around the call). dm-thin commits its
mappings at least once a second and on every flush, so a poll of the live volume may
trail the last second of writes; a backup never depends on that, because creating its
snapshot commits first and the set it copies is taken against that snapshot.

Only the snapshots some reference still needs are kept. One no reference needs any more
may be removed later (``drop_reference(later=True)``, then :meth:`ThinTracker.remove_doomed`):
its exact name is saved in the state first, so a removal a crash cut short is done when
the state is opened again; snapshots are only ever removed by the names saved there. A
snapshot is refused (clear error, nothing created) when the pool's data or metadata use
is above a limit.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

from blockguard.errors import (
    AlreadyExists,
    BlockguardError,
    CorruptMetadata,
    EnvironmentProblem,
    InvalidInput,
    MetadataSnapshotBusy,
    NotFound,
    TrackingLost,
)
from blockguard.storage.blockdev import BlockDevice, sysfs_dir
from blockguard.storage.dm import DeviceMapper, thin_delta
from blockguard.storage.lvm import Lvm
from blockguard.storage.manifest import write_atomic
from blockguard.storage.pool.thinspace import parse_thin_status
from blockguard.storage.runner import Runner, default_runner
from blockguard.storage.tracking.base import ChangeSet, TrackerState, validate_reference_name
from blockguard.storage.tracking.kept import KeptReferencesTracker
from blockguard.storage.tracking.thinmeta import MARKER, MetadataSnapshot, listen, recover

log = logging.getLogger(__name__)

#: Refuse a new snapshot above these pool fill levels (percent).
DATA_LIMIT = 90.0
METADATA_LIMIT = 80.0


@dataclass
class _State:
    vg: str
    lv: str
    pool: str
    chunk_size: int
    volume_size: int
    pool_block: int  # bytes per thin-pool data block
    references: dict[str, str] = field(default_factory=dict)  # reference -> snapshot LV
    unknown: dict[str, str] = field(default_factory=dict)
    serial: int = 0
    # Fixed for the life of an LV, so polling needs no lvs call: thin device ids (volume
    # and snapshots, by LV name) and the pool's dm name.
    thin_ids: dict[str, int] = field(default_factory=dict)
    pool_dm: str = ""
    # Snapshot LVs no reference needs, saved before their removal (see remove_doomed).
    doomed: list[str] = field(default_factory=list)
    # The dm uuid of the volume and of each snapshot as made (by LV name): an active LV
    # showing the same one is that LV, with the thin id recorded (see _check_active).
    dm_uuids: dict[str, str] = field(default_factory=dict)


class ThinTracker(KeptReferencesTracker):
    """Change tracking for an LVM thin volume; see the module docstring."""

    backend: ClassVar[str] = "thin"
    cheap_polling: ClassVar[bool] = True

    def __init__(self, state_dir: str | os.PathLike[str], state: _State, runner: Runner) -> None:
        super().__init__(f"/dev/{state.vg}/{state.lv}", state.chunk_size)
        self._dir = Path(state_dir)
        self._s = state
        self._run = runner
        self._lvm = Lvm(runner)
        self._dm = DeviceMapper(runner)
        # remove_doomed may run beside a backup or a poll of this tracker, which change
        # and save the state: it changes nothing in it, it only notes what it removed
        # here, and the next save (or open) takes those names off the doomed list.
        self._gone: set[str] = set()
        self._gone_lock = threading.Lock()
        self._removing = threading.Lock()

    @classmethod
    def protect(
        cls,
        vg: str,
        lv: str,
        state_dir: str | os.PathLike[str],
        chunk_size: int,
        runner: Runner | None = None,
    ) -> ThinTracker:
        """Start tracking thin volume VG/LV.

        :raises InvalidInput: it is not a thin volume.
        """
        run = runner or default_runner()
        if (Path(state_dir) / "thin.json").exists():
            raise AlreadyExists(what="thin tracking state in", name=str(state_dir))
        lvm = Lvm(run)
        info = lvm.lv(vg, lv)
        if info.segtype != "thin":
            raise InvalidInput(detail=f"{vg}/{lv} is not a thin volume (it is {info.segtype})")
        pool_block = int(lvm.lvs("chunk_size", f"{vg}/{info.pool}")[0][0])
        state = _State(vg, lv, info.pool, chunk_size, info.size, pool_block)
        state.thin_ids[lv] = info.thin_id or 0
        state.pool_dm = lvm.lv(vg, info.pool).dm_name
        active = _active_lv(vg, lv)
        if active is not None:
            state.dm_uuids[lv] = active[0]
        tracker = cls(state_dir, state, run)
        tracker._save()
        return tracker

    @classmethod
    def open(cls, state_dir: str | os.PathLike[str], runner: Runner | None = None) -> ThinTracker:
        path = Path(state_dir) / "thin.json"
        try:
            state = _State(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise NotFound(what="thin tracking state in", name=str(state_dir)) from None
        except (ValueError, TypeError) as exc:
            raise CorruptMetadata(what=str(path), detail=str(exc)) from None
        tracker = cls(state_dir, state, runner or default_runner())
        # A previous run killed while it held the pool's metadata snapshot: release it if
        # (and only if) the one held is still ours.
        recover(tracker._dm, tracker._dir / MARKER)
        # ... or before it removed the snapshots it had doomed.
        if state.doomed:
            tracker.remove_doomed()
            tracker._save()
        return tracker

    @property
    def volume_size(self) -> int:
        return self._s.volume_size

    # --- the interface -----------------------------------------------------------------

    def state(self, *, recheck: bool = True) -> TrackerState:
        """:param recheck: ask LVM whether the volume and the reference snapshots are
        still there (an ``lvs``). Off only for a caller that knows the answer from
        moments before: the look after a backup, which checked before its copy and
        has since changed only what this tracker made and removed itself."""
        if recheck:
            self._check()
        return self._kept_state()

    def add_reference(self, name: str, *, replace: bool = False, active: bool = False) -> None:
        """Take a thin snapshot of the volume as reference ``name``.

        :param active: activate it at once (a backup's source; see :meth:`reference_device`).
        :raises EnvironmentProblem: the pool is too full for another snapshot.
        """
        validate_reference_name(name)
        if name in self._s.references and not replace:
            raise AlreadyExists(what="reference", name=name)
        self._check_pool_room()
        self._s.serial += 1
        snap = f"bgref-{self._s.lv}-{self._s.serial}"
        self._lvm.snapshot(self._s.vg, self._s.lv, snap, activate=False, now=active)
        self._s.thin_ids[snap] = self._thin_id(snap, active)
        made = _active_lv(self._s.vg, snap) if active else None
        if made is not None:
            self._s.dm_uuids[snap] = made[0]
        old = self._s.references.get(name)
        self._s.references[name] = snap
        self._s.unknown.pop(name, None)
        if old and old not in self._s.references.values():
            self._doom(old)
            self._save()
            self._remove_now()
        else:
            self._save()

    def reference_device(self, name: str) -> str:
        """Activate reference ``name``'s snapshot and return its (verified) device path:
        the point-in-time source a backup copies from."""
        snap = self._snapshot_of(name)
        path = f"/dev/{self._s.vg}/{snap}"
        try:
            with BlockDevice(path):  # created active (add_reference(active=True))
                return path
        except BlockguardError:
            pass
        self._lvm.activate(self._s.vg, snap, ignore_skip=True)
        with BlockDevice(path):
            pass
        return path

    def drop_reference(self, name: str, *, later: bool = False) -> None:
        """Drop reference ``name``; its snapshot goes unless another reference needs it.

        :param later: only doom the snapshot (its name saved in the state, with the
            reference gone): :meth:`remove_doomed` removes it, e.g. once a backup has
            reported, so that the ``lvremove`` is not part of the backup's time.
        """
        snap = self._snapshot_of(name)
        del self._s.references[name]
        self._s.unknown.pop(name, None)
        if snap not in self._s.references.values():
            self._doom(snap)
        self._save()  # one write: the reference gone and its snapshot doomed
        if not later:
            self._remove_now()

    def doomed(self) -> list[str]:
        """``VG/LV`` of the snapshots doomed and not yet removed."""
        with self._gone_lock:
            return [f"{self._s.vg}/{s}" for s in self._s.doomed if s not in self._gone]

    def _doom(self, snap: str) -> None:
        """Note ``snap`` for removal (saved with the caller's next save)."""
        self._s.thin_ids.pop(snap, None)
        self._s.dm_uuids.pop(snap, None)
        with self._gone_lock:  # not lost to a save of another thread pruning the list
            self._s.doomed.append(snap)

    def _remove_now(self) -> None:
        self.remove_doomed()
        self._save()

    def remove_doomed(self) -> None:
        """Remove the snapshots :meth:`drop_reference` doomed, each by its saved name.

        Safe beside a backup or a poll of this tracker (it changes nothing they read). A
        snapshot already gone (a removal a crash interrupted before the state was saved)
        counts as removed; one that cannot be removed stays doomed for the next call.
        """
        with self._removing:
            with self._gone_lock:
                todo = [s for s in list(self._s.doomed) if s not in self._gone]
            for snap in todo:
                try:
                    self._remove_snapshot(snap)
                except BlockguardError as exc:
                    rows = self._lvm.lvs("lv_name", self._s.vg, check=False)
                    if rows is None or any(r[:1] == [snap] for r in rows):
                        log.warning("removing %s/%s: %s", self._s.vg, snap, exc)
                        continue
                with self._gone_lock:
                    self._gone.add(snap)

    def listen(self) -> None:
        """Before a poll, outside the caller's locks: listen for another user of the
        pool's metadata snapshot when that is due (:func:`.thinmeta.listen`; it may take
        seconds). Without it a poll of a pool not known quiet is skipped."""
        listen(self._dm, f"{self._s.pool_dm}-tpool")

    def changed_many(self, names: Iterable[str], *, poll: bool = False) -> dict[str, ChangeSet]:
        """See :meth:`ChangeTracker.changed_many`.

        :param poll: a look between backups: never wait (for another process's hold of
            the pool's metadata snapshot, or to listen: see :meth:`listen`).
        :raises MetadataSnapshotBusy: it is held by another process (for longer than the
            bound, or at all when polling); tracking stays exact.
        """
        names = list(names)
        if not names:
            return {}
        snaps = {n: self._snapshot_of(n) for n in names}
        self._refuse_unknown(names)
        with BlockDevice(self.volume) as vol:  # an ioctl, not an lvs: this path is polled
            if vol.size != self._s.volume_size:
                self.mark_unknown(
                    f"{self.volume} was resized from {self._s.volume_size} to {vol.size} bytes"
                )
                raise TrackingLost(volume=self.volume, reason="the volume was resized")
        ids = {n: self._s.thin_ids[s] for n, s in snaps.items()}
        live = self._s.thin_ids[self._s.lv]
        try:
            blocks = self._thin_delta_many(ids, live, poll=poll)
        except MetadataSnapshotBusy:
            raise
        except BlockguardError as exc:
            self.mark_unknown(f"thin_delta failed: {exc}")
            raise TrackingLost(volume=self.volume, reason=str(exc)) from None
        return {n: self._to_changeset(ranges) for n, ranges in blocks.items()}

    def changed_between(self, older: str, newer: str) -> ChangeSet:
        """Chunks that differ between two references' snapshots (exact, no live volume)."""
        a, b = self._snapshot_of(older), self._snapshot_of(newer)
        self._refuse_unknown((older, newer))
        ranges = self._thin_delta_many({"x": self._s.thin_ids[a]}, self._s.thin_ids[b])["x"]
        return self._to_changeset(ranges)

    # --- internals ---------------------------------------------------------------------

    def _snapshot_of(self, name: str) -> str:
        try:
            return self._s.references[name]
        except KeyError:
            raise NotFound(what="reference", name=name) from None

    def _thin_id(self, lv: str, active: bool = False) -> int:
        """The thin device id of VG/LV: from its dm table (``0 LEN thin POOL ID``) when it
        is active, a cheaper question than ``lvs``; else from LVM."""
        if active:
            try:
                st = os.stat(f"/dev/{self._s.vg}/{lv}")
                if stat.S_ISBLK(st.st_mode):
                    fields = self._dm.table_of(st.st_rdev).split()
                    if len(fields) >= 5 and fields[2] == "thin":
                        return int(fields[4])
            except (OSError, BlockguardError, ValueError):
                pass
        info = self._lvm.lv(self._s.vg, lv)
        if info.thin_id is None:
            raise CorruptMetadata(what=f"{self._s.vg}/{lv}", detail="no thin device id")
        return info.thin_id

    def _thin_delta_many(
        self, ids: dict[str, int], live: int, *, poll: bool = False
    ) -> dict[str, list[tuple[int, int]]]:
        pool = self._s.pool_dm
        tmeta = self._dm.node(f"{pool}_tmeta")
        snap = MetadataSnapshot(self._dm, f"{pool}-tpool", self._dir / MARKER, poll=poll)
        outs = {}
        with snap.held():  # only the thin_delta calls inside: other tools wait for it
            for name, snap_id in ids.items():
                outs[name] = thin_delta(self._run, tmeta, snap_id, live)
        return {name: parse_thin_delta(out) for name, out in outs.items()}

    def _to_changeset(self, ranges: list[tuple[int, int]]) -> ChangeSet:
        pb = self._s.pool_block
        size = self._s.volume_size
        return ChangeSet.from_byte_ranges(
            self.chunk_size,
            size,
            ((b * pb, min(n * pb, size - b * pb)) for b, n in ranges if b * pb < size),
        )

    def _check(self) -> None:
        """A missing reference snapshot or a resized volume makes the state unknown.

        When the volume and every reference snapshot are active LVs that are the ones
        made (:meth:`_check_active`) the kernel answers; else one ``lvs`` of the VG
        answers for all (under TCG an ``lvs`` costs 0.3-0.9 s, and this runs before every
        backup).
        """
        s = self._s
        if self._check_active():
            return
        rows = self._lvm.lvs("lv_name,lv_size", s.vg, check=False)
        sizes = {r[0]: int(r[1]) for r in rows or () if len(r) == 2 and r[1].isdigit()}
        if s.lv not in sizes:
            self.mark_unknown(f"volume {s.vg}/{s.lv} is gone")
            return
        if s.lv not in s.dm_uuids and sizes[s.lv] == s.volume_size:
            # State from before uuids were kept: LVM just named the volume's LV.
            active = _active_lv(s.vg, s.lv)
            if active is not None and active[1] == s.volume_size:
                s.dm_uuids[s.lv] = active[0]
                self._save()
        if sizes[s.lv] != s.volume_size:
            self.mark_unknown(
                f"{s.vg}/{s.lv} was resized from {s.volume_size} to {sizes[s.lv]} bytes"
            )
        for ref, snap in s.references.items():
            if ref not in s.unknown and snap not in sizes:
                s.unknown[ref] = f"reference snapshot {s.vg}/{snap} is missing"
                self._save()

    def _check_active(self) -> bool:
        """What :meth:`_check` would find, from the kernel alone (device nodes and sysfs,
        no command): True when the volume (of its recorded size) and every reference
        snapshot not already unknown are active with the dm uuid recorded when they were
        made. An LV's uuid is never given to another LV, so the same uuid is the same
        snapshot, with the thin id recorded. False (ask LVM) for anything else: an LV
        inactive, removed, made again under its name, or made before uuids were kept."""
        s = self._s
        snaps = [snap for ref, snap in s.references.items() if ref not in s.unknown]
        for lv in [s.lv, *snaps]:
            want = s.dm_uuids.get(lv)
            found = _active_lv(s.vg, lv)
            if want is None or found is None or found[0] != want:
                return False
            if lv == s.lv and found[1] != s.volume_size:
                return False
        return True

    def _pool_percent(self) -> tuple[float, float]:
        """Data and metadata use of the thin pool, in percent: from the kernel's status of
        the pool (``used/total`` metadata and data blocks), or ``lvs`` if that fails."""
        try:
            space = parse_thin_status(self._dm.status(f"{self._s.pool_dm}-tpool"), 1)
            if not space.writable:  # failed, read-only or out of data space: full
                return 100.0, 100.0
            return 100.0 * space.data_used_blocks / max(1, space.data_total_blocks), (
                space.meta_percent
            )
        except BlockguardError:
            info = self._lvm.lv(self._s.vg, self._s.pool)
            return info.data_percent or 0.0, info.metadata_percent or 0.0

    def _check_pool_room(self) -> None:
        data, meta = self._pool_percent()
        if data >= DATA_LIMIT or meta >= METADATA_LIMIT:
            raise EnvironmentProblem(
                detail=f"thin pool {self._s.vg}/{self._s.pool} is too full for another snapshot "
                f"(data {data:.1f}% of limit {DATA_LIMIT:.0f}%, metadata {meta:.1f}% of limit "
                f"{METADATA_LIMIT:.0f}%); nothing was created"
            )

    def _remove_snapshot(self, snap: str) -> None:
        self._lvm.remove_lv(self._s.vg, snap)

    def _save(self) -> None:
        with self._gone_lock:
            if self._gone:
                self._s.doomed = [s for s in self._s.doomed if s not in self._gone]
                self._gone.clear()
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        doc = json.dumps(asdict(self._s), indent=1, sort_keys=True).encode()
        write_atomic(self._dir / "thin.json", doc)  # tmp, fsync, rename, fsync the directory


def _active_lv(vg: str, lv: str) -> tuple[str, int] | None:
    """The dm uuid and size in bytes of VG/LV if it is active (its node and sysfs)."""
    try:
        st = os.stat(f"/dev/{vg}/{lv}")
        if not stat.S_ISBLK(st.st_mode):
            return None
        sysfs = sysfs_dir(st.st_rdev)
        uuid = (sysfs / "dm" / "uuid").read_text().strip()
        return (uuid, int((sysfs / "size").read_text()) * 512) if uuid else None
    except (OSError, ValueError):
        return None


def parse_thin_delta(xml_text: str) -> list[tuple[int, int]]:
    """``(begin, length)`` in pool blocks of every difference ``thin_delta`` reports."""
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError as exc:
        raise CorruptMetadata(what="thin_delta output", detail=str(exc)) from None
    return [
        (int(el.get("begin", "")), int(el.get("length", "")))
        for el in root.iter()
        if el.tag in ("different", "left_only", "right_only")
    ]
