"""The era backend: dm-era between a volume and its users.

(One thing at ~450 lines: the era tracker's life: interpose, checkpoint, read, recover, remove.)

Placement (the choice, documented): for an LVM logical volume the era target is
*interposed* so applications keep the LV's path and device number: the LV's current
table moves to a new dm device ``blockguard-inner-<dm name>``, and the LV's own dm device
is reloaded with an era target on top of it (suspend, reload, resume — no I/O is lost in
between, the suspend flushes it). For any other block device (disk, partition, loop) the
protected device is a new dm device ``blockguard-era-<name>`` on top of it, and users are
to use that path.

Reference points are era numbers. :meth:`EraTracker.add_reference` suspends and resumes
the era device; every resume starts a new era, so the reference era is the current era
after the resume, and everything written before it (and therefore everything a
point-in-time snapshot taken during the suspend contains) has a smaller era. Change sets
are read from a metadata snapshot with ``era_invalidate --written-since`` — the upstream
reader, exact when the nodes it reads are real block devices (see the platform notes).

Tracking is lost (state ``unknown``, persistently) when: the era table was replaced by
someone else (an LVM command reloading the LV, for instance); the origin was written
while no era device was on it (its sysfs write counter moved since the era device was
removed, or since boot); the metadata cannot be read; the volume was resized.
"""

from __future__ import annotations

import contextlib
import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

from pyroaring import BitMap

from blockguard.core.vocab import devno
from blockguard.errors import (
    AlreadyExists,
    BlockguardError,
    CorruptMetadata,
    InvalidInput,
    NotFound,
    TrackingLost,
)
from blockguard.storage.blockdev import BlockDevice, device_rdev
from blockguard.storage.dm import DeviceMapper, era_invalidate
from blockguard.storage.manifest import write_atomic
from blockguard.storage.runner import Runner, default_runner
from blockguard.storage.tracking.base import (
    ChangeSet,
    ChangeTracker,
    TrackerState,
    validate_reference_name,
)
from blockguard.storage.tracking.erameta import read_written_since

SECTOR = 512
#: dm-era keeps a u32 era per block plus one bitset per archived era; 4 KiB blocks.
_MD_BLOCK = 4096


def era_metadata_size(volume_size: int, chunk_size: int, archived_eras: int = 64) -> int:
    """A safe size for a dm-era metadata device (rounded up to 1 MiB, at least 4 MiB)."""
    blocks = -(-volume_size // chunk_size)
    era_array = blocks * 4
    writesets = archived_eras * -(-blocks // 8)
    total = 2 * (era_array + writesets) + 64 * _MD_BLOCK
    mib = 1 << 20
    return max(4 * mib, -(-total // mib) * mib)


def _boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def _write_ios(rdev: int) -> int:
    """Writes completed on a device since it appeared (sysfs ``stat``, field 5)."""
    with open(f"/sys/dev/block/{devno(rdev)}/stat") as f:
        return int(f.read().split()[4])


@dataclass
class _State:
    """What survives restarts, kept as JSON in the tracker's state directory."""

    volume: str
    mode: str  # "lvm" (interposed) or "stacked"
    era_name: str  # dm name of the era device
    inner_name: str | None  # lvm mode: dm name holding the LV's original table
    origin_table: str  # lvm mode: the LV's table before interposition
    metadata: str
    chunk_size: int
    volume_size: int
    references: dict[str, int] = field(default_factory=dict)
    unknown: dict[str, str] = field(default_factory=dict)  # reference -> reason
    # The boot the era device was last put in place in; and, when it was taken away on
    # purpose, the origin's write counter then. Writes the counter shows beyond that
    # (or, after a reboot, any write before re-attachment) went untracked.
    attached_boot_id: str | None = None
    detached_write_ios: int | None = None


class EraTracker(ChangeTracker):
    """Change tracking with dm-era; see the module docstring.

    Use :meth:`protect` to set it up on a volume and :meth:`open` to continue after a
    daemon restart or a reboot.
    """

    backend: ClassVar[str] = "era"
    cheap_polling: ClassVar[bool] = True

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        state: _State,
        runner: Runner | None = None,
    ) -> None:
        super().__init__(state.volume, state.chunk_size)
        self._dir = Path(state_dir)
        self._s = state
        self._run = runner or default_runner()
        self._dm = DeviceMapper(self._run)

    # --- setting up and continuing ---------------------------------------------------

    @classmethod
    def protect(
        cls,
        volume: str,
        metadata: str,
        state_dir: str | os.PathLike[str],
        chunk_size: int,
        *,
        name: str | None = None,
        runner: Runner | None = None,
    ) -> EraTracker:
        """Put ``volume`` under dm-era with its metadata on ``metadata`` (wiped).

        :param volume: an LVM LV's device (interposed in place) or any block device.
        :param metadata: a block device on pool space, at least :func:`era_metadata_size`.
        :param name: blockguard's name for the volume (stacked mode's dm name).
        """
        run = runner or default_runner()
        dm = DeviceMapper(run)
        state_path = Path(state_dir)
        if (state_path / "era.json").exists():
            raise AlreadyExists(what="era tracking state in", name=str(state_path))
        with BlockDevice(volume) as vol:
            volume_size, rdev = vol.size, vol.rdev
        need = era_metadata_size(volume_size, chunk_size)
        with BlockDevice(metadata, write=True) as md:
            if md.size < need:
                raise InvalidInput(
                    detail=f"metadata device {metadata} has {md.size} bytes; "
                    f"{need} are needed for {volume}"
                )
            # A fresh superblock: dm-era formats zeroed metadata on first load.
            md.pwrite_all(bytes(_MD_BLOCK), 0)
            md.flush()
        lv_dm_name = dm.name_of(rdev)
        if lv_dm_name and _is_lvm_lv(dm, lv_dm_name):
            inner = f"blockguard-inner-{lv_dm_name}"
            state = _State(volume, "lvm", lv_dm_name, inner, "", metadata, chunk_size,
                           volume_size)  # fmt: skip
        else:
            era_name = f"blockguard-era-{name or Path(volume).name}"
            state = _State(volume, "stacked", era_name, None, "", metadata, chunk_size,
                           volume_size)  # fmt: skip
        tracker = cls(state_path, state, run)
        tracker._attach()
        return tracker

    @classmethod
    def open(cls, state_dir: str | os.PathLike[str], runner: Runner | None = None) -> EraTracker:
        """Continue tracking from saved state; re-creates the era device if it is gone
        (after a reboot or a removal), on its metadata, so tracking continues.

        :raises NotFound: no saved state in ``state_dir``.
        """
        path = Path(state_dir) / "era.json"
        try:
            state = _State(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise NotFound(what="era tracking state in", name=str(state_dir)) from None
        except (ValueError, TypeError) as exc:
            raise CorruptMetadata(what=str(path), detail=str(exc)) from None
        tracker = cls(state_dir, state, runner)
        tracker._reattach()
        return tracker

    @property
    def device(self) -> str:
        """The path users write to: the LV itself (interposed) or the era device."""
        return self._s.volume if self._s.mode == "lvm" else self._dm.node(self._s.era_name)

    def detach(self) -> None:
        """Take the era target away (shutdown or unprotect), remembering where the origin's
        write counter stood so that later untracked writes are noticed."""
        s = self._s
        if s.mode == "lvm":
            if self._table_is_ours():
                self._dm.suspend(s.era_name)
                self._dm.reload(s.era_name, s.origin_table)
                self._dm.resume(s.era_name)
            self._dm.remove(s.inner_name or "")
            origin = device_rdev(s.volume)
        else:
            self._dm.remove(s.era_name)
            origin = device_rdev(s.volume)
        s.detached_write_ios = _write_ios(origin)
        self._save()

    def _reattach(self) -> None:
        s = self._s
        if self._dm.exists(s.era_name) and self._table_is_ours():
            return  # a daemon restart: the kernel kept tracking all along
        if s.mode == "lvm" and not self._dm.exists(s.era_name):
            self.mark_unknown(f"the logical volume's device {s.era_name} is not active")
            return
        # The counter to read: the LV's own device (it counts writes whatever its table),
        # or the raw origin under a stacked era device.
        counter = _write_ios(device_rdev(s.volume))
        same_boot = s.attached_boot_id == _boot_id()
        if same_boot and s.detached_write_ios is None:
            self.mark_unknown(f"the dm-era table of {s.era_name} was replaced or removed")
        else:
            baseline = s.detached_write_ios if same_boot else 0
            if counter != baseline:
                self.mark_unknown(
                    f"{s.volume} was written ({counter - (baseline or 0)} writes) "
                    "while not under dm-era"
                )
        with BlockDevice(s.volume) as vol:
            if vol.size != s.volume_size:
                self.mark_unknown(f"{s.volume} was resized from {s.volume_size} to {vol.size}")
                return
        self._attach()

    def _attach(self) -> None:
        """Put the era target in place on the saved metadata (which dm-era continues)."""
        s = self._s
        sectors = s.volume_size // SECTOR
        block = s.chunk_size // SECTOR
        if s.mode == "lvm":
            s.origin_table = self._dm.table(s.era_name)
            if self._dm.exists(s.inner_name or ""):
                self._dm.remove(s.inner_name or "")  # left over from a crash; unused now
            inner = device_rdev(self._dm.create(s.inner_name or "", s.origin_table))
            self._dm.suspend(s.era_name)
            try:
                self._dm.reload(
                    s.era_name,
                    f"0 {sectors} era {_devno(s.metadata)} {devno(inner)} {block}",
                )
            except BlockguardError:
                self._dm.resume(s.era_name)
                self._dm.remove(s.inner_name or "")
                raise
            self._dm.resume(s.era_name)
        else:
            self._dm.create(
                s.era_name, f"0 {sectors} era {_devno(s.metadata)} {_devno(s.volume)} {block}"
            )
        s.attached_boot_id = _boot_id()
        s.detached_write_ios = None
        self._save()

    # --- the interface -----------------------------------------------------------------

    def state(self) -> TrackerState:
        self._check_live()
        if self._s.unknown:
            reasons = "; ".join(f"{r}: {why}" for r, why in sorted(self._s.unknown.items()))
            return TrackerState.unknown(reasons)
        return TrackerState.exact()

    def references(self) -> list[str]:
        return sorted(self._s.references)

    def add_reference(self, name: str, *, replace: bool = False) -> None:
        with self.point_in_time():
            pass
        self.commit_reference(name, replace=replace)

    @contextlib.contextmanager
    def point_in_time(self) -> Iterator[None]:
        """Suspend the era device (I/O quiesced) for the body: take a snapshot there.
        On resume a new era starts; :meth:`commit_reference` then names it."""
        self._check_live()
        self._dm.suspend(self._s.era_name)
        try:
            yield
        finally:
            self._dm.resume(self._s.era_name)
        self._pending_era = self._current_era()

    def commit_reference(self, name: str, *, replace: bool = False) -> None:
        """Record the era started by the last :meth:`point_in_time` as reference ``name``."""
        validate_reference_name(name)
        if name in self._s.references and not replace:
            raise AlreadyExists(what="reference", name=name)
        era = getattr(self, "_pending_era", None)
        if era is None:
            raise InvalidInput(detail="commit_reference needs a point_in_time first")
        self._s.references[name] = era
        self._s.unknown.pop(name, None)
        self._pending_era = None
        self._save()

    def drop_reference(self, name: str) -> None:
        if name not in self._s.references:
            raise NotFound(what="reference", name=name)
        del self._s.references[name]
        self._s.unknown.pop(name, None)
        self._save()

    def mark_unknown(self, reason: str) -> None:
        for ref in self._s.references:
            self._s.unknown.setdefault(ref, reason)
        self._save()

    def changed(self, name: str) -> ChangeSet:
        return self.changed_many([name])[name]

    def changed_many(self, names: Iterable[str]) -> dict[str, ChangeSet]:
        names = list(names)
        if not names:
            return {}
        for n in names:
            if n not in self._s.references:
                raise NotFound(what="reference", name=n)
        self._check_live()
        for n in names:
            if n in self._s.unknown:
                raise TrackingLost(volume=self.volume, reason=self._s.unknown[n])
        oldest = min(self._s.references[n] for n in names)
        try:
            by_era = self._written_since(oldest)
        except BlockguardError as exc:
            self.mark_unknown(f"era metadata cannot be read: {exc}")
            raise TrackingLost(volume=self.volume, reason=str(exc)) from None
        result: dict[str, ChangeSet] = {}
        for n in names:
            era = self._s.references[n]
            bm = BitMap()
            for e, blocks in by_era.items():
                if e >= era:
                    bm |= blocks
            result[n] = ChangeSet(self.chunk_size, self._s.volume_size, bm)
        return result

    # --- reading dm-era ----------------------------------------------------------------

    def _current_era(self) -> int:
        # "0 SECTORS era <md block size> <used>/<total> <current era> <held root or ->"
        fields = self._dm.status(self._s.era_name).split()
        if len(fields) < 6 or fields[2] != "era":
            raise CorruptMetadata(
                what=f"dm-era status of {self._s.era_name}", detail=" ".join(fields)
            )
        return int(fields[5])

    def _written_since(self, oldest: int) -> dict[int, BitMap]:
        """Blocks first written in each reference era >= ``oldest`` (disjoint per era),
        from one metadata snapshot, read directly (see :mod:`.erameta`; ``era_invalidate``
        gives the same sets and is the cross-check in the guest tests, 14-180x slower)."""
        name = self._s.era_name
        eras = sorted({e for e in self._s.references.values() if e >= oldest})
        self._dm.message(name, "take_metadata_snap")
        try:
            since = read_written_since(self._s.metadata, eras, use_metadata_snapshot=True)
        finally:
            self._dm.message(name, "drop_metadata_snap")
        found: dict[int, BitMap] = {}
        seen = BitMap()
        for era in reversed(eras):
            found[era] = since[era] - seen
            seen |= since[era]
        return found

    def written_since_by_tool(self, era: int) -> BitMap:
        """Blocks written since ``era`` according to ``era_invalidate`` (the upstream
        reader): a cross-check of the direct reader, not used for tracking."""
        name = self._s.era_name
        self._dm.message(name, "take_metadata_snap")
        try:
            with BlockDevice(self._s.metadata):  # a real block device, not a stray file
                pass
            out = era_invalidate(self._run, self._s.metadata, era)
        finally:
            self._dm.message(name, "drop_metadata_snap")
        return parse_era_invalidate(out)

    def _table_is_ours(self) -> bool:
        try:
            table = self._dm.table(self._s.era_name).split()
        except NotFound:
            return False
        return len(table) >= 6 and table[2] == "era" and table[3] == _devno(self._s.metadata)

    def _check_live(self) -> None:
        """Notice a table replaced behind our back, or a resized volume."""
        s = self._s
        if not self._dm.exists(s.era_name) or not self._table_is_ours():
            if s.references and len(s.unknown) < len(s.references):
                self.mark_unknown(f"the dm-era table of {s.era_name} was replaced or removed")
            return
        with BlockDevice(s.volume if s.mode == "stacked" else self.device) as dev:
            size = dev.size
        if size != s.volume_size and len(s.unknown) < len(s.references):
            self.mark_unknown(f"{s.volume} was resized from {s.volume_size} to {size} bytes")

    def _save(self) -> None:
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        doc = json.dumps(asdict(self._s), indent=1, sort_keys=True).encode()
        write_atomic(self._dir / "era.json", doc)  # tmp, fsync, rename, fsync the directory


def parse_era_invalidate(xml_text: str) -> BitMap:
    """Blocks named by ``era_invalidate`` output (``<block>`` and half-open ``<range>``).

    Parsed as XML: 0.9.0 prints ``end = "12"`` with spaces, which a regex would miss.
    """
    blocks = BitMap()
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError as exc:
        raise CorruptMetadata(what="era_invalidate output", detail=str(exc)) from None
    for el in root:
        if el.tag == "block":
            blocks.add(int(el.get("block", "")))
        elif el.tag == "range":
            blocks.add_range(int(el.get("begin", "")), int(el.get("end", "")))
    return blocks


def _devno(path: str) -> str:
    rdev = device_rdev(path)
    return devno(rdev)


def _is_lvm_lv(dm: DeviceMapper, name: str) -> bool:
    return dm.uuid(name).startswith("LVM-")
