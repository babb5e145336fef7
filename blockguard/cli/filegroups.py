"""``blockguardctl filegroup create|list|show|remove``: thin callers of the Manager's
CreateFileGroup, ListFileGroups, ShowFileGroup and RemoveFileGroup; ``restore-files``,
which writes the files itself from the device RestoreFiles serves."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from blockguard.cli.client import Client, RemoteError, plain, variant
from blockguard.cli.output import Column, Output
from blockguard.core.formats import format_duration, format_size
from blockguard.errors import InvalidInput


def filegroup_create(client: Client, args: argparse.Namespace, out: Output) -> None:
    found = plain(client.call("CreateFileGroup", "ssas", args.name, args.volume, args.paths))
    if out.as_json:
        out.json({"filegroup": found})
    else:
        out.line(
            f"file group {found['name']} of volume {found['volume']}: {', '.join(found['paths'])}"
        )


def filegroup_list(client: Client, args: argparse.Namespace, out: Output) -> None:
    found = plain(client.call("ListFileGroups"))
    if out.as_json:
        out.json({"filegroups": found})
        return
    out.table(
        "File groups",
        (Column("name", keep=True), Column("volume", keep=True), Column("paths")),
        ([g["name"], g["volume"], " ".join(g["paths"])] for g in found),
    )


def filegroup_show(client: Client, args: argparse.Namespace, out: Output) -> None:
    found = plain(client.call("ShowFileGroup", "s", args.name))
    if out.as_json:
        out.json({"filegroup": found})
        return
    out.line(f"file group {found['name']}")
    out.line(f"  volume:  {found['volume']}")
    out.line(f"  mounted: {found.get('mounted_at') or 'no'}")
    for path in found["paths"]:
        out.line(f"  path:    {path}")
    out.table(
        "Generations",
        (
            Column("generation", keep=True),
            Column("kind"),
            Column("files"),
            Column("bytes"),
            Column("changed", keep=True),
            Column("note", drop=2),
        ),
        (
            [
                g["generation"],
                g["kind"],
                str(g.get("files", "")),
                str(g.get("bytes", "")),
                str(g.get("changed_bytes", "")),
                _note(g),
            ]
            for g in found.get("generations", [])
        ),
    )


def _note(row: dict[str, object]) -> str:
    if not row.get("listed"):
        return "no file list (the volume was not mounted, or the group is newer)"
    unsettled = row.get("unsettled") or []
    return f"{len(unsettled)} files changed during the backup" if unsettled else ""


def filegroup_remove(client: Client, args: argparse.Namespace, out: Output) -> None:
    client.call("RemoveFileGroup", "s", args.name)
    if out.as_json:
        out.json({"removed": args.name})
    else:
        out.line(f"removed file group {args.name}")


def restore_files(client: Client, args: argparse.Namespace, out: Output) -> None:
    """The daemon checks the request and serves the generation as a read-only loop
    device; the files are written here, in the caller's mount namespace (under its
    systemd unit the daemon could not write the caller's directories), and the device
    is released whatever happens (docs/design/filegroups.md)."""
    from blockguard.cli.filewriter import DeviceReader, check_target, decode_items, write_files

    dest = Path(os.path.abspath(args.to))
    if not dest.is_dir():
        raise InvalidInput(detail=f"the target {args.to} is not a directory")
    # The daemon names the target in its log and in its hold of the generation.
    served = client.call(
        "RestoreFiles", "sass", args.group, args.paths, str(os.path.realpath(dest))
    )
    entries = served["entries"].value
    found = plain({k: v for k, v in served.items() if k != "entries"})
    result: dict[str, object] = {}
    try:
        items = decode_items(entries)
        check_target(items, dest, overwrite=args.overwrite)
        started = time.monotonic()
        reader = DeviceReader(found["device"], found["generation"])
        try:
            written = write_files(reader, items, dest, overwrite=args.overwrite)
        finally:
            reader.close()
        seconds = time.monotonic() - started
        result = {"files": found["files"], "bytes": written, "seconds": seconds}
    except BaseException as exc:
        result = {"error": str(exc) or type(exc).__name__}
        raise
    finally:
        try:
            client.call(
                "FinishRestoreFiles",
                "sa{sv}",
                found["id"],
                {k: variant(v) for k, v in result.items()},
            )
        except RemoteError:
            if "error" not in result:  # else the restore's own error is the one to see
                raise
    shown = {
        key: found.get(key)
        for key in ("group", "generation", "number", "target", "files", "estimated_seconds")
    }
    shown.update(bytes=written, seconds=seconds)
    if out.as_json:
        out.json({"restore": shown})
        return
    estimate = found.get("estimated_seconds")
    out.line(
        f"restored {found['files']} files ({format_size(written)}) of {found['group']} "
        f"from {found['generation']} into {found['target']} in "
        f"{format_duration(seconds)}"
        + (f" (estimated {format_duration(float(estimate))})" if estimate is not None else "")
    )
