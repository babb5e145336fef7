"""The first hour of an admin, typed into a real terminal (tmux, 80 columns).

blockguardctl against the real daemon with the real engine on a private bus: a dir pool on
a loop device, a volume with scan tracking. Each step is typed into a tmux pane and its
screen is read back: the text a person sees (the probe spinner, the progress bar, the
tables at 80 columns) says what the step did, shows ids whole and never a Python repr.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.bus import REPO
from tests.support.daemon import EngineHarness
from tests.support.devices import MiB, sha256_of, write_random
from tests.timeouts import scaled

VOLUME_SIZE = 32 * MiB
POOL_SIZE = 400 * MiB
#: What a screen must never show: Python reprs, tracebacks, internals.
REPRS = ("{'", "['", "('", "<blockguard", "Variant(", "Traceback", "object at 0x", "None,")
DONE = re.compile(r"^__DONE (\d+)$", re.MULTILINE)


class Terminal:
    """One tmux session of 80x50 on a private server; ``run`` types a command and waits."""

    def __init__(self, socket: Path, address: str) -> None:
        self.socket = socket
        self.captures: list[str] = []
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "TERM": "xterm-256color",
            "PS1": "$ ",
        }
        env.pop("TMUX", None)
        env.pop("NO_COLOR", None)
        self._tmux(
            "new-session", "-d", "-x", "80", "-y", "50", "bash", "--norc", "--noprofile", env=env
        )
        ctl = f"{shlex.quote(sys.executable)} -m blockguard.cli.main --bus {shlex.quote(address)}"
        self._type(f'bgctl() {{ {ctl} "$@"; }}')

    def _tmux(self, *args: str, env: dict[str, str] | None = None) -> str:
        return subprocess.run(
            ["tmux", "-S", str(self.socket), *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
            env=env,
        ).stdout

    def _type(self, line: str) -> None:
        self._tmux("send-keys", "-t", "0", "-l", line)
        self._tmux("send-keys", "-t", "0", "Enter")

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-J", "-t", "0").rstrip("\n") + "\n"

    def run(self, command: str, timeout: float = 120) -> tuple[str, int, list[str]]:
        """Type ``command`` on a clear screen; returns the screen when it finished, its exit
        status and every screen seen meanwhile (progress shows only while it runs)."""
        self.start(command)
        return self.finish(command, timeout)

    def start(self, command: str) -> None:
        """Type ``command`` on a clear screen and return at once."""
        self._type("clear")
        self._tmux("clear-history", "-t", "0")
        deadline = time.monotonic() + scaled(5)
        while self.screen().strip() not in ("$", "") and time.monotonic() < deadline:
            time.sleep(0.05)
        self._type(f'{command}; echo "__DONE $?"')

    def wait_for(self, pattern: str, timeout: float = 60) -> str:
        """The screen once ``pattern`` (a regex) is on it."""
        deadline = time.monotonic() + scaled(timeout)
        while True:
            text = self.screen()
            self.captures.append(text)
            if re.search(pattern, text):
                return text
            assert time.monotonic() < deadline, f"{pattern!r} never showed:\n{text}"
            time.sleep(0.05)

    def interrupt(self) -> None:
        self._tmux("send-keys", "-t", "0", "C-c")

    def finish(self, command: str, timeout: float = 120) -> tuple[str, int, list[str]]:
        """Wait for the command :meth:`start` typed to end (see :meth:`run`)."""
        seen = []
        deadline = time.monotonic() + scaled(timeout)
        while True:
            text = self.screen()
            seen.append(text)
            found = DONE.search(text)
            if found:
                break
            assert time.monotonic() < deadline, f"{command} did not finish:\n{text}"
            time.sleep(0.05)
        self.captures.extend(seen)
        return text, int(found.group(1)), seen

    def close(self) -> None:
        subprocess.run(
            ["tmux", "-S", str(self.socket), "kill-server"], capture_output=True, timeout=30
        )


@pytest.fixture
def terminal(engine: EngineHarness, tmp_path: Path) -> Iterator[tuple[Terminal, str]]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (scripts/bootstrap installs it)")
    # A short probe, so that pool create has something to show while it waits.
    # A slow backup (per extent written), so that Ctrl-C can come while one runs.
    daemon = engine.start(BLOCKGUARD_PROBE_SECONDS="1.5", BLOCKGUARD_TEST_BACKUP_DELAY="0.1")
    term = Terminal(tmp_path / "tmux.sock", daemon.address)
    try:
        yield term, daemon.address
    finally:
        term.close()
        # A swap-in the test left (it failed midway) holds a loop device: release it.
        for swap in ctl_json(daemon.address, "restore", "--swap-ins", check=False).get(
            "swap_ins", []
        ):
            ctl_json(daemon.address, "restore", "--release", swap["name"], check=False)


def ctl_json(address: str, *args: str, check: bool = True) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "blockguard.cli.main", "--bus", address, *args, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    if not check and out.returncode:
        return {}
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_first_hour_in_a_terminal(terminal: tuple[Terminal, str], loopdev: object) -> None:
    term, address = terminal
    pool_disk = loopdev(POOL_SIZE, "pool.img")  # type: ignore[operator]
    volume = loopdev(VOLUME_SIZE, "db.img")  # type: ignore[operator]
    target = loopdev(VOLUME_SIZE, "target.img")  # type: ignore[operator]

    screen, rc, seen = term.run(f"bgctl pool create p1 {pool_disk}")
    assert rc == 0, screen
    assert "created pool p1" in screen
    assert any("probing" in s for s in seen), "no sign of the probe while it ran"

    screen, rc, _ = term.run(f"bgctl protect {volume} db --rpo 1h --rto 10m")
    assert rc == 0 and "protecting db" in screen, screen

    screen, rc, _ = term.run("bgctl plan db")
    assert rc == 0 and "The next backup of db would be full" in screen, screen

    write_random(volume, 0, VOLUME_SIZE, seed=1)
    screen, rc, seen = term.run("bgctl backup db")
    assert rc == 0, screen
    assert re.search(r"backup of db done: full db@1 \(db@\S+\), 32\.0 MiB in ", screen), screen
    bars = [s for s in seen if "backup db" in s and "%" in s]
    assert bars or len(seen) < 3, "the backup ran for a while and showed no progress bar"

    write_random(volume, 4 * MiB, 2 * MiB, seed=2)
    second = sha256_of(volume)
    screen, rc, _ = term.run("bgctl backup db")
    assert rc == 0 and "backup of db done" in screen, screen
    write_random(volume, 8 * MiB, 1 * MiB, seed=3)

    # Ctrl-C stops the waiting, not the backup; jobs wait follows it to its end.
    term.start("bgctl backup db --full")
    term.wait_for(r"backup db .*%")
    term.interrupt()
    screen, rc, _ = term.finish("backup")
    assert rc == 130, screen
    found = re.search(r"stopped waiting; job (\d+) goes on in the daemon", screen)
    assert found, screen
    screen, rc, _ = term.run(f"bgctl jobs wait {found.group(1)}")
    assert rc == 0, screen
    # A full of a volume with a full already clones it: only the changed chunks are copied.
    assert re.search(r"backup of db done: full db@3 \(db@\S+\), \S+ MiB in ", screen), screen

    gens = ctl_json(address, "generations", "db")["generations"]
    assert [g["short_id"] for g in gens] == ["db@1", "db@2", "db@3"]
    screen, rc, _ = term.run("bgctl generations db")
    assert rc == 0, screen
    for g in gens:
        assert g["id"] in screen, f"{g['id']} is cut short at 80 columns:\n{screen}"
    assert "…" not in screen, screen
    piped, rc, _ = term.run("bgctl generations db | cat")
    assert rc == 0 and not set("┃━│─┏┡") & set(piped), piped
    assert re.search(r"^#\s+id\s+method", piped, re.MULTILINE), piped

    screen, rc, _ = term.run("bgctl verify db@latest")
    assert rc == 0, screen
    assert f"verify of {gens[2]['id']} done: db@3 ({gens[2]['id']})" in screen, screen
    assert "ok yes" in screen, screen

    screen, rc, _ = term.run(f"bgctl restore db@2 --target {target}")
    assert rc == 0, screen
    assert f"restore of db done: new-device db@2 ({gens[1]['id']})" in screen, screen
    assert sha256_of(target, VOLUME_SIZE) == second

    screen, rc, _ = term.run("bgctl restore db@20 --target /dev/null")
    assert rc == 3, screen
    assert "generation db@20 does not exist" in screen and "numbered 1..3" in screen, screen

    # A swap-in is listed, and released when service moved off it.
    screen, rc, _ = term.run("bgctl restore db@1 --mode swap-in")
    assert rc == 0, screen
    found = re.search(r"blockguardctl restore --release (/dev/loop\d+)", screen)
    assert found and f"restore of db done: swap-in db@1 ({gens[0]['id']})" in screen, screen
    swapped = found.group(1)
    screen, rc, _ = term.run("bgctl restore --swap-ins")
    assert rc == 0 and swapped in screen and "p1" in screen, screen
    screen, rc, _ = term.run(f"bgctl restore --release {swapped}")
    assert rc == 0 and f"released swap-in {swapped}" in screen, screen
    assert ctl_json(address, "restore", "--swap-ins")["swap_ins"] == []

    help_text, _, _ = term.run("bgctl status --help")
    if "--check" in help_text:
        screen, rc, _ = term.run("bgctl status --check")
        assert rc == 0 and "BLOCKGUARD OK" in screen, screen
        assert "db" in screen and "p1" in screen, screen

    for capture in term.captures:
        for bad in REPRS:
            assert bad not in capture, f"{bad!r} on the screen:\n{capture}"
