"""What clients see of a volume (:class:`~blockguard.engine.service.VolumeInfo`), built
from the catalog's row, its objectives, its plan and its generations."""

from __future__ import annotations

from typing import Any

from blockguard.core.catalog import Volume
from blockguard.core.vocab import GenerationKind
from blockguard.core.what_if import ChangeSets
from blockguard.engine import service as svc

#: A detached volume's tracker backend in the catalog and tracker state to clients
#: (it has no tracker).
DETACHED = "detached"


def attached(
    vol: Volume,
    objectives: dict[str, Any],
    state: str,
    changes: ChangeSets,
    plan: dict[str, Any],
    generations: tuple[svc.GenerationInfo, ...],
    last_drill: dict[str, Any],
    next_drill: int,
) -> svc.VolumeInfo:
    """A tracked volume with its plan (see :func:`~blockguard.engine.planning.plan_dict`)
    and its restore drills (the last one's record, the next one's time or 0)."""
    return svc.VolumeInfo(
        name=vol.name,
        device=vol.device_path,
        pool=vol.pool or "",
        backend=vol.tracker_backend,
        chunk_size=vol.chunk_size,
        group=vol.group or "",
        objectives=objectives,
        tracker_state=state,
        changed_bytes_since_backup=changes.incremental_bytes,
        changed_bytes_since_full=changes.differential_bytes,
        estimated_restore_seconds=plan["estimated_restore_seconds"],
        next_method=plan["method"],
        next_method_reasons=tuple(plan["reasons"]),
        next_backup=plan["next_backup"],
        generations=generations,
        restore_estimate={
            "seconds": plan["estimated_seconds"],
            "upper_seconds": plan["estimated_upper_seconds"],
            "calibrated": plan["calibrated"],
            "calibration": plan["calibration"],
            "mode": plan["restore_mode"],
            "breakdown": plan["restore_breakdown"],
            "upper_by_method": plan["upper_restore_seconds"],
            "copy_target": plan.get("copy_target"),
        },
        last_drill=last_drill,
        next_drill=next_drill,
    )


def detached(
    vol: Volume,
    objectives: dict[str, Any],
    reason: str,
    generations: tuple[svc.GenerationInfo, ...],
) -> svc.VolumeInfo:
    """A volume without device or tracker: its generations, nothing planned."""
    return _idle(vol, objectives, DETACHED, "", reason, generations, attached=False)


def stopped(
    vol: Volume,
    objectives: dict[str, Any],
    lost: bool,
    problem: str,
    generations: tuple[svc.GenerationInfo, ...],
) -> svc.VolumeInfo:
    """A volume that cannot be planned now (its tracker is lost or the pool failed)."""
    state = "lost" if lost else "stopped"
    return _idle(vol, objectives, state, GenerationKind.FULL.value, problem, generations)


def _idle(
    vol: Volume,
    objectives: dict[str, Any],
    state: str,
    next_method: str,
    reason: str,
    generations: tuple[svc.GenerationInfo, ...],
    *,
    attached: bool = True,
) -> svc.VolumeInfo:
    """A volume with nothing planned: no change counts, no estimate, one reason."""
    return svc.VolumeInfo(
        name=vol.name,
        device=vol.device_path if attached else "",
        pool=vol.pool or "",
        backend=vol.tracker_backend if attached else "",
        chunk_size=vol.chunk_size,
        group=vol.group or "",
        objectives=objectives,
        tracker_state=state,
        changed_bytes_since_backup=0,
        changed_bytes_since_full=0,
        estimated_restore_seconds={},
        next_method=next_method,
        next_method_reasons=(reason,),
        next_backup=0,
        generations=generations,
    )
