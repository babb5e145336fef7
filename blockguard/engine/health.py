"""Gathering the facts of :mod:`blockguard.core.health`, and the monitor that assesses them.

The facts come from what the engine keeps anyway: each volume's cached info (objectives,
generations, restore estimate, tracker state) and last plan (feasible or not), the
catalog's job records (failed backups in a row survive a restart), and each pool's
capacity. The :class:`HealthMonitor` thread assesses when poked (after a backup, a pool
or tracker change), when time alone makes an RPO missed (the assessment says when), and
every ``BLOCKGUARD_HEALTH_INTERVAL`` seconds for what changes unannounced (a pool's
space used by others).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from blockguard.core.catalog import Catalog
from blockguard.core.health import (
    PoolFacts,
    Thresholds,
    VolumeFacts,
    next_time_change,
    retry_delay,
)
from blockguard.core.health import assess as assess_health
from blockguard.core.objectives import DailyRPO, IntervalRPO, parse_rpo, parse_rto
from blockguard.engine import metrics
from blockguard.engine import service as svc
from blockguard.engine.alerts import AlertCenter
from blockguard.engine.pools import PoolRegistry
from blockguard.engine.settings import Settings
from blockguard.engine.volumes import VolumeRegistry
from blockguard.errors import BlockguardError

log = logging.getLogger(__name__)

#: How many of a volume's newest job records are read to count failures in a row.
FAILURE_WINDOW = 64
DAY = 86400.0


def thresholds_of(settings: Settings) -> Thresholds:
    return Thresholds(
        pool_free_percent=settings.alert_pool_free_percent,
        failed_backups=settings.alert_failed_backups,
        rpo_grace=settings.alert_rpo_grace,
    )


def failures_in_row(catalog: Catalog, volume: str) -> tuple[int, float, str]:
    """Failed backups of ``volume`` since its last successful one: ``(count, unix time of
    the newest failure, its message)``; jobs still queued or running are not counted."""
    count, last_at, last_error = 0, 0.0, ""
    for job in catalog.list_jobs(volume=volume, limit=FAILURE_WINDOW):
        if job.kind != "backup" or job.state in ("queued", "running"):
            continue
        if job.state != "failed":
            break
        if count == 0:
            last_at, last_error = job.finished or job.created, job.error or ""
        count += 1
    return count, last_at, last_error


def retry_hold(catalog: Catalog, volume: str, settings: Settings, now: float) -> float:
    """Seconds before the scheduler may try ``volume`` again (0: now)."""
    count, last_at, _ = failures_in_row(catalog, volume)
    delay = retry_delay(count, settings.retry_base, settings.retry_cap)
    return max(0.0, last_at + delay - now) if delay else 0.0


def _rpo_seconds(objectives: dict[str, Any]) -> float | None:
    text = objectives.get("rpo")
    if not text:
        return None
    try:
        rpo = parse_rpo(str(text), objectives.get("tz") or None)
    except BlockguardError:
        return None
    if isinstance(rpo, IntervalRPO):
        return rpo.interval.total_seconds()
    if isinstance(rpo, DailyRPO):
        return DAY
    return None  # an amount of changed data has no age limit


def _rto_seconds(objectives: dict[str, Any]) -> float | None:
    text = objectives.get("rto")
    if not text:
        return None
    try:
        return parse_rto(str(text)).total_seconds()
    except BlockguardError:
        return None


def volume_facts(
    info: svc.VolumeInfo, plan: dict[str, Any] | None, failures: tuple[int, float, str]
) -> VolumeFacts:
    """One volume's facts from its cached info, its last plan and its failure count."""
    usable = [g for g in info.generations if g.state == "ok"]
    objectives = dict(info.objectives)
    upper = info.restore_estimate.get("upper_seconds") if info.restore_estimate else None
    infeasible = ""
    if plan is not None and not plan.get("feasible", True):
        reasons = plan.get("reasons") or ["the objectives cannot be met"]
        infeasible = str(reasons[-1])
    return VolumeFacts(
        name=info.name,
        pool=info.pool,
        rpo_seconds=_rpo_seconds(objectives),
        rto_seconds=_rto_seconds(objectives),
        last_success=float(max(g.created for g in usable)) if usable else None,
        estimate_upper=float(upper) if isinstance(upper, int | float) and upper >= 0 else None,
        infeasible=infeasible,
        failures_in_row=failures[0],
        last_error=failures[2],
        tracker_state=info.tracker_state,
        generations=len(info.generations),
        bytes_stored=sum(g.bytes for g in info.generations),
    )


def pool_facts(info: svc.PoolInfo) -> PoolFacts:
    return PoolFacts(
        info.name, info.capacity, info.free, info.state, info.metadata_capacity, info.metadata_free
    )


def clock(settings: Settings) -> float:
    """The assessment's time: now, plus the test hook's offset if one is set."""
    now = time.time()
    path: Path | None = settings.test_clock_file
    if path is not None:
        with contextlib.suppress(OSError, ValueError):
            now += float(path.read_text().strip() or 0)
    return now


#: Events after which health is assessed again (at once, in the monitor's thread).
POKING_EVENTS = (
    svc.BackupFinished,
    svc.BackupFailed,
    svc.PoolSpaceLow,
    svc.ObjectiveInfeasible,
    svc.TrackingLost,
    svc.PoolChanged,
    svc.PoolRemoved,
    svc.VolumeRemoved,
)


#: Set in the thread of an assessment while it announces pool space changes.
_publishing = threading.local()


class HealthMonitor:
    """Calls ``assess(reuse_space=...)`` in a thread of its own when poked, every
    ``interval`` seconds, and at the time ``next_due`` names (unix time; ``None``: none).

    Pokes that arrive while an assessment runs make one more, not one each. The pools'
    space is read again unless every poke since the last assessment said it did not
    change (a backup that stored and freed nothing); the periodic assessment always
    reads it (space used by others changes unannounced).
    """

    def __init__(
        self,
        assess: Callable[[], object],
        interval: float,
        next_due: Callable[[], float | None] | None = None,
    ) -> None:
        self.assess = assess
        self.interval = interval
        self.next_due = next_due
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._space_due = True

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="health", daemon=True)
            self._thread.start()

    def poke(self, *, space: bool = True) -> None:
        """Assess soon; ``space``: the pools' space may have changed."""
        if space:
            self._space_due = True
        self._wake.set()

    def on_event(self, event: svc.ServiceEvent) -> None:
        """An event subscriber: poke on the events that can change health (not on the
        PoolChanged an assessment itself announces: during a backup the space changes at
        every look, and each would ask for the next)."""
        if isinstance(event, POKING_EVENTS) and not getattr(_publishing, "active", False):
            # A backup that stored and freed nothing changed the volume's facts (its
            # last success), not a pool's space: on an lvm pool that saves a vgs and a
            # dmsetup table and status after every backup that found no change.
            space = not isinstance(event, svc.BackupFinished) or event.space_changed
            self.poke(space=space)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None

    def _timeout(self) -> float | None:
        waits = [self.interval] if self.interval > 0 else []
        at = self.next_due() if self.next_due is not None else None
        if at is not None:
            # A little after the time, so the RPO is past its limit when assessed.
            waits.append(max(0.0, at - time.time()) + 1.0)
        return min(waits, default=None)

    def _loop(self) -> None:
        while not self._stop.is_set():
            poked = self._wake.wait(self._timeout())
            self._wake.clear()
            if self._stop.is_set():
                return
            space, self._space_due = self._space_due or not poked, False
            try:
                self.assess(reuse_space=not space)
            except Exception:
                log.exception("health assessment failed")


class HealthKeeper:
    """Assesses the engine's health, updates the alerts and writes the metrics file.

    :param settings: thresholds, retry back-off, metrics path, test clock.
    :param volumes: the volume registry (cached infos and plans, the catalog).
    :param pools: the pool registry.
    :param alerts: where raised and resolved alerts go.
    """

    def __init__(
        self,
        settings: Settings,
        volumes: VolumeRegistry,
        pools: PoolRegistry,
        alerts: AlertCenter,
    ) -> None:
        self.settings = settings
        self.volumes = volumes
        self.pools = pools
        self.alerts = alerts
        self.catalog = volumes.catalog
        self._space: dict[str, tuple[int, int]] = {}
        #: each pool's info as the last assessment read it (see assess's reuse_space)
        self._infos: dict[str, svc.PoolInfo] = {}
        #: the last assessment's level and alert count (for the one-line status)
        self.last: tuple[str, int] | None = None
        #: unix time when time alone changes the assessment (see next_time_change)
        self.next_change: float | None = None
        #: the steady part of the metrics file last written, and when (monotonic)
        self._metrics_last: tuple[str, float] | None = None
        # One assessment at a time: two could see the same new condition and raise twice.
        self._lock = threading.Lock()

    def retry_hold(self, volume: str) -> float:
        """For the scheduler: seconds before a failing volume is tried again."""
        return retry_hold(self.catalog, volume, self.settings, time.time())

    def facts(self, reuse_space: bool = False) -> tuple[list[VolumeFacts], list[svc.PoolInfo]]:
        """The volumes' facts and the pools' infos (one look at each pool's space, or
        none with ``reuse_space`` for a pool an earlier assessment read)."""
        vols = [
            volume_facts(
                info,
                self.volumes.last_plan.get(info.name),
                failures_in_row(self.catalog, info.name),
            )
            for info in self.volumes.all_infos()
        ]
        pools = []
        for name in self.pools.names():
            try:
                known = self._infos.get(name) if reuse_space else None
                info = self.pools.info(name, space_of=known)
                self._infos[name] = info
                pools.append(info)
            except BlockguardError as exc:
                log.warning("no health facts of pool %s: %s", name, exc)
        return vols, pools

    def _publish_space(self, pools: list[svc.PoolInfo]) -> None:
        """A pool whose space changed since the last look is announced (PoolChanged), so
        the D-Bus Pool object's Free follows backups, retention and garbage collection.
        The event carries the info just read: on an lvm pool a second look would be a
        vgs and a dmsetup table and status more after every backup."""
        changed = []
        for p in pools:
            if self._space.get(p.name) != (p.capacity, p.free):
                self._space[p.name] = (p.capacity, p.free)
                changed.append(svc.PoolChanged(p.name, p))
        if changed:
            _publishing.active = True
            try:
                self.pools.events.emit(*changed)
            finally:
                _publishing.active = False

    def assess(self, *, reuse_space: bool = False) -> dict[str, Any]:
        """Assess now; raise and resolve alerts; write the metrics file. Returns the
        health as :meth:`Service.health <blockguard.engine.service.Service.health>` does.

        :param reuse_space: the pools' space as the last assessment read it (the caller
            knows nothing changed it since).
        """
        with self._lock:
            now = clock(self.settings)
            vols, infos = self.facts(reuse_space)
            pools = [pool_facts(i) for i in infos]
            health = assess_health(vols, pools, thresholds_of(self.settings), now)
            at = next_time_change(vols, thresholds_of(self.settings), now)
            # In real time: the test clock's offset taken off again.
            self.next_change = None if at is None else at - (now - time.time())
            # Before the alerts go out: their event refreshes the status line, which says it.
            self.last = (health.level.label, len(health.conditions))
            self.alerts.update(health.conditions)
            active = self.alerts.active_records()
            jobs = [(j.kind, j.state) for j in self.catalog.list_jobs()]
            text = metrics.render(health, jobs, active)
            written = time.monotonic()
            if metrics.rewrite_due(text, self._metrics_last, written) and metrics.write(
                self.settings.metrics_file, text
            ):
                self._metrics_last = (metrics.steady(text), written)
        self._publish_space(infos)
        result = health.as_dict()
        result["time"] = now
        return result
