"""Sharing a thin pool's metadata snapshot: wait for another holder, never take theirs.

The pool is a fake (the host kernel has no device-mapper; tests/guest/test_thin_neighbour.py
runs the same against the real kernel), and so is the clock: nothing here sleeps.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from blockguard.engine.tracking import VolumeTracking
from blockguard.engine.volumes import VolumeRegistry
from blockguard.errors import Busy, MetadataSnapshotBusy, NotFound
from blockguard.storage.tracking import thinmeta
from blockguard.storage.tracking.thinmeta import MetadataSnapshot, Policy, recover
from tests.timeouts import scaled


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


def test_a_poll_never_listens_it_is_skipped_until_listen_ran(tmp_path) -> None:
    clock = [0.0]
    pool = FakePool(clock)

    def sleep(s: float) -> None:
        clock[0] += s

    poll = snapshot(pool, clock, tmp_path, poll=True)
    with pytest.raises(MetadataSnapshotBusy) as err, poll.held():
        pytest.fail("a poll reserved a pool nobody listened to")
    assert "not listened to yet" in str(err.value)
    assert clock[0] == 0.0 and pool.log == []
    # listen() (outside the caller's locks) listens for ``quiet`` seconds, reserving nothing;
    thinmeta.listen(
        pool,  # type: ignore[arg-type]
        "vg-pool-tpool",
        policy=Policy(quiet=5),
        clock=lambda: clock[0],
        sleep=sleep,
    )
    assert clock[0] >= 5.0 and pool.log == []
    # then the poll reserves at once, and a second listen() has nothing to do.
    listened = clock[0]
    with snapshot(pool, clock, tmp_path, poll=True).held():
        assert pool.ours == 42 and clock[0] == listened
    thinmeta.listen(pool, "vg-pool-tpool", clock=lambda: clock[0], sleep=sleep)  # type: ignore[arg-type]
    assert clock[0] == listened


def test_listen_ends_at_a_neighbours_hold_and_the_poll_is_skipped(tmp_path) -> None:
    clock = [0.0]
    pool = FakePool(clock, holds=[(2.0, 3.0)])

    def sleep(s: float) -> None:
        clock[0] += s

    thinmeta.listen(
        pool,  # type: ignore[arg-type]
        "vg-pool-tpool",
        policy=Policy(quiet=10),
        clock=lambda: clock[0],
        sleep=sleep,
    )
    assert 2.0 <= clock[0] < 3.0  # it stopped listening when the neighbour came
    clock[0] = 4.0  # free again, but it comes back: a poll does not step in
    poll = snapshot(pool, clock, tmp_path, poll=True)
    with pytest.raises(MetadataSnapshotBusy) as err, poll.held():
        pytest.fail("a poll reserved right after a neighbour's hold")
    assert "lately" in str(err.value) and pool.log == []


class _ListeningTracker:
    """A thin tracker whose listen() sleeps (on a fake clock) until the test lets it go."""

    backend = "thin"

    def __init__(self, pool: FakePool, clock: list[float]) -> None:
        self.pool, self.clock = pool, clock
        self.listening = threading.Event()
        self.go_on = threading.Event()

    def _sleep(self, s: float) -> None:
        self.listening.set()
        assert self.go_on.wait(scaled(60)), "the test never let the listen go on"
        self.clock[0] += s

    def listen(self) -> None:
        thinmeta.listen(
            self.pool,  # type: ignore[arg-type]
            "vg-pool-tpool",
            policy=Policy(quiet=5),
            clock=lambda: self.clock[0],
            sleep=self._sleep,
        )


class _NoVolumes:
    def get_volume(self, name: str) -> None:
        raise NotFound(what="volume", name=name)


def test_a_polls_listening_leaves_the_registry_lock_to_other_volumes(tmp_path) -> None:
    clock = [0.0]
    tracker = _ListeningTracker(FakePool(clock), clock)
    registry = VolumeRegistry(_NoVolumes(), None, None, None, None)  # type: ignore[arg-type]
    registry.tracking["a"] = VolumeTracking(tmp_path / "a", tracker, None)  # type: ignore[arg-type]
    other = object()
    registry.cache["b"] = other  # type: ignore[assignment]
    failures: list[BaseException] = []

    def refresh_a() -> None:
        try:
            registry.refresh("a")
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=refresh_a)
    thread.start()
    try:
        assert tracker.listening.wait(scaled(60)), "refresh of a did not listen"
        # a is listening: the lock is free, another volume's call goes through.
        assert registry.lock.acquire(blocking=False), "a's listening holds the registry lock"
        registry.lock.release()
        assert registry.info("b") is other
    finally:
        tracker.go_on.set()
        thread.join(scaled(60))
    assert not thread.is_alive()
    # After listening, refresh went on under the lock (the fake catalog has no volume a).
    assert len(failures) == 1 and isinstance(failures[0], NotFound), failures
    assert thinmeta._known_quiet(thinmeta._watch("vg-pool-tpool"), clock[0])


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
