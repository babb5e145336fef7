"""A volume's last restore drill: its record read back from the job history, and what its
measurement says of the next backup (floors by method)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from blockguard.core.vocab import GenerationKind
from blockguard.engine.drillbook import DrillRecord, floors_of

INCR = GenerationKind.INCREMENTAL
DIFF = GenerationKind.DIFFERENTIAL


def gen(gid: str, parent: str | None = None) -> Any:
    """The fields of a manifest that chains are built from."""
    return SimpleNamespace(generation_id=gid, parent_id=parent, is_full=parent is None)


def drilled(*chain: str, seconds: float = 9.0, mode: str = "swap-in") -> DrillRecord:
    return DrillRecord(1.0, "failed", "slow", seconds, 1.0, 2.0, 5.0, mode, "db@x", chain)


def test_a_drill_of_the_newest_chain_bounds_an_incremental() -> None:
    gens = [gen("f"), gen("i1", "f"), gen("i2", "i1")]
    assert floors_of(drilled("f", "i1", "i2"), "swap-in", gens) == {INCR: 9.0}
    # An older drilled chain is still contained in the newest one.
    assert floors_of(drilled("f", "i1"), "swap-in", gens) == {INCR: 9.0}


def test_a_drill_of_the_lone_full_bounds_a_differential_too() -> None:
    gens = [gen("f")]
    assert floors_of(drilled("f"), "swap-in", gens) == {INCR: 9.0, DIFF: 9.0}


def test_a_new_full_or_another_mode_is_not_bounded() -> None:
    gens = [gen("f"), gen("i1", "f"), gen("f2")]
    assert floors_of(drilled("f", "i1"), "swap-in", gens) == {}
    assert floors_of(drilled("f2"), "copy", gens) == {}  # drilled in swap-in mode
    assert floors_of(None, "swap-in", gens) == {}
    unfinished = DrillRecord(1.0, "failed", "checksum mismatch")
    assert floors_of(unfinished, "swap-in", gens) == {}
    # A branch beside the drilled chain (a differential on the full) does not contain it.
    branch = [gen("f"), gen("i1", "f"), gen("d1", "f")]
    assert floors_of(drilled("f", "i1"), "swap-in", branch) == {}


def test_the_record_round_trips_through_the_job_history() -> None:
    record = drilled("f", "i1")
    done = SimpleNamespace(state="done", result=record.as_dict(), started=1.0, created=0.5)
    assert DrillRecord.from_job(done) == record
    failed = SimpleNamespace(
        state="failed", result=None, error="checksum mismatch", started=None, created=3.0
    )
    assert DrillRecord.from_job(failed) == DrillRecord(3.0, "failed", "checksum mismatch")
    garbled = SimpleNamespace(state="done", result={"at": "x"}, started=1.0, created=1.0)
    assert DrillRecord.from_job(garbled) is None
