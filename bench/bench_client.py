"""How fast blockguardctl starts and answers, as ratios to ``python -c pass`` (issue 16).

Run as root: ``.venv/bin/python bench/bench_client.py [--runs N]``.

A private dbus-daemon and blockguardd with the real engine (the harness of
``tests/support``) run in a temporary directory, with a dir pool on one loop device and a
protected volume ``db`` on another, so that ``plan db`` has something to explain. Then
``blockguardctl --version``, ``status`` and ``plan db`` each run ``--runs`` times,
interleaved with the reference ``python -c pass`` (the same interpreter, the same
environment), and the medians are printed with their ratio to the reference's median.
The client runs as the console script does (``from blockguard.cli.main import main``),
with this checkout first on ``PYTHONPATH``. Printed, never asserted; the target of
issue 16 is ``status`` <= 2 x the reference.

Every command runs with a bytecode cache, as an installed program has (pip compiles it):
``PYTHONDONTWRITEBYTECODE`` is dropped and ``PYTHONPYCACHEPREFIX`` points into the
temporary directory, so the checkout is not written to and the first (warm-up) run fills
the cache. Without a cache, every call compiles blockguard's modules from source.

Every command is timed in two layouts, each with its own reference:

- ``checkout``: the interpreter of this checkout's venv, where blockguard is installed
  *editable*: ``site`` runs the editable install's import hook at every start (pathlib, re,
  enum, urllib.parse ...: ~10 ms on the host), the reference's start-up too; the
  modules it loaded are free for blockguardctl. Both are slower than installed, and the
  ratio looks better than it is.
- ``installed``: a throwaway venv of the same base interpreter without that hook, whose
  one ``.pth`` line puts the dependencies' site-packages on the path (a ``.pth`` line adds
  a directory; the ``.pth`` files in it are not run): the start-up of a venv that pip
  installed blockguard into. This is the fair ratio.

``--importtime`` also prints the slowest imports (``-X importtime``) of one ``status``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.bus import PERMISSIVE, REPO, NotifyListener, start_bus
from tests.support.daemon import EngineHarness
from tests.support.devices import LoopFactory, MiB

POOL_SIZE = 400 * MiB  # a dir pool is XFS, which wants 300 MiB at least
VOLUME_SIZE = 16 * MiB
#: What the installed ``blockguardctl`` script runs.
ENTRY = "import sys; from blockguard.cli.main import main; sys.exit(main())"


@contextlib.contextmanager
def daemon_with_volume() -> Iterator[str]:
    """blockguardd on a private bus with pool p1 and volume db; yields the bus address."""
    directory = Path(tempfile.mkdtemp(prefix="bg-bench-client-"))
    directory.chmod(0o755)
    loops = LoopFactory(directory)
    PYCACHE[:] = [directory / "pycache"]
    try:
        with start_bus(directory, PERMISSIVE) as bus:
            notify = NotifyListener(str(directory / "notify"), str(directory / "notify"))
            harness = EngineHarness(bus, directory, notify)
            try:
                harness.start()
                ctl(bus.address, "pool", "create", "p1", loops(POOL_SIZE, "p.img"))
                ctl(bus.address, "protect", loops(VOLUME_SIZE, "db.img"), "db")
                yield bus.address
            finally:
                harness.cleanup()
                notify.close()
    finally:
        loops.cleanup()
        shutil.rmtree(directory, ignore_errors=True)


#: The bytecode cache of every command run (set by daemon_with_volume).
PYCACHE: list[Path] = []


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if PYCACHE:
        env["PYTHONPYCACHEPREFIX"] = str(PYCACHE[0])
    return env


def ctl(address: str, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", ENTRY, "--bus", address, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    if out.returncode != 0:
        raise SystemExit(f"blockguardctl {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout


def installed_python(directory: Path) -> str:
    """The interpreter of a venv like one pip installed blockguard into (see the module
    docstring): the same base interpreter, the dependencies of this one's venv."""
    venv = directory / "installed-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(purelib, "blockguard-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return str(python)


def wall(argv: list[str]) -> tuple[float, float]:
    """Seconds from start to exit, and the CPU seconds (user + system) the command used;
    output goes to /dev/null (a file, not a tty)."""
    start = time.perf_counter()
    process = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env()
    )
    _pid, _status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    process.returncode = 0  # reaped above; keeps Popen from waiting again
    return elapsed, usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="runs of each command (median)")
    parser.add_argument("--importtime", action="store_true", help="show the slowest imports")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (loop devices, mkfs, mount)")
    with daemon_with_volume() as address:
        layouts = {"checkout": sys.executable, "installed": installed_python(PYCACHE[0].parent)}
        commands = {}
        for layout, python in layouts.items():
            client = [python, "-c", ENTRY, "--bus", address]
            commands[f"{layout}: python -c pass"] = [python, "-c", "pass"]
            commands[f"{layout}: blockguardctl --version"] = [*client, "--version"]
            commands[f"{layout}: blockguardctl status"] = [*client, "status"]
            commands[f"{layout}: blockguardctl plan db"] = [*client, "plan", "db"]
        for argv in commands.values():  # warm the caches (bytecode, the daemon) once
            wall(argv)
        times: dict[str, list[float]] = {name: [] for name in commands}
        cpu: dict[str, list[float]] = {name: [] for name in commands}
        # Interleaved, so that a burst of load on the machine hits every command alike.
        for _ in range(args.runs):
            for name, argv in commands.items():
                elapsed, used = wall(argv)
                times[name].append(elapsed)
                cpu[name].append(used)
        if args.importtime:
            out = subprocess.run(
                [layouts["installed"], "-X", "importtime", "-c", ENTRY, "--bus", address, "status"],
                capture_output=True,
                text=True,
                env=_env(),
                timeout=120,
            )
            rows = [r for r in out.stderr.splitlines() if r.startswith("import time:") and "|" in r]
            rows = [r for r in rows if r.split("|")[1].strip().isdigit()]
            rows.sort(key=lambda line: int(line.split("|")[1]), reverse=True)
            print("slowest imports of status, installed layout (cumulative us):")
            print("\n".join(rows[:25]))
    print(f"median of {args.runs} runs each, interleaved ({sys.executable} and its base)")
    print("(CPU = user + system time of the command: steadier than wall on a busy machine)")
    print(f"{'command':<37} {'wall ms':>8} {'min ms':>7} {'x pass':>7} {'CPU ms':>7} {'x pass':>7}")
    for layout in layouts:
        reference = statistics.median(times[f"{layout}: python -c pass"])
        cpu_reference = statistics.median(cpu[f"{layout}: python -c pass"])
        for name, values in times.items():
            if not name.startswith(f"{layout}: "):
                continue
            median, cpu_median = statistics.median(values), statistics.median(cpu[name])
            print(
                f"{name:<37} {median * 1000:>8.1f} {min(values) * 1000:>7.1f} "
                f"{median / reference:>7.2f} {cpu_median * 1000:>7.1f} "
                f"{cpu_median / cpu_reference:>7.2f}"
            )
    print("target (issue 16): blockguardctl status wall <= 2.00 x pass (the installed layout")
    print("is the fair one; the checkout's editable-install hook slows every start-up)")


if __name__ == "__main__":
    main()
