"""``blockguardctl mount V@GEN DIR``, ``umount DIR`` and ``mounts``: callers of the
Manager's Mount, Unmount and ListMounts.

The daemon stops at a read-only loop device; the mount is made here, in the caller's
mount namespace: under its systemd unit the daemon has a namespace of its own
(ProtectSystem, PrivateTmp, ProtectHome), and a mount it made would leave the user an
empty directory. Loop devices are global, so the caller sees the daemon's.
"""

from __future__ import annotations

import argparse
import os
import subprocess

from blockguard.cli.client import Client, plain
from blockguard.cli.output import Column, Output
from blockguard.errors import EnvironmentProblem, InvalidInput

_ENV = {"LC_ALL": "C", "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=_ENV)


def _source_at(point: str) -> str | None:
    """The source of what is mounted at ``point`` (the topmost), or None."""
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as info:
        for line in info:
            fields = line.split()
            if _unescape(fields[4]) == point:
                found = fields[fields.index("-") + 2]
    return found


def _unescape(field: str) -> str:
    """A mountinfo path: space, tab, newline and backslash come octal-escaped."""
    for code in ("040", "011", "012", "134"):
        field = field.replace("\\" + code, chr(int(code, 8)))
    return field


def _check_mountpoint(given: str) -> str:
    point = os.path.realpath(given)
    if not os.path.isdir(point):
        raise InvalidInput(detail=f"the mount point {given} is not a directory")
    if os.listdir(point):
        raise InvalidInput(detail=f"the mount point {given} is not empty")
    if _source_at(point) is not None:
        raise InvalidInput(detail=f"something is already mounted at {given}")
    return point


def mount(client: Client, args: argparse.Namespace, out: Output) -> None:
    point = _check_mountpoint(args.mountpoint)
    found = plain(client.call("Mount", "ss", args.generation, point))
    argv = ["mount", "-o", found["options"], "-t", found["fstype"], found["loop"], point]
    done = _run(argv)
    if done.returncode != 0:
        # Undo the daemon's half: nothing stays attached for a mount that failed.
        client.call("Unmount", "s", point)
        raise EnvironmentProblem(
            detail=f"cannot mount {found['loop']} ({found['generation']}) at {point}: "
            f"{done.stderr.strip() or f'mount exited with {done.returncode}'}"
        )
    if out.as_json:
        out.json({"mount": found})
    else:
        out.line(
            f"mounted {found['generation']} ({found['fstype']}, read-only) at {found['mountpoint']}"
        )


def umount(client: Client, args: argparse.Namespace, out: Output) -> None:
    point = os.path.realpath(args.mountpoint)
    ours = [m for m in plain(client.call("ListMounts")) if m["mountpoint"] == point]
    source = _source_at(point)
    # Only the browse mount's own loop device is unmounted here, never what else is there.
    if ours and source is not None and os.path.realpath(source) == ours[0]["loop"]:
        # Lazily when a process still uses it: it reads on until it lets go, and the
        # daemon serves the image (its loop is released by the kernel) until then.
        done = _run(["umount", point])
        if done.returncode != 0 and _source_at(point) is not None:
            done = _run(["umount", "-l", point])
        if done.returncode != 0:
            raise EnvironmentProblem(detail=f"cannot unmount {point}: {done.stderr.strip()}")
    found = plain(client.call("Unmount", "s", point))
    if out.as_json:
        out.json({"unmounted": found})
    else:
        out.line(f"unmounted {found['generation']} from {found['mountpoint']}")


def mounts(client: Client, args: argparse.Namespace, out: Output) -> None:
    found = plain(client.call("ListMounts"))
    if out.as_json:
        out.json({"mounts": found})
        return
    out.table(
        "Browse mounts",
        (
            Column("mountpoint", keep=True),
            Column("generation", keep=True),
            Column("fstype"),
            Column("loop", drop=2),
        ),
        ([m["mountpoint"], m["generation"], m.get("fstype", ""), m.get("loop", "")] for m in found),
    )
