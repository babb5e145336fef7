"""The one door through which blockguard runs external programs.

Every call takes an argv list (never a shell string), runs with ``LC_ALL=C`` so that
output parses the same everywhere, has a mandatory timeout, is logged, and is kept in a
bounded flight recorder that failure reports dump. Program paths can be overridden
per program, by the constructor or by ``BLOCKGUARD_BIN_<NAME>`` environment variables
(``BLOCKGUARD_BIN_DMSETUP=/tmp/fake-dmsetup``), so tests can put a failing fake in front.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import enum
import fcntl
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from blockguard.errors import (
    CommandFailed,
    CommandNotFound,
    CommandTimeout,
    InvalidInput,
    stderr_tail,
)
from blockguard.storage.spawned import SpawnedChild

log = logging.getLogger(__name__)

#: Where programs are looked up when they are not on PATH (root's sbin dirs are often
#: missing from the PATH of a service or a test).
SEARCH_PATH = os.pathsep.join(
    ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]
)


class CommandState(enum.StrEnum):
    """Where a recorded call is: a hung command shows as ``running``."""

    RUNNING = "running"
    FINISHED = "finished"
    TIMEOUT = "timeout"
    #: A spawned child that did not end when its stdin was closed, or was aborted.
    KILLED = "killed"
    NOT_FOUND = "not-found"
    ERROR = "error"


@dataclass
class CommandRecord:
    """One call as kept by the flight recorder: recorded when it starts, completed when
    it ends, so that a command that hangs is in the report (as ``running``).

    Fields change only under the owning runner's lock (see :meth:`Runner.history`, which
    hands out copies).
    """

    argv: tuple[str, ...]
    started: float = field(repr=False)
    thread: str = ""
    state: CommandState = CommandState.RUNNING
    returncode: int | None = None
    duration: float = 0.0
    stderr_tail: str = ""
    t0: float = field(default=0.0, repr=False)
    #: A spawned child's process id (to find it, or to show it is gone).
    pid: int | None = None

    def line(self, now: float | None = None) -> str:
        """One line of the failure report; ``now`` (monotonic) ages a running call."""
        if self.state is CommandState.RUNNING:
            age = (now if now is not None else time.monotonic()) - self.t0
            outcome, seconds = "running", age
        elif self.state is CommandState.FINISHED:
            outcome, seconds = f"rc={self.returncode}", self.duration
        else:
            outcome, seconds = self.state.value, self.duration
        tail = f" stderr={self.stderr_tail!r}" if self.stderr_tail else ""
        return (
            f"{time.strftime('%H:%M:%S', time.localtime(self.started))} {outcome} "
            f"{seconds:.3f}s [{self.thread}] {' '.join(self.argv)}{tail}"
        )


@dataclass(frozen=True)
class CommandResult:
    """The outcome of a call that ran to its end."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    duration: float


def widen_pipe(fd: int, size: int) -> int:
    """Ask for a pipe capacity of ``size`` bytes; returns the capacity it has.

    Best effort: above ``/proc/sys/fs/pipe-max-size`` an unprivileged process is refused
    (EPERM), and a user over its pipe quota too; the pipe then keeps its capacity.
    """
    try:
        return fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    except OSError as exc:
        log.debug("pipe capacity %d refused (%s); kept the default", size, exc)
        return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)


class Runner:
    """Runs external programs; see the module docstring for the guarantees.

    :param binaries: program name -> path overrides (take precedence over the environment).
    :param history: how many calls the flight recorder keeps.
    :param env: extra environment variables for every call (``LC_ALL`` is always ``C``).
    """

    def __init__(
        self,
        binaries: Mapping[str, str] | None = None,
        history: int = 100,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._binaries = dict(binaries or {})
        self._recorder: collections.deque[CommandRecord] = collections.deque(maxlen=history)
        self._lock = threading.Lock()
        self._env = dict(env or {})

    def resolve(self, program: str) -> str:
        """Return the path that would run for ``program``.

        :raises CommandNotFound: when neither an override nor the search path has it.
        """
        override = self._binaries.get(program) or os.environ.get(
            "BLOCKGUARD_BIN_" + program.upper().replace("-", "_")
        )
        if override:
            if not os.access(override, os.X_OK):
                raise CommandNotFound(program=program, path=override)
            return override
        if os.sep in program:
            if not os.access(program, os.X_OK):
                raise CommandNotFound(program=program, path=program)
            return program
        search = os.environ.get("PATH", "") + os.pathsep + SEARCH_PATH
        found = shutil.which(program, path=search)
        if found is None:
            raise CommandNotFound(program=program, path=search)
        return found

    def section(self) -> contextlib.AbstractContextManager[None]:
        """Kernel work of this thread outside a command (the dm ioctl) runs in this, so
        that the daemon's runner holds it back as it would a command (see
        ``engine/cmdguard.py``); nothing to hold back here."""
        return contextlib.nullcontext()

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        input: bytes | str | None = None,
        check: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> CommandResult:
        """Run ``argv`` and wait for it.

        :param argv: program name and arguments; a plain string is refused.
        :param timeout: seconds before the program is killed (mandatory).
        :param input: data for the program's stdin (none: stdin is /dev/null).
        :param check: raise :class:`CommandFailed` on a non-zero exit.
        :param env: extra environment variables for this call.
        :raises CommandFailed: non-zero exit with ``check``.
        :raises CommandTimeout: the timeout passed; the program was killed.
        :raises CommandNotFound: the program does not exist.
        """
        argv, call_env = self._prepare(argv, timeout, env)
        data = input.encode() if isinstance(input, str) else input
        record = self._start(argv)
        t0 = record.t0
        log.debug("run: %s", argv)
        try:
            proc = subprocess.run(
                argv,
                input=data,
                stdin=None if data is not None else subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                env=call_env,
                check=False,
                shell=False,
            )
        except subprocess.TimeoutExpired as exc:
            stderr = _text(exc.stderr)
            self._finish(record, CommandState.TIMEOUT, None, stderr)
            log.warning("command timed out after %ss: %s", timeout, argv)
            raise CommandTimeout(argv, timeout, stderr) from None
        except FileNotFoundError:
            self._finish(record, CommandState.NOT_FOUND, None, "not found")
            raise CommandNotFound(program=argv[0], path=argv[0]) from None
        except BaseException as exc:
            # Not left "running" for ever: it never started, or we were interrupted.
            self._finish(record, CommandState.ERROR, None, f"{type(exc).__name__}: {exc}")
            raise
        duration = time.monotonic() - t0
        stdout, stderr = _text(proc.stdout), _text(proc.stderr)
        self._finish(record, CommandState.FINISHED, proc.returncode, stderr)
        log.debug("rc=%d in %.3fs: %s", proc.returncode, duration, argv)
        if check and proc.returncode != 0:
            raise CommandFailed(argv, proc.returncode, stderr)
        return CommandResult(tuple(argv), proc.returncode, stdout, stderr, duration)

    def spawn(
        self,
        argv: Sequence[str],
        *,
        close_timeout: float,
        env: Mapping[str, str] | None = None,
        stderr_limit: int = 64 << 10,
        pipe_bytes: int | None = None,
    ) -> SpawnedChild:
        """Start ``argv`` as a long-lived child that talks over pipes (``ssh -T`` to a
        backup target): its stdin and stdout are the caller's, its stderr is drained by a
        thread into a bounded buffer (a chatty child can never block on a full pipe).

        The call is recorded when it starts and completed when the child is closed, like
        :meth:`run`'s. Close it (or use it as a context manager): that closes its stdin,
        waits up to ``close_timeout`` for it to end, then kills it, and always reaps it.

        :param close_timeout: seconds a closed child has to end before it is killed.
        :param stderr_limit: bytes of its error output kept (the last ones).
        :param pipe_bytes: the capacity asked for its stdin and stdout pipes (the kernel's
            default is 64 KiB); best effort: a size the kernel refuses leaves its default.
        :raises CommandNotFound: the program does not exist.
        """
        argv, call_env = self._prepare(argv, close_timeout, env)
        record = self._start(argv)
        log.debug("spawn: %s", argv)
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=call_env,
                shell=False,
            )
        except FileNotFoundError:
            self._finish(record, CommandState.NOT_FOUND, None, "not found")
            raise CommandNotFound(program=argv[0], path=argv[0]) from None
        except BaseException as exc:
            self._finish(record, CommandState.ERROR, None, f"{type(exc).__name__}: {exc}")
            raise
        with self._lock:
            record.pid = proc.pid
        if pipe_bytes is not None:
            assert proc.stdin and proc.stdout
            for pipe in (proc.stdin, proc.stdout):
                widen_pipe(pipe.fileno(), pipe_bytes)

        def finish(killed: bool, returncode: int, stderr: str) -> None:
            state = CommandState.KILLED if killed else CommandState.FINISHED
            self._finish(record, state, returncode, stderr)

        return SpawnedChild(proc, record.argv, finish, close_timeout, stderr_limit)

    def _prepare(
        self, argv: Sequence[str], timeout: float, env: Mapping[str, str] | None
    ) -> tuple[list[str], dict[str, str]]:
        """The checked argv with its program resolved, and the call's environment."""
        if isinstance(argv, str | bytes) or not argv:
            raise InvalidInput(detail=f"a command must be a non-empty argv list, not {argv!r}")
        if not all(isinstance(a, str) for a in argv):
            raise InvalidInput(detail=f"every argument must be a string: {argv!r}")
        if timeout is None or timeout <= 0:
            raise InvalidInput(detail=f"a command needs a positive timeout, got {timeout!r}")
        call_env = {**os.environ, **self._env, **(env or {}), "LC_ALL": "C"}
        return [self.resolve(argv[0]), *argv[1:]], call_env

    def _start(self, argv: Sequence[str]) -> CommandRecord:
        # Recorded before the program starts: a call that never returns must still be
        # in the report of the failure it causes.
        record = CommandRecord(
            tuple(argv),
            started=time.time(),
            thread=threading.current_thread().name,
            t0=time.monotonic(),
        )
        with self._lock:
            self._recorder.append(record)
        return record

    def _finish(
        self, record: CommandRecord, state: CommandState, rc: int | None, stderr: str
    ) -> None:
        tail = stderr_tail(stderr)
        with self._lock:
            record.state = state
            record.returncode = rc
            record.duration = time.monotonic() - record.t0
            record.stderr_tail = tail

    def history(self) -> list[CommandRecord]:
        """The last calls, oldest first (copies: they do not change afterwards)."""
        with self._lock:
            return [dataclasses.replace(r) for r in self._recorder]

    def failure_report(self, last: int | None = None) -> str:
        """The flight recorder as text, for logs, failed jobs and bug reports.

        :param last: only the newest ``last`` calls (None: all that are kept).
        """
        records = self.history()
        if last is not None:
            records = records[-last:] if last > 0 else []
        now = time.monotonic()
        lines = [r.line(now) for r in records]
        return "last commands run:\n" + ("\n".join(lines) if lines else "(none)")


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    if isinstance(data, str):
        return data
    return data.decode("utf-8", errors="replace")


_default: Runner | None = None


def default_runner() -> Runner:
    """The process-wide runner (one flight recorder for the whole daemon)."""
    global _default
    if _default is None:
        _default = Runner()
    return _default
