"""A long-lived child of the runner (:meth:`~blockguard.storage.runner.Runner.spawn`):
``ssh -T`` to a backup target, talking over its pipes for as long as a conversation lasts.

Its stderr is drained by a thread into a bounded buffer, so a chatty child never blocks on
a full pipe; it is always reaped, whether it ends by itself, when its stdin closes, or by
a kill; its record in the runner's flight recorder is completed when it is closed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import threading
from collections.abc import Callable
from typing import IO

log = logging.getLogger(__name__)


class SpawnedChild:
    """A child started by :meth:`Runner.spawn`: write to :attr:`stdin`, read :attr:`stdout`.

    One thread owns the pipes (a channel's owner); :meth:`close` may come from that thread
    or after it is done with them.
    """

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        argv: tuple[str, ...],
        finish: Callable[[bool, int, str], None],
        close_timeout: float,
        stderr_limit: int,
    ) -> None:
        assert proc.stdin and proc.stdout and proc.stderr
        self._finish = finish
        self.argv = argv
        self._proc = proc
        self.close_timeout = close_timeout
        self.stdin: IO[bytes] = proc.stdin
        self.stdout: IO[bytes] = proc.stdout
        self._stderr = bytearray()
        self._limit = stderr_limit
        self._stderr_lock = threading.Lock()
        self._returncode: int | None = None
        self._drain = threading.Thread(
            target=self._drain_stderr, args=(proc.stderr,), name=f"stderr-{proc.pid}", daemon=True
        )
        self._drain.start()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _drain_stderr(self, stream: IO[bytes]) -> None:
        # The thread owns the stream and closes it at its end: closing it from another
        # thread while a read blocks on it is not safe.
        try:
            fd = stream.fileno()
            while more := os.read(fd, 65536):
                with self._stderr_lock:
                    self._stderr += more
                    del self._stderr[: max(0, len(self._stderr) - self._limit)]
        except OSError:
            pass
        finally:
            stream.close()

    def stderr(self) -> str:
        """Its error output so far (the last ``stderr_limit`` bytes)."""
        with self._stderr_lock:
            return bytes(self._stderr).decode("utf-8", errors="replace")

    def poll(self) -> int | None:
        """Its exit code once it has ended (and been reaped), else None."""
        return self._proc.poll()

    def close(self, *, kill: bool = False) -> int:
        """End the child: close its stdin, wait up to ``close_timeout``, then kill it.
        It is reaped in every case, and the call's record completed. Closing twice
        returns the same code.

        :param kill: kill it at once (an aborted conversation: nothing to wait for).
        :returns: its exit code (negative: the signal that ended it).
        """
        if self._returncode is not None:
            return self._returncode
        killed = False
        try:
            if kill and self._proc.poll() is None:
                # Killed before its stdin closes: an EOF first could let it end by itself
                # and pass for a clean end of the conversation.
                self._proc.kill()
                killed = True
            with contextlib.suppress(OSError):
                # Buffered bytes a dead child will never read make close() raise.
                self.stdin.close()
            try:
                self._proc.wait(self.close_timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not end within %ss of its stdin closing: killed",
                            self.argv[0], self.close_timeout)  # fmt: skip
                self._proc.kill()
                killed = True
        finally:
            # Even when interrupted above: never a zombie.
            if self._proc.poll() is None:
                self._proc.kill()
                killed = True
            returncode = self._proc.wait()
            self._drain.join(self.close_timeout)
            with contextlib.suppress(OSError):
                self.stdout.close()
            self._returncode = returncode
            self._finish(killed, returncode, self.stderr())
            log.debug("spawned rc=%d: %s", returncode, self.argv)
        return returncode

    def __enter__(self) -> SpawnedChild:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close(kill=exc_type is not None)
