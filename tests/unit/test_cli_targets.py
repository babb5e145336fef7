"""The target and key commands' own parts: the next step after their errors, and the
``--key FILE`` reading that happens in the client."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockguard.cli.client import RemoteError
from blockguard.cli.errors import CliError, next_step
from blockguard.cli.targets import MAX_KEY_FILE, _area_speeds, _read_key_file, _rows
from blockguard.errors import ExitCode


@pytest.mark.parametrize(
    ("name", "message", "step"),
    [
        (
            "NotAuthorized",
            "not authorized: target t refused this host's key: ...; add this line to the "
            "authorized_keys of bg ...",
            "authorized_keys",
        ),
        ("NotAuthorized", "not authorized: ExportKey hands out the master key", "as root"),
        ("NotAuthorized", "not authorized: CreatePool needs root or membership", "group"),
        ("HostKeyUnconfirmed", "the host key of target t ...", "--host-key"),
        ("HostKeyMismatch", "the host key of target t does not match", "fingerprint"),
        ("NotFound", "target t does not exist", "target list"),
        ("NotFound", "key file /x does not exist", "target add"),
    ],
)
def test_target_errors_point_to_the_next_step(name: str, message: str, step: str) -> None:
    found = next_step(RemoteError(f"org.blockguard1.Error.{name}", message))
    assert found is not None and step in found


def test_a_key_file_is_read_whole_or_refused_named(tmp_path: Path) -> None:
    key = tmp_path / "key.txt"
    key.write_text("blockguard-key-v1:abcd\n")
    assert _read_key_file(str(key)) == "blockguard-key-v1:abcd\n"
    key.write_text("x" * (MAX_KEY_FILE + 1))
    with pytest.raises(CliError, match="larger than a key") as info:
        _read_key_file(str(key))
    assert info.value.exit_code == ExitCode.USAGE
    with pytest.raises(CliError, match="missing"):
        _read_key_file(str(tmp_path / "missing"))


def test_measured_areas_are_shown_with_their_speeds_and_unmeasured_ones_not() -> None:
    target = {
        "id": "offsite", "url": "ssh://bg@192.0.2.2", "pool": "main", "client_id": "h1",
        "host_key": "SHA256:x", "state": "ok",
        "areas": [
            {"name": "main", "read": 30e6, "write": 10e6, "disk": "hdd", "total": 1 << 30},
            {"name": "cold", "disk": "unknown"},
            {"name": "half", "read": 5e6},  # a partial answer: shown as not measured
        ],
        "failures": 2, "retry_at": 1_800_000_000.0,
    }  # fmt: skip
    assert _area_speeds(target).startswith("main ") and "cold" not in _area_speeds(target)
    assert _area_speeds({}) == "-"
    rows = dict(_rows(target))
    assert "the slower of the area and the link" in rows["area main"]
    assert "hdd" in rows["area main"] and "not measured" in rows["area cold"]
    assert "not measured" in rows["area half"] and "half" not in _area_speeds(target)
    assert "2 failure(s)" in rows["scheduled transfers"]
    assert "next try at" in rows["scheduled transfers"]
