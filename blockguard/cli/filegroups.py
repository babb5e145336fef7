"""``blockguardctl filegroup create|list|show|remove``: thin callers of the Manager's
CreateFileGroup, ListFileGroups, ShowFileGroup and RemoveFileGroup."""

from __future__ import annotations

import argparse
import os

from blockguard.cli.client import Client, plain
from blockguard.cli.output import Column, Output


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
    from blockguard.cli.actions import finish_job

    # The daemon resolves paths in its own root: hand it an absolute one.
    path = client.call(
        "RestoreFiles", "sassb", args.group, args.paths, os.path.abspath(args.to), args.overwrite
    )
    finish_job(client, path, args, out)
