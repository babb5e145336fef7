"""A pool has one drill scratch space (one name): one drill at a time has it, the gate
knows its device only while it exists, and a pool without room gives none."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from blockguard.core.catalog import Catalog
from blockguard.engine.events import EventHub
from blockguard.engine.pools import PoolRegistry
from blockguard.engine.scratch import scratch_space
from blockguard.engine.settings import Settings
from blockguard.storage.pool.base import ScratchSpace
from blockguard.storage.runner import Runner

MiB = 1 << 20


class FakeScratch(ScratchSpace):
    def __init__(self, log: list[str]) -> None:
        super().__init__("/dev/fake-scratch", "p1/bg-drill-scratch", 4 * MiB)
        self.log = log

    def release(self) -> None:
        self.log.append("released")


class FakePool:
    def __init__(self, free: int) -> None:
        self.free = free
        self.log: list[str] = []

    def capacity(self) -> SimpleNamespace:
        return SimpleNamespace(free=self.free)

    def drill_scratch(self, size: int) -> FakeScratch:
        self.log.append(f"made {size}")
        return FakeScratch(self.log)


def _registry(tmp_path: Path, backend: FakePool) -> PoolRegistry:
    catalog = Catalog(tmp_path / "catalog.db")
    catalog.add_pool("p1", "dir", "/srv/p1")
    pools = PoolRegistry(catalog, Settings(tmp_path, tmp_path / "mnt"), EventHub(), Runner())
    pools.open_pools["p1"] = backend  # type: ignore[assignment]
    return pools


def test_one_drill_at_a_time_has_the_pools_scratch(tmp_path: Path) -> None:
    backend = FakePool(free=64 * MiB)
    pools = _registry(tmp_path, backend)
    with scratch_space(pools, "p1", 4 * MiB) as first:
        assert first == "/dev/fake-scratch"
        assert pools.gate().scratch == {first: "p1"}
        with scratch_space(pools, "p1", 4 * MiB) as second:
            assert second is None  # would have removed the first one's
        assert pools.gate().scratch == {first: "p1"}
    assert backend.log == [f"made {4 * MiB}", "released"]
    assert pools.gate().scratch == {}
    with scratch_space(pools, "p1", 4 * MiB) as again:  # free again
        assert again == "/dev/fake-scratch"
    pools.catalog.close()


def test_no_scratch_without_room_besides_the_next_backup(tmp_path: Path) -> None:
    backend = FakePool(free=6 * MiB)
    pools = _registry(tmp_path, backend)
    with scratch_space(pools, "p1", 4 * MiB, reserve=4 * MiB) as scratch:
        assert scratch is None
    assert backend.log == []
    with scratch_space(pools, "p1", 4 * MiB, reserve=2 * MiB) as scratch:
        assert scratch is not None
    assert backend.log == [f"made {4 * MiB}", "released"]
    pools.catalog.close()
