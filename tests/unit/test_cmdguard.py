"""The daemon's runner holds back kernel work of other threads while one swaps tables."""

from __future__ import annotations

import threading

from blockguard.engine.cmdguard import GuardedRunner
from tests.timeouts import scaled


def test_a_section_of_another_thread_waits_for_an_exclusive_one() -> None:
    runner = GuardedRunner()
    order: list[str] = []

    def ioctl() -> None:  # what DeviceMapper does around a dm ioctl
        with runner.section():
            order.append("ioctl")

    with runner.exclusive():
        other = threading.Thread(target=ioctl)
        other.start()
        other.join(0.2)  # time to get in, were it not held back
        order.append("swap done")
    other.join(scaled(10))
    assert not other.is_alive()
    assert order == ["swap done", "ioctl"]


def test_an_exclusive_section_waits_for_a_running_one_and_its_own_thread_is_not_held() -> None:
    runner = GuardedRunner()
    order: list[str] = []
    inside, leave = threading.Event(), threading.Event()

    def ioctl() -> None:
        with runner.section():
            inside.set()
            leave.wait(scaled(10))
            order.append("ioctl")

    other = threading.Thread(target=ioctl)
    other.start()
    assert inside.wait(scaled(10))
    swapper = threading.Thread(target=lambda: _swap(runner, order))
    swapper.start()
    swapper.join(0.2)
    leave.set()
    for t in (other, swapper):
        t.join(scaled(10))
        assert not t.is_alive()
    assert order == ["ioctl", "own section", "swap"]


def _swap(runner: GuardedRunner, order: list[str]) -> None:
    with runner.exclusive():
        with runner.section():  # the owner's own kernel work is not held back
            order.append("own section")
        order.append("swap")
