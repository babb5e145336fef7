"""Input edges of the real daemon: objectives merge, protect is atomic, placement has room."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from dbus_fast import Variant

from blockguard.cli.client import VOLUME, Client, RemoteError
from blockguard.errors import ExitCode
from tests.support.bus import REPO
from tests.support.daemon import EngineHarness
from tests.support.devices import MiB

E = "org.blockguard1.Error."
SIG = "sstssa{sv}"


def cli(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blockguard.cli.main", "--bus", address, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )


def objectives_of(client: Client, name: str) -> dict[str, Any]:
    return dict(client.objects(VOLUME)[f"/org/blockguard1/volume/{name}"]["Objectives"])


def volume_names(client: Client) -> set[str]:
    return {v["Name"] for v in client.objects(VOLUME).values()}


def test_objectives_merge_and_atomic_protect(
    engine: EngineHarness, loopdev: Callable[..., str]
) -> None:
    pool_disk = loopdev(400 * MiB, "pool.img")
    vol = loopdev(16 * MiB, "v.img")
    other = loopdev(16 * MiB, "other.img")
    daemon = engine.start()
    with Client(daemon.address) as client:
        client.call("CreatePool", "ssasb", "p1", "dir", [pool_disk], False)
        # The reproduction: a refused objective leaves no volume behind (one call).
        refused = cli(daemon.address, "protect", other, "x", "--rto", "0s")
        assert refused.returncode == ExitCode.USAGE, refused.stderr
        assert "0s" in refused.stderr
        assert volume_names(client) == set()
        assert not (daemon.state_dir / "volumes" / "x").exists()
        too_many = cli(daemon.address, "protect", other, "x", "--generations", str(1 << 64))
        assert too_many.returncode == ExitCode.USAGE and str(1 << 64) in too_many.stderr
        assert volume_names(client) == set()

        done = cli(
            daemon.address,
            "protect",
            vol,
            "v",
            "--pool",
            "p1",
            "--rpo",
            "every 15m",
            "--generations",
            "9",
        )
        assert done.returncode == 0, done.stderr
        assert objectives_of(client, "v") == {"rpo": "every 15m", "generations": 9}

        # Only the keys given change: the RPO and the retention stay.
        assert cli(daemon.address, "objectives", "v", "--rto", "2.1s").returncode == 0
        # The RTO is stored with what it refers to (the default: copy).
        assert objectives_of(client, "v") == {
            "rpo": "every 15m",
            "generations": 9,
            "rto": "2.1s",
            "restore_mode": "copy",
        }
        client.call("SetObjectives", "sa{sv}", "v", {"generations": Variant("t", 12)})
        client.call("SetObjectives", "sa{sv}", "v", {"restore_mode": Variant("s", "copy")})
        client.call("SetObjectives", "sa{sv}", "v", {"tz": Variant("s", "Europe/Berlin")})
        assert objectives_of(client, "v") == {
            "rpo": "every 15m",
            "generations": 12,
            "rto": "2.1s",
            "restore_mode": "copy",
            "tz": "Europe/Berlin",
        }
        # An empty string clears a key; the CLI passes it through.
        assert cli(daemon.address, "objectives", "v", "--rpo", "").returncode == 0
        client.call("SetObjectives", "sa{sv}", "v", {"tz": Variant("s", "")})
        expected = {"generations": 12, "rto": "2.1s", "restore_mode": "copy"}
        assert objectives_of(client, "v") == expected

        # A refusal stores nothing, not even the valid keys given with it.
        for bad in (
            {"rto": Variant("t", (1 << 64) - 1)},
            {"generations": Variant("t", 5), "rto": Variant("s", "0s")},
            {"rpo": Variant("s", "every 30s"), "generations": Variant("t", 3)},
        ):
            with pytest.raises(RemoteError) as info:
                client.call("SetObjectives", "sa{sv}", "v", bad)
            assert info.value.name == E + "InvalidObjectives", info.value
            assert objectives_of(client, "v") == expected
        # Clearing every key leaves none (the defaults apply again).
        client.call(
            "SetObjectives",
            "sa{sv}",
            "v",
            {k: Variant("s", "") for k in ("generations", "rto", "restore_mode")},
        )
        assert objectives_of(client, "v") == {}
        assert client.call("Plan", "s", "v")
    assert "Traceback" not in daemon.log()


def test_placement_picks_a_pool_with_room(
    engine: EngineHarness, loopdev: Callable[..., str]
) -> None:
    small_pool = loopdev(320 * MiB, "small-pool.img")
    big_pool = loopdev(1024 * MiB, "big-pool.img")
    volume = loopdev(400 * MiB, "vol.img")
    huge = loopdev(2048 * MiB, "huge.img")
    daemon = engine.start()
    with Client(daemon.address) as client:
        # The small pool is created first: before, it got every new volume.
        client.call("CreatePool", "ssasb", "small", "dir", [small_pool], False)
        client.call("CreatePool", "ssasb", "big", "dir", [big_pool], False)
        before = {p["Name"]: p["Free"] for p in client.objects("org.blockguard1.Pool").values()}
        assert before["small"] < 400 * MiB < before["big"]

        with pytest.raises(RemoteError) as info:
            client.call("Protect", SIG, volume, "db", 0, "", "small", {})
        assert info.value.name == E + "PoolSpaceLow", info.value
        assert "small" in info.value.message and str(400 * MiB + 40 * MiB) in info.value.message
        with pytest.raises(RemoteError) as info:
            client.call("Protect", SIG, volume, "db", 0, "", "nope", {})
        assert info.value.name == E + "NotFound" and "nope" in info.value.message
        with pytest.raises(RemoteError) as info:
            client.call("Protect", SIG, huge, "huge", 0, "", "", {})
        assert info.value.name == E + "PoolSpaceLow", info.value
        assert "big" in info.value.message
        assert volume_names(client) == set()
        assert not (daemon.state_dir / "volumes").exists() or not any(
            (daemon.state_dir / "volumes").iterdir()
        )

        client.call("Protect", SIG, volume, "db", 0, "", "", {})
        assert client.call("Plan", "s", "db")
        info_db = client.objects(VOLUME)["/org/blockguard1/volume/db"]
        assert info_db["Pool"] == "big"
        refused = cli(daemon.address, "protect", huge, "huge", "--pool", "small")
        assert refused.returncode == ExitCode.ENVIRONMENT, refused.stderr
        assert "small" in refused.stderr
    assert "Traceback" not in daemon.log()
