"""The real :class:`~blockguard.engine.service.Service`: catalog, planner and storage.

(One thing at ~520 lines: the Service methods, each a few lines over the registries it composes.)

It composes the parts of this package (pools, volumes and their tracking, jobs, backups,
restores, the scheduler) and is what ``blockguardd`` runs by default. Every public
method validates and refuses before it changes anything, so a refused call leaves the
catalog and the devices as they were. One lock orders the changes; long work runs in
jobs.

On open (also after a crash): the state directory is locked against a second daemon,
jobs the previous daemon left running are failed ("daemon restarted"), the dm-snapshot
layers of their point-in-time copies are undone, pools are reopened (which collects the
garbage of interrupted backups, exception stores included) and trackers reopened, so
tracking continues where it stopped.

The state directory remembers that it was used (:data:`USED_MARKER`, written when a pool
is created, extended or imported, listing the pools and their disks). Opening refuses an
empty catalog in a used state directory with :class:`CatalogLost`, naming the disks to
``pool import``, unless ``BLOCKGUARD_ALLOW_EMPTY_CATALOG=1`` (``blockguardd
--allow-empty-catalog``) says the reset is deliberate.
"""

from __future__ import annotations

import contextlib
import faulthandler
import fcntl
import itertools
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from blockguard.core.catalog import Catalog, Target
from blockguard.core.health import AlertKind
from blockguard.engine import filegroups, ids, protection, swapins
from blockguard.engine import service as svc
from blockguard.engine.alerts import AlertCenter
from blockguard.engine.background import run_in_background
from blockguard.engine.backoff import TargetBackoff
from blockguard.engine.backups import back_up
from blockguard.engine.browsing import Browser
from blockguard.engine.calibration import run_drill_job
from blockguard.engine.cmdguard import GuardedRunner
from blockguard.engine.events import EventHub
from blockguard.engine.filerestores import (
    check_restore_files,
    finish_restore_files,
    serve_restore_files,
)
from blockguard.engine.health import HealthKeeper, HealthMonitor
from blockguard.engine.idle import IdleWork
from blockguard.engine.importing import import_pool
from blockguard.engine.jobbook import JobBook
from blockguard.engine.jobs import Job, JobKind, JobRunner, JobState, ProgressReporter
from blockguard.engine.pools import PoolRegistry
from blockguard.engine.remoterestores import (
    check_remote_restore,
    remote_estimate,
    run_remote_restore,
)
from blockguard.engine.restores import (
    check_restore,
    find_generation,
    run_restore,
    run_verify,
)
from blockguard.engine.scheduling import Scheduler
from blockguard.engine.settings import Settings
from blockguard.engine.targets import TargetRegistry, default_client_id
from blockguard.engine.transfers import Transfers
from blockguard.engine.voldrills import start_volume_drill
from blockguard.engine.volumes import VolumeRegistry, is_detached
from blockguard.errors import (
    BlockguardError,
    Busy,
    CatalogLost,
    EnvironmentProblem,
    NotFound,
    PoolSpaceLow,
)
from blockguard.storage import dm
from blockguard.storage.drill import DRILL_VOLUME
from blockguard.storage.manifest import write_atomic
from blockguard.storage.snapshot import recover_stale_points_in_time
from blockguard.storage.tracking import thinmeta

log = logging.getLogger(__name__)

#: In the state directory: the pools this directory has served (see the module docstring).
USED_MARKER = "pools-used.json"
ALLOW_EMPTY_ENV = "BLOCKGUARD_ALLOW_EMPTY_CATALOG"
#: Seconds a restore waits for a stopped restore drill of its volume to let go of it.
DRILL_STOP_WAIT = 60.0


class Engine:
    """See the module docstring.

    :param state_dir: catalog, tracker state, the lock (and pool mounts by default).
    :param runner: runs the jobs.
    :param settings: tunables (by default from the environment, see ``settings``).
    """

    def __init__(
        self, state_dir: Path, runner: JobRunner, settings: Settings | None = None
    ) -> None:
        self.state_dir = Path(state_dir)
        self.runner = runner
        self.settings = settings or Settings.from_env(self.state_dir)
        thinmeta.configure(self.settings.thin_metadata_wait, self.settings.thin_metadata_quiet)
        self.events = EventHub()
        # One runner for the daemon (one flight recorder), guarded: see cmdguard.
        self.cmd = GuardedRunner()
        self._lock = threading.RLock()
        self._lock_fd: int | None = None
        self._serial = itertools.count(1)
        self.catalog: Catalog | None = None
        self._pools: PoolRegistry | None = None
        self._volumes: VolumeRegistry | None = None
        self._jobs: JobBook | None = None
        self._health: HealthKeeper | None = None
        self._monitor: HealthMonitor | None = None
        self._targets: TargetRegistry | None = None
        #: Targets that could not be reached, held back from scheduled transfers.
        self.target_backoff = TargetBackoff()
        self._browser: Browser | None = None
        #: What the next backups would make in their own time, made when a pool is idle.
        self.idle = IdleWork(self._pool_busy, self.settings.idle_quiet)

    # --- life cycle ---------------------------------------------------------------------

    @property
    def pools(self) -> PoolRegistry:
        if self._pools is None:
            raise EnvironmentProblem(detail="the service is not open")
        return self._pools

    @property
    def volumes(self) -> VolumeRegistry:
        if self._volumes is None:
            raise EnvironmentProblem(detail="the service is not open")
        return self._volumes

    @property
    def targets(self) -> TargetRegistry:
        if self._targets is None:
            raise EnvironmentProblem(detail="the service is not open")
        return self._targets

    @property
    def transfers(self) -> Transfers:
        return Transfers(
            self.catalog_or_fail(),
            self.targets,
            self.pools,
            self.settings.default_speed,
            backoff=self.target_backoff,
            on_target_full=self._target_full,
            gc_grace=self.settings.s3_gc_grace,
            gc_interval=self.settings.s3_gc_interval,
            lease_timeout=self.settings.s3_lease_timeout,
        )

    def _target_full(self, target: str, exc: PoolSpaceLow) -> None:
        """A transfer found the target's area full: the space alert, naming the target
        (one-shot: the target's space is not watched between transfers)."""
        subject = f"target:{target}"
        self.alerts.fire(
            AlertKind.POOL_SPACE_LOW,
            subject,
            f"target {target}: no room for the transfer: {exc}",
            {"target": target},
        )

    @property
    def jobs(self) -> JobBook:
        if self._jobs is None:
            raise EnvironmentProblem(detail="the service is not open")
        return self._jobs

    def open(self) -> None:
        # kill -USR1 dumps every thread's stack to the log: the flight recorder of a hang.
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.state_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Busy(what=str(self.state_dir), reason="another blockguardd uses it") from None
        self._lock_fd = fd
        # Serial numbers of tracker references: unique across daemon lives.
        self._serial = itertools.count(int.from_bytes(os.urandom(3), "big") << 16)
        try:
            self.catalog = Catalog(self.state_dir / "catalog.db")
            self._pools = PoolRegistry(self.catalog, self.settings, self.events, self.cmd)
            self._volumes = VolumeRegistry(
                self.catalog, self._pools, self.settings, self.events, self.cmd
            )
            self._jobs = JobBook(self.catalog, self.runner, self.events, recorder=self.cmd)
            self._jobs.keep_ids_in(self.state_dir / "last-job-id")
            self._targets = TargetRegistry(
                self.catalog,
                self.state_dir,
                self.cmd,
                lease_timeout=self.settings.s3_lease_timeout,
            )
            self._refuse_lost_catalog()
            self._jobs.fail_interrupted()
            self._recover_points_in_time()
            self._pools.open_all()
            self._volumes.open_all()
            self._browser = Browser(self.state_dir, self._pools, self._volumes, self.cmd)
            self._browser.clean_stale()
            self._open_health()
        except BaseException:
            self.close()
            raise

    def _open_health(self) -> None:
        """Alerts and the health monitor (started with the scheduler: not in early boot)."""
        assert self._volumes is not None and self._pools is not None
        alerts = AlertCenter(
            self.state_dir,
            self.events,
            self.settings.alert_dir,
            self.settings.alert_hook_timeout,
        )
        self._health = HealthKeeper(self.settings, self._volumes, self._pools, alerts)
        keeper = self._health
        self._monitor = HealthMonitor(
            keeper.assess, self.settings.health_interval, lambda: keeper.next_change
        )
        self.events.subscribe(self._monitor.on_event)

    @property
    def alerts(self) -> AlertCenter:
        """Where other parts send alerts (e.g. ``engine.alerts.fire(...)`` for a drill)."""
        return self.health_keeper.alerts

    @property
    def health_keeper(self) -> HealthKeeper:
        if self._health is None:
            raise EnvironmentProblem(detail="the service is not open")
        return self._health

    def health(self) -> dict[str, Any]:
        return self.status_and_health()[1]

    def status_and_health(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """:meth:`status` after :meth:`health`, from one look at the volumes (issue 16:
        ``blockguardctl status`` asks for both, and each look reads the catalog)."""
        result = self.health_keeper.assess()
        status = self.status()
        result["summary"] = status["summary"]
        return status, result

    # --- the used-state marker ---------------------------------------------------------

    def _used_pools(self) -> dict[str, list[str]]:
        try:
            data = json.loads((self.state_dir / USED_MARKER).read_text())
            pools = data["pools"]
            return {str(k): [str(d) for d in v] for k, v in pools.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("%s is unreadable (%s); treating it as in use", USED_MARKER, exc)
            return {"?": []}

    def _mark_used(self) -> None:
        """Record the catalog's pools and their disks in the marker (atomically)."""
        assert self.catalog is not None
        pools = {
            p.name: [d.device_path for d in self.catalog.list_pool_devices(p.name)]
            for p in self.catalog.list_pools()
        }
        body = json.dumps({"pools": pools}, indent=1, sort_keys=True).encode()
        write_atomic(self.state_dir / USED_MARKER, body)

    def _refuse_lost_catalog(self) -> None:
        """:raises CatalogLost: an empty catalog in a state directory used before."""
        assert self.catalog is not None
        if self.catalog.list_pools() or self.catalog.list_volumes():
            return
        used = self._used_pools()
        trackers = sorted(p.name for p in (self.state_dir / "volumes").glob("*") if p.is_dir())
        if not used and not trackers:
            return
        evidence = (
            f"this state directory served pools {', '.join(sorted(used))}"
            if used
            else f"it holds the tracker state of volumes {', '.join(trackers)}"
        )
        if os.environ.get(ALLOW_EMPTY_ENV) == "1":
            log.warning(
                "starting on an empty catalog although %s (%s=1)", evidence, ALLOW_EMPTY_ENV
            )
            return
        hints = [
            f"blockguardctl pool import {' '.join(devices)}" for devices in used.values() if devices
        ]
        raise CatalogLost(
            path=str(self.state_dir / "catalog.db"),
            evidence=evidence,
            hint="; ".join(hints) or "blockguardctl pool import DEVICE...",
        )

    def _recover_points_in_time(self) -> None:
        """Undo the snapshot layers of backups a killed daemon left (each volume gets its
        own table back) before the pools reopen: their exception stores are then no
        longer held open and are collected as garbage."""
        if not dm.driver_loaded():
            return
        try:
            recover_stale_points_in_time(self.cmd)
        except BlockguardError as exc:
            log.error("cannot undo the point-in-time copies of interrupted backups: %s", exc)

    def close(self) -> None:
        self.idle.stop()
        if self._browser is not None:
            self._browser.close()
            self._browser = None
        if self._volumes is not None:
            self._stop_drills()
        if self._monitor is not None:
            self._monitor.stop()
            self._monitor = None
        if self._health is not None:
            self._health.alerts.close()
        if self._pools is not None:
            self._pools.close()
        if self.catalog is not None:
            self.catalog.close()
            self.catalog = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def subscribe(self, callback: svc.EventCallback) -> None:
        self.events.subscribe(callback)

    def _pool_busy(self, pool: str) -> bool:
        """Whether a job of ``pool`` (a pool-wide one, or one of any of its volumes) is
        queued or running. Takes no lock of the engine's (the idle work asks it)."""
        jobs, pools = self._jobs, self._pools
        if jobs is None or pools is None:
            return True
        for key in jobs.busy_volumes():
            if key == pool or key.endswith(f":{pool}"):
                return True
            try:
                if pools.catalog.get_volume(key).pool == pool:
                    return True
            except BlockguardError:
                continue  # a target's or another pool's key
        return False

    def status(self) -> dict[str, Any]:
        volumes = self.volumes.all_infos()
        pools = self.pools.catalog.list_pools()  # one query for the count and the states
        running = sum(1 for j in self.runner.list() if not j.is_finished)
        summary = f"{len(volumes)} volumes, {len(pools)} pools, {running} jobs running"
        degraded = [p.name for p in pools if p.state != "ok"]
        lost = [v.name for v in volumes if v.tracker_state == "lost"]
        detached = [v.name for v in volumes if v.tracker_state == "detached"]
        if degraded:
            summary += f"; degraded pools: {', '.join(degraded)}"
        if detached:
            summary += f"; detached: {', '.join(detached)}"
        if lost:
            summary += f"; tracking lost: {', '.join(lost)}"
        last = self._health.last if self._health is not None else None
        if last is not None and last[0] != "ok":
            alerts = f"{last[1]} alert" + ("s" if last[1] != 1 else "")
            summary += f"; health {last[0]}: {alerts} (blockguardctl status)"
        drills = {v.name: dict(v.last_drill) for v in volumes if v.last_drill}
        failed = sorted(n for n, d in drills.items() if d.get("result") == "failed")
        if failed:
            summary += f"; restore drill failed: {', '.join(failed)}"
        return {
            "volumes": len(volumes),
            "pools": len(pools),
            "running_jobs": running,
            "summary": summary,
            "drills": drills,
        }

    async def run_scheduler(self) -> None:
        """The scheduler loop (the daemon runs it as a task on its event loop); the
        health monitor runs alongside it, in its own thread."""
        if self._monitor is not None:
            self._monitor.start()
            self._monitor.poke()  # an assessment at start: alerts of the time we were down
        scheduler = self.scheduler()
        # Decisions renewed elsewhere (objectives, backups, rescans) wake it up.
        self.events.subscribe(scheduler.on_event)
        await scheduler.run()

    def scheduler(self) -> Scheduler:
        """A scheduler on this engine (tests call :meth:`Scheduler.tick` directly)."""
        return Scheduler(
            self.volumes,
            self.backup_now,
            self.jobs.busy_volumes,
            self.settings.scheduler_interval,
            held=self.health_keeper.retry_hold,
            start_drill=self.drill_volume,
            max_interval=self.settings.scheduler_max_interval,
            start_transfer=self.transfer_now,
            transfer_held=self.transfer_hold,
        )

    def transfer_hold(self, volume: str) -> float:
        """Seconds before the scheduler may start a transfer of ``volume``: its target's
        back-off after failures (0: now). A transfer asked by hand is never held."""
        try:
            target = self.volumes.objectives_of(volume).get("remote_target")
        except BlockguardError:
            return 0.0
        if not isinstance(target, str) or not target:
            return 0.0
        return self.target_backoff.wait(target, time.time())

    # --- pools ----------------------------------------------------------------------------

    def create_pool(
        self, name: str, backend: str, devices: Sequence[str], force: bool
    ) -> svc.PoolInfo:
        with self._lock:
            info = self.pools.create(name, backend, list(devices), bool(force))
            self._mark_used()
        self._auto_drill(name)
        return info

    def extend_pool(self, name: str, devices: Sequence[str], force: bool) -> svc.PoolInfo:
        with self._lock:
            info = self.pools.extend(name, list(devices), bool(force))
            self._mark_used()
        self._auto_drill(name)
        return info

    def drill(self, pool: str) -> Job:
        """Calibrate the restore-time model of ``pool`` with a restore drill (a job).

        :raises Busy: a drill of the pool is already queued or running.
        """
        with self._lock:
            self.pools.backend(pool)  # NotFound / EnvironmentProblem before any job
            key = f"{DRILL_VOLUME}:{pool}"

            def work(progress: ProgressReporter, _record: str) -> dict[str, Any]:
                result = run_drill_job(pool, self.pools, self.settings, progress)
                for volume in self.volumes.catalog.list_volumes():
                    if volume.pool == pool:
                        with contextlib.suppress(BlockguardError):
                            self.volumes.refresh(volume.name)
                return result

            return self.jobs.submit(JobKind.DRILL, key, pool, work, pool=pool)

    def drill_volume(self, volume: str) -> Job:
        """Run the restore drill of ``volume`` now (see :mod:`.voldrills`)."""
        with self._lock:
            self.volumes.require_attached(volume)
            return start_volume_drill(volume, self.volumes, self.pools, self.jobs, self.alerts)

    def _stop_drill(self, volume: str) -> None:
        """A restore never waits behind a restore drill of its volume: the drill is
        stopped (at its next extent; its scratch space released) and the restore goes on
        once the volume is free. Waited for outside the engine's lock."""
        if not self.volumes.drills.stop(volume):
            return
        log.info("stopping the restore drill of %s for a restore", volume, extra={"VOLUME": volume})
        deadline = time.monotonic() + DRILL_STOP_WAIT
        while volume in self.jobs.busy_volumes() and time.monotonic() < deadline:
            time.sleep(0.05)

    def _stop_drills(self) -> None:
        """At shutdown: stop the running restore drills of volumes and let them release
        their scratch space before the pools are closed (a loop device left attached to a
        scratch image would keep its pool area mounted)."""
        running = self.volumes.drills.busy()
        for volume in running:
            self.volumes.drills.stop(volume)
        deadline = time.monotonic() + DRILL_STOP_WAIT
        while self.volumes.drills.busy() and time.monotonic() < deadline:
            time.sleep(0.05)
        if running:
            log.info("restore drills of %s stopped for the shutdown", ", ".join(running))

    def _auto_drill(self, pool: str) -> None:
        """Drill after a pool change or a protect, unless turned off or already running."""
        if not self.settings.drill_auto:
            return
        try:
            self.drill(pool)
        except BlockguardError as exc:
            log.info("no restore drill of pool %s now: %s", pool, exc)

    def import_pool(self, devices: Sequence[str]) -> str:
        """Rebuild the catalog rows of the pool on ``devices`` (see :mod:`.importing`)."""
        with self._lock:
            name = import_pool(self.pools, self.volumes, list(devices))
            self._mark_used()
            return name

    def remove_pool(self, name: str, force: bool, delete_generations: bool = False) -> None:
        """Forget a pool. ``force`` unprotects its volumes; it is refused while the pool
        holds generations unless ``delete_generations`` (which deletes them from the
        pool's disks first): nothing committed is dropped silently."""
        with self._lock:
            self.pools.require_known(name)
            users = [v.name for v in self.volumes.catalog.list_volumes() if v.pool == name]
            if not force:
                self.pools.refuse_if_used(name, users)
            held = sum(len(self.volumes.catalog.list_generations(v)) for v in users)
            with contextlib.suppress(BlockguardError):
                held = max(held, len(self.pools.backend(name).generations()))
            if held and not delete_generations:
                raise Busy(
                    what=f"pool {name}",
                    reason=f"it holds {held} generations; remove it with delete_generations "
                    "(blockguardctl pool remove --delete-generations) to delete them",
                )
            busy = self.jobs.busy_volumes() & set(users)
            if busy:
                raise Busy(what=f"pool {name}", reason=f"volumes {', '.join(busy)} have jobs")
            if f"{DRILL_VOLUME}:{name}" in self.jobs.busy_volumes():
                raise Busy(what=f"pool {name}", reason="a restore drill of it is running")
            for volume in users:
                protection.unprotect(self.volumes, volume, delete_generations=True)
            with contextlib.suppress(EnvironmentProblem):
                self.pools.backend(name)  # raises when the pool could not be opened
                self._delete_strays(name)
            self.pools.remove(name)
            self._mark_used()

    def _delete_strays(self, name: str) -> None:
        """Delete generations and records no catalog volume names (newest first)."""
        backend = self.pools.backend(name)
        for m in reversed(backend.generations()):
            backend.remove_generation(m.volume.name, m.generation_id)
        for volume in backend.volume_records():
            backend.remove_volume_record(volume)

    def list_pools(self) -> list[svc.PoolInfo]:
        return [self.pools.info(n) for n in self.pools.names()]

    def get_pool(self, name: str) -> svc.PoolInfo:
        return self.pools.info(name)

    # --- volumes --------------------------------------------------------------------------

    def protect(self, request: svc.ProtectRequest) -> svc.VolumeInfo:
        with self._lock:
            info = protection.protect(self.volumes, request)
        if info.pool:
            self._auto_drill(info.pool)
        return info

    def unprotect(self, volume: str, delete_generations: bool = False) -> None:
        with self._lock:
            self.volumes.catalog.get_volume(volume)
            self.jobs.reserve(volume)
            try:
                protection.unprotect(self.volumes, volume, bool(delete_generations))
            finally:
                self.jobs.release(volume)

    def set_objectives(self, volume_or_group: str, objectives: Mapping[str, Any]) -> list[str]:
        with self._lock:
            return self.volumes.set_objectives(volume_or_group, objectives)

    def list_volumes(self) -> list[svc.VolumeInfo]:
        return self.volumes.all_infos()

    def get_volume(self, name: str) -> svc.VolumeInfo:
        return self.volumes.info(name)

    def list_generations(self, volume: str) -> list[svc.GenerationInfo]:
        return list(self.volumes.info(volume).generations)

    def get_generation(self, generation: str) -> svc.GenerationInfo:
        volume, _ = ids.split_public_id(generation)
        try:
            found = self.volumes.scan(volume).selectable()
        except NotFound:
            raise NotFound(what="generation", name=generation) from None
        pool_id = ids.resolve_generation(volume, generation, found)
        public = ids.public_id(volume, pool_id)
        for gen in self.volumes.info(volume).generations:
            if gen.id == public:
                return gen
        raise NotFound(what="generation", name=generation)

    def plan(self, volume: str) -> dict[str, Any]:
        return self.volumes.plan(volume)

    # --- backup targets (issue 11) ---------------------------------------------------------

    def add_target(
        self,
        target: str,
        url: str,
        pool: str,
        host_key: str = "",
        key_text: str = "",
        client_id: str = "",
        endpoint: str = "",
        credentials: str = "",
    ) -> Job:
        """Register a backup target: checked and its host key pinned now (refused with
        the offered fingerprints when none was confirmed), connected and measured in a
        job (see :mod:`.targets`); an ``s3://`` URL is an object store at ``endpoint``
        (see :mod:`.s3targets`)."""
        key = f"target:{target}"
        # Not under the engine's lock: asking the target's sshd for its keys may take
        # seconds, and a registration touches no volume or pool. The reservation keeps
        # two registrations of one id apart.
        self.jobs.reserve(key)
        try:
            request = self.targets.prepare(
                target,
                url,
                pool,
                host_key,
                key_text=key_text,
                client_id=client_id,
                endpoint=endpoint,
                credentials=credentials,
            )

            def work(progress: ProgressReporter, _record: str) -> dict[str, Any]:
                progress(0, 1)
                found = self.targets.register(request)
                progress(1, 1)
                return self.targets.describe(found)

            return self.jobs.submit(JobKind.TARGET, key, target, work, reserved=True)
        except BaseException:
            self.jobs.release(key)
            raise

    def remove_target(self, target: str) -> None:
        key = f"target:{target}"
        with self._lock:
            self.jobs.reserve(key)  # Busy while its registration runs
            try:
                self.targets.remove(target)
            finally:
                self.jobs.release(key)

    def transfer_now(self, volume: str) -> Job:
        """Send the newest local generation of ``volume`` to its target, by the remote
        plan (see :mod:`.transfers`). The volume is busy meanwhile: neither a backup nor
        retention may change the chain being read."""
        with self._lock:
            vol = self.volumes.catalog.get_volume(volume)
            self.volumes.require_attached(volume)
            pool = vol.pool
            if pool is None:
                raise EnvironmentProblem(detail=f"volume {volume} has no pool")
            self.jobs.reserve(volume)
            try:
                given = self.volumes.objectives_of(volume)
                usable = self.volumes.scan(volume).usable
                plan = self.transfers.plan(volume, pool, given, usable)

                def work(progress: ProgressReporter, _record: str) -> dict[str, Any]:
                    try:
                        return self.transfers.run(volume, pool, plan, progress)
                    finally:
                        with contextlib.suppress(BlockguardError):
                            self.volumes.refresh(volume)

                return self.jobs.submit(
                    JobKind.TRANSFER, volume, volume, work, pool=pool, reserved=True
                )
            except BaseException:
                self.jobs.release(volume)
                raise

    def restore_from_target(
        self, volume: str, generation: str, target_id: str, device: str, force: bool
    ) -> Job:
        """Restore ``generation`` of ``volume`` from backup target ``target_id`` onto
        ``device`` (see :mod:`.remoterestores`); the volume need not be protected here."""
        with self._lock:
            self.jobs.reserve(volume)
            try:
                catalog = self.catalog_or_fail()
                request = check_remote_restore(
                    catalog, self.pools, volume, generation, target_id, device, bool(force)
                )
                estimate = remote_estimate(
                    catalog, self.pools, request, self.settings.default_speed
                )

                def work(progress: ProgressReporter, _record: str) -> dict[str, Any]:
                    return run_remote_restore(
                        request, self.targets, self.pools, estimate, progress, bool(force)
                    )

                return self.jobs.submit(
                    JobKind.RESTORE,
                    volume,
                    volume,
                    work,
                    generation=ids.catalog_id(volume, request.generation_id),
                    reserved=True,
                )
            except BaseException:
                self.jobs.release(volume)
                raise

    def import_target(self, target: str) -> dict[str, Any]:
        """List what ``target`` holds of this host and record it (``target import``)."""
        key = f"target:{target}"
        self.jobs.reserve(key)  # not while its registration runs
        try:
            return self.transfers.import_target(target)
        finally:
            self.jobs.release(key)

    def collect_target(self, target: str) -> Job:
        """Sweep object-store target ``target``'s bucket now (``target gc``), a job."""
        key = f"target:{target}"
        self.jobs.reserve(key)  # not while its registration runs, nor twice at once
        try:
            self.catalog_or_fail().get_target(target)

            def work(progress: ProgressReporter, _record: str) -> dict[str, Any]:
                progress(0, 1)
                found = self.transfers.collect(target)
                progress(1, 1)
                return found

            return self.jobs.submit(JobKind.TARGET, key, target, work, reserved=True)
        except BaseException:
            self.jobs.release(key)
            raise

    def list_targets(self) -> list[dict[str, Any]]:
        return [self._describe_target(t) for t in self.catalog_or_fail().list_targets()]

    def get_target(self, target: str) -> dict[str, Any]:
        return self._describe_target(self.catalog_or_fail().get_target(target))

    def _describe_target(self, target: Target) -> dict[str, Any]:
        return self.targets.describe(target) | self.target_backoff.describe(target.id)

    def export_key(self) -> dict[str, str]:
        return self.targets.export_key()

    def client_public_key(self, client_id: str = "") -> dict[str, str]:
        """This host's ssh key, and the authorized_keys line a target needs for it."""
        public = self.targets.client_public_key()
        line = self.targets.authorized_keys_line(client_id or default_client_id(), public)
        return {"public_key": public, "authorized_keys_line": line}

    def catalog_or_fail(self) -> Catalog:
        if self.catalog is None:
            raise EnvironmentProblem(detail="the service is not open")
        return self.catalog

    # --- long operations ------------------------------------------------------------------

    def backup_now(self, volume: str, full: bool = False) -> Job:
        with self._lock:
            vol = self.volumes.catalog.get_volume(volume)
            self.volumes.require_attached(volume)
            self.jobs.reserve(volume)
            self.idle.touch(vol.pool)  # its idle work waits, or stops before its next step
            serial = next(self._serial)

            def work(progress: ProgressReporter, _record: str) -> dict[str, Any]:
                return back_up(
                    volume,
                    self.volumes,
                    self.pools,
                    self.events,
                    progress,
                    serial,
                    self.settings.backup_delay,
                    full=full,
                )

            def finished(job: Job) -> None:
                if job.snapshot().state is JobState.FAILED:
                    self.events.emit(svc.BackupFailed(volume, *job.snapshot().error))
                # After the job reported: what the backup left to clean up (old thin
                # snapshots) is no part of its time, nor of the next job's (behind it).
                tracking = self.volumes.tracking.get(volume)
                if tracking is not None:
                    run_in_background(tracking.tidy, f"tidy {volume}")
                self.idle.touch(vol.pool)
                if job.snapshot().state is JobState.DONE:
                    # The next backup's storage (an lvm pool's delta area), made once the
                    # pool is idle: never in the time of a job that comes right after.
                    self.idle.after_job(
                        vol.pool,
                        f"ahead {volume}",
                        lambda go_on: self.pools.backend(vol.pool).prepare_ahead(volume, go_on),
                    )

            job = self.jobs.submit(
                JobKind.BACKUP, volume, volume, work, finished, pool=vol.pool, reserved=True
            )
        self.events.emit(svc.BackupStarted(volume, job.id))
        return job

    def restore(self, volume: str, generation: str, mode: str, target: str, force: bool) -> Job:
        self._stop_drill(volume)
        with self._lock:
            self.jobs.reserve(volume)
            try:
                request = check_restore(
                    self.volumes, self.pools, volume, generation, mode, target, bool(force)
                )
            except BaseException:
                self.jobs.release(volume)
                raise

            def work(progress: ProgressReporter, record: str) -> dict[str, Any]:
                return run_restore(
                    request, self.volumes, self.pools, self.events, progress, record, bool(force)
                )

            return self.jobs.submit(
                JobKind.RESTORE,
                volume,
                volume,
                work,
                pool=request.pool,
                generation=ids.catalog_id(volume, request.manifest.generation_id),
                reserved=True,
            )

    def list_swap_ins(self) -> list[dict[str, Any]]:
        return swapins.list_swap_ins(self.pools)

    def release_swap_in(self, which: str) -> dict[str, Any]:
        with self._lock:
            return swapins.release_swap_in(self.pools, which)

    @property
    def browser(self) -> Browser:
        if self._browser is None:
            raise EnvironmentProblem(detail="the service is not open")
        return self._browser

    def mount(self, generation: str, mountpoint: str) -> dict[str, Any]:
        return self.browser.mount(generation, mountpoint)

    def unmount(self, mountpoint: str) -> dict[str, Any]:
        return self.browser.unmount(mountpoint)

    def list_mounts(self) -> list[dict[str, Any]]:
        return self.browser.list()

    def create_file_group(self, name: str, volume: str, paths: list[str]) -> dict[str, Any]:
        return filegroups.create(self._open_catalog(), name, volume, paths)

    def list_file_groups(self) -> list[dict[str, Any]]:
        return filegroups.list_groups(self._open_catalog())

    def show_file_group(self, name: str) -> dict[str, Any]:
        catalog = self._open_catalog()
        vol = catalog.get_volume(catalog.get_file_group(name).volume)
        pool = None if vol.pool is None else self.pools.backend(vol.pool)
        return filegroups.show(catalog, pool, name)

    def remove_file_group(self, name: str) -> None:
        filegroups.remove(self._open_catalog(), name)

    def restore_files(self, group: str, paths: list[str], to: str) -> dict[str, Any]:
        request = check_restore_files(self.volumes, self.pools, group, paths, to)
        return serve_restore_files(request, self.browser)

    def finish_restore_files(self, served_id: str, result: dict[str, Any]) -> None:
        finish_restore_files(self.browser, served_id, result)

    def _open_catalog(self) -> Catalog:
        if self.catalog is None:
            raise EnvironmentProblem(detail="the service is not open")
        return self.catalog

    def verify(self, generation: str) -> Job:
        with self._lock:
            volume, _ = ids.split_public_id(generation)
            self.volumes.catalog.get_volume(volume)
            manifest = find_generation(self.volumes, volume, generation, reverify=True)

            def work(progress: ProgressReporter, _record: str) -> dict[str, Any]:
                return run_verify(volume, manifest, self.volumes, self.pools, progress)

            return self.jobs.submit(
                JobKind.VERIFY,
                volume,
                ids.public_id(volume, manifest.generation_id),
                work,
                generation=ids.catalog_id(volume, manifest.generation_id),
            )

    def list_jobs(self) -> list[Job]:
        return self.jobs.list()

    def get_job(self, job_id: int) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(what="job", name=str(job_id))
        return job

    def cancel_job(self, job_id: int) -> None:
        job = self.get_job(job_id)
        job.cancel()
        log.info("job %d (%s of %s) cancelled on request", job.id, job.kind.value, job.target)

    # --- hooks of the adapters ------------------------------------------------------------

    def reestablish_tracking(self) -> list[str]:
        """Trackers were reopened by :meth:`open` (era re-creates its dm device there)."""
        return sorted(self.volumes.tracking)

    def watch_targets(self) -> svc.WatchTargets:
        return svc.WatchTargets(
            pool_devices={d.device_path: d.pool for d in self.pools.catalog.list_pool_devices()},
            volume_devices={
                v.device_path: v.name
                for v in self.volumes.catalog.list_volumes()
                if not is_detached(v)
            },
        )

    def pool_device_vanished(self, device: str) -> None:
        self.pools.device_vanished(device)

    def rescan_tracking(self, volume: str) -> None:
        try:
            self.volumes.refresh(volume)
        except NotFound:
            return
        except BlockguardError as exc:
            self.volumes.lost[volume] = str(exc)
            self.volumes.cache[volume] = self.volumes.bare_info(volume, str(exc))
            self.events.emit(svc.TrackingLost(volume, str(exc)), svc.VolumeChanged(volume))


def make_service(state_dir: Path, runner: JobRunner) -> Engine:
    """The factory ``blockguardd --service blockguard.engine.engine:make_service`` calls."""
    return Engine(Path(state_dir), runner)
