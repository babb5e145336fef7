"""The plan of a remote copy: the change sets of replicated local generations and the
method the remote RTO chooses, with the link as the target's speed."""

from __future__ import annotations

from datetime import timedelta

from pyroaring import BitMap

from blockguard.core.objective_sets import RemoteObjectives
from blockguard.core.objectives import RecoveryObjectives
from blockguard.core.perftable import DeviceSpeed
from blockguard.core.vocab import GenerationKind, RestoreMode
from blockguard.engine.remoteplan import (
    SentGeneration,
    changed_since,
    plan_remote,
    remote_changes,
    remote_plan_dict,
)
from blockguard.storage.manifest import Manifest, VolumeIdentity

CHUNK = 1 << 20
SIZE = 64 * CHUNK
FAST = DeviceSpeed.uniform(1e9)


def manifest(gid: str, kind: GenerationKind, changed: BitMap, base: str | None = None) -> Manifest:
    return Manifest(
        generation_id=gid,
        volume=VolumeIdentity("db", SIZE),
        chunk_size=CHUNK,
        kind=kind,
        base_id=base,
        parent_id=base,
        changed=changed if kind is not GenerationKind.FULL else BitMap(range(64)),
    )


LOCAL = [
    manifest("g1", GenerationKind.FULL, BitMap()),
    manifest("g2", GenerationKind.INCREMENTAL, BitMap([1, 2]), "g1"),
    manifest("g3", GenerationKind.INCREMENTAL, BitMap([2, 3, 10]), "g1"),
    manifest("g4", GenerationKind.DIFFERENTIAL, BitMap([20]), "g1"),
]


def sent(gid: str, kind: GenerationKind, base: str | None, nbytes: int) -> SentGeneration:
    return SentGeneration(gid, kind, base, nbytes, extents=1)


def test_a_remote_incremental_is_the_union_of_the_local_changes_since_the_last_sent() -> None:
    assert changed_since(LOCAL, "g2") == BitMap([2, 3, 10, 20])
    changes = remote_changes(
        LOCAL,
        [
            sent("g1", GenerationKind.FULL, None, SIZE),
            sent("g2", GenerationKind.INCREMENTAL, "g1", 2 * CHUNK),
        ],
    )
    assert changes.source.generation_id == "g4"
    assert changes.incremental == BitMap([2, 3, 10, 20])
    assert changes.differential == BitMap([1, 2, 3, 10, 20])
    assert changes.changes.incremental_bytes == 4 * CHUNK
    assert changes.changes.differential_bytes == 5 * CHUNK
    assert changes.full_required is None


def test_only_a_full_when_the_last_sent_local_generation_is_gone() -> None:
    changes = remote_changes(LOCAL[1:], [sent("g1", GenerationKind.FULL, None, SIZE)])
    assert changes.incremental is None and changes.differential is None
    assert "db@g1" in (changes.full_required or "")


def test_without_a_remote_full_the_first_transfer_is_a_full() -> None:
    remote = RemoteObjectives("offsite", None)
    plan = plan_remote(LOCAL, FAST, remote, FAST, [])
    assert plan.decision is not None
    assert plan.decision.method is GenerationKind.FULL
    assert plan.decision.nbytes == SIZE


def test_up_to_date_when_the_newest_local_generation_was_sent() -> None:
    plan = plan_remote(
        LOCAL,
        FAST,
        RemoteObjectives("offsite", None),
        FAST,
        [
            sent("g1", GenerationKind.FULL, None, SIZE),
            sent("g4", GenerationKind.DIFFERENTIAL, "g1", CHUNK),
        ],
    )
    assert plan.up_to_date
    assert remote_plan_dict(plan)["up_to_date"] is True


def test_the_remote_rto_chooses_the_method_with_the_link_speed() -> None:
    local = [manifest("x0", GenerationKind.FULL, BitMap()), *LOCAL[1:]]
    chain = [
        sent("x0", GenerationKind.FULL, None, SIZE),
        sent("g2", GenerationKind.INCREMENTAL, "x0", 2 * CHUNK),
    ]
    # Without an RTO: the cheapest, an incremental.
    cheap = plan_remote(local, FAST, RemoteObjectives("offsite", None), FAST, chain)
    assert cheap.decision is not None and cheap.decision.method is GenerationKind.INCREMENTAL
    # A link of 1 MiB/s: a restore reads the full (64 s) and what the chain adds (the
    # incremental 2 + 4 chunks, the differential 5): an RTO of 66 s only a full meets.
    slow = DeviceSpeed.uniform(CHUNK)
    rto = RecoveryObjectives(rto=timedelta(seconds=66), restore_mode=RestoreMode.COPY)
    tight = plan_remote(local, FAST, RemoteObjectives("offsite", rto), slow, chain)
    assert tight.decision is not None and tight.decision.feasible
    assert tight.decision.method is GenerationKind.FULL
    estimates = {p.method: p.estimate.upper_seconds for p in tight.decision.considered}
    assert estimates[GenerationKind.FULL] <= 66 < estimates[GenerationKind.DIFFERENTIAL]
    shown = remote_plan_dict(tight)
    assert shown["method"] == "full"
    assert shown["source"] == "db@g4"
    assert set(shown["estimated_restore_seconds"]) == {"full", "differential", "incremental"}
    # The same RTO over a fast link: an incremental.
    easy = plan_remote(local, FAST, RemoteObjectives("offsite", rto), FAST, chain)
    assert easy.decision is not None and easy.decision.method is GenerationKind.INCREMENTAL


def test_the_remote_rpo_makes_a_transfer_due_against_the_copy_point_in_time() -> None:
    from datetime import UTC, datetime

    from blockguard.core.objectives import IntervalRPO
    from blockguard.engine.remoteplan import transfer_schedule

    hourly = RecoveryObjectives(rpo=IntervalRPO(timedelta(hours=1)))
    chain = [sent("g1", GenerationKind.FULL, None, SIZE)]
    plan = plan_remote(LOCAL, FAST, RemoteObjectives("offsite", hourly), FAST, chain)
    sent_at = datetime(2026, 12, 1, 12, tzinfo=UTC).timestamp()
    soon = transfer_schedule(plan, sent_at, datetime(2026, 12, 1, 12, 30, tzinfo=UTC))
    assert soon is not None and not soon.due
    late = transfer_schedule(plan, sent_at, datetime(2026, 12, 1, 13, 30, tzinfo=UTC))
    assert late is not None and late.due
    # Nothing to send, or no remote RPO: never due.
    done = plan_remote(
        LOCAL, FAST, RemoteObjectives("offsite", hourly), FAST,
        [*chain, sent("g4", GenerationKind.DIFFERENTIAL, "g1", CHUNK)],
    )  # fmt: skip
    assert transfer_schedule(done, sent_at, datetime(2026, 12, 2, tzinfo=UTC)) is None
    on_request = plan_remote(LOCAL, FAST, RemoteObjectives("offsite", None), FAST, chain)
    assert transfer_schedule(on_request, sent_at, datetime(2026, 12, 2, tzinfo=UTC)) is None
