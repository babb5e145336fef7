"""Sharing a thin pool's metadata snapshot: wait for another holder, never take theirs.

The pool is a fake (the host kernel has no device-mapper; tests/guest/test_thin_neighbour.py
runs the same against the real kernel), and so is the clock: nothing here sleeps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blockguard.errors import Busy, MetadataSnapshotBusy
from blockguard.storage.tracking import thinmeta
from blockguard.storage.tracking.thinmeta import MetadataSnapshot, Policy, recover


class FakePool:
    """One thin pool's held root; ``holds`` scripts another process: (start, end) times."""

    def __init__(self, clock: list[float], holds: list[tuple[float, float]] = ()) -> None:
        self.clock = clock
        self.holds = list(holds)
        self.ours: int | None = None
        self.log: list[str] = []

    def neighbour_holds(self) -> bool:
        return any(a <= self.clock[0] < b for a, b in self.holds)

    def held_metadata_root(self, pool: str) -> int | None:
        if self.ours is not None:
            return self.ours
        return 777 if self.neighbour_holds() else None

    def reserve_metadata_snap(self, pool: str) -> None:
        if self.ours is not None or self.neighbour_holds():
            raise MetadataSnapshotBusy(pool=pool, waited="")
        self.ours = 42
        self.log.append(f"reserve@{self.clock[0]:.2f}")

    def release_metadata_snap(self, pool: str) -> None:
        assert self.ours is not None, "released a snapshot that is not ours"
        self.ours = None
        self.log.append(f"release@{self.clock[0]:.2f}")


@pytest.fixture(autouse=True)
def fresh_watches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(thinmeta, "_watches", {})


def snapshot(pool: FakePool, clock: list[float], tmp_path: Path, **kw) -> MetadataSnapshot:
    def sleep(s: float) -> None:
        clock[0] += s

    return MetadataSnapshot(
        pool,  # type: ignore[arg-type]
        "vg-pool-tpool",
        tmp_path / thinmeta.MARKER,
        clock=lambda: clock[0],
        sleep=sleep,
        **kw,
    )


def test_a_held_snapshot_is_waited_for_and_reserved_right_after_its_release(tmp_path) -> None:
    clock = [0.0]
    pool = FakePool(clock, holds=[(0.0, 3.0), (8.0, 9.0)])
    snap = snapshot(pool, clock, tmp_path, policy=Policy(wait=60, quiet=5))
    with snap.held():
        assert pool.ours == 42
        assert json.loads((tmp_path / thinmeta.MARKER).read_text())["root"] == 42
        t = clock[0]
    # in the gap, not at its end: one poll later at most (a pause is jittered to 0.5-1.5x)
    assert 3.0 <= t <= 3.0 + 1.5 * thinmeta.POLL_CAP
    assert pool.ours is None and not (tmp_path / thinmeta.MARKER).exists()


def test_after_a_neighbour_was_seen_a_free_snapshot_is_listened_to_first(tmp_path) -> None:
    clock = [0.0]
    pool = FakePool(clock, holds=[(0.0, 1.0), (6.0, 7.0)])
    policy = Policy(wait=60, quiet=10)
    with snapshot(pool, clock, tmp_path, policy=policy).held():
        pass
    clock[0] = 5.5  # free now, but the neighbour holds it again at 6: wait for that one
    with snapshot(pool, clock, tmp_path, policy=policy).held():
        assert clock[0] >= 7.0


def test_the_wait_is_bounded_and_busy_is_a_named_error_not_tracking_lost(tmp_path) -> None:
    clock = [0.0]
    pool = FakePool(clock, holds=[(0.0, 1000.0)])
    snap = snapshot(pool, clock, tmp_path, policy=Policy(wait=30, quiet=5))
    with pytest.raises(MetadataSnapshotBusy) as err, snap.held():
        pytest.fail("reserved a snapshot another process holds")
    assert isinstance(err.value, Busy)
    assert "vg-pool-tpool" in str(err.value) and "held by another process" in str(err.value)
    assert 30 <= clock[0] < 31 and pool.log == []


def test_a_poll_does_not_wait_for_a_held_snapshot(tmp_path) -> None:
    clock = [0.0]
    pool = FakePool(clock, holds=[(0.0, 100.0)])
    with pytest.raises(MetadataSnapshotBusy), snapshot(pool, clock, tmp_path, poll=True).held():
        pass
    assert clock[0] == 0.0 and pool.log == []


def test_an_error_inside_releases_the_snapshot(tmp_path) -> None:
    clock = [0.0]
    pool = FakePool(clock)
    snap = snapshot(pool, clock, tmp_path, policy=Policy(wait=1, quiet=0))
    with pytest.raises(RuntimeError), snap.held():
        raise RuntimeError("thin_delta died")
    assert pool.ours is None and not (tmp_path / thinmeta.MARKER).exists()


def test_recover_releases_only_our_own_leftover(tmp_path) -> None:
    clock = [0.0]
    marker = tmp_path / thinmeta.MARKER
    pool = FakePool(clock)
    pool.ours = 42  # a previous run was killed while it held root 42
    marker.write_text(json.dumps({"pool": "vg-pool-tpool", "root": 42}))
    recover(pool, marker)  # type: ignore[arg-type]
    assert pool.ours is None and not marker.exists()
    # Our marker, but the held snapshot is another tool's (root 777): left alone.
    pool = FakePool(clock, holds=[(0.0, 100.0)])
    marker.write_text(json.dumps({"pool": "vg-pool-tpool", "root": 42}))
    recover(pool, marker)  # type: ignore[arg-type]
    assert pool.held_metadata_root("vg-pool-tpool") == 777 and pool.log == []
    assert not marker.exists()
