"""Which generations a damaged one makes unusable, and when that forces a full (pure)."""

from __future__ import annotations

from blockguard.core.damage import Damage, DamageCause, full_required_reason, unusable
from blockguard.core.retention import GenerationRef


def chain(*kinds: str) -> list[GenerationRef]:
    """g0, g1, ... of the given kinds; incrementals on the previous one, differentials on
    the last full."""
    gens: list[GenerationRef] = []
    full = ""
    for i, kind in enumerate(kinds):
        gid = f"g{i}"
        if kind == "full":
            gens.append(GenerationRef(gid, kind, None, None, float(i)))
            full = gid
        elif kind == "differential":
            gens.append(GenerationRef(gid, kind, full, full, float(i)))
        else:
            gens.append(GenerationRef(gid, kind, full, gens[-1].generation_id, float(i)))
    return gens


def bad(gid: str, cause: DamageCause = DamageCause.METADATA) -> dict[str, Damage]:
    return {gid: Damage(gid, cause, "its manifest is unreadable")}


def test_nothing_damaged_nothing_unusable() -> None:
    assert unusable(chain("full", "incremental"), {}) == {}


def test_an_incremental_takes_its_descendants_only() -> None:
    gens = chain("full", "incremental", "incremental", "incremental", "differential")
    # g2 is unreadable, so it is not among the readable generations given.
    readable = [g for g in gens if g.generation_id != "g2"]
    result = unusable(readable, bad("g2"))
    assert sorted(result) == ["g2", "g3"]
    assert result["g3"].source == "g2"
    assert "depends on g2" in result["g3"].describe("g3")
    assert result["g2"].describe("g2") == "its manifest is unreadable"


def test_a_full_takes_its_whole_chain_but_not_the_next_one() -> None:
    gens = chain("full", "incremental", "differential", "full", "incremental")
    result = unusable(gens, bad("g0", DamageCause.CHECKSUM))
    assert sorted(result) == ["g0", "g1", "g2"]
    assert all(d.cause is DamageCause.CHECKSUM for d in result.values())


def test_the_nearest_damaged_dependency_is_blamed() -> None:
    gens = chain("full", "incremental", "incremental", "incremental")
    damaged = {**bad("g1"), **bad("g2")}
    assert unusable(gens, damaged)["g3"].source == "g2"


def test_a_missing_dependency_makes_dependents_unusable() -> None:
    gens = [g for g in chain("full", "incremental", "incremental") if g.generation_id != "g1"]
    result = unusable(gens, {})
    assert list(result) == ["g2"]
    assert "g1 is missing" in result["g2"].reason
    # An id known to exist (e.g. reported elsewhere) is not "missing".
    assert unusable(gens, {}, known=["g1"]) == {}


def test_full_required_while_the_current_chain_is_corrupt() -> None:
    gens = chain("full", "incremental", "incremental")
    corrupt = unusable(gens, bad("g1"))
    reason = full_required_reason(gens, corrupt, {})
    assert reason is not None and "g1" in reason


def test_no_full_required_once_a_newer_full_exists() -> None:
    gens = chain("full", "incremental", "full", "incremental")
    corrupt = unusable(gens, bad("g1"))
    assert full_required_reason(gens, corrupt, {}) is None
    assert full_required_reason(gens, {}, {}) is None


def test_full_required_when_the_newest_full_is_corrupt() -> None:
    gens = chain("full", "incremental", "full", "incremental")
    corrupt = unusable(gens, bad("g2", DamageCause.CHECKSUM))
    assert sorted(corrupt) == ["g2", "g3"]
    assert "g2" in (full_required_reason(gens, corrupt, {}) or "")


def test_an_unreadable_generation_is_placed_by_its_time() -> None:
    gens = chain("full", "incremental")
    damaged = bad("gx")
    assert full_required_reason(gens, damaged, {"gx": -1.0}) is None  # older than the full
    assert full_required_reason(gens, damaged, {"gx": 5.0}) is not None
    assert full_required_reason(gens, damaged, {}) is not None  # unknown time: newest
