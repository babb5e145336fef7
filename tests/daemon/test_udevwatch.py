"""The udev watcher: classification, debouncing, the loop integration, real kernel uevents."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import subprocess
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pytest

from blockguard.daemon.udevwatch import Debouncer, DeviceEvent, RescanRequest, UdevWatcher
from blockguard.engine.service import WatchTargets


@dataclass
class FakeDevice:
    action: str
    device_node: str | None
    device_number: int = 0
    properties: dict[str, str] = field(default_factory=dict)


class FakeMonitor:
    """A pyudev-like monitor: a pipe makes its fd readable whenever events are queued."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        self.queue: deque[FakeDevice] = deque()

    def fileno(self) -> int:
        return self.read_fd

    def push(self, *devices: FakeDevice) -> None:
        self.queue.extend(devices)
        os.write(self.write_fd, b"x" * len(devices))

    def poll(self, timeout: float | None = None) -> FakeDevice | None:
        with contextlib.suppress(BlockingIOError):
            os.read(self.read_fd, 1)
        return self.queue.popleft() if self.queue else None

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


def test_debouncer_merges_a_burst_into_one_call() -> None:
    async def run() -> list[list[Any]]:
        calls: list[list[Any]] = []
        debouncer = Debouncer(asyncio.get_running_loop(), calls.append, delay=0.1, max_delay=5)
        for i in range(20):
            debouncer.feed(i)
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        debouncer.feed("late")
        await asyncio.sleep(0.3)
        return calls

    calls = asyncio.run(run())
    assert calls == [list(range(20)), ["late"]]


def test_debouncer_max_delay_bounds_the_wait() -> None:
    async def run() -> tuple[list[list[Any]], int]:
        calls: list[list[Any]] = []
        debouncer = Debouncer(asyncio.get_running_loop(), calls.append, delay=0.1, max_delay=0.3)
        fed = 0
        for _ in range(60):  # events every 20 ms for 1.2 s: never quiet for 0.1 s
            debouncer.feed(fed)
            fed += 1
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        return calls, fed

    calls, fed = asyncio.run(run())
    assert len(calls) >= 3  # flushed by max_delay, not only at the end
    assert [i for call in calls for i in call] == list(range(fed))


def test_watcher_classifies_and_debounces_fake_events(tmp_path: Any) -> None:
    pool_disk = tmp_path / "pool-disk"
    volume_disk = tmp_path / "vol-disk"
    requests: list[RescanRequest] = []
    monitor = FakeMonitor()

    async def run() -> None:
        watcher = UdevWatcher(requests.append, debounce=0.1, monitor=monitor)
        watcher.set_targets(
            WatchTargets({str(pool_disk): "p1"}, {str(volume_disk): "db", "/dev/x": "other"})
        )
        watcher.start()
        monitor.push(
            FakeDevice("remove", str(pool_disk)),
            FakeDevice("change", str(pool_disk)),  # a pool disk changing is not a loss
            FakeDevice("change", str(volume_disk)),
            FakeDevice("change", str(volume_disk)),
            FakeDevice("add", "/dev/sdz"),  # a new disk: never touched
            FakeDevice("remove", "/dev/sdy"),  # not ours
            FakeDevice("change", "/dev/dm-3", properties={"DM_NAME": "blockguard-other"}),
        )
        await asyncio.sleep(0.4)
        watcher.stop()

    try:
        asyncio.run(run())
    finally:
        monitor.close()
    assert len(requests) == 1
    assert requests[0].vanished_pool_devices == {str(pool_disk): "p1"}
    assert requests[0].changed_volumes == {"db", "other"}


def test_new_disks_alone_cause_no_rescan() -> None:
    requests: list[RescanRequest] = []
    monitor = FakeMonitor()

    async def run() -> None:
        watcher = UdevWatcher(requests.append, debounce=0.05, monitor=monitor)
        watcher.set_targets(WatchTargets({}, {}))
        watcher.start()
        monitor.push(FakeDevice("add", "/dev/sdq"), FakeDevice("change", "/dev/sdq"))
        await asyncio.sleep(0.2)
        watcher.stop()

    try:
        asyncio.run(run())
    finally:
        monitor.close()
    assert requests == []


def test_event_matches_by_device_number_after_the_node_is_gone() -> None:
    watcher = UdevWatcher(lambda _r: None)
    watcher._by_devnum = {os.makedev(7, 3): ("pool", "/dev/loop3", "p1")}
    event = DeviceEvent(action="remove", devnode=None, devnum=os.makedev(7, 3))
    assert watcher.classify(event) == ("pool", "/dev/loop3", "p1")


@pytest.mark.root
def test_real_kernel_uevents_reach_the_callback(loopdev: Any) -> None:
    volume_dev = loopdev(8 * 1024 * 1024, "vol.img")
    pool_dev = loopdev(8 * 1024 * 1024, "pool.img")
    pool_minor = os.minor(os.stat(pool_dev).st_rdev)
    requests: list[RescanRequest] = []

    async def run() -> None:
        watcher = UdevWatcher(requests.append, debounce=0.3, source="kernel")
        watcher.set_targets(WatchTargets({pool_dev: "p1"}, {volume_dev: "db"}))
        try:
            watcher.start()
        except OSError as exc:
            pytest.skip(f"no netlink uevents here: {exc}")
        await asyncio.sleep(0.1)
        name = os.path.basename(volume_dev)
        with open(f"/sys/block/{name}/uevent", "w") as f:
            f.write("change")
        # The pool disk vanishes: detach it, then remove the loop device itself.
        subprocess.run(["losetup", "-d", pool_dev], check=True, timeout=30)
        fd = os.open("/dev/loop-control", os.O_RDWR)
        try:
            removed = False
            for _ in range(20):  # detaching is asynchronous; removal fails while busy
                try:
                    fcntl.ioctl(fd, 0x4C81, pool_minor)  # LOOP_CTL_REMOVE
                    removed = True
                    break
                except OSError:
                    await asyncio.sleep(0.1)
        finally:
            os.close(fd)
        for _ in range(40):
            if requests and (not removed or any(r.vanished_pool_devices for r in requests)):
                break
            await asyncio.sleep(0.1)
        watcher.stop()
        if not removed:
            pytest.skip("could not remove the loop device (busy)")

    asyncio.run(run())
    assert any(r.changed_volumes == {"db"} for r in requests), requests
    assert any(r.vanished_pool_devices == {pool_dev: "p1"} for r in requests), requests
