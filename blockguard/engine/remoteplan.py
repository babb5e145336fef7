"""The plan of a volume's copy on a backup target (issue 11).

A remote copy **replicates committed local generations** (docs/design/remote.md, open
question 1): a remote generation has the id and the point in time of the local
generation it copies, and its data is the union of what the local generations since the
one last sent changed (an incremental there), or since the one the newest remote full
copies (a differential there), or every chunk (a full). The planner of local backups,
``plan_backup``, chooses among them by the remote RTO unchanged: the target is one more
"pool device" whose speeds are the link's (reads what comes down, writes what goes up;
``min(area, link)`` once the target reports its areas' own speeds), and a restore from
it writes to this host's copy target like a local restore.

This module gathers and calls the core; it decides nothing itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pyroaring import BitMap

from blockguard.core.catalog import Catalog, area_of_perf_key, link_perf_key
from blockguard.core.objective_sets import RemoteObjectives, remote_of
from blockguard.core.objectives import IntervalRPO, RecoveryObjectives
from blockguard.core.perftable import DeviceSpeed
from blockguard.core.planner import PlanDecision, plan_backup
from blockguard.core.restore_model import Chain, StoredDelta
from blockguard.core.scheduler import ScheduleDecision, schedule
from blockguard.core.vocab import GenerationKind, RestoreMode
from blockguard.core.what_if import ChangeSets
from blockguard.engine.ids import public_id
from blockguard.engine.planning import PlanInputs
from blockguard.storage.manifest import Manifest
from blockguard.storage.restore import runs


@dataclass(frozen=True)
class SentGeneration:
    """A generation committed on a target: a copy of the local generation of the same id.

    :param generation_id: the local generation's id (the same point in time).
    :param kind: how it was sent (full, differential, incremental on the target).
    :param base_id: the remote full it needs (``None`` for a full).
    :param bytes_stored: bytes of chunks it holds (before compression).
    :param extents: runs of adjacent chunks it holds, when known.
    """

    generation_id: str
    kind: GenerationKind
    base_id: str | None
    bytes_stored: int
    extents: int | None = None


def target_device(target: str) -> str:
    """The name the target has as a "device" in the restore model: ``target:ID``."""
    return f"target:{target}"


def changed_since(local: Sequence[Manifest], generation_id: str) -> BitMap | None:
    """Chunks the local generations after ``generation_id`` changed, up to the newest.

    :returns: ``None`` when it cannot be known: ``generation_id`` is no longer a local
        generation (retention removed it), or the chunk size or the volume size changed
        since (the chunks would not line up).
    """
    ids = [m.generation_id for m in local]
    if generation_id not in ids:
        return None
    since = local[ids.index(generation_id)]
    changed = BitMap()
    for m in local[ids.index(generation_id) + 1 :]:
        if m.chunk_size != since.chunk_size or m.volume.size != since.volume.size:
            return None
        changed |= m.stored_chunks()
    return changed


@dataclass(frozen=True)
class RemoteChanges:
    """What a transfer of the newest local generation would send, by method.

    :param source: the local generation to send (the newest usable one).
    :param changes: the sizes for the planner.
    :param incremental: chunks changed since the generation last sent (``None``: unknown).
    :param differential: chunks changed since the newest remote full's generation.
    :param full_required: why only a full can be sent, or ``None``.
    """

    source: Manifest
    changes: ChangeSets
    incremental: BitMap | None
    differential: BitMap | None
    full_required: str | None

    def chunks(self, method: GenerationKind) -> BitMap:
        """The chunks a transfer of ``method`` sends (every chunk for a full)."""
        if method is GenerationKind.FULL:
            return self.source.stored_chunks()
        chosen = self.incremental if method is GenerationKind.INCREMENTAL else self.differential
        if chosen is None:
            raise ValueError(f"a {method.value} cannot be sent: {self.full_required}")
        return chosen


def remote_changes(local: Sequence[Manifest], sent: Sequence[SentGeneration]) -> RemoteChanges:
    """The change sets of a transfer of the newest of ``local`` (usable, oldest first).

    :param sent: the generations on the target, oldest first.
    :raises ValueError: ``local`` is empty (nothing to send).
    """
    if not local:
        raise ValueError("no local generation to send")
    source = local[-1]
    size = source.volume.size
    fulls = [g for g in sent if g.kind is GenerationKind.FULL]
    incremental = differential = None
    why = None
    if not fulls:
        why = "no full on the target yet"
    else:
        incremental = changed_since(local, sent[-1].generation_id)
        differential = changed_since(local, fulls[-1].generation_id)
        if incremental is None or differential is None:
            gone = sent[-1] if incremental is None else fulls[-1]
            why = (
                f"local generation {public_id(source.volume.name, gone.generation_id)}, which "
                "the target's chain copies, is gone or no longer lines up"
            )
            incremental = differential = None
    inc_bytes = size if incremental is None else source.bytes_of(incremental)
    diff_bytes = size if differential is None else source.bytes_of(differential)
    changes = ChangeSets(
        incremental_bytes=inc_bytes,
        differential_bytes=diff_bytes,
        volume_bytes=size,
        incremental_extents=None if incremental is None else runs(incremental),
        differential_extents=None if differential is None else runs(differential),
    )
    return RemoteChanges(source, changes, incremental, differential, why)


def remote_chain(sent: Sequence[SentGeneration], device: str, volume_bytes: int) -> Chain | None:
    """The target's chain since its newest full, as the restore model sees it."""
    fulls = [i for i, g in enumerate(sent) if g.kind is GenerationKind.FULL]
    if not fulls:
        return None
    full = sent[fulls[-1]]
    deltas = tuple(
        StoredDelta(g.kind, g.bytes_stored, device, extents=g.extents)
        for g in sent[fulls[-1] + 1 :]
        if g.base_id == full.generation_id
    )
    return Chain(volume_bytes, device, deltas)


@dataclass(frozen=True)
class RemotePlan:
    """The decision for the next transfer, with what it was made from."""

    objectives: RemoteObjectives
    changes: RemoteChanges | None
    decision: PlanDecision | None
    link_measured: bool
    #: why there is nothing to send (when :attr:`decision` is ``None``)
    idle_reason: str = ""

    @property
    def up_to_date(self) -> bool:
        """Nothing to send: the newest local generation is on the target (or there is none)."""
        return self.decision is None


def plan_remote(
    manifests: Sequence[Manifest],
    copy_target: DeviceSpeed,
    remote: RemoteObjectives,
    link: DeviceSpeed,
    sent: Sequence[SentGeneration],
    *,
    link_measured: bool = True,
) -> RemotePlan:
    """Decide how the newest local generation goes to the target.

    :param manifests: the volume's usable local generations, oldest first.
    :param copy_target: the speed of the device a restore writes to (on this host).
    :param link: the target's speeds (the link, or ``min(area, link)``).
    :param sent: the generations on the target, oldest first.
    """
    if not manifests:
        return RemotePlan(remote, None, None, link_measured, "no local generation yet")
    if sent and sent[-1].generation_id == manifests[-1].generation_id:
        return RemotePlan(remote, None, None, link_measured, "the newest generation is there")
    changes = remote_changes(manifests, sent)
    device = target_device(remote.target)
    # Without a remote RTO the planner takes the cheapest method (the stand-in's RPO is
    # not used to plan).
    objectives = remote.objectives or RecoveryObjectives(
        rpo=IntervalRPO(timedelta(days=1)), restore_mode=RestoreMode.COPY
    )
    decision = plan_backup(
        remote_chain(sent, device, changes.changes.volume_bytes),
        changes.changes,
        {device: link},
        objectives,
        candidates=[device],
        copy_target=copy_target,
        full_required=changes.full_required,
    )
    return RemotePlan(remote, changes, decision, link_measured)


def remote_plan_dict(plan: RemotePlan) -> dict[str, Any]:
    """The ``remote`` part of ``Plan``'s answer."""
    out: dict[str, Any] = {
        "target": plan.objectives.target,
        "objectives": plan.objectives.describe(),
        "generations": plan.objectives.generations,
        "link_measured": plan.link_measured,
    }
    if plan.decision is None or plan.changes is None:
        out.update(method="", up_to_date=True, reasons=[plan.idle_reason])
        return out
    d = plan.decision
    source = plan.changes.source
    out.update(
        up_to_date=False,
        source=public_id(source.volume.name, source.generation_id),
        method=d.method.value,
        reasons=list(d.reasons),
        feasible=d.feasible,
        estimated_bytes=d.nbytes,
        estimated_seconds=d.estimate.seconds,
        estimated_upper_seconds=d.estimate.upper_seconds,
        estimated_restore_seconds={p.method.value: p.estimate.seconds for p in d.considered},
    )
    if d.needed_rate is not None:
        out["needed_rate"] = d.needed_rate
    return out


def link_speed(catalog: Catalog, target: str, default: float) -> tuple[DeviceSpeed, bool]:
    """The target's speeds for the restore model and whether they were measured.

    The row of the target's area (each figure ``min(area, link)``, written by
    registration): the area named as the target's pool, else its only area. A target
    that reports no measured area is planned with the link's row (reads down, writes
    up); one with neither, with ``default``.

    :raises NotFound: no target of that id.
    """
    record = catalog.get_target(target)
    areas = {
        name: e
        for e in catalog.list_perf("pool")
        if (name := area_of_perf_key(target, e.device_key)) is not None
    }
    entry = areas.get(record.pool) or (next(iter(areas.values())) if len(areas) == 1 else None)
    for row in (entry, catalog.get_perf(link_perf_key(target), "pool")):
        if row is None:
            continue
        figures = (row.seq_read, row.seq_write, row.rand_read, row.rand_write)
        if all(figures):
            return DeviceSpeed(*figures, chunk_size=row.chunk_size or 65536), True  # type: ignore[arg-type]  # all() checked them
    return DeviceSpeed.uniform(default), False


def sent_generations(catalog: Catalog, target: str, volume: str) -> list[SentGeneration]:
    """The volume's generations on ``target`` as the catalog recorded them, oldest first."""
    return [
        SentGeneration(r.generation, GenerationKind(r.kind), r.base, r.bytes_stored, r.extents)
        for r in catalog.list_remote_generations(target, volume)
    ]


def remote_section(
    catalog: Catalog,
    name: str,
    given: Mapping[str, Any],
    local: PlanInputs,
    default_speed: float,
) -> RemotePlan | None:
    """The plan of the volume's remote copy, or ``None`` when its objectives name no target.

    :param given: the volume's stored objectives.
    """
    remote = remote_of(given)
    if remote is None:
        return None
    link, measured = link_speed(catalog, remote.target, default_speed)
    sent = sent_generations(catalog, remote.target, name)
    manifests = [] if local.generations is None else local.generations.usable
    return plan_remote(manifests, local.copy_target, remote, link, sent, link_measured=measured)


def transfer_schedule(
    plan: RemotePlan, last_sent: float | None, now: datetime
) -> ScheduleDecision | None:
    """Whether a transfer is due by the remote RPO (``None``: no remote RPO, or nothing
    to send). The remote copy's point in time is its local generation's, so the RPO is
    held against that: a transfer is due when the newest copy there is older than the
    RPO allows (or at the daily hour, or once the changes not there reach the amount).

    :param last_sent: the point in time of the newest generation on the target.
    """
    objectives = plan.objectives.objectives
    if objectives is None or objectives.rpo is None or plan.changes is None:
        return None
    last = None if last_sent is None else datetime.fromtimestamp(last_sent, UTC)
    changed = plan.changes.changes.incremental_bytes
    return schedule(objectives, last_backup=last, changed_bytes=changed, now=now)
