"""File groups in the catalog: recorded with their paths, listed, refused when their name
or volume is wrong (nothing recorded then), removed with their volume."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blockguard.core.catalog import Catalog, DeviceIdentity
from blockguard.errors import AlreadyExists, InvalidInput, NotFound


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    cat = Catalog(tmp_path / "catalog.db")
    cat.add_volume(
        "db",
        "/dev/loop7",
        DeviceIdentity(major=7, minor=7, size=1 << 20),
        chunk_size=65536,
        tracker_backend="scan",
    )
    return cat


def test_add_list_show_remove(catalog: Catalog) -> None:
    made = catalog.add_file_group("conf", "db", ["etc", "srv/app.conf"])
    assert (made.name, made.volume, made.paths) == ("conf", "db", ("etc", "srv/app.conf"))
    assert catalog.get_file_group("conf") == made
    assert catalog.list_file_groups() == [made]
    assert catalog.list_file_groups("db") == [made]
    assert catalog.list_file_groups("other") == []
    catalog.remove_file_group("conf")
    assert catalog.list_file_groups() == []
    with pytest.raises(NotFound, match="conf"):
        catalog.get_file_group("conf")
    with pytest.raises(NotFound, match="conf"):
        catalog.remove_file_group("conf")


def test_refusals_record_nothing(catalog: Catalog) -> None:
    catalog.add_file_group("conf", "db", ["etc"])
    with pytest.raises(AlreadyExists, match="conf"):
        catalog.add_file_group("conf", "db", ["var"])
    with pytest.raises(NotFound, match="nope"):
        catalog.add_file_group("other", "nope", ["etc"])
    with pytest.raises(InvalidInput, match="at least one path"):
        catalog.add_file_group("other", "db", [])
    with pytest.raises(InvalidInput, match="file group name"):
        catalog.add_file_group("bad name!", "db", ["etc"])
    assert [g.paths for g in catalog.list_file_groups()] == [("etc",)]


def test_removed_with_their_volume(catalog: Catalog) -> None:
    catalog.add_file_group("conf", "db", ["etc"])
    catalog.remove_volume("db")
    assert catalog.list_file_groups() == []


def test_mount_point_of_reads_mountinfo_by_device_number(tmp_path: Path) -> None:
    from blockguard.storage.filemap import mount_point_of

    dev = os.stat("/dev/null").st_rdev
    ident = f"{os.major(dev)}:{os.minor(dev)}"
    info = tmp_path / "mountinfo"
    info.write_text(
        f"30 1 {ident} /sub /mnt/bind rw - ext4 /dev/x rw\n"
        f"31 1 {ident} / /mnt/with\\040space rw - ext4 /dev/x rw\n"
        f"32 1 {ident} / /mnt/second rw - ext4 /dev/x rw\n"
    )
    # A bind mount of a subdirectory is skipped; escapes are decoded; the first wins.
    assert mount_point_of("/dev/null", mountinfo=str(info)) == "/mnt/with space"
    info.write_text("30 1 0:99 / /other rw - ext4 /dev/y rw\n")
    assert mount_point_of("/dev/null", mountinfo=str(info)) is None
    with pytest.raises(NotFound, match="/dev/nope"):
        mount_point_of("/dev/nope", mountinfo=str(info))
