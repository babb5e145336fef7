"""The scheduler loop: looks at a volume when its objectives need it, starts the backups due.

The decisions are :mod:`blockguard.core.scheduler`'s: on the RPO interval, at the daily
hour, when the changes reach the RPO amount or (with only an RTO) what can still be
restored in time. Runs missed while the daemon was down collapse into one (the decision
is computed from the last backup's time). No volume gets a second job while one runs.
Restore drills (:mod:`blockguard.engine.voldrills`) start when the volume's drill is due
and no job of it runs; a backup due at the same look goes first. Transfers to a backup
target (issue 11) start the same way when the remote RPO makes one due
(:func:`blockguard.engine.remoteplan.transfer_schedule`), after the backups and drills.
A group starts only when no member is busy, all members at once: with device-mapper the
point-in-time copies are taken back to back; on the host (scan tracking, no snapshots)
"one point in time" holds only as far as the caller keeps the members quiet.

A volume whose backups fail is held back: it is tried again after a delay that doubles
with each failure in a row, up to a cap (:func:`blockguard.core.health.retry_delay`),
instead of at every look. A group waits while any member is held. ``BackupNow`` is
never held.

Idle means idle: a volume is *looked at* (refreshed: its tracker and pool read, its plan
and schedule decision recomputed) only when its objectives need it. A volume without
objectives and drills is never looked at by the scheduler; an interval or daily RPO is
looked at when it falls due; an amount of changed data (or an RTO without RPO) is looked
at on a delay that fits the amount left and the volume's recent change rate
(:func:`blockguard.core.scheduler.poll_delay`, between ``scheduler_interval`` and
``scheduler_max_interval``). Service events (objectives set, a backup finished, a device
rescanned after a uevent) carry fresh decisions: the scheduler takes them as they come
and wakes up when the earliest look is due, not on a fixed tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from blockguard.core.scheduler import (
    ScheduleDecision,
    group_schedule,
    group_startable,
    poll_delay,
    startable,
)
from blockguard.engine import service as svc
from blockguard.engine.volumes import VolumeRegistry, is_detached
from blockguard.errors import BlockguardError

log = logging.getLogger(__name__)

#: The longest sleep of the loop even with nothing due: a wall clock set forward (or a
#: resume from suspend) is noticed within this many seconds. A wake-up with nothing due
#: does no device work.
MAX_SLEEP = 300.0

#: Set in the scheduler's own thread while it looks at volumes: the VolumeChanged events
#: of its own refreshes carry nothing it does not know.
_looking = threading.local()


class Scheduler:
    """See the module docstring.

    :param volumes: the volumes (their refresh computes each one's schedule decision).
    :param start_backup: starts a backup job of a volume (raises Busy if one runs).
    :param busy: the volumes with a job queued or running.
    :param interval: the shortest time between two looks at one volume (0: never look).
    :param held: seconds before a volume whose backups fail may be tried again (0: now).
    :param start_drill: starts a volume's restore drill (raises Busy if a job runs).
    :param max_interval: the longest time between two looks at a volume with an amount
        trigger (default: ``interval``).
    :param clock: the time (unix seconds), for tests.
    :param start_transfer: starts a volume's transfer to its target (raises Busy if a
        job runs).
    :param transfer_held: seconds before a volume's transfer may be started again (its
        target's back-off after failures; 0: now).
    """

    def __init__(
        self,
        volumes: VolumeRegistry,
        start_backup: Callable[[str], object],
        busy: Callable[[], set[str]],
        interval: float,
        held: Callable[[str], float] | None = None,
        start_drill: Callable[[str], object] | None = None,
        max_interval: float | None = None,
        clock: Callable[[], float] = time.time,
        start_transfer: Callable[[str], object] | None = None,
        transfer_held: Callable[[str], float] | None = None,
    ) -> None:
        self.volumes = volumes
        self.start_transfer = start_transfer
        self.transfer_held = transfer_held
        self.held = held
        self.start_backup = start_backup
        self.busy = busy
        self.interval = interval
        self.max_interval = max(interval, interval if max_interval is None else max_interval)
        self.start_drill = start_drill
        self.clock = clock
        self._lock = threading.Lock()
        #: volume -> unix time of its next look (absent: planned at the next tick)
        self.look_at: dict[str, float] = {}
        #: volume -> (unix time, changed bytes) of the last look, and the change rate seen
        self._sample: dict[str, tuple[float, int]] = {}
        self._rate: dict[str, float] = {}
        #: volumes whose cached decision an event renewed since the last tick
        self._renewed: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    # --- events -------------------------------------------------------------------------

    def on_event(self, event: svc.ServiceEvent) -> None:
        """An event subscriber: a volume's decision was recomputed elsewhere (objectives
        set, backup finished, rescan after a uevent), or its job started or ended. The
        next wake-up plans it from the cached decision, without device work."""
        volume = getattr(event, "volume", None)
        if not isinstance(volume, str) or getattr(_looking, "active", False):
            return
        with self._lock:
            self._renewed.add(volume)
        self._poke()

    def _poke(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed at shutdown
                loop.call_soon_threadsafe(wake.set)

    # --- planning -----------------------------------------------------------------------

    def _observe(self, name: str, now: float) -> None:
        """Take the volume's change count from its cached decision (for the change rate)."""
        decision = self.volumes.last_due.get(name)
        changed = None if decision is None else decision.changed_bytes
        if changed is None:
            self._sample.pop(name, None)
            self._rate.pop(name, None)
            return
        before = self._sample.get(name)
        if before is not None and changed >= before[1] and now > before[0]:
            self._rate[name] = (changed - before[1]) / (now - before[0])
        # After a backup the count starts again: the last rate seen still describes the
        # writer until the next two looks measure it anew.
        self._sample[name] = (now, changed)

    def plan(self, name: str, now: float) -> tuple[float, str]:
        """When the volume is next looked at, and why (``inf``: only an event makes it).

        From the volume's cached decisions: the backup's (due now, at its due time, or
        after a poll delay for an amount trigger; a held volume after its back-off) and
        the restore drill's.
        """
        if name not in self.volumes.last_due:
            # Its refresh failed (at open, say): tried again now and then.
            return now + self.max_interval, "no decision yet (its last refresh failed)"
        decision = self.volumes.last_due[name]
        drill = self.volumes.drill_due.get(name)
        times: list[tuple[float, str]] = []
        if decision is not None:
            if decision.due:
                wait = self.held(name) if self.held is not None else 0.0
                why = f"held back {wait:.0f}s after failures" if wait > 0 else "backup due"
                times.append((now + max(0.0, wait), why))
            elif decision.next_due is not None:
                times.append((decision.next_due.timestamp(), f"{decision.trigger} due"))
            elif decision.limit_bytes is not None and decision.changed_bytes is not None:
                rate = self._rate.get(name, 0.0)
                delay = poll_delay(
                    decision.changed_bytes,
                    decision.limit_bytes,
                    rate,
                    self.interval,
                    self.max_interval,
                )
                seen = self._sample.get(name, (now, 0))[0]
                times.append((seen + delay, f"{decision.trigger} poll, {rate:.0f} B/s changing"))
        if drill is not None and drill.next_due is not None:
            times.append((now if drill.due else drill.next_due.timestamp(), "restore drill due"))
        transfer = None if self.start_transfer is None else self.volumes.transfer_due.get(name)
        if transfer is not None:
            if transfer.due:
                wait = self._transfer_wait(name)
                why = (
                    f"transfer held back {wait:.0f}s: its target failed" if wait else "transfer due"
                )
                times.append((now + wait, why))
            elif transfer.next_due is not None:
                times.append((transfer.next_due.timestamp(), "transfer due"))
        if not times:
            return math.inf, "no objectives need a look"
        return min(times)

    def _replan(self, name: str, now: float, floor: float | None = None) -> None:
        at, why = self.plan(name, now)
        if floor is not None:
            at = max(at, floor)
        if self.look_at.get(name) != at:
            shown = "never" if at == math.inf else datetime.fromtimestamp(at, UTC).isoformat()
            log.debug(
                "next look at %s: %s (unix %.3f): %s",
                name,
                shown,
                at,
                why,
                extra={"VOLUME": name},
            )
        self.look_at[name] = at

    def next_wake(self) -> float:
        """Unix time of the earliest look planned (``inf``: none)."""
        with self._lock:
            return min(self.look_at.values(), default=math.inf)

    # --- looking ------------------------------------------------------------------------

    def decisions(self) -> dict[str, ScheduleDecision]:
        """Each volume's decision now (volumes without objectives are left out); looks at
        every volume not busy (tests and ``tick(everything=True)``)."""
        self.tick(everything=True, start=False)
        return {n: d for n, d in self.volumes.last_due.items() if d is not None}

    def tick(self, everything: bool = False, start: bool = True) -> list[str]:
        """Look at the volumes whose look is due and start the backups (and restore
        drills) that are due; returns the volumes whose backups started.

        :param everything: look at every volume now (tests; the old fixed tick).
        :param start: start the jobs due (else only look).
        """
        now = self.clock()
        running = self.busy()
        catalog = {v.name: v for v in self.volumes.catalog.list_volumes()}
        with self._lock:
            renewed, self._renewed = self._renewed, set()
            for name in list(self.look_at):
                if name not in catalog:
                    self.look_at.pop(name)
                    self._sample.pop(name, None)
                    self._rate.pop(name, None)
        looked: set[str] = set()
        for name, vol in sorted(catalog.items()):
            if is_detached(vol):
                with self._lock:
                    self.look_at[name] = math.inf
                continue
            if (name in renewed or name not in self.look_at) and name not in running:
                # Planned from the decision its last refresh cached (at open, or where the
                # event came from): no device work.
                self._observe(name, now)
                with self._lock:
                    self._replan(name, now)
            planned = self.look_at.get(name)
            if not everything and planned is not None and planned > now:
                continue
            if name in running:
                # Its job's end comes as an event (or is seen at the next wake-up: a
                # wake-up without device work is cheap). A renewal waits for the job's end.
                with self._lock:
                    self.look_at[name] = now + max(self.interval, 1.0)
                    if name in renewed:
                        self._renewed.add(name)
                continue
            log.debug("looking at %s", name, extra={"VOLUME": name})
            _looking.active = True
            try:
                self.volumes.refresh(name)
            except BlockguardError as exc:
                log.warning("cannot schedule %s: %s", name, exc, extra={"VOLUME": name})
                with self._lock:
                    self.look_at[name] = now + self.max_interval
                continue
            finally:
                _looking.active = False
            looked.add(name)
            self._observe(name, now)
        started = self._start_due(catalog, running, looked) if start else []
        drills = self.drills(set(started), looked) if start else []
        sent = self.transfers(set(started) | set(drills), looked) if start else []
        with self._lock:
            for name in looked:
                # Never look at one volume twice within ``interval``, whatever is due.
                self._replan(name, now, floor=now + self.interval)
            for name in started + drills + sent:
                self.look_at[name] = now + max(self.interval, 1.0)
        return started

    def _start_due(
        self, catalog: dict[str, object], running: set[str], looked: set[str]
    ) -> list[str]:
        decisions = {
            n: d for n, d in self.volumes.last_due.items() if d is not None and n in catalog
        }
        groups: dict[str, list[str]] = {}
        solo = []
        for name, vol in sorted(catalog.items()):
            if is_detached(vol):  # type: ignore[arg-type]
                continue  # nothing to back up: no device, no tracker
            group = getattr(vol, "group", None)
            if group is not None:
                groups.setdefault(group, []).append(name)
            elif name in looked and name in decisions and decisions[name].due:
                solo.append(name)
        chosen = startable(solo, running)
        for _group, members in sorted(groups.items()):
            mine = {m: decisions[m] for m in members if m in decisions}
            fresh = looked.intersection(members)
            if fresh and mine and group_schedule(mine).due and group_startable(members, running):
                chosen.extend(members)
        chosen = self._not_held(chosen, groups)
        started = []
        for name in chosen:
            reason = decisions[name].reason if name in decisions else "group member"
            try:
                self.start_backup(name)
            except BlockguardError as exc:
                log.warning("scheduled backup of %s not started: %s", name, exc)
                continue
            log.info("scheduled backup of %s: %s", name, reason, extra={"VOLUME": name})
            started.append(name)
        return started

    def drills(self, skip: set[str], looked: set[str] | None = None) -> list[str]:
        """Start the restore drills that are due (not of ``skip``; only of ``looked`` if
        given); returns the volumes."""
        if self.start_drill is None:
            return []
        running = self.busy() | skip
        started = []
        for vol in self.volumes.catalog.list_volumes():
            if looked is not None and vol.name not in looked:
                continue
            due = self.volumes.drill_due.get(vol.name)
            if is_detached(vol) or vol.name in running or due is None or not due.due:
                continue
            try:
                self.start_drill(vol.name)
            except BlockguardError as exc:
                log.warning("scheduled restore drill of %s not started: %s", vol.name, exc)
                continue
            log.info(
                "scheduled restore drill of %s: %s",
                vol.name,
                due.reason,
                extra={"VOLUME": vol.name},
            )
            started.append(vol.name)
        return started

    def transfers(self, skip: set[str], looked: set[str]) -> list[str]:
        """Start the transfers the remote RPO makes due (of ``looked``, not of ``skip``);
        returns the volumes."""
        if self.start_transfer is None:
            return []
        running = self.busy() | skip
        started = []
        for name in sorted(looked - running):
            due = self.volumes.transfer_due.get(name)
            if due is None or not due.due:
                continue
            if wait := self._transfer_wait(name):
                log.debug("transfer of %s held back %.0fs: its target failed", name, wait)
                continue
            try:
                self.start_transfer(name)
            except BlockguardError as exc:
                log.warning("scheduled transfer of %s not started: %s", name, exc)
                continue
            log.info("scheduled transfer of %s: %s", name, due.reason, extra={"VOLUME": name})
            started.append(name)
        return started

    def _transfer_wait(self, name: str) -> float:
        return 0.0 if self.transfer_held is None else max(0.0, self.transfer_held(name))

    def _not_held(self, chosen: list[str], groups: dict[str, list[str]]) -> list[str]:
        """``chosen`` without the volumes (and groups with a member) in retry back-off."""
        if self.held is None:
            return chosen
        held = {}
        for name in chosen:
            wait = self.held(name)
            if wait > 0:
                held[name] = wait
        if not held:
            return chosen
        blocked = set(held)
        for members in groups.values():
            if blocked.intersection(members):
                blocked.update(members)
        for name, wait in sorted(held.items()):
            log.debug("backup of %s held back %.0fs after failures", name, wait)
        return [n for n in chosen if n not in blocked]

    async def run(self) -> None:
        """Sleep until the earliest look is due (or an event comes), look, repeat; until
        cancelled. ``interval`` 0: never."""
        if self.interval <= 0:
            return
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        while True:
            try:
                await asyncio.to_thread(self.tick)
            except Exception:
                log.exception("scheduler tick failed")
            delay = min(MAX_SLEEP, max(0.0, self.next_wake() - self.clock()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            self._wake.clear()
