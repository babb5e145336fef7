"""Browse mounts with the real daemon: ``mount V@GEN DIR`` shows exactly the files of that
generation, ``umount`` leaves no loop or FUSE mount behind, a kill -9 while mounted is
cleaned up by the next start, and a damaged chunk fails the read of its file with EIO
and a named error in the daemon's log (the other files still read).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from blockguard.cli.client import Client, RemoteError, plain, variant
from tests.support.bus import REPO
from tests.support.daemon import Daemon, EngineHarness, run_job
from tests.support.devices import MiB
from tests.timeouts import scaled

SIZE = 48 * MiB
POOL_SIZE = 400 * MiB
#: mkfs.xfs refuses file systems under 300 MB.
XFS_SIZE = 320 * MiB
XFS_POOL_SIZE = 900 * MiB
CLI = [sys.executable, "-m", "blockguard.cli.main"]


def run(argv: list[str]) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=120).stdout


@pytest.fixture
def fs_dir(tmp_path: Path) -> Iterator[Path]:
    """Where the test mounts the protected volume to change its files (unmounted after)."""
    path = tmp_path / "fs"
    path.mkdir()
    yield path
    subprocess.run(["umount", str(path)], capture_output=True, timeout=60)


def files_of(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every regular file below ``root`` (lost+found aside)."""
    found = {}
    for dirpath, dirnames, names in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "lost+found"]
        for name in names:
            path = Path(dirpath) / name
            found[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def write(path: Path, nbytes: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(hashlib.shake_256(seed.to_bytes(8, "little")).digest(nbytes))


def setup_volume(client: Client, pool_disk: str, volume: str) -> None:
    client.call("CreatePool", "ssasb", "p1", "dir", [pool_disk], False)
    client.call("Protect", "sstssa{sv}", volume, "db", 0, "", "", {})
    client.call("SetObjectives", "sa{sv}", "db", {"rpo": variant("1h"), "generations": variant(20)})


def back_up(client: Client, method: str) -> str:
    props = run_job(client, client.call("BackupNow", "s", "db"))
    assert props["State"] == "done", props["Error"]
    result = props["Result"]
    assert result["method"] == method, result["reasons"]
    return str(result["generation"])


def cli(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "--bus", daemon.address, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def browse(daemon: Daemon, generation: str, point: Path) -> dict[str, object]:
    """``blockguardctl mount``: the daemon attaches the loop device, the CLI mounts it."""
    done = cli(daemon, "--json", "mount", generation, str(point))
    assert done.returncode == 0, done.stderr
    record = dict(json.loads(done.stdout)["mount"])
    record["seen_seq"] = diskseq(str(record["loop"]))
    return record


def diskseq(loop: str) -> str:
    """The loop device's disk sequence number: new at each attach."""
    return Path(f"/sys/block/{Path(loop).name}/diskseq").read_text().strip()


def mountinfo_points() -> set[str]:
    with open("/proc/self/mountinfo") as info:
        return {line.split()[4] for line in info}


def loop_attached(loop: str) -> bool:
    return Path(f"/sys/block/{Path(loop).name}/loop/backing_file").exists()


def still_attached(record: dict[str, object]) -> bool:
    """The record's own attachment of its loop device is still there (its name and its
    disk sequence number: the name alone may since have been attached by someone else)."""
    loop = str(record.get("loop") or "")
    if not loop or not loop_attached(loop):
        return False
    return diskseq(loop) == record.setdefault("seen_seq", diskseq(loop))


def assert_gone(record: dict[str, object]) -> None:
    """Nothing the mount's record names is left: no mount, no loop device (a loop device
    detached while its last user lets go is released a moment later)."""
    deadline = time.monotonic() + scaled(30)
    while still_attached(record) and time.monotonic() < deadline:
        time.sleep(0.05)
    points = mountinfo_points()
    assert record["mountpoint"] not in points
    assert record["fuse_dir"] not in points
    assert not still_attached(record), record["loop"]


def forget(record: dict[str, object]) -> None:
    """Clean up what a failed test left, by the recorded names only."""
    for point in (record.get("mountpoint"), record.get("fuse_dir")):
        if point in mountinfo_points():
            subprocess.run(["umount", "-l", str(point)], capture_output=True, timeout=60)
    if still_attached(record):
        subprocess.run(["losetup", "-d", str(record["loop"])], capture_output=True, timeout=60)


def physical_offset(path: Path, at: int) -> int:
    """Byte offset on the device of byte ``at`` of ``path``."""
    out = run(["filefrag", "-s", "-v", "-b1", str(path)])  # -s: sync (no delalloc)
    for line in out.splitlines():
        fields = line.replace(":", " ").replace("..", " ").split()
        if len(fields) >= 5 and fields[0].isdigit():
            logical, _, physical = int(fields[1]), int(fields[2]), int(fields[3])
            length = int(fields[5]) if len(fields) > 5 else 0
            if logical <= at < logical + length:
                return physical + at - logical
    raise AssertionError(f"no extent of {path} at {at}: {out}")


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_mount_each_generation_shows_its_files(
    engine: EngineHarness, loopdev: Callable[..., str], fs_dir: Path, tmp_path: Path, fstype: str
) -> None:
    if shutil.which(f"mkfs.{fstype}") is None:
        pytest.skip(f"mkfs.{fstype} is not installed")
    xfs = fstype == "xfs"
    pool_disk = loopdev(XFS_POOL_SIZE if xfs else POOL_SIZE, "pool.img")
    volume = loopdev(XFS_SIZE if xfs else SIZE, "db.img")
    if not xfs:
        run(["mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", volume])
    else:
        run(["mkfs.xfs", "-q", volume])
    run(["mount", volume, str(fs_dir)])
    write(fs_dir / "keep.bin", 4 * MiB, 1)
    write(fs_dir / "change.bin", 300_000, 2)
    write(fs_dir / "gone.txt", 5000, 3)
    write(fs_dir / "dir/nested.bin", 70_000, 4)
    first = files_of(fs_dir)
    # Where keep.bin's middle lies on the volume: the chunk damaged at the end.
    damaged_at = physical_offset(fs_dir / "keep.bin", 2 * MiB)
    run(["umount", str(fs_dir)])

    daemon = engine.start()
    records: list[dict[str, object]] = []
    try:
        with Client(daemon.address) as client:
            setup_volume(client, pool_disk, volume)
            full = back_up(client, "full")
            run(["mount", volume, str(fs_dir)])
            write(fs_dir / "change.bin", 310_000, 20)
            (fs_dir / "gone.txt").unlink()
            write(fs_dir / "added.bin", 1 * MiB + 17, 21)
            second = files_of(fs_dir)
            run(["umount", str(fs_dir)])
            incr = back_up(client, "incremental")
            assert first != second

            for generation, want in ((full, first), (incr, second)):
                point = tmp_path / f"browse-{generation.split('@')[1]}"
                point.mkdir()
                done = cli(daemon, "--json", "mount", generation, str(point))
                assert done.returncode == 0, done.stderr
                (record,) = [
                    m for m in plain(client.call("ListMounts")) if m["mountpoint"] == str(point)
                ]
                records.append(record)
                listed = cli(daemon, "--json", "mounts")
                assert listed.returncode == 0, listed.stderr
                assert json.loads(listed.stdout)["mounts"] == [record]
                assert record["generation"] == generation
                assert record["fstype"] == fstype
                assert files_of(point) == want
                # Read-only all the way: the file system and the loop device.
                with pytest.raises(OSError) as info:
                    (point / "new").write_bytes(b"x")
                assert info.value.errno == errno.EROFS
                assert run(["blockdev", "--getro", str(record["loop"])]).strip() == "1"
                done = cli(daemon, "umount", str(point))
                assert done.returncode == 0, done.stderr
                assert_gone(record)
                assert not plain(client.call("ListMounts"))

            # Mounted, then the daemon is killed: the next start removes what was left.
            point = tmp_path / "browse-killed"
            point.mkdir()
            record = browse(daemon, incr, point)
            records.append(record)
            assert files_of(point) == second
        daemon.kill()
        assert record["mountpoint"] in mountinfo_points()  # left behind by the kill

        daemon = engine.start()
        assert_gone(record)
        assert not list((daemon.state_dir / "mounts").glob("*.json"))
        assert "cleaned stale browse mount" in daemon.log()

        # A damaged chunk of the full (keep.bin's middle, which the incremental reads from
        # the full): that file's read fails with EIO, named in the log; the rest read.
        image = next(
            (daemon.state_dir / "pools" / "p1").glob(
                f"area-*/volumes/db/{full.split('@')[1]}/image"
            )
        )
        with open(image, "r+b") as data:
            data.seek(damaged_at)
            byte = data.read(1)
            data.seek(damaged_at)
            data.write(bytes([byte[0] ^ 0xFF]))
        with Client(daemon.address) as client:
            point = tmp_path / "browse-damaged"
            point.mkdir()
            record = browse(daemon, incr, point)
            records.append(record)
            with pytest.raises(OSError) as info:
                (point / "keep.bin").read_bytes()
            assert info.value.errno == errno.EIO
            assert "checksum mismatch in generation" in daemon.log()
            got = files_of_except(point, "keep.bin")
            assert got == {k: v for k, v in second.items() if k != "keep.bin"}
            client.call("Unmount", "s", str(point))
            assert_gone(record)
    finally:
        for record in records:
            forget(record)


def files_of_except(root: Path, skip: str) -> dict[str, str]:
    found = {}
    for dirpath, dirnames, names in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "lost+found"]
        for name in names:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if rel != skip:
                found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def test_mount_refuses_a_bad_mountpoint(
    engine: EngineHarness, loopdev: Callable[..., str], tmp_path: Path
) -> None:
    pool_disk = loopdev(POOL_SIZE, "pool.img")
    volume = loopdev(SIZE, "db.img")
    daemon = engine.start()
    with Client(daemon.address) as client:
        setup_volume(client, pool_disk, volume)
        gen = back_up(client, "full")
        busy = tmp_path / "busy"
        busy.mkdir()
        (busy / "file").write_bytes(b"x")
        # The CLI checks the directory: it is the caller's, in the caller's namespace.
        for point, why in ((busy, "not empty"), (tmp_path / "none", "not a directory")):
            done = cli(daemon, "mount", gen, str(point))
            assert done.returncode != 0
            assert why in done.stderr and str(point) in done.stderr
        assert not plain(client.call("ListMounts"))
        # The volume holds no file system: refused, and nothing is left behind.
        empty = tmp_path / "empty"
        empty.mkdir()
        loops_before = run(["losetup", "-a"])
        with pytest.raises(RemoteError) as info:
            client.call("Mount", "ss", gen, str(empty))
        assert info.value.name == "org.blockguard1.Error.InvalidInput"
        assert "no file system" in str(info.value) and gen in str(info.value)
        assert not plain(client.call("ListMounts"))
        assert not list((daemon.state_dir / "mounts").glob("*.json"))
        browse = daemon.state_dir / "browse"
        assert not [p for p in mountinfo_points() if p.startswith(str(browse))]
        assert not list(browse.iterdir())
        assert str(browse) not in run(["losetup", "-a"]).replace(loops_before, "")
        with pytest.raises(RemoteError) as info:
            client.call("Unmount", "s", str(busy))
        assert info.value.name == "org.blockguard1.Error.NotFound"


def test_retention_keeps_a_mounted_generation(
    engine: EngineHarness, loopdev: Callable[..., str], tmp_path: Path
) -> None:
    pool_disk = loopdev(POOL_SIZE, "pool.img")
    volume = loopdev(SIZE, "db.img")
    run(["mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", volume])
    daemon = engine.start()
    record: dict[str, object] = {}
    try:
        with Client(daemon.address) as client:
            setup_volume(client, pool_disk, volume)
            old = back_up(client, "full")
            point = tmp_path / "browse"
            point.mkdir()
            record = browse(daemon, old, point)
            client.call("SetObjectives", "sa{sv}", "db", {"generations": variant(1)})

            def full_backup() -> str:
                job = client.call("BackupNowWithOptions", "sa{sv}", "db", {"full": variant(True)})
                props = run_job(client, job)
                assert props["State"] == "done", props["Error"]
                return str(props["Result"]["generation"])  # type: ignore[index]

            def listed() -> set[str]:
                return {g[0] for g in plain(client.call("ListGenerations", "s", "db"))}

            new = full_backup()
            # Retention would take the old full: it is mounted, so it stays and reads.
            assert listed() == {old, new}
            assert (point / "lost+found").is_dir()
            client.call("Unmount", "s", str(point))
            newest = full_backup()
            assert listed() == {newest}
            # The CLI's mount fails (a mount(8) that refuses, first on its PATH): the daemon's
            # loop device and FUSE image are taken down again.
            fake = tmp_path / "bin"
            fake.mkdir()
            script = "#!/bin/sh\necho 'mount: refused by the test' >&2\nexit 32\n"
            (fake / "mount").write_text(script)
            (fake / "mount").chmod(0o755)
            point = tmp_path / "refused"
            point.mkdir()
            path = os.environ["PATH"]
            done = subprocess.run(
                [*CLI, "--bus", daemon.address, "mount", newest, str(point)],
                capture_output=True,
                text=True,
                timeout=300,
                env={**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{fake}:{path}"},
            )
            assert done.returncode != 0
            assert "refused by the test" in done.stderr and str(point) in done.stderr
            assert not plain(client.call("ListMounts"))
            assert not list((daemon.state_dir / "mounts").glob("*.json"))
            assert str(daemon.state_dir / "browse") not in run(["losetup", "-a"])
    finally:
        forget(record)


def test_umount_while_a_file_is_open_is_lazy(
    engine: EngineHarness, loopdev: Callable[..., str], fs_dir: Path, tmp_path: Path
) -> None:
    pool_disk = loopdev(POOL_SIZE, "pool.img")
    volume = loopdev(SIZE, "db.img")
    run(["mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", volume])
    run(["mount", volume, str(fs_dir)])
    write(fs_dir / "open.bin", 3 * MiB, 7)
    want = hashlib.sha256((fs_dir / "open.bin").read_bytes()).hexdigest()
    run(["umount", str(fs_dir)])
    daemon = engine.start()
    record: dict[str, object] = {}
    try:
        with Client(daemon.address) as client:
            setup_volume(client, pool_disk, volume)
            gen = back_up(client, "full")
            point = tmp_path / "browse"
            point.mkdir()
            record = browse(daemon, gen, point)
            client.call("SetObjectives", "sa{sv}", "db", {"generations": variant(1)})

            def full_backup() -> str:
                job = client.call("BackupNowWithOptions", "sa{sv}", "db", {"full": variant(True)})
                props = run_job(client, job)
                assert props["State"] == "done", props["Error"]
                return str(props["Result"]["generation"])  # type: ignore[index]

            def listed() -> set[str]:
                return {g[0] for g in plain(client.call("ListGenerations", "s", "db"))}

            with open(point / "open.bin", "rb") as held:
                done = cli(daemon, "umount", str(point))
                assert done.returncode == 0, done.stderr
                assert str(point) not in mountinfo_points()
                assert not plain(client.call("ListMounts"))
                # Unmounted, but still read: a retention now must keep the chain.
                new = full_backup()
                assert listed() == {gen, new}
                # Still served to the process that had it open, whole.
                assert hashlib.sha256(held.read()).hexdigest() == want
            assert_gone(record)
            assert not list((daemon.state_dir / "mounts").glob("*.json"))
            # Released with its last reader: the next retention takes it.
            newest = full_backup()
            assert listed() == {newest}
    finally:
        forget(record)


def test_umount_and_restart_after_the_fuse_side_was_detached(
    engine: EngineHarness, loopdev: Callable[..., str], tmp_path: Path
) -> None:
    """Once the FUSE mount is detached (a lazy unmount; the namespace of a daemon that
    died), sysfs names the loop's backing file just "/image": ``umount`` and the cleanup
    by a restarted daemon still find and detach the loop device the record names."""
    pool_disk = loopdev(POOL_SIZE, "pool.img")
    volume = loopdev(SIZE, "db.img")
    run(["mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", volume])
    daemon = engine.start()
    records: list[dict[str, object]] = []
    try:
        with Client(daemon.address) as client:
            setup_volume(client, pool_disk, volume)
            gen = back_up(client, "full")
            for how in ("umount", "restart"):
                point = tmp_path / f"browse-{how}"
                point.mkdir()
                record = browse(daemon, gen, point)
                records.append(record)
                run(["umount", "-l", str(record["fuse_dir"])])
                backing = Path(f"/sys/block/{Path(str(record['loop'])).name}/loop/backing_file")
                assert backing.read_text().strip() == "/image"
                assert (point / "lost+found").is_dir()  # the loop still reads the image
                if how == "umount":
                    done = cli(daemon, "umount", str(point))
                    assert done.returncode == 0, done.stderr
                    assert_gone(record)
                    assert not plain(client.call("ListMounts"))
        daemon.kill()
        assert records[-1]["mountpoint"] in mountinfo_points()  # left behind by the kill
        # The caller's mount of the loop (the daemon's own namespace is the test's here).
        daemon = engine.start()
        assert_gone(records[-1])
        assert not list((daemon.state_dir / "mounts").glob("*.json"))
    finally:
        for record in records:
            forget(record)
