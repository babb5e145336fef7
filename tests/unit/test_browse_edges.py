"""The browse code's edges that need no device: the mount table and /dev/fuse."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from blockguard.errors import EnvironmentProblem
from blockguard.storage import browse, fuse
from blockguard.storage.browse import MountRecord, mount_table, teardown


def test_mount_table_keeps_non_ascii_and_unescapes_spaces(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "36 25 7:3 / /mnt/caf\u00e9\\040noir ro,relatime shared:1 - ext4 /dev/loop3 ro\n"
        "37 25 7:4 / /mnt/x rw - xfs /dev/loop4 rw\n"
        "38 37 7:5 / /mnt/x ro - ext4 /dev/loop5 ro\n",
        encoding="utf-8",
    )

    table = mount_table(str(info))

    assert table["/mnt/caf\u00e9 noir"] == ("ext4", "/dev/loop3")
    assert table["/mnt/x"] == ("ext4", "/dev/loop5")  # the topmost


def test_no_dev_fuse_is_an_environment_problem_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = str(tmp_path / "no-fuse")
    monkeypatch.setattr(fuse, "FUSE_DEV", missing)
    server = fuse.FuseFile(tmp_path, "image", 4096, lambda _o, _s: b"")

    with pytest.raises(EnvironmentProblem, match=missing):
        server.start()
    assert not server.serving


class _Runner:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def run(self, argv: list[str], **_kw: object) -> None:
        self.calls.append(argv)


def test_teardown_detaches_the_recorded_attachment_whatever_its_backing_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop is the record's by name and disk sequence number in this boot: detached
    though sysfs names its file "/image" (a detached FUSE mount); a loop of that name
    attached since (another number), or a record of another boot, is left alone."""
    sys_block = tmp_path / "sys"
    boot = tmp_path / "boot_id"
    boot.write_text("b1\n")
    record = MountRecord(
        name="abc",
        volume="db",
        pool="p1",
        generation="db@1",
        chain=("1",),
        mountpoint=str(tmp_path / "point"),
        fuse_dir=str(tmp_path / "fuse"),
        loop="/dev/loop7",
        boot="b1",
        loop_seq=41,
    )
    (sys_block / "loop7" / "loop").mkdir(parents=True)
    (sys_block / "loop7" / "loop" / "backing_file").write_text("/image\n")
    (sys_block / "loop7" / "diskseq").write_text("41\n")
    monkeypatch.setattr(browse, "SYS_BLOCK", sys_block)
    monkeypatch.setattr(browse, "BOOT_ID", boot)

    for other in (replace(record, loop_seq=40), replace(record, boot="b0")):
        runner = _Runner()
        teardown(other, runner)  # type: ignore[arg-type]
        assert runner.calls == []
    runner = _Runner()
    teardown(record, runner)  # type: ignore[arg-type]
    assert runner.calls == [["losetup", "-d", "/dev/loop7"]]
