"""File groups in the catalog: recorded with their paths, listed, refused when their name
or volume is wrong (nothing recorded then), removed with their volume."""

from __future__ import annotations

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
