"""A target whose disk is full (issue 11, Faults): the target's area is a small ext4 on a
loop device, mounted as the serve's root. A transfer that does not fit ends with
``PoolSpaceLow`` naming the target, the space alert is raised, nothing is committed on
either side (the writer removed its open generation: it could not be resumed without
room anyway, and its packs would hold the space that must be freed), every committed
generation there stays restorable bit-exact, and once space is freed the next transfer
succeeds with nothing cleaned up by hand."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from blockguard.storage.remote.packstore import PackStore
from tests.host.test_remote_targets import CLIENT
from tests.host.test_remote_transfer import SIZE, as_json, ctl, ok, restore_from, set_up, transfer
from tests.support.daemon import EngineHarness
from tests.support.devices import MiB, sha256_of, write_random
from tests.support.netlab import NetLab, require_netlab

pytestmark = pytest.mark.root

AREA_SIZE = 64 * MiB


@pytest.fixture(autouse=True)
def _can_run() -> None:
    require_netlab()


@contextlib.contextmanager
def small_area(lab: NetLab, loopdev: Callable[..., str]) -> Iterator[Path]:
    """A 64 MiB ext4 (no reserved blocks: the serve runs as root) mounted as the area in
    the mount namespace of the target's sshd (where its serves run; a mount made here
    would not reach it). Yields the area as this process sees it (through
    ``/proc/PID/root``); unmounted by its path afterwards, also on failure (the loop
    device is the fixture's)."""
    device = loopdev(AREA_SIZE, "target-area.img")
    subprocess.run(["mkfs.ext4", "-q", "-m", "0", device], check=True)
    area = lab.run_dir / "area"
    area.mkdir()
    in_target = ["nsenter", "-t", str(lab.sshd_pid), "-m", "--"]
    subprocess.run([*in_target, "mount", "-t", "ext4", device, str(area)], check=True)
    try:
        seen = Path(f"/proc/{lab.sshd_pid}/root") / area.relative_to("/")
        PackStore.create(seen, CLIENT).close()
        yield seen
    finally:
        subprocess.run([*in_target, "umount", "-l", str(area)], check=False)


def fill(area: Path, leave: int) -> Path:
    """A filler file that leaves about ``leave`` bytes free in the area."""
    st = os.statvfs(area)
    free = st.f_bavail * st.f_frsize
    filler = area / "filler"
    with filler.open("wb") as f:
        for _ in range(max(0, free - leave) // MiB):
            f.write(os.urandom(MiB))
        f.flush()
        os.fsync(f.fileno())
    return filler


def generations_there(area: Path) -> list[str]:
    return sorted(p.name for p in area.glob("clients/*/generations/*"))


def test_a_full_target_refuses_by_name_keeps_what_is_committed_and_recovers(
    net_lab: NetLab, engine: EngineHarness, loopdev: Callable[..., str]
) -> None:
    with small_area(net_lab, loopdev) as area:
        daemon, volume = set_up(net_lab, engine, loopdev)
        ok(daemon, "backup", "db")
        first_sum = sha256_of(volume)
        ok(daemon, "objectives", "db", "--target", "offsite")

        # The full (32 MiB of random data) does not fit in the ~8 MiB left.
        filler = fill(area, 8 * MiB)
        refused = ctl(daemon, "transfer", "db")
        assert refused.returncode != 0
        assert "target offsite" in refused.stderr and "free" in refused.stderr, refused.stderr
        assert generations_there(area) == [], "the open generation was left"
        assert as_json(daemon, "plan", "db")["plan"]["remote"]["method"] == "full"
        log = daemon.log()
        assert "alert raised: target offsite: no room for the transfer" in log, log[-4000:]
        shown = as_json(daemon, "target", "show", "offsite")["target"]
        assert shown["state"] == "ok" and "failures" not in shown  # the link worked

        # Space freed: the next transfer succeeds, nothing cleaned up by hand.
        filler.unlink()
        first = transfer(daemon)
        assert first["method"] == "full"

        # An incremental of 16 MiB does not fit either; the committed full stays whole.
        write_random(volume, 0, 16 * MiB, seed=7)
        ok(daemon, "backup", "db")
        second_sum = sha256_of(volume)
        filler = fill(area, 4 * MiB)
        refused = ctl(daemon, "transfer", "db")
        assert refused.returncode != 0 and "target offsite" in refused.stderr, refused.stderr
        assert len(generations_there(area)) == 1
        device = loopdev(SIZE, "restore-first.img")
        restore_from(daemon, first["generation"], device)
        assert sha256_of(device) == first_sum

        filler.unlink()
        assert transfer(daemon)["method"] == "incremental"
        device = loopdev(SIZE, "restore-second.img")
        restore_from(daemon, "db@latest", device)
        assert sha256_of(device) == second_sum
