"""The catalog's backup targets: recorded with their link, refused whole, removed whole."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockguard.core.catalog import Catalog, PerfEntry, link_perf_key
from blockguard.errors import AlreadyExists, InvalidInput, NotFound

FINGERPRINT = "SHA256:" + "b" * 43


def _link(target: str = "offsite") -> PerfEntry:
    return PerfEntry(link_perf_key(target), "pool", 5.0, "probe", seq_read=2e7, seq_write=1e7)


def _add(c: Catalog, target: str = "offsite", **changes: object) -> object:
    values: dict[str, object] = {
        "url": "ssh://bg@192.0.2.2:2222",
        "client_id": "host1",
        "pool": "main",
        "host_key": FINGERPRINT,
        "link": _link(target),
        "round_trip": 0.004,
        "space": (100, 200, 3),
    }
    values.update(changes)
    return c.add_target(target, **values)  # type: ignore[arg-type]


def test_target_is_recorded_with_its_link_and_removed_with_it(tmp_path: Path) -> None:
    with Catalog(tmp_path / "catalog.db", clock=lambda: 42.0) as c:
        t = _add(c)
        assert c.list_targets() == [t]
        got = c.get_target("offsite")
        assert (got.client_id, got.pool, got.host_key, got.state) == (
            "host1",
            "main",
            FINGERPRINT,
            "ok",
        )
        assert (got.space_free, got.space_total, got.space_used, got.checked_at) == (
            100,
            200,
            3,
            42.0,
        )
        link = c.get_perf(link_perf_key("offsite"), "pool")
        assert link is not None and (link.seq_read, link.seq_write) == (2e7, 1e7)
        c.remove_target("offsite")
        assert c.list_targets() == []
        assert c.get_perf(link_perf_key("offsite"), "pool") is None
        with pytest.raises(NotFound, match="offsite"):
            c.remove_target("offsite")


@pytest.mark.parametrize(
    ("target", "changes", "error", "names"),
    [
        ("bad/id", {}, InvalidInput, "bad/id"),
        ("offsite", {"client_id": "-x"}, InvalidInput, "-x"),
        ("offsite", {"host_key": "MD5:aa"}, InvalidInput, "MD5:aa"),
        ("offsite", {"link": _link("other")}, InvalidInput, "target:offsite:link"),
        ("offsite", {"round_trip": -1.0}, InvalidInput, "round trip"),
    ],
)
def test_bad_target_is_refused_and_nothing_recorded(
    tmp_path: Path, target: str, changes: dict[str, object], error: type, names: str
) -> None:
    with Catalog(tmp_path / "catalog.db") as c:
        with pytest.raises(error) as info:
            _add(c, target, **changes)
        assert names in str(info.value)
        assert c.list_targets() == []
        assert c.list_perf() == []


def test_second_target_of_one_id_is_refused_and_the_first_kept(tmp_path: Path) -> None:
    with Catalog(tmp_path / "catalog.db") as c:
        first = _add(c)
        with pytest.raises(AlreadyExists, match="offsite"):
            _add(c, url="ssh://other@192.0.2.9")
        assert c.list_targets() == [first]
        assert c.set_target_state("offsite", "unreachable", "link down").state == "unreachable"
        with pytest.raises(InvalidInput):
            c.set_target_state("offsite", "refused")
