"""blockguardd with the real engine on a private bus: start, stop, kill -9, wait for jobs.

The daemon runs as a subprocess in its own process group (``Daemon.kill`` takes the
commands it was running too) and logs to a file of the test's, one per start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.bus import REPO, NotifyListener, PrivateBus
from tests.support.devices import MiB, unmount_under
from tests.timeouts import scaled

ENGINE = "blockguard.engine.engine:make_service"
#: The daemon's environment for engine tests: no probe (loop devices are too fast for an
#: RTO of seconds to matter), every device at 8 MiB/s, no scheduler unless a test asks (and
#: then an amount of changed data is looked at every second at the latest),
#: no restore drill unless a test asks (``Drill``), and a small one then; none of the
#: host's alert hooks, no metrics file.
ENGINE_ENV = {
    "BLOCKGUARD_PROBE_SECONDS": "0",
    "BLOCKGUARD_DEFAULT_SPEED": str(8 * MiB),
    "BLOCKGUARD_SCHEDULER_INTERVAL": "0",
    "BLOCKGUARD_SCHEDULER_MAX_INTERVAL": "1",
    "BLOCKGUARD_DRILL_AUTO": "0",
    "BLOCKGUARD_DRILL_BYTES": str(4 * MiB),
    "BLOCKGUARD_ALERT_DIR": "/nonexistent/blockguard-test-alert.d",
    "BLOCKGUARD_METRICS_FILE": "",
}


@dataclass
class Daemon:
    process: subprocess.Popen[str]
    bus: PrivateBus
    state_dir: Path
    notify: NotifyListener
    log_path: Path
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return self.bus.address

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(scaled(timeout))
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def kill(self) -> None:
        """kill -9 the daemon and every command it was running, as systemd does when the
        main process of a unit dies (KillMode=control-group): an lvm or dmsetup call left
        running would otherwise finish after the next daemon has collected the garbage of
        the killed one (an lvcreate that lands after the new daemon's pool scan)."""
        pgid = self.process.pid  # started with start_new_session: the group is the daemon's
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        self.process.wait(scaled(10))
        deadline = time.monotonic() + scaled(10)
        while _group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _group_members(pgid), f"still running after kill -9: {_group_members(pgid)}"


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


def start_daemon(
    bus: PrivateBus,
    tmp_path: Path,
    notify: NotifyListener,
    *extra_args: str,
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
) -> Daemon:
    """Start blockguardd on ``bus`` with its state in ``tmp_path/state``.

    Without ``--service`` in ``extra_args`` it runs the daemon's default service, the real
    engine; ``env`` is added to the environment (engine tests pass :data:`ENGINE_ENV`).
    """
    state_dir = tmp_path / "state"
    # Each daemon of a test keeps its own log (a restarted one must not overwrite the log of
    # the one that was killed: that is the log a failure needs).
    log_path = tmp_path / "blockguardd.log"
    n = 1
    while log_path.exists():
        n += 1
        log_path = tmp_path / f"blockguardd-{n}.log"
    environ = dict(os.environ)
    environ.update({"NOTIFY_SOCKET": notify.address, "PYTHONPATH": str(REPO)})
    for key in ("JOURNAL_STREAM", "INVOCATION_ID", "WATCHDOG_USEC", "WATCHDOG_PID"):
        environ.pop(key, None)
    environ.update(env or {})
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "blockguard.daemon.main",
                "--bus",
                bus.address,
                "--state-dir",
                str(state_dir),
                "--udev-source",
                "none",
                "--log-level",
                "debug",
                *extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environ,
            text=True,
            # Its own process group, which its commands inherit: Daemon.kill takes them all.
            start_new_session=True,
        )
    daemon = Daemon(process, bus, state_dir, notify, log_path)
    if wait_ready:
        try:
            # A loaded machine or a guest under TCG can take a minute to get here.
            notify.wait_for("READY", "1", timeout=60)
        except AssertionError as exc:
            daemon.stop()
            raise AssertionError(f"{exc}\n--- daemon log ---\n{daemon.log()}") from None
    return daemon


@dataclass
class EngineHarness:
    """Starts the real daemon (more than once if a test restarts it) and cleans up."""

    bus: PrivateBus
    tmp_path: Path
    notify: NotifyListener
    daemons: list[Daemon] = field(default_factory=list)

    def start(self, *args: str, **env: str) -> Daemon:
        """Start blockguardd (``args`` are extra command-line options) with
        :data:`ENGINE_ENV` and ``env``; waits for its READY, not that of an earlier one."""
        while self.notify.receive(0.01) is not None:
            pass
        self.notify.messages.clear()
        daemon = start_daemon(
            self.bus,
            self.tmp_path,
            self.notify,
            "--service",
            ENGINE,
            *args,
            env={**ENGINE_ENV, **env},
        )
        self.daemons.append(daemon)
        return daemon

    def cleanup(self) -> None:
        for daemon in self.daemons:
            daemon.stop()
        unmount_under(self.tmp_path)


def run_job(client: object, path: str, timeout: float = 60) -> dict[str, object]:
    """Wait for a job (by its D-Bus path) and return its final properties."""
    bound = scaled(timeout)
    return client.wait_job(path, interval=0.05, timeout=bound)  # type: ignore[attr-defined]
