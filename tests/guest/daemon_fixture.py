"""blockguardd with the real engine on a private bus, inside the guest; dm/LVM clean-up.

The bus, the notify socket and the daemon come from the harness the host-side daemon tests
use (:mod:`tests.support`): the same code starts them here. What the guest adds is
taking apart what the daemon leaves in the kernel after a test (also after a kill -9):
point-in-time layers, era devices interposed on LVs, volume groups.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from blockguard.storage.snapshot import PREFIX
from tests.support.bus import PERMISSIVE, NotifyListener, start_bus
from tests.support.daemon import EngineHarness

__all__ = [
    "EngineHarness",
    "dm_names",
    "engine_on_private_bus",
    "remove_dm",
    "resume_suspended",
    "sh",
]


def sh(*argv: str, check: bool = True) -> str:
    """Run a command (never through a shell); its stdout."""
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=300).stdout


def dm_names() -> list[str]:
    out = sh("dmsetup", "ls", check=False)
    return [
        line.split()[0] for line in out.splitlines() if line.strip() and "No devices" not in line
    ]


def remove_dm(names: list[str]) -> None:
    """Remove these dm devices, users first (a few passes: holders go before what they
    hold); names that do not exist are skipped."""
    left = [n for n in names if n in dm_names()]
    for _ in range(4):
        if not left:
            return
        for name in list(left):
            if subprocess.run(["dmsetup", "remove", name], capture_output=True).returncode == 0:
                left.remove(name)


def pit_layers() -> list[str]:
    return [n for n in dm_names() if n.startswith(PREFIX)]


def suspended() -> list[str]:
    """The dm devices that are suspended now."""
    out = sh("dmsetup", "info", "-c", "--noheadings", "-o", "name,attr", "--separator", ":",
             check=False)  # fmt: skip
    found = []
    for line in out.splitlines():
        name, _, attr = line.strip().rpartition(":")
        if name and "s" in attr:
            found.append(name)
    return found


def resume_suspended() -> list[str]:
    """Resume every suspended dm device (a test that failed half-way must not leave
    writers blocked in the kernel: the guest could not even power off)."""
    names = suspended()
    for name in names:
        sh("dmsetup", "resume", name, check=False)
    return names


def save_diagnostics(harness: EngineHarness, directory: Path) -> None:
    """Daemon logs (with a stack dump of any daemon still running) and the kernel's dm
    state, for a failure in the guest to be read on the host."""
    directory.mkdir(parents=True, exist_ok=True)
    running = [d for d in harness.daemons if d.process.poll() is None]
    for daemon in running:
        daemon.process.send_signal(signal.SIGUSR1)  # faulthandler: every thread's stack
    if running:
        time.sleep(1)
    for n, daemon in enumerate(harness.daemons):
        with contextlib.suppress(OSError):
            shutil.copy(daemon.log_path, directory / f"blockguardd-{n}.log")
    if suspended():
        # Tasks blocked in the kernel (a hung suspend or resume) into the kernel log.
        with contextlib.suppress(OSError), open("/proc/sysrq-trigger", "w") as f:
            f.write("w")
        time.sleep(0.5)
    state = [["dmsetup", "info", "-c"], ["dmsetup", "table"], ["dmesg"]]
    (directory / "dm.txt").write_text(
        "\n".join(f"$ {' '.join(argv)}\n{sh(*argv, check=False)}" for argv in state)
    )


@contextlib.contextmanager
def engine_on_private_bus(
    tmp_path: Path, diagnostics: Path | None = None
) -> Iterator[EngineHarness]:
    """A private system-type bus and an :class:`EngineHarness` on it (``start(**env)``);
    every daemon is stopped (by PID) and the pool mounts under ``tmp_path`` unmounted.

    :param diagnostics: where to save logs and dm state when leaving (see
        :func:`save_diagnostics`).
    """
    shared = Path(tempfile.mkdtemp(prefix="bg-bus-"))
    shared.chmod(0o755)
    notify = NotifyListener(str(tmp_path / "notify"), str(tmp_path / "notify"))
    try:
        with start_bus(shared, PERMISSIVE) as bus:
            harness = EngineHarness(bus, tmp_path, notify)
            try:
                yield harness
            finally:
                if diagnostics is not None:
                    with contextlib.suppress(Exception):
                        save_diagnostics(harness, diagnostics)
                resume_suspended()
                harness.cleanup()
    finally:
        notify.close()
        shutil.rmtree(shared, ignore_errors=True)
