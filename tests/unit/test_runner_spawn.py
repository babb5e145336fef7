"""The runner's long-lived children (``ssh -T`` to a backup target): pipes both ways,
LC_ALL=C, stderr drained and bounded, recorded like every call, and always reaped:
after a clean close, a child that will not end, and an exception in the caller."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from blockguard.errors import CommandNotFound, InvalidInput
from blockguard.storage.runner import Runner
from tests.timeouts import scaled


def assert_reaped(pid: int) -> None:
    """No child of ours with ``pid`` is left, not even a zombie."""
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    assert not Path(f"/proc/{pid}").exists()


def test_a_child_talks_over_its_pipes_with_lc_all_c_and_is_recorded() -> None:
    runner = Runner()
    child = runner.spawn(
        ["sh", "-c", 'printf "%s|" "$LC_ALL"; cat; echo bye >&2; exit 3'],
        close_timeout=scaled(30),
    )
    [record] = runner.history()
    assert record.state == "running" and record.pid == child.pid
    child.stdin.write(b"\x00frame\xff")
    child.stdin.flush()
    assert child.stdout.read(len(b"C|\x00frame\xff")) == b"C|\x00frame\xff"
    assert child.close() == 3
    assert child.close() == 3
    assert "bye" in child.stderr()
    [record] = runner.history()
    assert record.state == "finished" and record.returncode == 3
    assert record.stderr_tail == "bye"
    assert_reaped(child.pid)


def test_a_child_that_does_not_end_when_its_stdin_closes_is_killed() -> None:
    runner = Runner()
    # Not a shell of its own: sleep is the child, and SIGKILL ends it.
    child = runner.spawn(["sleep", "600"], close_timeout=0.2)
    assert child.close() == -9
    assert runner.history()[0].state == "killed"
    assert_reaped(child.pid)


def test_an_error_in_the_caller_kills_the_child_at_once() -> None:
    runner = Runner()
    # A close_timeout this long would be felt: the exception path must not wait for it.
    with (
        pytest.raises(RuntimeError, match="the caller failed"),
        runner.spawn(["cat"], close_timeout=3600) as child,
    ):
        raise RuntimeError("the caller failed")
    assert child.poll() == -9
    assert_reaped(child.pid)


def test_stderr_is_drained_into_a_bounded_buffer() -> None:
    # 1 MiB of error output would fill the pipe and block a child nobody drains.
    script = "head -c 1048576 /dev/zero | tr '\\0' x >&2; echo END >&2; cat >/dev/null"
    child = Runner().spawn(["sh", "-c", script], close_timeout=scaled(60), stderr_limit=1000)
    with child:
        pass
    assert child.poll() == 0
    text = child.stderr()
    assert len(text) == 1000 and text.endswith("xEND\n")


def test_bad_commands_are_refused_before_anything_runs() -> None:
    runner = Runner()
    with pytest.raises(InvalidInput, match="argv list"):
        runner.spawn("ssh host", close_timeout=5)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="positive timeout"):
        runner.spawn(["cat"], close_timeout=0)
    with pytest.raises(CommandNotFound, match="no-such-program-blockguard"):
        runner.spawn(["no-such-program-blockguard"], close_timeout=5)
    assert runner.history() == []


def test_a_child_can_have_wider_pipes_and_still_talks_over_them() -> None:
    # ``pipe_bytes`` widens both of its pipes (the kernel's default is 64 KiB); what goes
    # through them is unchanged, more than the default's worth of it in one piece.
    with Runner().spawn(["cat"], close_timeout=scaled(30), pipe_bytes=1 << 20) as child:
        for pipe in (child.stdin, child.stdout):
            assert fcntl.fcntl(pipe.fileno(), fcntl.F_GETPIPE_SZ) == 1 << 20
        data = os.urandom(512 << 10)
        child.stdin.write(data)
        child.stdin.flush()
        assert child.stdout.read(len(data)) == data
