"""Pools of the real service: registration (with a probe of each disk), reopening, state.

(One thing at ~460 lines: the pool registry: create, extend, reopen, remove, state, speeds.)

The catalog remembers which disks make up which pool; the pool backend (``dir`` on XFS
with reflink here, ``lvm`` where device-mapper exists) holds the data. At daemon start
every pool is reopened from the catalog, which also removes the garbage a crash left;
a pool whose disk is missing is opened on the disks that remain and marked degraded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from blockguard.core import vocab
from blockguard.core.catalog import Catalog, DeviceIdentity, PerfEntry
from blockguard.core.perftable import DeviceSpeed
from blockguard.core.vocab import PoolKind
from blockguard.engine import service as svc
from blockguard.engine.events import EventHub
from blockguard.engine.gate import build_gate
from blockguard.engine.settings import Settings
from blockguard.errors import (
    AlreadyExists,
    BlockguardError,
    Busy,
    EnvironmentProblem,
    InvalidInput,
    NotABlockDevice,
    NotFound,
)
from blockguard.storage import devinfo, dm, probe
from blockguard.storage.blockdev import BlockDevice, device_rdev, mounted_devnos
from blockguard.storage.manifest import Manifest
from blockguard.storage.pool.base import PoolBackend, SpaceAlert
from blockguard.storage.pool.dirpool import MIN_DEVICE_SIZE, DirPool
from blockguard.storage.pool.lvmpool import LvmPool
from blockguard.storage.pool.registration import DiskAdmission, refuse_unless_free
from blockguard.storage.runner import Runner
from blockguard.storage.safety import SafetyGate

log = logging.getLogger(__name__)


def lvm_backend_available() -> bool:
    """The lvm pool backend needs device-mapper."""
    return dm.driver_loaded()


def _block_device(path: object) -> str:
    """:raises NotABlockDevice: unless ``path`` is an absolute path of a block device."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise NotABlockDevice(str(path), "not an absolute path")
    with BlockDevice(path):
        pass
    return path


def _describe(path: str) -> str | None:
    """A stable identity of the disk (None when it cannot be told)."""
    try:
        return devinfo.describe_device(path).device_id
    except BlockguardError as exc:
        log.warning("cannot describe %s: %s", path, exc)
        return None


class PoolRegistry:
    """The pools of one daemon (thread-safe under the service's lock).

    :param catalog: where pools and their disks are remembered.
    :param settings: mount root, probe duration, default speed.
    :param events: where PoolChanged and PoolSpaceLow go.
    :param cmd: the runner for mkfs/mount/losetup.
    """

    def __init__(self, catalog: Catalog, settings: Settings, events: EventHub, cmd: Runner) -> None:
        self.catalog = catalog
        self.settings = settings
        self.events = events
        self.cmd = cmd
        self.lock = threading.RLock()
        self.open_pools: dict[str, PoolBackend] = {}
        self._placement: dict[tuple[str, str], str] = {}
        #: drill scratch devices that exist now: path -> pool (the gate knows them)
        self._scratch: dict[str, str] = {}
        #: pools whose scratch space a drill has claimed (one at a time per pool)
        self._scratch_claims: set[str] = set()

    # --- life cycle -------------------------------------------------------------------

    def open_all(self) -> list[str]:
        """Reopen every pool of the catalog (garbage is collected on the way)."""
        opened = []
        for pool in self.catalog.list_pools():
            devices = self.catalog.list_pool_devices(pool.name)
            present, missing = [], []
            for dev in devices:
                try:
                    _block_device(dev.device_path)
                    present.append(dev.device_path)
                except BlockguardError:
                    missing.append(dev.device_path)
            for path in missing:
                self.catalog.set_pool_device_state(path, "missing")
            try:
                backend = self._open_backend(pool.name, pool.backend, present)
            except BlockguardError as exc:
                log.error("cannot open pool %s: %s", pool.name, exc, extra={"POOL": pool.name})
                self.catalog.set_pool_state(pool.name, "missing", str(exc))
                continue
            self.open_pools[pool.name] = backend
            if missing:
                self.catalog.set_pool_state(
                    pool.name, "degraded", f"missing disks: {', '.join(missing)}"
                )
            opened.append(pool.name)
        return opened

    def _open_backend(
        self, name: str, kind: str, devices: list[str], *, collect: bool = True
    ) -> PoolBackend:
        opener: Callable[..., PoolBackend]
        if kind == PoolKind.LVM:
            if not lvm_backend_available():
                raise EnvironmentProblem(detail="the lvm pool backend needs device-mapper")
            opener = LvmPool.open
        else:
            opener = DirPool.open
        return opener(
            name,
            devices,
            self.settings.mount_root,
            runner=self.cmd,
            alert=self._alert,
            collect=collect,
        )

    # --- import -------------------------------------------------------------------------

    def lvm_backend_available(self) -> bool:
        return lvm_backend_available()

    def open_for_import(self, name: str, kind: str, devices: list[str]) -> PoolBackend:
        """Open a pool found on disks without collecting its garbage (import writes
        nothing to the pool); the caller adopts it or closes it."""
        if kind == PoolKind.LVM and not lvm_backend_available():
            raise EnvironmentProblem(detail="the lvm pool backend needs device-mapper")
        return self._open_backend(name, kind, devices, collect=False)

    def adopt(self, name: str, backend: PoolBackend) -> None:
        """Serve an imported pool (its catalog rows exist now)."""
        with self.lock:
            self.open_pools[name] = backend

    def close_backend(self, name: str, backend: PoolBackend) -> None:
        """Close a pool that was opened but not adopted (an import refused late)."""
        self._close_backend(name, backend)

    def close(self) -> None:
        """Close every pool and unmount the areas under our mount root."""
        with self.lock:
            for name, backend in list(self.open_pools.items()):
                with contextlib.suppress(BlockguardError):
                    self._close_backend(name, backend)
            self.open_pools.clear()

    def _close_backend(self, name: str, backend: PoolBackend) -> None:
        if backend.kind == PoolKind.LVM:
            areas = [Path(backend.meta_dir)]  # type: ignore[attr-defined]
        else:
            areas = [Path(d.area) for d in backend.devices()]
        backend.close()
        # A daemon that restarted after a crash adopted the mounts of its predecessor;
        # it unmounts them on a clean stop like the ones it made itself.
        root = self.settings.mount_root.resolve()
        mounted = set(mounted_devnos().values())
        for area in areas:
            if area.resolve().is_relative_to(root) and str(area) in mounted:
                self.cmd.run(["umount", str(area)], timeout=120, check=False)

    # --- registration ---------------------------------------------------------------

    def gate(self) -> SafetyGate:
        """The safety gate of every protected volume and pool disk of the catalog, and of
        the drill scratch devices the pools made."""
        with self.lock:
            scratch = dict(self._scratch)
        return build_gate(self.catalog, self.cmd, scratch)

    def claim_scratch(self, pool: str) -> bool:
        """Take ``pool``'s one drill scratch space for a drill; False if another has it
        (it has one name: a second drill making it would remove the first one's)."""
        with self.lock:
            if pool in self._scratch_claims:
                return False
            self._scratch_claims.add(pool)
            return True

    def scratch_made(self, device: str, pool: str) -> None:
        """Pool ``pool`` made ``device`` as a drill's scratch space (see :meth:`gate`)."""
        with self.lock:
            self._scratch[device] = pool

    def scratch_removing(self, device: str) -> None:
        """Scratch ``device`` is about to be removed: no gate knows it from now on (its
        device number may soon be another device's)."""
        with self.lock:
            self._scratch.pop(device, None)

    def unclaim_scratch(self, pool: str) -> None:
        """The drill that claimed ``pool``'s scratch space is done with it."""
        with self.lock:
            self._scratch_claims.discard(pool)

    def _check_new_devices(self, devices: Sequence[str], gate: SafetyGate, force: bool) -> None:
        if not isinstance(devices, list | tuple) or not devices:
            raise InvalidInput(detail="give at least one pool device")
        if len(set(devices)) != len(devices):
            raise InvalidInput(detail="a device is listed twice")
        rdevs = {}
        for path in devices:
            _block_device(path)
            rdevs[path] = device_rdev(path)
        if len(set(rdevs.values())) != len(rdevs):
            raise InvalidInput(detail="two of the paths given are the same device")
        for path in devices:
            # The others given with it count as pool disks: a disk and its own partition
            # (or a device stacked on it) cannot both be taken.
            others = {p: "being created" for p in devices if p != path}
            refuse_unless_free(
                path,
                gate=gate.adding(pool_disks=others),
                min_size=MIN_DEVICE_SIZE,
                force=force,
                runner=self.cmd,
            )

    def _measure(self, path: str, gate: SafetyGate, force: bool) -> tuple[str, DeviceSpeed | None]:
        """Identity key and, unless probing is off, the measured speed of a free disk."""
        with BlockDevice(path) as dev:
            ident = dev.identity
        serial = _describe(path)
        key = DeviceIdentity(ident.major, ident.minor, ident.size, serial).key
        if self.settings.probe_seconds <= 0:
            return key, None
        # The probe writes: the gate is asked again right before it, not only at the
        # start of the registration.
        gate.check_writable(path, purpose="a pool disk (probe)", force=force)
        # The disk passed the registration checks and is about to be formatted: writing
        # anywhere on it harms nothing.
        region = probe.WritableRegion(0, min(ident.size, 256 << 20) // (1 << 20) * (1 << 20))
        try:
            result = probe.probe_device(
                path,
                writable=region,
                duration=self.settings.probe_seconds,
                depths=(1, 4),
                expect_rdev=os.makedev(ident.major, ident.minor),
            )
            return key, result.speed()  # type: ignore[attr-defined]
        except BlockguardError as exc:
            log.warning("probe of %s failed (%s); using the default speed", path, exc)
            return key, None

    def _record_device(
        self, pool: str, path: str, area_size: int, measured: tuple[str, DeviceSpeed | None]
    ) -> None:
        with BlockDevice(path) as dev:
            ident = dev.identity
        key, speed = measured
        serial = key.removeprefix("serial:") if key.startswith("serial:") else None
        self.catalog.add_pool_device(
            pool, path, DeviceIdentity(ident.major, ident.minor, ident.size, serial), area_size
        )
        if speed is not None:
            self.catalog.upsert_perf(
                PerfEntry(
                    device_key=key,
                    kind="pool",
                    measured_at=time.time(),
                    source="probe",
                    device_path=path,
                    capacity=ident.size,
                    seq_read=speed.seq_read,
                    seq_write=speed.seq_write,
                    rand_read=speed.rand_read,
                    rand_write=speed.rand_write,
                    chunk_size=speed.chunk_size,
                )
            )

    def create(self, name: str, backend: str, devices: Sequence[str], force: bool) -> svc.PoolInfo:
        vocab.check_name("pool", name)
        backend = backend or (PoolKind.LVM if lvm_backend_available() else PoolKind.DIR)
        backend = vocab.check_choice("pool backend", backend, vocab.POOL_BACKENDS)
        if backend == PoolKind.LVM and not lvm_backend_available():
            raise EnvironmentProblem(
                detail="the lvm pool backend needs device-mapper and its module; "
                "use the dir backend on this host"
            )
        with self.lock:
            if any(p.name == name for p in self.catalog.list_pools()):
                raise AlreadyExists(what="pool", name=name)
            gate = self.gate()
            self._check_new_devices(devices, gate, force)
            measured = {path: self._measure(path, gate, force) for path in devices}
            pool: PoolBackend
            if backend == PoolKind.LVM:
                # LvmPool.create removes what it made if it fails half-way.
                pool = LvmPool.create(
                    name,
                    list(devices),
                    self.settings.mount_root,
                    force=force,
                    runner=self.cmd,
                    alert=self._alert,
                    gate=gate,
                )
                rest: Sequence[str] = ()
            else:
                pool = DirPool.create(
                    name,
                    devices[0],
                    self.settings.mount_root,
                    force=force,
                    runner=self.cmd,
                    alert=self._alert,
                    gate=gate,
                )
                rest = devices[1:]
            try:
                for path in rest:
                    pool.add_device(path, DiskAdmission(gate, force=force))
                with self.catalog.transaction():
                    self.catalog.add_pool(name, backend, str(self.settings.mount_root / name))
                    # By device number: LVM may name a PV otherwise than it was given.
                    sizes = {d.devno: d.size for d in pool.devices()}
                    for path in devices:
                        size = sizes.get(vocab.devno(device_rdev(path)), 0)
                        self._record_device(name, path, size, measured[path])
            except BaseException:
                self._close_backend(name, pool)
                if backend == PoolKind.LVM:
                    pool.destroy()  # type: ignore[attr-defined]
                raise
            self.open_pools[name] = pool
        self.events.emit(svc.PoolChanged(name))
        return self.info(name)

    def extend(self, name: str, devices: Sequence[str], force: bool) -> svc.PoolInfo:
        with self.lock:
            pool = self.backend(name)
            gate = self.gate()
            self._check_new_devices(devices, gate, force)
            measured = {path: self._measure(path, gate, force) for path in devices}
            for path in devices:
                dev = pool.add_device(path, DiskAdmission(gate, force=force))
                self._record_device(name, path, dev.size, measured[path])
        self.events.emit(svc.PoolChanged(name))
        return self.info(name)

    def remove(self, name: str) -> None:
        """Forget a pool (its volumes must be gone) and unmount it; the data stays on disk."""
        with self.lock:
            self.catalog.get_pool(name)
            with self.catalog.transaction():
                for dev in self.catalog.list_pool_devices(name):
                    self.catalog.remove_pool_device(name, dev.device_path)
                self.catalog.remove_pool(name)
            backend = self.open_pools.pop(name, None)
            if backend is not None:
                self._close_backend(name, backend)
        self.events.emit(svc.PoolRemoved(name))

    # --- queries --------------------------------------------------------------------

    def backend(self, name: str) -> PoolBackend:
        """:raises NotFound: no such pool; :raises EnvironmentProblem: it could not be opened."""
        pool = self.catalog.get_pool(name)
        backend = self.open_pools.get(name)
        if backend is None:
            raise EnvironmentProblem(
                detail=f"pool {name} is not available ({pool.state}: {pool.state_reason})"
            )
        return backend

    def names(self) -> list[str]:
        return [p.name for p in self.catalog.list_pools()]

    def device_paths(self) -> list[str]:
        return [d.device_path for d in self.catalog.list_pool_devices()]

    def speed_of(self, device_path: str) -> tuple[DeviceSpeed, bool]:
        """The speed of a pool disk and whether it was measured (else the default)."""
        for dev in self.catalog.list_pool_devices():
            if dev.device_path == device_path:
                entry = self.catalog.get_perf(dev.identity.key, "pool")
                figures = (
                    None
                    if entry is None
                    else (entry.seq_read, entry.seq_write, entry.rand_read, entry.rand_write)
                )
                if figures is not None and all(f for f in figures):
                    return DeviceSpeed(*figures, chunk_size=entry.chunk_size or 65536), True  # type: ignore[arg-type,union-attr]
        return DeviceSpeed.uniform(self.settings.default_speed), False

    def speeds(self, pool: str) -> dict[str, DeviceSpeed]:
        """Pool disk path -> speed, for the restore-time model."""
        return {
            d.device_path: self.speed_of(d.device_path)[0]
            for d in self.catalog.list_pool_devices(pool)
            if d.state == "ok"
        }

    def read_floors(self, pool: str) -> dict[str, float]:
        """Pool disk path -> least seconds per byte a restore reading it can take (1 / its
        probed sequential read rate), for the disks that were measured; the fit of the
        restore terms is held to it (:func:`~blockguard.core.restore_terms.fit_terms`)."""
        floors = {}
        for d in self.catalog.list_pool_devices(pool):
            speed, measured = self.speed_of(d.device_path)
            if d.state == "ok" and measured and speed.read(False) > 0:
                floors[d.device_path] = 1.0 / speed.read(False)
        return floors

    def device_of(self, pool: str, manifest: Manifest) -> str:
        """The pool disk a generation is stored on."""
        backend = self.backend(pool)
        if backend.kind == PoolKind.LVM:
            # Where an LV lies does not change: one lvs call per generation, not per look.
            key = (pool, manifest.generation_id)
            if key not in self._placement:
                pvs = backend.lv_devices(manifest)  # type: ignore[attr-defined]
                # No PV (an empty delta: nothing to read): any disk of the pool. The
                # catalog lists them; asking the pool would be a pvs after every
                # backup that changed nothing.
                known = sorted(d.device_path for d in self.catalog.list_pool_devices(pool))
                if not pvs and not known:
                    known = [backend.devices()[0].path]
                self._placement[key] = pvs[0] if pvs else known[0]
            return self._placement[key]
        for dev in backend.devices():
            gen_dir = Path(dev.area) / "volumes" / manifest.volume.name / manifest.generation_id
            if gen_dir.is_dir():
                return dev.path
        devices = backend.devices()
        if not devices:
            raise EnvironmentProblem(detail=f"pool {pool} has no devices")
        return devices[0].path

    def info(self, name: str, *, space_of: svc.PoolInfo | None = None) -> svc.PoolInfo:
        """The pool as clients see it.

        :param space_of: an earlier info of the pool whose space figures still hold (the
            caller knows nothing changed them): the pool's space is not read again.
        """
        pool = self.catalog.get_pool(name)
        backend = self.open_pools.get(name)
        devices = []
        for dev in self.catalog.list_pool_devices(name):
            speed, measured = self.speed_of(dev.device_path)
            perf = {
                "seq_read_bps": speed.seq_read,
                "seq_write_bps": speed.seq_write,
                "rand_read_bps": speed.rand_read,
                "rand_write_bps": speed.rand_write,
                "measured": 1.0 if measured else 0.0,
            }
            devices.append(svc.PoolDeviceInfo(dev.device_path, dev.identity.size, dev.state, perf))
        capacity = free = meta_capacity = meta_free = 0
        if space_of is not None:
            capacity, free = space_of.capacity, space_of.free
            meta_capacity, meta_free = space_of.metadata_capacity, space_of.metadata_free
        elif backend is not None:
            with contextlib.suppress(OSError, BlockguardError):
                cap = backend.capacity()
                capacity, free = cap.total, cap.free
                meta_capacity, meta_free = cap.thin_meta_total, cap.thin_meta_free
        return svc.PoolInfo(
            name, pool.backend, tuple(devices), capacity, free, pool.state,
            meta_capacity, meta_free,
        )  # fmt: skip

    # --- events ---------------------------------------------------------------------

    def _alert(self, alert: SpaceAlert) -> None:
        self.events.emit(svc.PoolSpaceLow(alert.pool, alert.free, alert.needed))

    def device_vanished(self, device: str) -> None:
        with self.lock:
            for dev in self.catalog.list_pool_devices():
                if dev.device_path == device and dev.state == "ok":
                    self.catalog.set_pool_device_state(device, "missing")
                    self.catalog.set_pool_state(dev.pool, "degraded", f"disk {device} vanished")
                    self.events.emit(svc.PoolChanged(dev.pool))

    def require_known(self, name: str) -> None:
        """:raises NotFound: no such pool."""
        if name not in self.names():
            raise NotFound(what="pool", name=name)

    def refuse_if_used(self, name: str, users: list[str]) -> None:
        if users:
            raise Busy(what=f"pool {name}", reason=f"it holds volumes {', '.join(users)}")
