"""An in-memory :class:`~blockguard.engine.service.Service` for the daemon skeleton and its tests.

It keeps pools, volumes and generations in dictionaries, copies no data and touches no
device: "backups" are jobs that sleep in small steps and report progress. Device paths must
exist (a block device or, so that tests need no root, a regular file) and may be used once.
Test hook: backups of a volume whose name starts with ``failing-`` fail with a DataError.
"""

from __future__ import annotations

import fcntl
import os
import stat
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from blockguard.core import vocab
from blockguard.core.objective_sets import clean_given, merge_given, parse_given
from blockguard.core.objectives import IntervalRPO
from blockguard.engine import service as svc
from blockguard.engine.jobs import Job, JobKind, JobRunner, ProgressReporter
from blockguard.errors import (
    AlreadyExists,
    Busy,
    DataError,
    InvalidChunkSize,
    InvalidInput,
    NotABlockDevice,
    NotAPool,
    NotFound,
    PoolDiskRefused,
    ProtectedDevice,
    VolumeDetached,
)

POOL_BACKENDS = ("file", "reflink", "thin")
TRACKING_BACKENDS = ("era", "thin", "snapshot")
DEFAULT_CHUNK_SIZE = 64 * 1024
FAKE_RATE = 200e6  # bytes/s used for the fake restore-time estimates


def _device_size(path: str) -> int:
    """Size of an existing block device or regular file; raises NotABlockDevice otherwise."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise NotABlockDevice(str(path), "not an absolute path")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotABlockDevice(path, "no such file") from None
    except OSError as exc:
        raise NotABlockDevice(path, exc.strerror or str(exc)) from None
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if not stat.S_ISBLK(st.st_mode):
        raise NotABlockDevice(path)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def validate_objectives(objectives: Mapping[str, Any]) -> dict[str, Any]:
    """A new set of objectives, checked as the engine checks it (the same code)."""
    return clean_given(objectives)


class MemoryService:
    """The skeleton's service: see the module docstring.

    :param state_dir: created and locked on :meth:`open`, so two daemons cannot share it.
    :param runner: runs the jobs.
    :param job_seconds: how long a fake backup/restore/verify takes.
    """

    def __init__(self, state_dir: Path, runner: JobRunner, job_seconds: float = 1.0) -> None:
        self.state_dir = Path(state_dir)
        self.runner = runner
        self.job_seconds = job_seconds
        self._lock = threading.RLock()
        self._subscribers: list[svc.EventCallback] = []
        self._pools: dict[str, svc.PoolInfo] = {}
        self._volumes: dict[str, svc.VolumeInfo] = {}
        self._generation_counter: dict[str, int] = {}
        self._lock_fd: int | None = None

    # life cycle ---------------------------------------------------------------------

    def open(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.state_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Busy(what=str(self.state_dir), reason="another blockguardd uses it") from None
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def subscribe(self, callback: svc.EventCallback) -> None:
        self._subscribers.append(callback)

    def _emit(self, event: svc.ServiceEvent) -> None:
        for callback in list(self._subscribers):
            callback(event)

    def status(self) -> dict[str, Any]:
        with self._lock:
            running = sum(1 for j in self.runner.list() if not j.is_finished)
            degraded = [p.name for p in self._pools.values() if p.state != "ok"]
            lost = [v.name for v in self._volumes.values() if v.tracker_state == "lost"]
            summary = (
                f"{len(self._volumes)} volumes, {len(self._pools)} pools, {running} jobs running"
            )
            if degraded:
                summary += f"; degraded pools: {', '.join(degraded)}"
            if lost:
                summary += f"; tracking lost: {', '.join(lost)}"
            return {
                "volumes": len(self._volumes),
                "pools": len(self._pools),
                "running_jobs": running,
                "summary": summary,
            }

    # pools ----------------------------------------------------------------------------

    def _refuse_used(self, path: str, purpose: str) -> None:
        """The real engine's gate, reduced to the toy's files: the same error names."""
        for pool in self._pools.values():
            if any(d.path == path for d in pool.devices):
                raise PoolDiskRefused(
                    path=path, purpose=purpose, relation="is", device=path, pool=pool.name
                )
        for vol in self._volumes.values():
            if vol.device == path:
                raise ProtectedDevice(
                    path=path, purpose=purpose, relation="is", device=path, volume=vol.name
                )

    def _new_pool_devices(self, devices: Sequence[str]) -> list[svc.PoolDeviceInfo]:
        if not devices:
            raise InvalidInput(detail="give at least one pool device")
        if len(set(devices)) != len(devices):
            raise InvalidInput(detail="a device is listed twice")
        new = []
        for path in devices:
            size = _device_size(path)
            self._refuse_used(path, "a pool disk")
            new.append(svc.PoolDeviceInfo(path=path, size=size))
        return new

    def create_pool(
        self, name: str, backend: str, devices: Sequence[str], force: bool
    ) -> svc.PoolInfo:
        vocab.check_name("pool", name)
        backend = backend or "file"
        if backend not in POOL_BACKENDS:
            raise InvalidInput(detail=f"pool backend {backend!r} is not one of {POOL_BACKENDS}")
        with self._lock:
            if name in self._pools:
                raise AlreadyExists(what="pool", name=name)
            new = self._new_pool_devices(devices)
            capacity = sum(d.size for d in new)
            pool = svc.PoolInfo(name, backend, tuple(new), capacity, capacity)
            self._pools[name] = pool
        self._emit(svc.PoolChanged(name))
        return pool

    def extend_pool(self, name: str, devices: Sequence[str], force: bool) -> svc.PoolInfo:
        with self._lock:
            pool = self.get_pool(name)
            new = self._new_pool_devices(devices)
            added = sum(d.size for d in new)
            pool = replace(
                pool,
                devices=pool.devices + tuple(new),
                capacity=pool.capacity + added,
                free=pool.free + added,
            )
            self._pools[name] = pool
        self._emit(svc.PoolChanged(name))
        return pool

    def remove_pool(self, name: str, force: bool, delete_generations: bool = False) -> None:
        with self._lock:
            self.get_pool(name)
            users = [v.name for v in self._volumes.values() if v.pool == name]
            if users and not force:
                raise Busy(what=f"pool {name}", reason=f"it holds volumes {', '.join(users)}")
            held = sum(len(self._volumes[v].generations) for v in users)
            if held and not delete_generations:
                raise Busy(what=f"pool {name}", reason=f"it holds {held} generations")
            for volume in users:
                del self._volumes[volume]
            del self._pools[name]
        for volume in users:
            self._emit(svc.VolumeRemoved(volume))
        self._emit(svc.PoolRemoved(name))

    def list_pools(self) -> list[svc.PoolInfo]:
        with self._lock:
            return list(self._pools.values())

    def get_pool(self, name: str) -> svc.PoolInfo:
        with self._lock:
            try:
                return self._pools[name]
            except KeyError:
                raise NotFound(what="pool", name=name) from None

    # volumes --------------------------------------------------------------------------

    def protect(
        self,
        device: str,
        name: str,
        chunk_size: int | None,
        backend: str | None,
        pool: str | None = None,
        objectives: Mapping[str, Any] | None = None,
    ) -> svc.VolumeInfo:
        vocab.check_name("volume", name)
        stored = validate_objectives(objectives) if objectives else {}
        chunk = chunk_size or DEFAULT_CHUNK_SIZE
        if chunk & (chunk - 1) or not 4096 <= chunk <= 16 * 1024 * 1024:
            raise InvalidChunkSize(chunk_size=chunk)
        backend = backend or "era"
        if backend not in TRACKING_BACKENDS:
            raise InvalidInput(
                detail=f"tracking backend {backend!r} is not one of {TRACKING_BACKENDS}"
            )
        with self._lock:
            if name in self._volumes:
                raise AlreadyExists(what="volume", name=name)
            _device_size(device)
            self._refuse_used(device, "a protected volume")
            if not self._pools:
                raise InvalidInput(detail="there is no pool to back up into; create one first")
            if pool is not None and pool not in self._pools:
                raise NotFound(what="pool", name=pool)
            pool = pool or next(iter(self._pools))
            volume = svc.VolumeInfo(
                name=name,
                device=device,
                pool=pool,
                backend=backend,
                chunk_size=chunk,
                group="",
                objectives=stored,
                tracker_state="exact",
                changed_bytes_since_backup=0,
                changed_bytes_since_full=0,
                estimated_restore_seconds={},
                next_method="full",
                next_method_reasons=("no generation exists yet",),
                next_backup=0,
                generations=(),
            )
            self._volumes[name] = volume
        self._emit(svc.VolumeChanged(name))
        return volume

    def unprotect(self, volume: str, delete_generations: bool = False) -> None:
        with self._lock:
            info = self.get_volume(volume)
            busy = [j for j in self.runner.list() if j.target == volume and not j.is_finished]
            if busy:
                raise Busy(what=f"volume {volume}", reason=f"job {busy[0].id} is running")
            if info.generations and not delete_generations:
                # Like the real engine: the generations stay, the volume is detached.
                self._update_volume(volume, device="", backend="", tracker_state="detached")
                detached = True
            else:
                del self._volumes[volume]
                detached = False
        self._emit(svc.VolumeChanged(volume) if detached else svc.VolumeRemoved(volume))

    def import_pool(self, devices: Sequence[str]) -> str:
        """The skeleton has no pool disks to read: every device is refused."""
        if not devices:
            raise InvalidInput(detail="give the pool's disks")
        _device_size(devices[0])
        raise NotAPool(path=devices[0], detail="the in-memory service cannot read pools")

    def set_objectives(self, volume_or_group: str, objectives: Mapping[str, Any]) -> list[str]:
        with self._lock:
            names = [v.name for v in self._volumes.values() if volume_or_group in (v.name, v.group)]
            if not names:
                raise NotFound(what="volume or group", name=volume_or_group)
            # Every merge is checked before any volume changes: all or nothing.
            merged = {n: merge_given(self._volumes[n].objectives, objectives) for n in names}
            for name in names:
                self._update_volume(name, objectives=merged[name])
        for name in names:
            self._emit(svc.VolumeChanged(name))
        return names

    def _update_volume(self, name: str, **changes: Any) -> svc.VolumeInfo:
        """Apply changes and recompute the derived plan fields (caller holds the lock)."""
        volume = replace(self._volumes[name], **changes)
        plan = self._plan(volume)
        volume = replace(
            volume,
            next_method=plan["method"],
            next_method_reasons=tuple(plan["reasons"]),
            estimated_restore_seconds=plan["estimated_restore_seconds"],
            next_backup=plan["next_backup"],
        )
        self._volumes[name] = volume
        return volume

    def list_volumes(self) -> list[svc.VolumeInfo]:
        with self._lock:
            return list(self._volumes.values())

    def get_volume(self, name: str) -> svc.VolumeInfo:
        with self._lock:
            try:
                return self._volumes[name]
            except KeyError:
                raise NotFound(what="volume", name=name) from None

    def list_generations(self, volume: str) -> list[svc.GenerationInfo]:
        return list(self.get_volume(volume).generations)

    def get_generation(self, generation: str) -> svc.GenerationInfo:
        with self._lock:
            for volume in self._volumes.values():
                for gen in volume.generations:
                    if gen.id == generation:
                        return gen
        raise NotFound(what="generation", name=generation)

    def _plan(self, volume: svc.VolumeInfo) -> dict[str, Any]:
        size = _device_size(volume.device) if os.path.exists(volume.device) else 0
        if not volume.generations:
            method, reasons = "full", ["no generation exists yet"]
        elif len(volume.generations) % 4 == 0:
            method, reasons = "full", ["the chain of deltas is long enough to start anew"]
        else:
            method, reasons = "incremental", ["few blocks changed since the last backup"]
        estimate = {
            "full": size / FAKE_RATE,
            "differential": size / FAKE_RATE * 1.2,
            "incremental": size / FAKE_RATE * (1 + 0.1 * len(volume.generations)),
        }
        parsed = parse_given(volume.objectives)
        rto = None if parsed is None else parsed.rto
        feasible = rto is None or estimate[method] <= rto.total_seconds()
        # The toy schedule: an interval RPO from the last backup; other RPO kinds daily.
        rpo = None if parsed is None else parsed.rpo
        last = volume.generations[-1].created if volume.generations else 0
        next_backup = 0
        if rpo is not None:
            every = rpo.interval.total_seconds() if isinstance(rpo, IntervalRPO) else 86400
            next_backup = int(max(last, time.time()) + every)
        return {
            "method": method,
            "reasons": reasons,
            "estimated_restore_seconds": estimate,
            "estimated_bytes": size if method == "full" else volume.changed_bytes_since_backup,
            "feasible": feasible,
            "next_backup": next_backup,
        }

    def plan(self, volume: str) -> dict[str, Any]:
        return self._plan(self.get_volume(volume))

    # jobs -----------------------------------------------------------------------------

    def _sleep_work(self, nbytes: int) -> Callable[[ProgressReporter], None]:
        steps = 10

        def work(progress: ProgressReporter) -> None:
            for step in range(1, steps + 1):
                time.sleep(self.job_seconds / steps)
                progress(nbytes * step // steps, nbytes)

        return work

    def backup_now(self, volume: str) -> Job:
        info = self.get_volume(volume)
        if info.tracker_state == "detached":
            raise VolumeDetached(volume=volume, detail="it has no device")
        plan = self._plan(info)
        nbytes = max(int(plan["estimated_bytes"]), 1)
        sleep = self._sleep_work(nbytes)

        def work(progress: ProgressReporter) -> dict[str, Any]:
            sleep(progress)
            if volume.startswith("failing-"):
                raise DataError(detail=f"simulated read error on {info.device}")
            with self._lock:
                current = self.get_volume(volume)
                n = self._generation_counter.get(volume, 0) + 1
                self._generation_counter[volume] = n
                parent = current.generations[-1].id if current.generations else ""
                gen = svc.GenerationInfo(
                    id=f"{volume}@{n}",
                    volume=volume,
                    method=plan["method"],
                    parent="" if plan["method"] == "full" else parent,
                    created=int(time.time()),
                    bytes=nbytes,
                )
                self._update_volume(
                    volume,
                    generations=(*current.generations, gen),
                    changed_bytes_since_backup=0,
                )
            self._emit(svc.BackupFinished(volume, gen.id, gen.method, gen.bytes))
            self._emit(svc.VolumeChanged(volume))
            return {"generation": gen.id, "method": gen.method, "bytes": gen.bytes}

        def finished(job: Job) -> None:
            if job.error[0]:
                self._emit(svc.BackupFailed(volume, job.error[0], job.error[1]))

        job = self.runner.submit(JobKind.BACKUP, volume, work, on_finish=finished)
        self._emit(svc.JobAdded(job))
        self._emit(svc.BackupStarted(volume, job.id))
        return job

    def restore(self, volume: str, generation: str, mode: str, target: str, force: bool) -> Job:
        info = self.get_volume(volume)
        if not info.generations:
            raise NotFound(what="generation of volume", name=volume)
        gen = info.generations[-1] if not generation else self.get_generation(generation)
        if gen.volume != volume:
            raise InvalidInput(detail=f"generation {gen.id} belongs to volume {gen.volume}")
        vocab.check_choice("restore mode", mode, vocab.RESTORE_MODES)
        target = target or info.device
        _device_size(target)
        if target != info.device:
            self._refuse_used(target, "a restore target")
        sleep = self._sleep_work(max(gen.bytes, 1))

        def work(progress: ProgressReporter) -> dict[str, Any]:
            sleep(progress)
            self._emit(svc.RestoreFinished(volume, gen.id, target))
            return {"generation": gen.id, "target": target, "mode": mode}

        job = self.runner.submit(JobKind.RESTORE, volume, work)
        self._emit(svc.JobAdded(job))
        return job

    def verify(self, generation: str) -> Job:
        gen = self.get_generation(generation)
        sleep = self._sleep_work(max(gen.bytes, 1))

        def work(progress: ProgressReporter) -> dict[str, Any]:
            sleep(progress)
            return {"generation": gen.id, "ok": True}

        job = self.runner.submit(JobKind.VERIFY, generation, work)
        self._emit(svc.JobAdded(job))
        return job

    def drill(self, pool: str) -> Job:
        """A drill that only takes a moment: nothing here has a restore path to measure."""
        self.get_pool(pool)
        sleep = self._sleep_work(1)

        def work(progress: ProgressReporter) -> dict[str, Any]:
            sleep(progress)
            return {"pool": pool, "samples": []}

        job = self.runner.submit(JobKind.DRILL, pool, work)
        self._emit(svc.JobAdded(job))
        return job

    def list_jobs(self) -> list[Job]:
        return self.runner.list()

    def get_job(self, job_id: int) -> Job:
        job = self.runner.get(job_id)
        if job is None:
            raise NotFound(what="job", name=str(job_id))
        return job

    # hooks ------------------------------------------------------------------------------

    def reestablish_tracking(self) -> list[str]:
        with self._lock:
            names = list(self._volumes)
            for name in names:
                self._update_volume(name, tracker_state="exact")
        for name in names:
            self._emit(svc.VolumeChanged(name))
        return names

    def watch_targets(self) -> svc.WatchTargets:
        with self._lock:
            return svc.WatchTargets(
                pool_devices={d.path: p.name for p in self._pools.values() for d in p.devices},
                volume_devices={v.device: v.name for v in self._volumes.values()},
            )

    def pool_device_vanished(self, device: str) -> None:
        changed = []
        with self._lock:
            for pool in self._pools.values():
                if any(d.path == device for d in pool.devices):
                    devices = tuple(
                        replace(d, state="missing") if d.path == device else d for d in pool.devices
                    )
                    self._pools[pool.name] = replace(pool, devices=devices, state="degraded")
                    changed.append(pool.name)
        for name in changed:
            self._emit(svc.PoolChanged(name))

    def rescan_tracking(self, volume: str) -> None:
        with self._lock:
            info = self._volumes.get(volume)
            if info is None or os.path.exists(info.device):
                return
            self._update_volume(volume, tracker_state="lost")
        self._emit(svc.TrackingLost(volume, "the device disappeared"))
        self._emit(svc.VolumeChanged(volume))
