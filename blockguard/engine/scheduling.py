"""The scheduler loop: looks at every volume now and then and starts the backups due.

The decisions are :mod:`blockguard.core.scheduler`'s: on the RPO interval, at the daily
hour, when the changes reach the RPO amount or (with only an RTO) what can still be
restored in time. Runs missed while the daemon was down collapse into one (the decision
is computed from the last backup's time). No volume gets a second job while one runs.
Restore drills (:mod:`blockguard.engine.voldrills`) start when the volume's drill is due
and no job of it runs; a backup due at the same tick goes first.
A group starts only when no member is busy, all members at once: with device-mapper the
point-in-time copies are taken back to back; on the host (scan tracking, no snapshots)
"one point in time" holds only as far as the caller keeps the members quiet.

A volume whose backups fail is held back: it is tried again after a delay that doubles
with each failure in a row, up to a cap (:func:`blockguard.core.health.retry_delay`),
instead of on every tick. A group waits while any member is held. ``BackupNow`` is
never held.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from blockguard.core.scheduler import (
    ScheduleDecision,
    group_schedule,
    group_startable,
    startable,
)
from blockguard.engine.volumes import VolumeRegistry, is_detached
from blockguard.errors import BlockguardError

log = logging.getLogger(__name__)


class Scheduler:
    """See the module docstring.

    :param volumes: the volumes (their refresh computes each one's schedule decision).
    :param start_backup: starts a backup job of a volume (raises Busy if one runs).
    :param busy: the volumes with a job queued or running.
    :param interval: seconds between two looks.
    :param held: seconds before a volume whose backups fail may be tried again (0: now).
    :param start_drill: starts a volume's restore drill (raises Busy if a job runs).
    """

    def __init__(
        self,
        volumes: VolumeRegistry,
        start_backup: Callable[[str], object],
        busy: Callable[[], set[str]],
        interval: float,
        held: Callable[[str], float] | None = None,
        start_drill: Callable[[str], object] | None = None,
    ) -> None:
        self.volumes = volumes
        self.held = held
        self.start_backup = start_backup
        self.busy = busy
        self.interval = interval
        self.start_drill = start_drill

    def decisions(self) -> dict[str, ScheduleDecision]:
        """Each volume's decision now (volumes without objectives are left out)."""
        result = {}
        running = self.busy()
        for vol in self.volumes.catalog.list_volumes():
            if vol.name in running or is_detached(vol):
                continue
            try:
                self.volumes.refresh(vol.name)
            except BlockguardError as exc:
                log.warning("cannot schedule %s: %s", vol.name, exc, extra={"VOLUME": vol.name})
                continue
            due = self.volumes.last_due.get(vol.name)
            if due is not None:
                result[vol.name] = due
        return result

    def tick(self) -> list[str]:
        """Start the backups that are due; returns the volumes started."""
        decisions = self.decisions()
        running = self.busy()
        groups: dict[str, list[str]] = {}
        solo = []
        for vol in self.volumes.catalog.list_volumes():
            if is_detached(vol):
                continue  # nothing to back up: no device, no tracker
            if vol.group is not None:
                groups.setdefault(vol.group, []).append(vol.name)
            elif vol.name in decisions and decisions[vol.name].due:
                solo.append(vol.name)
        chosen = startable(solo, running)
        for _group, members in sorted(groups.items()):
            mine = {m: decisions[m] for m in members if m in decisions}
            if mine and group_schedule(mine).due and group_startable(members, running):
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
        self.drills(set(started))
        return started

    def drills(self, skip: set[str]) -> list[str]:
        """Start the restore drills that are due (not of ``skip``); returns the volumes."""
        if self.start_drill is None:
            return []
        running = self.busy() | skip
        started = []
        for vol in self.volumes.catalog.list_volumes():
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
        """Tick every :attr:`interval` seconds until cancelled (0: never)."""
        if self.interval <= 0:
            return
        while True:
            await asyncio.sleep(self.interval)
            try:
                await asyncio.to_thread(self.tick)
            except Exception:
                log.exception("scheduler tick failed")
