"""File groups with the real daemon (issue 13): ``filegroup create NAME --volume V PATH...``
checks its paths on the volume's mounted file system and records them relative to the
mount point; list, show and remove; a group is refused, and nothing recorded, when the
volume is not mounted or a path is outside it or missing.
"""

from __future__ import annotations

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

CLI = [sys.executable, "-m", "blockguard.cli.main"]


def run(argv: list[str]) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=120).stdout


def cli(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "--bus", daemon.address, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


@pytest.fixture
def fs_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "fs"
    path.mkdir()
    yield path
    subprocess.run(["umount", str(path)], capture_output=True, timeout=60)


def test_filegroup_create_list_show_remove(
    engine: EngineHarness, loopdev: Callable[..., str], fs_dir: Path, tmp_path: Path
) -> None:
    pool_disk = loopdev(400 * MiB, "pool.img")
    volume = loopdev(32 * MiB, "db.img")
    run(["mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", volume])
    daemon = engine.start()
    with Client(daemon.address) as client:
        client.call("CreatePool", "ssasb", "p1", "dir", [pool_disk], False)
        client.call("Protect", "sstssa{sv}", volume, "db", 0, "", "", {})
        client.call("SetObjectives", "sa{sv}", "db", {"rpo": variant("1h")})

        # Not mounted: refused, naming the volume.
        with pytest.raises(RemoteError) as info:
            client.call("CreateFileGroup", "ssas", "conf", "db", ["etc"])
        assert info.value.name.endswith(".InvalidInput")
        assert "volume db" in info.value.message and "not mounted" in info.value.message

        run(["mount", volume, str(fs_dir)])
        (fs_dir / "etc").mkdir()
        (fs_dir / "etc/app.conf").write_text("x = 1\n")
        (fs_dir / "data.bin").write_bytes(b"\0" * 4096)
        (fs_dir / "escape").symlink_to(tmp_path)
        outside = tmp_path / "elsewhere"
        outside.mkdir()

        for paths, error, words in (
            (["../elsewhere"], "InvalidInput", ".."),
            ([str(outside)], "InvalidInput", "not below"),
            (["escape"], "InvalidInput", "symlink"),
            (["etc", "missing.txt"], "NotFound", "missing.txt"),
            (["."], "InvalidInput", "whole file system"),
        ):
            with pytest.raises(RemoteError) as info:
                client.call("CreateFileGroup", "ssas", "conf", "db", paths)
            assert info.value.name.endswith("." + error), (paths, info.value)
            assert words in info.value.message, (paths, info.value.message)
        assert plain(client.call("ListFileGroups")) == []

        # Another file system over the volume's mount point (as the daemon's own /tmp is
        # under PrivateTmp): the mount table names the volume there, the path leads
        # elsewhere; refused rather than map another file system's files.
        run(["mount", "-t", "tmpfs", "-o", "size=1m", "hide", str(fs_dir)])
        try:
            (fs_dir / "etc").mkdir()
            with pytest.raises(RemoteError) as info:
                client.call("CreateFileGroup", "ssas", "conf", "db", ["etc"])
            assert info.value.name.endswith(".InvalidInput")
            assert "does not see it" in info.value.message, info.value.message
        finally:
            run(["umount", str(fs_dir)])
        assert plain(client.call("ListFileGroups")) == []

        done = cli(daemon, "--json", "filegroup", "create", "conf", "--volume", "db",
                   "etc", str(fs_dir / "data.bin"))  # fmt: skip
        assert done.returncode == 0, done.stderr
        made = json.loads(done.stdout)["filegroup"]
        # Paths are kept relative to the mount point, an absolute one below it too.
        assert (made["name"], made["volume"], made["paths"]) == ("conf", "db", ["etc", "data.bin"])

        again = cli(daemon, "filegroup", "create", "conf", "--volume", "db", "etc")
        assert again.returncode != 0 and "conf" in again.stderr

        listed = cli(daemon, "--json", "filegroup", "list")
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout)["filegroups"] == [made]
        shown = cli(daemon, "--json", "filegroup", "show", "conf")
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["filegroup"] == {
            **made,
            "mounted_at": str(fs_dir),
            "generations": [],
        }
        text = cli(daemon, "filegroup", "show", "conf")
        assert text.returncode == 0 and str(fs_dir) in text.stdout, text

        gone = cli(daemon, "filegroup", "remove", "conf")
        assert gone.returncode == 0, gone.stderr
        assert plain(client.call("ListFileGroups")) == []
        missing = cli(daemon, "filegroup", "show", "conf")
        assert missing.returncode != 0 and "conf" in missing.stderr


def write(path: Path, nbytes: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(hashlib.shake_256(seed.to_bytes(8, "little")).digest(nbytes))


def protect_with_group(client: Client, pool_disk: str, volume: str) -> None:
    """Pool p1 on ``pool_disk``, ``volume`` protected as db, group grp of its ``grp``."""
    client.call("CreatePool", "ssasb", "p1", "dir", [pool_disk], False)
    client.call("Protect", "sstssa{sv}", volume, "db", 0, "", "", {})
    client.call("SetObjectives", "sa{sv}", "db", {"rpo": variant("1h")})
    client.call("CreateFileGroup", "ssas", "grp", "db", ["grp"])


def back_up(client: Client) -> dict[str, object]:
    props = run_job(client, client.call("BackupNow", "s", "db"))
    assert props["State"] == "done", props["Error"]
    return dict(props["Result"])  # type: ignore[call-overload]


def test_each_backup_keeps_the_group_list_and_its_changed_bytes(
    engine: EngineHarness, loopdev: Callable[..., str], fs_dir: Path
) -> None:
    pool_disk = loopdev(400 * MiB, "pool.img")
    volume = loopdev(32 * MiB, "db.img")
    run(["mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", volume])
    run(["mount", volume, str(fs_dir)])
    write(fs_dir / "grp/a.bin", 600_000, 1)
    write(fs_dir / "grp/sub/b.bin", 70_000, 2)
    write(fs_dir / "other.bin", 2_000_000, 3)
    daemon = engine.start()
    with Client(daemon.address) as client:
        protect_with_group(client, pool_disk, volume)
        first = back_up(client)
        assert first["warnings"] == []
        # Only files outside the group change: the group changed nothing.
        write(fs_dir / "other.bin", 2_000_000, 30)
        second = back_up(client)
        # A file of the group is rewritten in place (its blocks), one appended to.
        with open(fs_dir / "grp/a.bin", "r+b") as f:
            f.seek(100_000)
            f.write(b"x" * 50_000)
        with open(fs_dir / "grp/sub/b.bin", "ab") as f:
            f.write(b"y" * 10_000)
        third = back_up(client)

        shown = plain(client.call("ShowFileGroup", "s", "grp"))
        rows = {r["generation"]: r for r in shown["generations"]}
        assert list(rows) == [first["generation"], second["generation"], third["generation"]]
        assert all(r["listed"] and r["files"] == 2 and not r["unsettled"] for r in rows.values())
        full, quiet, changed = (rows[str(g["generation"])] for g in (first, second, third))
        # Block-rounded extents: at least the files' bytes, at most a block more each.
        assert 670_000 <= full["bytes"] <= 670_000 + 2 * 4096
        assert full["changed_bytes"] == full["bytes"]
        assert quiet["changed_bytes"] == 0
        assert changed["bytes"] >= 680_000
        assert 60_000 <= changed["changed_bytes"] < changed["bytes"]
        text = cli(daemon, "filegroup", "show", "grp")
        assert text.returncode == 0, text.stderr
        assert all(str(g["generation"]) in text.stdout for g in (first, second, third))


def tree_of(root: Path) -> dict[str, tuple[object, ...]]:
    """Relative path -> what restore-files must keep: a file's sha256, mode, owner and
    mtime; a symlink's target; a directory's mode and owner."""
    found: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, names in os.walk(root):
        for name in [*dirnames, *names]:
            path = Path(dirpath) / name
            st = path.lstat()
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = ("symlink", os.readlink(path))
            elif path.is_dir():
                found[rel] = ("dir", st.st_mode, st.st_uid, st.st_gid)
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                found[rel] = ("file", digest, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns)
    return found


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_restore_files_of_every_generation(
    engine: EngineHarness, loopdev: Callable[..., str], fs_dir: Path, tmp_path: Path, fstype: str
) -> None:
    if shutil.which(f"mkfs.{fstype}") is None:
        pytest.skip(f"mkfs.{fstype} is not installed")
    xfs = fstype == "xfs"
    # mkfs.xfs refuses file systems under 300 MB.
    pool_disk = loopdev(900 * MiB if xfs else 400 * MiB, "pool.img")
    volume = loopdev(320 * MiB if xfs else 48 * MiB, "db.img")
    if xfs:
        run(["mkfs.xfs", "-q", volume])
    else:
        run(["mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", volume])
    run(["mount", volume, str(fs_dir)])
    grp = fs_dir / "grp"
    daemon = engine.start()
    backups: list[tuple[dict[str, object], dict[str, tuple[object, ...]]]] = []
    with Client(daemon.address) as client:
        client.call("CreatePool", "ssasb", "p1", "dir", [pool_disk], False)
        client.call("Protect", "sstssa{sv}", volume, "db", 0, "", "", {})
        client.call("SetObjectives", "sa{sv}", "db", {"rpo": variant("1h")})
        for round_ in range(4):
            if round_ == 0:
                write(grp / "a.bin", 600_000, 1)
                write(grp / "sub/b.bin", 70_000, 2)
                with open(grp / "sparse.bin", "wb") as f:
                    f.seek(5 * MiB)
                    f.write(b"end" * 1000)
                (grp / "link").symlink_to("a.bin")
                os.link(grp / "sub/b.bin", grp / "sub/b.hard")
                os.chmod(grp / "a.bin", 0o600)
                os.chown(grp / "sub/b.bin", 1234, 5678)
                os.setxattr(grp / "a.bin", "user.tag", b"kept")
                client.call("CreateFileGroup", "ssas", "grp", "db", ["grp"])
            elif round_ == 1:
                with open(grp / "a.bin", "ab") as f:  # append
                    f.write(b"appended" * 5000)
                write(grp / "sub/b.bin", 90_000, 12)  # rewrite (hard link follows)
                (grp / "sparse.bin").unlink()  # delete
                write(grp / "c.bin", 200_000, 13)
            elif round_ == 2:
                with open(grp / "a.bin", "r+b") as f:  # rewrite in place
                    f.seek(100_000)
                    f.write(b"x" * 50_000)
                os.link(grp / "c.bin", grp / "c2.bin")
            else:
                (grp / "c.bin").unlink()  # c2.bin keeps the inode
                with open(grp / "sparse2.bin", "wb") as f:
                    f.write(b"head" * 1000)
                    f.seek(3 * MiB)
                    f.write(b"tail" * 1000)
            write(fs_dir / "other.bin", 1_000_000, 100 + round_)  # outside the group
            backups.append((back_up(client), tree_of(fs_dir / "grp")))
            assert backups[-1][0]["warnings"] == [], backups[-1][0]

        for n, (result, want) in enumerate(backups):
            into = tmp_path / f"restore-{n}"
            into.mkdir()
            done = cli(
                daemon, "--json", "restore-files", f"grp@{result['number']}", "--to", str(into)
            )
            assert done.returncode == 0, done.stderr
            restored = json.loads(done.stdout)["restore"]
            assert restored["seconds"] >= 0 and restored["generation"] == result["generation"]
            assert restored["target"] == str(into)
            assert_nothing_served(daemon)
            # Only the group: nothing else of the volume comes along.
            assert os.listdir(into) == ["grp"]
            assert tree_of(into / "grp") == want, n
            assert os.getxattr(into / "grp/a.bin", "user.tag") == b"kept"
            if (into / "grp/sub/b.hard").exists():
                assert (into / "grp/sub/b.hard").stat().st_ino == (
                    into / "grp/sub/b.bin"
                ).stat().st_ino
        sparse = tmp_path / "restore-0/grp/sparse.bin"
        assert sparse.stat().st_blocks * 512 < 1 * MiB  # the hole stayed a hole

        # Existing files: refused without --overwrite, and nothing is written.
        into = tmp_path / "restore-0"
        (into / "grp/a.bin").write_bytes(b"local change")
        before = tree_of(into)
        again = cli(daemon, "restore-files", f"grp@{backups[0][0]['number']}", "--to", str(into))
        assert again.returncode != 0
        assert "a.bin" in again.stderr and "--overwrite" in again.stderr, again.stderr
        assert tree_of(into) == before
        forced = cli(daemon, "restore-files", f"grp@{backups[0][0]['number']}", "--to", str(into),
                     "--overwrite")  # fmt: skip
        assert forced.returncode == 0, forced.stderr
        assert tree_of(into / "grp") == backups[0][1]

        # Some paths only: them and the directories above them.
        into = tmp_path / "restore-sub"
        into.mkdir()
        part = cli(daemon, "restore-files", "grp", "grp/sub", "--to", str(into))
        assert part.returncode == 0, part.stderr
        assert tree_of(into / "grp") == {
            k: v for k, v in backups[-1][1].items() if k == "sub" or k.startswith("sub/")
        }
        missing = cli(daemon, "restore-files", "grp", "grp/nope", "--to", str(into))
        assert missing.returncode != 0 and "grp/nope" in missing.stderr
        assert_nothing_served(daemon)


def assert_nothing_served(daemon: Daemon) -> None:
    """No loop device over the daemon's generation images, no FUSE mount of them, no
    record left: restore-files released what it was served."""
    browse = str(daemon.state_dir / "browse")
    assert not list((daemon.state_dir / "mounts").glob("*.json"))
    with open("/proc/self/mountinfo") as info:
        assert not [line for line in info if browse in line.split()[4]]
    for entry in Path("/sys/block").iterdir():
        backing = entry / "loop" / "backing_file"
        if backing.exists():
            assert not backing.read_text().startswith(browse), entry.name


def test_restore_files_stops_at_a_damaged_chunk(
    engine: EngineHarness, loopdev: Callable[..., str], fs_dir: Path, tmp_path: Path
) -> None:
    """A chunk of a file's data fails its checksum: restore-files stops with a named data
    error, leaves no file (or part of one) under the damaged file's name, and releases
    the device; the files restored before it are whole."""
    from tests.daemon.test_browse import physical_offset

    pool_disk = loopdev(400 * MiB, "pool.img")
    volume = loopdev(32 * MiB, "db.img")
    run(["mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", volume])
    run(["mount", volume, str(fs_dir)])
    write(fs_dir / "grp/a.bin", 300_000, 1)
    write(fs_dir / "grp/b.bin", 3 * MiB, 2)
    good = hashlib.sha256((fs_dir / "grp/a.bin").read_bytes()).hexdigest()
    damaged_at = physical_offset(fs_dir / "grp/b.bin", 2 * MiB)
    daemon = engine.start()
    with Client(daemon.address) as client:
        protect_with_group(client, pool_disk, volume)
        result = back_up(client)
    gen_id = str(result["generation"]).split("@")[1]
    image = next((daemon.state_dir / "pools" / "p1").glob(f"area-*/volumes/db/{gen_id}/image"))
    with open(image, "r+b") as data:
        data.seek(damaged_at)
        byte = data.read(1)
        data.seek(damaged_at)
        data.write(bytes([byte[0] ^ 0xFF]))

    into = tmp_path / "restore"
    into.mkdir()
    done = cli(daemon, "restore-files", "grp", "--to", str(into))
    assert done.returncode == 6, (done.returncode, done.stderr)  # ExitCode.DATA
    assert "could not be read" in done.stderr and "grp/b.bin" in done.stderr, done.stderr
    assert "checksum mismatch in generation" in daemon.log()
    # Nothing under the damaged file's name, no partial file beside it.
    assert sorted(os.listdir(into / "grp")) == ["a.bin"]
    assert hashlib.sha256((into / "grp/a.bin").read_bytes()).hexdigest() == good
    assert "failed" in daemon.log()
    assert_nothing_served(daemon)

    # A client that is served and leaves the bus without finishing (a killed CLI): the
    # daemon releases what it served it.
    with Client(daemon.address) as client:
        served = plain(client.call("RestoreFiles", "sass", "grp", ["grp/a.bin"], str(into)))
        assert Path(f"/sys/block/{Path(served['device']).name}/loop/backing_file").exists()
    deadline = time.monotonic() + scaled(60)
    while list((daemon.state_dir / "mounts").glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert_nothing_served(daemon)
    assert "left the bus before it finished" in daemon.log()
