"""Holds of generations in a pool (browse mounts): counted per holder."""

from __future__ import annotations

from blockguard.storage.pool.base import PoolBackend


class _Bare(PoolBackend):
    """Only the hold bookkeeping of the base class is used here."""


_Bare.__abstractmethods__ = frozenset()


def test_two_holders_of_one_full_each_keep_it_until_both_release() -> None:
    pool = _Bare("p")
    pool.hold(["full1", "inc2"], "the browse mount at /mnt/a")
    pool.hold(["full1", "inc3"], "the browse mount at /mnt/b")

    pool.release("the browse mount at /mnt/a")

    assert pool.holder_of("full1") == "the browse mount at /mnt/b"
    assert pool.holder_of("inc3") == "the browse mount at /mnt/b"
    assert pool.holder_of("inc2") is None

    pool.release("the browse mount at /mnt/b")

    assert pool.holder_of("full1") is None
    assert pool.holder_of("inc3") is None
