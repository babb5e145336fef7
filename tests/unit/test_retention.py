"""Retention: keep N and everything they depend on (examples and properties)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockguard.core.retention import GenerationRef, dependencies, select_for_deletion


def history(kinds: list[str]) -> list[GenerationRef]:
    """Generations of the given kinds, each referring to the right earlier ones."""
    gens: list[GenerationRef] = []
    last_full: str | None = None
    for i, kind in enumerate(kinds):
        gid = f"g{i:03d}"
        if kind == "full" or last_full is None:
            gens.append(GenerationRef(gid, "full", None, None, float(i)))
            last_full = gid
        elif kind == "differential":
            gens.append(GenerationRef(gid, kind, last_full, last_full, float(i)))
        else:
            gens.append(GenerationRef(gid, kind, last_full, gens[-1].generation_id, float(i)))
    return gens


def test_keep_three_of_ten() -> None:
    kinds = ["full", "incremental", "incremental", "differential", "incremental"] * 2
    gens = history(kinds)
    doomed = select_for_deletion(gens, 3)
    # Newest three: g007 (incr of g006), g008 (diff of g005), g009 (incr of g008);
    # g007 needs g006 and g005 too; the whole first chain goes.
    assert doomed == ["g000", "g001", "g002", "g003", "g004"]
    assert select_for_deletion(gens, 2) == ["g000", "g001", "g002", "g003", "g004", "g006", "g007"]


def test_incremental_keeps_its_whole_chain() -> None:
    gens = history(["full", "incremental", "incremental", "incremental"])
    assert select_for_deletion(gens, 1) == []
    assert dependencies(gens[-1], {g.generation_id: g for g in gens}) == {"g000", "g001", "g002"}


def test_differential_needs_only_its_base() -> None:
    gens = history(["full", "incremental", "incremental", "differential"])
    assert select_for_deletion(gens, 1) == ["g001", "g002"]


def test_keep_must_be_positive() -> None:
    with pytest.raises(ValueError):
        select_for_deletion(history(["full"]), 0)


kind_lists = st.lists(st.sampled_from(["full", "differential", "incremental"]), max_size=40)


@settings(max_examples=300, deadline=None)
@given(kinds=kind_lists, keep=st.integers(1, 6), order=st.randoms())
def test_no_kept_generation_loses_a_dependency(kinds: list[str], keep: int, order) -> None:
    gens = history(kinds)
    shuffled = list(gens)
    order.shuffle(shuffled)  # input order must not matter
    doomed = set(select_for_deletion(shuffled, keep))
    by_id = {g.generation_id: g for g in gens}
    kept = [g for g in gens if g.generation_id not in doomed]
    for g in kept:
        assert not dependencies(g, by_id) & doomed, f"{g.generation_id} lost a dependency"
    # The newest `keep` always survive, and nothing is kept without a reason.
    newest = {g.generation_id for g in gens[-keep:]}
    assert newest <= {g.generation_id for g in kept}
    needed = set(newest)
    for gid in newest:
        needed |= dependencies(by_id[gid], by_id)
    assert {g.generation_id for g in kept} == needed


@settings(max_examples=100, deadline=None)
@given(kinds=kind_lists, keep=st.integers(1, 6))
def test_applying_retention_after_each_commit_stays_consistent(kinds: list[str], keep: int) -> None:
    """The pool applies retention after every commit: the survivors stay restorable."""
    pool: list[GenerationRef] = []
    for gen in history(kinds):
        pool.append(gen)
        doomed = set(select_for_deletion(pool, keep))
        pool = [g for g in pool if g.generation_id not in doomed]
        by_id = {g.generation_id: g for g in pool}
        for g in pool:
            assert dependencies(g, by_id) <= set(by_id)


def test_empty_deltas_do_not_count() -> None:
    full = GenerationRef("g0", "full", None, None, 0.0)
    real = GenerationRef("g1", "incremental", "g0", "g0", 1.0)
    # Idle backups: each empty incremental builds on the last one that stored data.
    empties = [
        GenerationRef(f"e{i}", "incremental", "g0", "g1", 2.0 + i, empty=True) for i in range(4)
    ]
    doomed = select_for_deletion([full, real, *empties], 2)
    assert doomed == ["e0", "e1", "e2"]  # the newest empty one stays, both real ones too


def test_an_empty_generation_others_depend_on_stays() -> None:
    full = GenerationRef("g0", "full", None, None, 0.0)
    empty = GenerationRef("e1", "incremental", "g0", "g0", 1.0, empty=True)
    after = GenerationRef("g2", "incremental", "g0", "e1", 2.0)
    assert select_for_deletion([full, empty, after], 1) == []
