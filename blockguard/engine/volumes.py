"""Protected volumes of the real service: their state under one lock, objectives, plans.

(One thing at ~480 lines: every volume's cached state and the lock that guards it; what
works without them is in :mod:`.protection` (protect, unprotect), :mod:`.generations`
(the pool's generations and their damage) and :mod:`.volumeinfo` (what clients see).)

A volume's :class:`~blockguard.engine.service.VolumeInfo` is recomputed (the tracker
asked for its change sets, the planner for its choice) when something changed — a
backup, new objectives, a scheduler tick, an explicit ``Plan`` — and kept, so reads are
quick. The catalog's generation rows are kept in step with the pool's manifests.

A *detached* volume is a catalog volume without device or tracker (after ``Unprotect``
without ``delete_generations``, or an import whose original device is absent): its
generations stay listed, restorable (to a target) and under retention; it is never backed
up. The catalog marks it with the tracker backend :data:`DETACHED` and a placeholder
device path under ``/dev/blockguard-detached/`` (where no device node is made); the
original device stays in the volume record on the pool. ``Protect`` of a device under its
name re-attaches it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from blockguard.core.catalog import Catalog, Volume
from blockguard.core.damage import Damage
from blockguard.core.perftable import DeviceSpeed
from blockguard.core.scheduler import DrillDecision, ScheduleDecision, drill_schedule
from blockguard.core.vocab import RestoreMode, TrackingKind
from blockguard.core.what_if import ChangeSets
from blockguard.engine import ids, poolspace, volumeinfo
from blockguard.engine import service as svc
from blockguard.engine.calibration import calibration, copy_target_of
from blockguard.engine.drillbook import DrillBook, drill_mode, floors_of
from blockguard.engine.events import EventHub
from blockguard.engine.generations import (
    VolumeGenerations,
    catalog_rows,
    generation_infos,
    scan_generations,
)
from blockguard.engine.planning import (
    PlanInputs,
    chain_view,
    correction_from,
    drill_of,
    merge_given,
    parse_given,
    plan_dict,
    restore_mode_of,
    retention_of,
    schedule_of,
)
from blockguard.engine.pools import PoolRegistry
from blockguard.engine.remoteplan import remote_plan_dict, remote_section, transfer_schedule
from blockguard.engine.settings import Settings
from blockguard.engine.tracking import LAST_BACKUP, LAST_FULL, VolumeTracking
from blockguard.engine.volumeinfo import DETACHED
from blockguard.errors import (
    BlockguardError,
    EnvironmentProblem,
    MetadataSnapshotBusy,
    NotFound,
    PoolSpaceLow,
    TrackingLost,
    VolumeDetached,
)
from blockguard.storage.blockdev import BlockDevice
from blockguard.storage.manifest import Manifest
from blockguard.storage.pool.base import PoolBackend, VolumeRecord
from blockguard.storage.restore import runs
from blockguard.storage.runner import Runner
from blockguard.storage.tracking import (
    ChangeSet,
)

log = logging.getLogger(__name__)

#: A new volume's pool must hold a full backup plus 1/PLACEMENT_MARGIN of it (at least
#: 4 MiB): manifests, hashes and the file system's own blocks.
PLACEMENT_MARGIN = 10


def detached_path(name: str) -> str:
    """The catalog's placeholder device of a detached volume: unique and absent (no
    device node is ever made there), so every check sees "it does not exist"."""
    return f"/dev/blockguard-detached/{name}"


def is_detached(vol: Volume) -> bool:
    return vol.tracker_backend == DETACHED


class VolumeRegistry:
    """The protected volumes of one daemon; see the module docstring."""

    def __init__(
        self,
        catalog: Catalog,
        pools: PoolRegistry,
        settings: Settings,
        events: EventHub,
        cmd: Runner,
    ) -> None:
        self.catalog = catalog
        self.pools = pools
        self.settings = settings
        self.events = events
        self.cmd = cmd
        self.lock = threading.RLock()
        self.tracking: dict[str, VolumeTracking] = {}
        self.cache: dict[str, svc.VolumeInfo] = {}
        self.lost: dict[str, str] = {}
        #: Generations found corrupt on use (verify, restore), by volume and pool id; the
        #: pool keeps a record of them too, which is what survives a restart.
        self.found_corrupt: dict[str, dict[str, Damage]] = {}
        self.last_plan: dict[str, dict[str, Any]] = {}
        self.last_due: dict[str, ScheduleDecision | None] = {}
        self.drills = DrillBook(catalog)
        self.drill_due: dict[str, DrillDecision] = {}
        #: volume -> whether a transfer to its target is due by its remote RPO (issue 11)
        self.transfer_due: dict[str, ScheduleDecision | None] = {}

    def directory(self, name: str) -> Path:
        return self.settings.state_dir / "volumes" / name

    # --- life cycle -------------------------------------------------------------------

    def open_all(self) -> list[str]:
        """Reopen every volume's tracker (tracking continues) and sync its generations."""
        active = []
        for vol in self.catalog.list_volumes():
            if is_detached(vol):
                self._open_detached(vol.name)
                continue
            try:
                if vol.tracker_backend == TrackingKind.ERA and vol.pool is not None:
                    # After a reboot the metadata LV is not active yet.
                    poolspace.era_metadata_device(self.pools.backend(vol.pool), vol.name)
                self.tracking[vol.name] = VolumeTracking.open(
                    self.directory(vol.name),
                    vol.device_path,
                    vol.tracker_backend,
                    vol.chunk_size,
                    self.cmd,
                )
                active.append(vol.name)
            except BlockguardError as exc:
                log.error("tracking of %s cannot continue: %s", vol.name, exc)
                self.lost[vol.name] = str(exc)
            try:
                self.sync_generations(vol.name)
                self.refresh(vol.name)
            except BlockguardError as exc:
                log.error("volume %s: %s", vol.name, exc, extra={"VOLUME": vol.name})
                self.cache[vol.name] = self.bare_info(vol.name, str(exc))
            except Exception as exc:  # a bug seen on one volume must not stop the daemon
                log.exception("volume %s: internal error", vol.name, extra={"VOLUME": vol.name})
                self.cache[vol.name] = self.bare_info(vol.name, f"internal error: {exc!r}")
        return active

    def _open_detached(self, name: str) -> None:
        try:
            self.sync_generations(name)
            self.refresh(name)
        except BlockguardError as exc:
            log.error("volume %s: %s", name, exc, extra={"VOLUME": name})
            self.cache[name] = self.bare_info(name, str(exc))

    def retain_detached(self, name: str) -> list[str]:
        """Apply the volume's retention to a detached volume (no backup will do it)."""
        vol = self.catalog.get_volume(name)
        if not is_detached(vol) or vol.pool is None:
            return []
        given = self.objectives_of(name)
        result = self.pools.backend(vol.pool).apply_retention(name, retention_of(given))
        if result.freed_ids:
            self.sync_generations(name)
        return result.freed_ids

    def record_of(self, name: str) -> VolumeRecord:
        """The volume record the pool keeps of ``name`` (see :class:`VolumeRecord`)."""
        vol = self.catalog.get_volume(name)
        group_objectives: dict[str, Any] = {}
        if vol.group is not None:
            group_objectives = dict(self.catalog.get_group(vol.group).objectives)
        return VolumeRecord(
            name=name,
            device_path=vol.device_path,
            major=vol.identity.major or 0,
            minor=vol.identity.minor or 0,
            size=vol.identity.size,
            serial=vol.identity.serial,
            chunk_size=vol.chunk_size,
            tracker_backend=vol.tracker_backend,
            objectives=dict(vol.objectives),
            group=vol.group,
            group_objectives=group_objectives,
            updated=time.time(),
        )

    def write_record(self, name: str) -> None:
        """Store the volume record on its pool (not for a detached volume: the record
        keeps the device it had)."""
        vol = self.catalog.get_volume(name)
        if vol.pool is None or is_detached(vol):
            return
        self.pools.backend(vol.pool).write_volume_record(self.record_of(name))

    def set_objectives(self, target: str, given: Mapping[str, Any]) -> list[str]:
        """Merge ``given`` into the target's own set (see :func:`merge_given`)."""
        # The refreshes below run under the lock: their thin polls' listening comes first
        # (the volume's, or every volume's for a group; nothing where a pool is known).
        for name, tracking in list(self.tracking.items()):
            if target in self.tracking and name != target:
                continue
            tracking.listen()
        with self.lock:
            if given.get("remote_target"):
                # Only a registered target: a typo would otherwise plan against nothing.
                self.catalog.get_target(str(given["remote_target"]))
            volumes = {v.name: v for v in self.catalog.list_volumes()}
            if target in volumes:
                merged = merge_given(volumes[target].objectives or {}, given)
                self.catalog.update_volume(target, objectives=merged)
                names = [target]
            elif target in {g.name for g in self.catalog.list_groups()}:
                merged = merge_given(self.catalog.get_group(target).objectives or {}, given)
                self.catalog.set_group_objectives(target, merged)
                names = [v.name for v in volumes.values() if v.group == target]
            else:
                raise NotFound(what="volume or group", name=target)
            for name in names:
                self.write_record(name)
                self.retain_detached(name)
                self.refresh(name)
        return names

    def place(self, size: int, wanted: str | None) -> str:
        """The pool a new volume of ``size`` bytes backs up into.

        A full backup must fit, with a margin for manifests and the file system's own
        needs; of the pools where it does, the one with the most free space.

        :param wanted: the pool the client named, or ``None`` to choose.
        :raises PoolSpaceLow: naming the pool with the most room and what is needed.
        """
        needed = size + max(size // PLACEMENT_MARGIN, 4 * 1024 * 1024)
        free: dict[str, int] = {}
        for pool in [wanted] if wanted is not None else self.pools.names():
            try:
                free[pool] = self.pools.backend(pool).capacity().free
            except (OSError, BlockguardError) as exc:
                # A pool whose space cannot be read is no candidate; the refusal names it.
                log.warning("pool %s: free space unknown: %s", pool, exc)
                free[pool] = 0
        best = max(sorted(free), key=lambda p: free[p])
        if free[best] < needed:
            raise PoolSpaceLow(pool=best, free=free[best], needed=needed)
        return best

    # --- generations ------------------------------------------------------------------

    def manifests(self, name: str) -> list[Manifest]:
        vol = self.catalog.get_volume(name)
        if vol.pool is None:
            return []
        return self.pools.backend(vol.pool).generations(name)

    def scan(self, name: str) -> VolumeGenerations:
        """The pool's generations of ``name`` with their damage and its consequences."""
        vol = self.catalog.get_volume(name)
        if vol.pool is None:
            return VolumeGenerations([], [], {}, None)
        backend = self.pools.backend(vol.pool)
        return scan_generations(backend, name, self.found_corrupt.get(name, {}))

    def mark_corrupt(self, name: str, pool_id: str, damage: Damage) -> None:
        """Record a generation found corrupt on use, on the pool (so a restart or another
        host knows it too) and here (in case the pool cannot take the record)."""
        with self.lock:
            self.found_corrupt.setdefault(name, {})[pool_id] = damage
            log.error(
                "generation %s is corrupt: %s",
                ids.public_id(name, pool_id),
                damage.reason,
                extra={"VOLUME": name},
            )
            try:
                self._pool_of(name).mark_damaged(name, pool_id, damage.reason, damage.chunk)
            except (BlockguardError, OSError) as exc:
                log.error("cannot record the damage of %s on its pool: %s", pool_id, exc)
        with contextlib.suppress(BlockguardError):
            self.refresh(name)

    def clear_corrupt(self, name: str, pool_ids: list[str]) -> None:
        """Forget findings on use for generations that were read back whole since."""
        with self.lock:
            known = self.found_corrupt.get(name, {})
            cleared = [gid for gid in pool_ids if known.pop(gid, None) is not None]
            recorded = {d.generation_id for d in self.scan(name).damaged if d.found_on_use}
            for gid in recorded.intersection(pool_ids):
                if gid not in cleared:
                    cleared.append(gid)
                try:
                    self._pool_of(name).clear_damaged(name, gid)
                except (BlockguardError, OSError) as exc:
                    log.error("cannot clear the damage record of %s: %s", gid, exc)
        if cleared:
            log.info("generations %s were read back whole", cleared, extra={"VOLUME": name})
            with contextlib.suppress(BlockguardError):
                self.refresh(name)

    def _pool_of(self, name: str) -> PoolBackend:
        pool = self.catalog.get_volume(name).pool
        if pool is None:
            raise EnvironmentProblem(detail=f"volume {name} has no pool")
        return self.pools.backend(pool)

    def sync_generations(self, name: str) -> None:
        """Make the catalog's rows of ``name`` mirror the pool's manifests (if they differ)."""
        rows = catalog_rows(self.scan(name))
        have = {(g.id, g.state) for g in self.catalog.list_generations(name)}
        if have != {(r["id"], "committed") for r in rows}:
            self.catalog.rebuild_generations(name, rows)

    # --- planning ---------------------------------------------------------------------

    def objectives_of(self, name: str) -> dict[str, Any]:
        vol = self.catalog.get_volume(name)
        if vol.objectives:
            return dict(vol.objectives)
        if vol.group is not None:
            group = self.catalog.get_group(vol.group)
            if group.objectives:
                return {**group.objectives, "group": vol.group}
        return {}

    def restore_mode(self, name: str) -> RestoreMode:
        """The mode of a restore of ``name`` that names none: what its RTO refers to."""
        return restore_mode_of(self.objectives_of(name))

    def inputs(self, name: str, source: str | None = None) -> PlanInputs:
        """Gather what the planner needs now (asks the tracker: a full read for scan).

        :param source: a backup's point-in-time copy of the volume (see
            :meth:`VolumeTracking.change_sets`).
        """
        vol = self.catalog.get_volume(name)
        if vol.pool is None:
            raise EnvironmentProblem(detail=f"volume {name} has no pool")
        gens = self.scan(name)
        manifests = gens.usable
        view = chain_view(manifests, lambda m: self.pools.device_of(vol.pool, m))  # type: ignore[arg-type]
        with BlockDevice(vol.device_path) as dev:
            size = dev.size
        sets, problem = ({}, "") if view.newest is None else self._change_sets(name, gens, source)
        exact = view.newest is None or (LAST_BACKUP in sets and LAST_FULL in sets)
        if exact:
            problem = ""
        changes = ChangeSets(
            incremental_bytes=sets[LAST_BACKUP].changed_bytes if exact and sets else size,
            differential_bytes=sets[LAST_FULL].changed_bytes if exact and sets else size,
            volume_bytes=size,
            tracker_exact=exact,
            incremental_extents=runs(sets[LAST_BACKUP].chunks) if exact and sets else None,
            differential_extents=runs(sets[LAST_FULL].chunks) if exact and sets else None,
        )
        speeds = self.pools.speeds(vol.pool)
        pool_speeds = dict(speeds)
        candidates = list(speeds)
        if not candidates:
            raise EnvironmentProblem(detail=f"pool {vol.pool} has no working disk")
        default = DeviceSpeed.uniform(self.settings.default_speed)
        if view.chain is not None:
            for device in {view.chain.full_device_id} | {d.device_id for d in view.chain.deltas}:
                speeds.setdefault(device, default)
        given = self.objectives_of(name)
        given.pop("group", None)
        objectives = parse_given(given)
        copy = copy_target_of(self.pools, vol.pool)
        return PlanInputs(
            view=view,
            changes=changes,
            sets=sets,
            speeds=speeds,
            candidates=candidates,
            objectives=objectives,
            keep=retention_of(given),
            correction=correction_from(self.catalog.recent_restores(name)),
            copy_target=copy.speed,
            copy_target_info=copy.as_dict(),
            lost_reason=problem,
            full_required=gens.full_required,
            generations=gens,
            calibration=calibration(
                self.catalog, sorted(speeds), pool_speeds, self.pools.read_floors(vol.pool)
            ),
            floors=floors_of(self.drills.last(name), drill_mode(objectives), manifests),
            restore_mode=restore_mode_of(given),
        )

    def _change_sets(
        self, name: str, gens: VolumeGenerations, source: str | None
    ) -> tuple[dict[str, ChangeSet], str]:
        """The tracker's change sets since its trusted references, or why there are none."""
        tracking = self.tracking.get(name)
        if tracking is None:
            return {}, self.lost.get(name, "the tracker could not be opened")
        # The tracker's roles describe the newest generation and the newest full that were
        # made, usable or not (a corrupt one forces a full anyway, see full_required).
        fulls_any = [m.generation_id for m in gens.manifests if m.is_full]
        trusted, problem = tracking.trusted(gens.newest_id(), fulls_any[-1] if fulls_any else None)
        try:
            return tracking.change_sets(trusted, source), problem
        except TrackingLost as exc:
            return {}, exc.message

    def _plan_remote(self, name: str, inputs: PlanInputs, plan: dict[str, Any]) -> None:
        """Add the plan of the volume's copy on its target, when its objectives name one."""
        given = self.objectives_of(name)
        try:
            remote = remote_section(self.catalog, name, given, inputs, self.settings.default_speed)
        except NotFound as exc:
            # The target was removed under the objectives: the local plan still stands.
            plan["remote"] = {"target": given.get("remote_target", ""), "problem": exc.message}
            self.transfer_due.pop(name, None)
            return
        if remote is None:
            self.transfer_due.pop(name, None)
            return
        plan["remote"] = remote_plan_dict(remote)
        sent = self.catalog.list_remote_generations(remote.objectives.target, name)
        due = transfer_schedule(remote, sent[-1].created if sent else None, datetime.now(UTC))
        self.transfer_due[name] = due
        if due is not None:
            plan["remote"]["schedule"] = due.reason
            plan["remote"]["due"] = due.due

    def plan(self, name: str) -> dict[str, Any]:
        with self.lock:
            self.require_attached(name)
            self.refresh(name)
            return dict(self.last_plan[name])

    def refresh(self, name: str) -> svc.VolumeInfo:
        """Recompute the volume's info (and its plan); emits VolumeChanged/TrackingLost."""
        tracking = self.tracking.get(name)
        if tracking is not None:
            # Before the lock: a thin poll's listening may take seconds, and every other
            # volume's call waits for this lock (so callers that hold it listen first too).
            tracking.listen()
        with self.lock:
            if is_detached(self.catalog.get_volume(name)):
                return self._refresh_detached(name)
            try:
                inputs = self.inputs(name)
            except MetadataSnapshotBusy as exc:
                # Another tool holds the thin pool's metadata snapshot: this look is
                # skipped (tracking is intact), the last one stands.
                if name not in self.cache:
                    raise
                log.debug("refresh of %s skipped: %s", name, exc)
                return self.cache[name]
            gens = inputs.generations
            assert gens is not None  # inputs() always scans the pool
            now = datetime.now(UTC)
            plan = plan_dict(inputs, now)
            self._plan_remote(name, inputs, plan)
            self.last_plan[name] = plan
            self.last_due[name] = schedule_of(inputs, now)
            drill = self._drill_decision(name, inputs, now)
            vol = self.catalog.get_volume(name)
            newly_lost = bool(inputs.lost_reason) and self.lost.get(name) != inputs.lost_reason
            if inputs.lost_reason:
                self.lost[name] = inputs.lost_reason
                state = "lost"
            else:
                self.lost.pop(name, None)
                state = "exact" if inputs.view.newest is not None else "initialising"
            catalog_state = "unknown" if state != "exact" else "exact"
            reason = inputs.lost_reason or ("never backed up" if state == "initialising" else "")
            if (vol.tracker_state, vol.tracker_reason) != (catalog_state, reason):
                self.catalog.set_tracker_state(name, catalog_state, reason)
            info = volumeinfo.attached(
                vol,
                self.objectives_of(name),
                state,
                inputs.changes,
                plan,
                generation_infos(name, gens),
                self._last_drill(name),
                0 if drill.next_due is None else int(drill.next_due.timestamp()),
            )
            self.cache[name] = info
        events: list[svc.ServiceEvent] = [svc.VolumeChanged(name)]
        if newly_lost:
            events.insert(0, svc.TrackingLost(name, inputs.lost_reason))
        self.events.emit(*events)
        return info

    def _drill_decision(self, name: str, inputs: PlanInputs, now: datetime) -> DrillDecision:
        """When the volume's restore drill is due (kept for the scheduler)."""
        given = self.objectives_of(name)
        given.pop("group", None)
        last = self.drills.last(name)
        newest = inputs.view.newest
        decision = drill_schedule(
            drill_of(given),
            last_drill=None if last is None else datetime.fromtimestamp(last.at, UTC),
            newest_generation=(
                None if newest is None else datetime.fromtimestamp(newest.created, UTC)
            ),
            now=now,
            last_failed=last is not None and last.result != "ok",
        )
        self.drill_due[name] = decision
        return decision

    def _last_drill(self, name: str) -> dict[str, Any]:
        last = self.drills.last(name)
        if last is None:
            return {}
        shown = last.as_dict()
        del shown["chain"]  # the pool's own ids: for the plan, not for clients
        return shown

    def _refresh_detached(self, name: str) -> svc.VolumeInfo:
        vol = self.catalog.get_volume(name)
        reason = "detached: no device is tracked; protect a device under this name to resume"
        if vol.tracker_reason.startswith("detached: not protected again"):
            reason = vol.tracker_reason  # the import's own words: which device, and why
        if (vol.tracker_state, vol.tracker_reason) != ("unknown", reason):
            self.catalog.set_tracker_state(name, "unknown", reason)
        self.last_due[name] = None
        self.drill_due.pop(name, None)
        self.transfer_due.pop(name, None)
        self.last_plan.pop(name, None)
        info = volumeinfo.detached(
            vol, self.objectives_of(name), reason, generation_infos(name, self.scan(name))
        )
        self.cache[name] = info
        self.events.emit(svc.VolumeChanged(name))
        return info

    def require_attached(self, name: str) -> None:
        """:raises VolumeDetached: ``name`` has no device to back up."""
        if is_detached(self.catalog.get_volume(name)):
            raise VolumeDetached(
                volume=name, detail="it has no device; protect a device under this name first"
            )

    def bare_info(self, name: str, problem: str) -> svc.VolumeInfo:
        vol = self.catalog.get_volume(name)
        generations: tuple[svc.GenerationInfo, ...] = ()
        with contextlib.suppress(BlockguardError):
            # What the pool holds stays visible while the volume cannot be planned.
            generations = generation_infos(name, self.scan(name))
        return volumeinfo.stopped(
            vol, self.objectives_of(name), name in self.lost, problem, generations
        )

    def info(self, name: str) -> svc.VolumeInfo:
        with self.lock:
            info = self.cache.get(name)
        if info is None:
            raise NotFound(what="volume", name=name)
        return info

    def all_infos(self) -> list[svc.VolumeInfo]:
        with self.lock:
            return [self.cache[n] for n in sorted(self.cache)]
