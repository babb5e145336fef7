"""Idle means idle: the scheduler looks at a volume only when its objectives need it.

Three protected volumes on one dir pool: ``quiet`` has no objectives, ``hourly`` an
interval RPO (``every 6h``, so after its first full nothing is due for hours) and
``amount`` an RPO of changed data. After the two first fulls, over a window of several
scheduler floors, the daemon looks at ``amount`` now and then (its trigger needs the
tracker's count) but never at ``quiet`` or ``hourly``, and runs no command naming their
devices; ``hourly``'s next look is planned for its due time, ``quiet``'s for never.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from blockguard.cli.client import JOB, Client, plain, variant
from tests.support.daemon import Daemon, EngineHarness
from tests.support.devices import MiB
from tests.timeouts import scaled

SIZE = 8 * MiB
INTERVAL = 6 * 3600


def wait_fulls(client: Client, names: list[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + scaled(timeout)
    while True:
        counts = {n: len(plain(client.call("ListGenerations", "s", n))) for n in names}
        running = [p for p in client.objects(JOB).values() if p["State"] in ("queued", "running")]
        if all(counts.values()) and not running:
            return
        assert time.monotonic() < deadline, (counts, running)
        time.sleep(0.1)


def planned_looks(text: str, name: str) -> list[float]:
    """The unix times of the looks the scheduler planned for ``name``, in order."""
    pattern = rf"next look at {re.escape(name)}: \S+ \(unix (\S+)\)"
    return [float(m.group(1)) for m in re.finditer(pattern, text)]


def wait_planned(
    daemon: Daemon, name: str, settled: Callable[[float], bool], timeout: float = 30
) -> None:
    """Until the last look the scheduler planned for ``name`` satisfies ``settled``."""
    deadline = time.monotonic() + scaled(timeout)
    while True:
        planned = planned_looks(daemon.log(), name)
        if planned and settled(planned[-1]):
            return
        assert time.monotonic() < deadline, (name, planned[-3:])
        time.sleep(0.1)


def looks(text: str, name: str) -> int:
    return len(re.findall(rf"looking at {re.escape(name)}(?: \[|$)", text, flags=re.M))


def commands_naming(text: str, device: str) -> list[str]:
    return [line for line in text.splitlines() if "run: [" in line and f"'{device}'" in line]


def test_idle_volumes_are_not_looked_at(engine: EngineHarness, loopdev: Callable[..., str]) -> None:
    pool_disk = loopdev(400 * MiB, "pool.img")
    devices = {name: loopdev(SIZE, f"{name}.img") for name in ("quiet", "hourly", "amount")}
    daemon: Daemon = engine.start(BLOCKGUARD_SCHEDULER_INTERVAL="0.2")
    with Client(daemon.address) as client:
        client.call("CreatePool", "ssasb", "p1", "dir", [pool_disk], False)
        for name, device in devices.items():
            client.call("Protect", "sstssa{sv}", device, name, 0, "", "", {})
        client.call("SetObjectives", "sa{sv}", "hourly", {"rpo": variant("every 6h")})
        client.call("SetObjectives", "sa{sv}", "amount", {"rpo": variant("changed 4MiB")})
        wait_fulls(client, ["hourly", "amount"])
        assert plain(client.call("ListGenerations", "s", "quiet")) == []
        # After a backup the scheduler looks once more to plan the next: wait for that plan.
        wait_planned(daemon, "hourly", lambda t: t > time.time() + INTERVAL - 600)
        wait_planned(daemon, "quiet", lambda t: t == float("inf"))

        before = len(daemon.log())
        time.sleep(scaled(3.0))  # 15 scheduler floors; amount's ceiling is 1 s
        window = daemon.log()[before:]

        assert looks(window, "amount") >= 1, window  # the scheduler is awake
        assert looks(window, "quiet") == 0, window
        assert looks(window, "hourly") == 0, window
        for name in ("quiet", "hourly"):
            assert commands_naming(window, devices[name]) == [], name

        text = daemon.log()
        assert planned_looks(text, "quiet")[-1] == float("inf"), text
        plan = plain(client.call("Plan", "s", "hourly"))
        gens = plain(client.call("ListGenerations", "s", "hourly"))
        assert len(gens) == 1 and plan["next_backup"] > time.time() + INTERVAL - 600, plan
        assert abs(planned_looks(daemon.log(), "hourly")[-1] - plan["next_backup"]) < 1.0
