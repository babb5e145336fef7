"""The serve command a target's ``authorized_keys`` forces for a client's key::

    restrict,command="python3 -m blockguard.engine.servecmd --client C1 --root /srv/bg" ssh-...

It serves one conversation on stdin/stdout (:mod:`.serving`) for the client named on its
command line, never for one the connection asks for (``SSH_ORIGINAL_COMMAND`` is not
read), and exits: 0 after the client's BYE, the error's exit code otherwise.

Why a module here and not ``blockguardctl serve``: blockguardctl is a D-Bus client that
imports only its own layer (tests/unit/test_layers.py, test_cli_imports.py), and a serve
that opens a store over a directory is engine work. When serve becomes the shim that hands
its stdin/stdout to the target's blockguardd over D-Bus (docs/design/remote.md), the shim
is ``blockguardctl serve`` and this body runs as a job of that daemon.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from blockguard.errors import BlockguardError, ExitCode
from blockguard.storage.remote import areaprobe
from blockguard.storage.remote.channel import Channel
from blockguard.storage.remote.packstore import PackStore
from blockguard.storage.remote.readahead import ReadAhead

from .serving import serve_client

log = logging.getLogger("blockguard.serve")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python3 -m blockguard.engine.servecmd",
        description="Serve one remote-target conversation of one client on stdin/stdout.",
    )
    parser.add_argument("--client", required=True, help="the client id this key is for")
    parser.add_argument("--root", required=True, type=Path, help="the area holding clients/CLIENT/")
    parser.add_argument(
        "--create",
        action="store_true",
        help="make the client's root and exit (an administrator's step, never in a forced command)",
    )
    parser.add_argument(
        "--area",
        help="the area's name in the areas answer (default: the root's directory name)",
    )
    parser.add_argument(
        "--probe-seconds",
        type=float,
        default=areaprobe.DEFAULT_DURATION,
        help="seconds per test and depth when the area's speeds are measured (once, kept "
        "in the area)",
    )
    parser.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"]
    )
    return parser.parse_args(argv)


def take_stdio() -> tuple[io.BufferedReader, io.BufferedWriter]:
    """The conversation's streams: stdin and stdout, taken over so that nothing else
    writes to the client. A stray print (ours or a library's) would corrupt the frames;
    fd 1 then points at stderr and fd 0 at /dev/null."""
    reader = io.BufferedReader(io.FileIO(os.dup(0), "rb"))
    writer = io.BufferedWriter(io.FileIO(os.dup(1), "wb"))
    os.dup2(2, 1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return reader, writer


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.create:
            PackStore.create(args.root, args.client).close()
            return 0
        reader, writer = take_stdio()
        # The next pack arrives while one is stored (readahead.py says why).
        ahead = ReadAhead(reader, name="serve-read-ahead")
        channel = Channel(ahead, writer, peer=f"client {args.client}")
        name = args.area or args.root.resolve().name
        root = args.root

        def areas() -> list[areaprobe.AreaReport]:
            return [areaprobe.area_report(root, name, duration=args.probe_seconds)]

        serve_client(channel, args.root, args.client, areas)
    except BlockguardError as exc:
        log.error("%s", exc)
        return int(exc.exit_code)
    except Exception:
        log.exception("serve failed")
        return int(ExitCode.INTERNAL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
