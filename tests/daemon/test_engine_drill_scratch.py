"""A pool drill's copy restores go into scratch space on the pool (issue 14), with the real
daemon on loop devices (dir pool): a sparse file on the pool's file system attached to a
loop device, judged by the safety gate as the pool's own scratch, probed for its write
rate and removed after the drill. The copy samples keep that rate, and ``Plan`` then
takes a copy's target writes at it instead of the default target speed. A scratch file
a crash left is detached and deleted when the daemon starts; a file of a similar name is
not touched."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

from blockguard.cli.client import VOLUME, Client, plain, variant
from tests.support.daemon import ENGINE_ENV, Daemon, EngineHarness, run_job
from tests.support.devices import MiB

from .test_cli import ctl

VOLUME_SIZE = 16 * MiB
POOL_SIZE = 400 * MiB
SCRATCH = "bg-drill-scratch.img"
DEFAULT_SPEED = float(ENGINE_ENV["BLOCKGUARD_DEFAULT_SPEED"])
VOLUME_PATH = "/org/blockguard1/volume/db"


def _copy_samples(daemon: Daemon) -> list[tuple[str, str, float]]:
    conn = sqlite3.connect(daemon.state_dir / "catalog.db")
    try:
        return conn.execute("SELECT mode, source, write_rate FROM path_samples").fetchall()
    finally:
        conn.close()


def _loops_of(path: Path) -> list[str]:
    """Loop devices attached to ``path`` (that file, by inode)."""
    out = subprocess.run(["losetup", "-j", str(path)], capture_output=True, text=True, check=True)
    return [line.split(":", 1)[0] for line in out.stdout.splitlines() if ":" in line]


def _scratch_loops(root: Path) -> list[str]:
    """Attached loop devices whose backing file is a drill scratch under ``root``."""
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            text = backing.read_text().strip()
            if text.startswith(str(root)) and SCRATCH in text:
                found.append(f"{backing.parents[1].name}: {text}")
    return found


def _area(root: Path) -> Path:
    """The mounted area of the test's one dir pool."""
    (pool_file,) = list(root.rglob("pool.json"))
    return pool_file.parent


@contextlib.contextmanager
def _attached(path: Path) -> Iterator[str]:
    """``path`` on a loop device for the body; detached after it if still attached."""
    dev = subprocess.run(
        ["losetup", "--find", "--show", str(path)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        yield dev
    finally:
        backing = Path(f"/sys/block/{Path(dev).name}/loop/backing_file")
        with contextlib.suppress(OSError):
            if backing.read_text().strip().removesuffix(" (deleted)") == str(path.resolve()):
                subprocess.run(["losetup", "-d", dev], check=False)


def test_drill_copies_into_scratch_on_the_pool_and_plan_uses_its_rate(
    engine: EngineHarness, loopdev: Callable[..., str]
) -> None:
    pool_disk = loopdev(POOL_SIZE, "pool.img")
    volume = loopdev(VOLUME_SIZE, "db.img")
    daemon = engine.start()
    with Client(daemon.address) as client:
        client.call("CreatePool", "ssasb", "p1", "dir", [pool_disk], False)
        client.call("Protect", "sstssa{sv}", volume, "db", 0, "", "", {})
        client.call(
            "SetObjectives", "sa{sv}", "db", {"rto": variant("1h"), "restore_mode": variant("copy")}
        )
        before = plain(client.call("Plan", "s", "db"))["copy_target"]
        assert before["measured"] is False
        assert before["write_rate"] == DEFAULT_SPEED
        assert "no drill of pool p1" in before["source"]

        job = run_job(client, client.call("Drill", "s", "p1"))
        assert job["State"] == "done", job["Error"]
        result = job["Result"]
        assert result["copy_scratch"].startswith("/dev/loop"), result["copy_scratch"]
        rate = result["copy_write_rate"]
        assert rate > 0

        # Every copy sample of the drill wrote the scratch and keeps its rate; the swap-in
        # samples wrote no target of their own.
        samples = _copy_samples(daemon)
        copies = [w for mode, source, w in samples if mode == "copy" and source == "drill"]
        assert len(copies) == 14 and set(copies) == {rate}
        assert {w for mode, _, w in samples if mode == "swap-in"} == {0.0}

        plan = plain(client.call("Plan", "s", "db"))
        assert plan["calibrated"] is True, plan["calibration"]
        after = plan["copy_target"]
        assert after["measured"] is True
        assert after["write_rate"] == rate != DEFAULT_SPEED
        assert "measured by the restore drill of pool p1 into scratch space" in after["source"]
        est = plain(client.properties(VOLUME_PATH, VOLUME))["RestoreEstimate"]
        assert est["copy_target"] == after
    for command in (("plan", "db"), ("volume", "show", "db")):
        shown = ctl(daemon, *command)
        assert shown.returncode == 0, shown.stderr
        text = " ".join(shown.stdout.split())
        assert "copy target writes" in text and "into scratch space" in text, text

    # Nothing of the scratch is left: no file on the pool, no loop device on it.
    assert not list(engine.tmp_path.rglob(SCRATCH))
    assert not _scratch_loops(engine.tmp_path)
    assert not list(engine.tmp_path.rglob("@drill*"))
    assert f"drill scratch space {_area(engine.tmp_path) / SCRATCH}" in daemon.log()


def test_scratch_left_by_a_crash_is_removed_at_start(
    engine: EngineHarness, loopdev: Callable[..., str]
) -> None:
    pool_disk = loopdev(POOL_SIZE, "pool.img")
    daemon = engine.start()
    with Client(daemon.address) as client:
        client.call("CreatePool", "ssasb", "p1", "dir", [pool_disk], False)
    # A crash in the middle of a drill: the daemon gone, its pool area still mounted, the
    # scratch file on it attached to a loop device.
    daemon.kill()
    area = _area(engine.tmp_path)
    left = area / SCRATCH
    similar = area / "bg-drill-scratch-mine.img"
    for path in (left, similar):
        with open(path, "wb") as f:
            f.truncate(8 * MiB)
    with _attached(left) as dev:
        assert _loops_of(left) == [dev]
        daemon = engine.start()
        assert not left.exists()
        assert _loops_of(left) == []
        assert not Path(f"/sys/block/{Path(dev).name}/loop/backing_file").exists()
        # Only that exact name is the drill's.
        assert similar.exists()
        assert f"removed drill scratch ['{left}']" in daemon.log()
        similar.unlink()
