"""The one door for external commands."""

from __future__ import annotations

import logging
import stat
import threading
import time
from pathlib import Path

import pytest

from blockguard.errors import CommandFailed, CommandNotFound, CommandTimeout, InvalidInput
from blockguard.storage.runner import Runner
from tests.timeouts import timeout_scale


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
    # That it returned at all (sleep 30 was killed) is the point; how fast is not asserted.
    with pytest.raises(CommandTimeout, match=r"did not finish within 0\.5 s"):
        Runner().run(["sleep", "30"], timeout=0.5)


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


def test_flight_recorder_shows_a_call_while_it_runs(tmp_path: Path) -> None:
    # A command that hangs (a dmsetup waiting on a suspended device) must be in the report
    # of the failure it causes: it is recorded when it starts, not when it ends.
    release = tmp_path / "release"
    runner = Runner()
    script = f"while [ ! -e {release} ]; do sleep 0.05; done"
    worker = threading.Thread(
        target=runner.run, args=(["sh", "-c", script],), kwargs={"timeout": 600}, name="job_7"
    )
    worker.start()
    try:
        for _ in range(int(6000 * timeout_scale())):
            if runner.history():
                break
            time.sleep(0.01)
        [running] = runner.history()
        assert running.state == "running" and running.returncode is None
        report = runner.failure_report()
        assert " running " in report and "[job_7]" in report and script in report
    finally:
        release.touch()
        worker.join()
    [done] = runner.history()
    assert done.state == "finished" and done.returncode == 0
    assert " rc=0 " in runner.failure_report(last=1)
    assert runner.failure_report(last=0) == "last commands run:\n(none)"


def test_flight_recorder_marks_timeouts() -> None:
    runner = Runner()
    with pytest.raises(CommandTimeout):
        runner.run(["sleep", "30"], timeout=0.2)
    [rec] = runner.history()
    assert rec.state == "timeout" and " timeout " in runner.failure_report()
