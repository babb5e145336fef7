"""From the pool, the tracker and the catalog to the planner's and scheduler's inputs.

This module gathers (the chain from the pool's manifests, the change sets from the
tracker, the speeds from the performance table, the correction from measured restores)
and calls the pure deciders of ``blockguard.core``; it decides nothing itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from blockguard.core.objective_sets import (
    CLEAR,
    OBJECTIVE_KEYS,
    check_value,
    clean_given,
    drill_of,
    generations_of,
    merge_given,
    parse_given,
    restore_mode_of,
    retention_of,
)
from blockguard.core.objectives import (
    DEFAULT_GENERATIONS,
    DEFAULT_RESTORE_MODE,
    IntervalRPO,
    RecoveryObjectives,
)
from blockguard.core.perftable import DeviceSpeed
from blockguard.core.planner import PlanDecision, plan_backup
from blockguard.core.restore_model import (
    Chain,
    RestoreEstimate,
    RestoreSample,
    StoredDelta,
    correction_factor,
)
from blockguard.core.retention import RetentionPolicy, choose
from blockguard.core.scheduler import ScheduleDecision, schedule
from blockguard.core.vocab import GenerationKind, RestoreMode
from blockguard.core.what_if import ChangeSets, bytes_restorable_within, what_if
from blockguard.engine.calibration import Calibration, estimate_dict
from blockguard.engine.ids import public_id, short_id
from blockguard.storage.manifest import Manifest
from blockguard.storage.pool.base import generation_refs
from blockguard.storage.restore import merged_deltas, runs
from blockguard.storage.tracking import ChangeSet

if TYPE_CHECKING:
    from blockguard.engine.generations import VolumeGenerations

__all__ = [
    "CLEAR",
    "OBJECTIVE_KEYS",
    "check_value",
    "clean_given",
    "drill_of",
    "generations_of",
    "merge_given",
    "parse_given",
    "restore_mode_of",
    "retention_of",
]


def _objectives_or_stand_in(inputs: PlanInputs) -> RecoveryObjectives:
    """The volume's objectives; for one that has none, a stand-in with no RTO (so the
    cheapest method) whose estimates are for the restore the volume gets by default."""
    if inputs.objectives is not None:
        return inputs.objectives
    return RecoveryObjectives(rpo=IntervalRPO(timedelta(days=1)), restore_mode=inputs.restore_mode)


@dataclass(frozen=True)
class ChainView:
    """What the pool holds of one volume, as the model sees it."""

    chain: Chain | None
    newest: Manifest | None
    newest_full: Manifest | None


def chain_view(manifests: Sequence[Manifest], device_of: Callable[[Manifest], str]) -> ChainView:
    """The chain since the newest full (the manifests oldest first)."""
    newest = manifests[-1] if manifests else None
    fulls = [m for m in manifests if m.is_full]
    if not fulls:
        return ChainView(None, newest, None)
    full = fulls[-1]
    on_full = [m for m in manifests if not m.is_full and m.base_id == full.generation_id]
    deltas = tuple(
        StoredDelta(
            GenerationKind(m.kind.value), m.bytes_stored, device_of(m), extents=runs(m.changed)
        )
        for m in on_full
    )
    # What a restore of the newest applies (as Chain.restore_deltas): the last
    # differential and the incrementals after it, each chunk once.
    differential = GenerationKind.DIFFERENTIAL.value
    start = max((i for i, m in enumerate(on_full) if m.kind.value == differential), default=0)
    merged = merged_deltas([full, *on_full[start:]])
    return ChainView(Chain(full.volume.size, device_of(full), deltas, merged), newest, full)


@dataclass
class PlanInputs:
    """Everything the planner and the scheduler need about one volume, gathered."""

    view: ChainView
    changes: ChangeSets
    sets: dict[str, ChangeSet]
    speeds: dict[str, DeviceSpeed]
    candidates: list[str]
    objectives: RecoveryObjectives | None
    correction: float
    copy_target: DeviceSpeed
    #: What retention keeps (objectives may say so without an RPO or RTO).
    keep: RetentionPolicy = field(default_factory=lambda: RetentionPolicy(DEFAULT_GENERATIONS))
    lost_reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    #: why the next backup must be a full (a corrupt generation in the current chain)
    full_required: str | None = None
    #: the pool's generations of the volume, corrupt ones included
    generations: VolumeGenerations | None = None
    #: the restore-path terms fitted from drills and restores of the pool's devices
    calibration: Calibration = field(default_factory=Calibration)
    #: seconds a restore after each method is known to take at least (a volume drill)
    floors: dict[GenerationKind, float] = field(default_factory=dict)
    #: the mode of a restore that names none: what the RTO refers to (restore_mode_of)
    restore_mode: RestoreMode = DEFAULT_RESTORE_MODE
    #: where ``copy_target`` comes from (:meth:`~.calibration.CopyTarget.as_dict`)
    copy_target_info: dict[str, Any] = field(default_factory=dict)


def correction_from(records: Sequence[Any]) -> float:
    """The model's correction from catalog restore records (newest first)."""
    samples = [
        RestoreSample(r.predicted_seconds, r.measured_seconds)
        for r in reversed(records)
        if r.predicted_seconds is not None
    ]
    return correction_factor(samples)


def decide(inputs: PlanInputs) -> PlanDecision:
    return plan_backup(
        inputs.view.chain,
        inputs.changes,
        inputs.speeds,
        _objectives_or_stand_in(inputs),
        candidates=inputs.candidates,
        copy_target=inputs.copy_target,
        correction=inputs.correction,
        full_required=inputs.full_required,
        terms=inputs.calibration.terms,
        floors=inputs.floors,
    )


def what_ifs(inputs: PlanInputs) -> dict[str, RestoreEstimate]:
    """Method -> restore estimate of the newest state after a backup of it now."""
    objectives = _objectives_or_stand_in(inputs)
    result = what_if(
        inputs.view.chain,
        inputs.changes,
        inputs.candidates[0],
        inputs.speeds,
        objectives.restore_mode,
        inputs.copy_target,
        inputs.correction,
        inputs.calibration.terms,
    )
    return {method.value: est for method, est in result.items()}


def estimates(inputs: PlanInputs) -> dict[str, float]:
    """Method -> estimated restore seconds of the newest state after a backup of it now."""
    return {method: est.seconds for method, est in what_ifs(inputs).items()}


def schedule_of(inputs: PlanInputs, now: datetime) -> ScheduleDecision | None:
    """When the next backup is due, or None without objectives."""
    objectives = inputs.objectives
    if objectives is None:
        return None
    newest = inputs.view.newest
    last = None if newest is None else datetime.fromtimestamp(newest.created, UTC)
    restorable = None
    if objectives.rpo is None and objectives.rto is not None:
        restorable = bytes_restorable_within(
            objectives.rto,
            inputs.view.chain,
            inputs.candidates[0],
            inputs.speeds,
            objectives.restore_mode,
            inputs.copy_target,
            inputs.correction,
            terms=inputs.calibration.terms,
        )
    return schedule(
        objectives,
        last_backup=last,
        changed_bytes=inputs.changes.incremental_bytes if newest is not None else 0,
        now=now,
        restorable_bytes=restorable,
    )


def plan_dict(inputs: PlanInputs, now: datetime) -> dict[str, Any]:
    """The answer of ``Plan``: method, reasons, estimates, feasibility, next backup."""
    decision = decide(inputs)
    reasons = list(decision.reasons)
    if inputs.lost_reason:
        reasons.insert(0, f"tracking not exact: {inputs.lost_reason}")
    due = schedule_of(inputs, now)
    next_backup = 0
    if due is not None:
        if due.due:
            next_backup = int(now.timestamp())
        elif due.next_due is not None:
            next_backup = int(due.next_due.timestamp())
    options = what_ifs(inputs)
    chosen = estimate_dict(decision.estimate, inputs.calibration)
    plan: dict[str, Any] = {
        "method": decision.method.value,
        "reasons": reasons,
        "estimated_restore_seconds": {m: e.seconds for m, e in options.items()},
        "upper_restore_seconds": {m: e.upper_seconds for m, e in options.items()},
        "estimated_upper_seconds": decision.estimate.upper_seconds,
        "calibrated": decision.estimate.calibrated,
        "calibration": chosen["calibration"],
        "restore_breakdown": chosen["breakdown"],
        "restore_mode": chosen["mode"],
        "estimated_bytes": decision.nbytes,
        "estimated_seconds": decision.estimate.seconds,
        "feasible": decision.feasible,
        "next_backup": next_backup,
        "device": decision.device_id,
        "changed_bytes_since_backup": inputs.changes.incremental_bytes,
        "changed_bytes_since_full": inputs.changes.differential_bytes,
        "tracker_exact": inputs.changes.tracker_exact,
        "schedule": "" if due is None else due.reason,
    }
    if decision.needed_rate is not None:
        plan["needed_rate"] = decision.needed_rate
    if "terms" in chosen:
        plan["restore_terms"] = chosen["terms"]
    if inputs.copy_target_info:
        plan["copy_target"] = inputs.copy_target_info
    plan["retention"] = retention_dict(inputs)
    return plan


def retention_dict(inputs: PlanInputs) -> dict[str, Any]:
    """The volume's retention policy and what it keeps of the pool's generations now.

    ``kept`` lists each kept generation with why (``last 1``, ``daily 2026-12-01``,
    ``needed by ...``); ``would_delete`` is what applying the policy now would delete
    (empty unless the policy changed since the last backup, which applies it).
    """
    policy = inputs.keep
    out: dict[str, Any] = {"policy": policy.describe(), **policy.to_dict()}
    manifests = [] if inputs.generations is None else inputs.generations.manifests
    choice = choose(generation_refs(manifests), policy)
    numbers = inputs.generations.numbers() if inputs.generations is not None else {}
    names = {m.generation_id: m.volume.name for m in manifests}

    def shown(gid: str) -> str:
        number = numbers.get(gid, 0)
        return short_id(names[gid], number) if number else public_id(names[gid], gid)

    needed = "needed by "
    out["kept"] = [
        {
            "generation": public_id(names[gid], gid),
            "number": numbers.get(gid, 0),
            "reasons": [
                needed + shown(r[len(needed) :]) if r.startswith(needed) else r for r in reasons
            ],
        }
        for gid, reasons in choice.kept.items()
    ]
    out["would_delete"] = [public_id(names[gid], gid) for gid in choice.deleted]
    return out
