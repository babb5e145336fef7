"""``blockguardctl mount V@GEN DIR``, ``umount DIR`` and ``mounts``: thin callers of the
Manager's Mount, Unmount and ListMounts."""

from __future__ import annotations

import argparse
import os

from blockguard.cli.client import Client, plain
from blockguard.cli.output import Column, Output


def mount(client: Client, args: argparse.Namespace, out: Output) -> None:
    # The daemon resolves paths in its own root: hand it an absolute one.
    found = plain(client.call("Mount", "ss", args.generation, os.path.abspath(args.mountpoint)))
    if out.as_json:
        out.json({"mount": found})
    else:
        out.line(
            f"mounted {found['generation']} ({found.get('fstype') or 'unknown'}, read-only) "
            f"at {found['mountpoint']}"
        )


def umount(client: Client, args: argparse.Namespace, out: Output) -> None:
    found = plain(client.call("Unmount", "s", os.path.abspath(args.mountpoint)))
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
