"""The one door for external commands."""

from __future__ import annotations

import logging
import stat
import time
from pathlib import Path

import pytest

from blockguard.errors import CommandFailed, CommandNotFound, CommandTimeout, InvalidInput
from blockguard.storage.runner import Runner


def fake(tmp_path: Path, name: str, body: str) -> str:
    p = tmp_path / name
    p.write_text("#!/bin/sh\n" + body + "\n")
    p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return str(p)


def test_shell_strings_are_refused() -> None:
    with pytest.raises(InvalidInput, match="argv list"):
        Runner().run("echo hi; rm -rf /", timeout=5)  # type: ignore[arg-type]


def test_timeout_is_mandatory() -> None:
    with pytest.raises(TypeError):
        Runner().run(["true"])  # type: ignore[call-arg]
    with pytest.raises(InvalidInput, match="positive timeout"):
        Runner().run(["true"], timeout=0)


def test_lc_all_is_c_and_metacharacters_are_literal() -> None:
    r = Runner().run(["sh", "-c", 'printf "%s|%s" "$LC_ALL" "$1"', "x", "$(id); *"], timeout=5)
    assert r.stdout == "C|$(id); *"


def test_failure_carries_argv_code_and_stderr() -> None:
    with pytest.raises(CommandFailed) as info:
        Runner().run(["sh", "-c", "echo boom >&2; exit 3"], timeout=5)
    err = info.value
    assert err.returncode == 3
    assert err.argv[1:] == ["-c", "echo boom >&2; exit 3"]
    assert "boom" in err.stderr
    assert "exit code 3" in str(err) and "boom" in str(err)


def test_check_false_returns_the_code() -> None:
    assert Runner().run(["false"], timeout=5, check=False).returncode == 1


def test_timeout_kills_and_raises() -> None:
    t0 = time.monotonic()
    with pytest.raises(CommandTimeout, match=r"did not finish within 0\.5 s"):
        Runner().run(["sleep", "30"], timeout=0.5)
    assert time.monotonic() - t0 < 10


def test_override_by_constructor_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failing = fake(tmp_path, "dmsetup", "echo 'fake dmsetup says no' >&2; exit 1")
    with pytest.raises(CommandFailed, match="fake dmsetup says no"):
        Runner(binaries={"dmsetup": failing}).run(["dmsetup", "targets"], timeout=5)
    monkeypatch.setenv("BLOCKGUARD_BIN_THIN_DELTA", fake(tmp_path, "td", "echo overridden"))
    assert Runner().run(["thin_delta", "-V"], timeout=5).stdout.strip() == "overridden"


def test_missing_program_is_named() -> None:
    with pytest.raises(CommandNotFound, match="no-such-program-blockguard"):
        Runner().run(["no-such-program-blockguard"], timeout=5)


def test_flight_recorder_keeps_last_calls_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    runner = Runner(history=3)
    with caplog.at_level(logging.DEBUG, logger="blockguard.storage.runner"):
        for i in range(5):
            runner.run(["sh", "-c", f"exit {i % 2}"], timeout=5, check=False)
    hist = runner.history()
    assert [h.argv[-1] for h in hist] == ["exit 0", "exit 1", "exit 0"]
    assert [h.returncode for h in hist] == [0, 1, 0]
    report = runner.failure_report()
    assert report.count("\n") == 3 and "rc=1" in report
    assert sum("run:" in r.message for r in caplog.records) == 5


def test_stdin_is_not_inherited() -> None:
    assert Runner().run(["cat"], timeout=5).stdout == ""
    assert Runner().run(["cat"], timeout=5, input="fed").stdout == "fed"


def test_environment_extra() -> None:
    out = Runner(env={"DM_DISABLE_UDEV": "1"}).run(["sh", "-c", "echo $DM_DISABLE_UDEV"], timeout=5)
    assert out.stdout.strip() == "1"
