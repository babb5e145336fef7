"""The ``target`` and ``key`` commands of blockguardctl (issue 11): each a few lines
over the Manager's AddTarget, ListTargets, GetTarget, RemoveTarget, ClientKey and
ExportKey."""

from __future__ import annotations

import argparse
import os
from typing import Any

from blockguard.cli.actions import finish_job
from blockguard.cli.client import Client, plain, variant
from blockguard.cli.errors import CliError
from blockguard.cli.output import Column, Output, text
from blockguard.core.vocab import format_ago, format_rate, format_size, format_time
from blockguard.errors import ExitCode

#: An exported key is about 90 characters; a file much larger is not one.
MAX_KEY_FILE = 4096


def _read_key_file(name: str) -> str:
    """The text of ``--key FILE``, read here (as the caller) and sent to the daemon."""
    try:
        with open(name, encoding="ascii", errors="replace") as f:
            found = f.read(MAX_KEY_FILE + 1)
    except OSError as exc:
        raise CliError(
            f"cannot read the key file {name}: {exc.strerror or exc}", ExitCode.USAGE
        ) from exc
    if len(found) > MAX_KEY_FILE:
        raise CliError(
            f"the key file {name} is larger than a key ({MAX_KEY_FILE} bytes at most)",
            ExitCode.USAGE,
        )
    return found


def target_add(client: Client, args: argparse.Namespace, out: Output) -> None:
    credentials = os.path.abspath(args.credentials) if args.credentials else ""
    options = {
        name: variant(value)
        for name, value in (
            ("host_key", args.host_key),
            ("client_id", args.client),
            ("endpoint", args.endpoint),
            # Only the path travels: the daemon reads the file (and refuses it unless
            # root-only), so the secret is on no command line and in no message.
            ("credentials", credentials),
        )
        if value
    }
    if args.key:
        options["key_text"] = variant(_read_key_file(args.key))
    path = client.call("AddTarget", "sssa{sv}", args.id, args.url, args.pool, options)
    finish_job(client, path, args, out)
    if not args.no_wait and not out.as_json:
        out.fields(_rows(plain(client.call("GetTarget", "s", args.id))))


def _rows(target: dict[str, Any]) -> list[tuple[str, Any]]:
    """A target's fields for a person."""
    s3 = target.get("kind") == "s3"
    rows: list[tuple[str, Any]] = [("id", target["id"]), ("url", target["url"])]
    if s3:
        rows += [
            ("kind", "object store (S3)"),
            ("endpoint", target["endpoint"]),
            ("bucket", target["bucket"]),
            ("prefix", target["prefix"] or "-"),
            ("credentials", target["credentials"]),
        ]
    else:
        rows += [
            ("pool", target["pool"]),
            ("client id", target["client_id"]),
            ("host key", target["host_key"]),
        ]
    rows += [
        (
            "state",
            target["state"]
            + (f" ({target['state_reason']})" if target.get("state_reason") else ""),
        ),
    ]
    if "retry_at" in target:
        rows.append(
            (
                "scheduled transfers",
                f"held back after {target['failures']} failure(s) in a row; next try at "
                f"{format_time(target['retry_at'])} (`blockguardctl transfer VOLUME` tries now)",
            )
        )
    if "link_down" in target:
        down, up = ("GET", "PUT") if s3 else ("link down", "link up")
        rows += [
            (down, format_rate(target["link_down"])),
            (up, format_rate(target["link_up"])),
        ]
    if "link_round_trip" in target:
        latency = "small GET" if s3 else "round trip"
        rows.append((latency, f"{target['link_round_trip'] * 1000:.1f} ms"))
    if "link_measured_at" in target:
        rows.append(("link measured", format_ago(target["link_measured_at"])))
    for area in target.get("areas", []):
        if _measured(area):
            speeds = (
                f"read {format_rate(area['read'])}, write {format_rate(area['write'])} "
                "(the slower of the area and the link)"
            )
        else:
            speeds = "not measured (the link stands for it)"
        size = f", {format_size(area['total'])}" if "total" in area else ""
        rows.append((f"area {area['name']}", f"{speeds}, {area.get('disk', 'unknown')}{size}"))
    if "space_total" in target:
        rows.append(
            (
                "space",
                f"{format_size(target['space_free'])} free of "
                f"{format_size(target['space_total'])}, this host uses "
                f"{format_size(target['space_used'])}",
            )
        )
    return rows


def _area_speeds(target: dict[str, Any]) -> str:
    """The measured areas' read/write as seen from here (each the slower of area and
    link), or "-" when the target reports none measured."""
    shown = [
        f"{a['name']} {format_rate(a['read'])}/{format_rate(a['write'])}"
        for a in target.get("areas", [])
        if _measured(a)
    ]
    return ", ".join(shown) or "-"


def _measured(area: dict[str, Any]) -> bool:
    """The daemon reported both of the area's figures (a partial answer is shown as
    not measured, never as a crash)."""
    return "read" in area and "write" in area


def target_list(client: Client, args: argparse.Namespace, out: Output) -> None:
    found = plain(client.call("ListTargets"))
    if out.as_json:
        out.json({"targets": found})
        return
    out.table(
        "Backup targets",
        (
            Column("id", keep=True),
            Column("url", drop=3),
            Column("pool", drop=2),
            Column("state"),
            Column("down"),
            Column("up"),
            Column("round trip", drop=1),
            Column("area read/write", drop=2),
            Column("free", drop=1),
        ),
        (
            [
                t["id"],
                t["url"],
                t["pool"] or "-",
                t["state"],
                format_rate(t["link_down"]) if "link_down" in t else "-",
                format_rate(t["link_up"]) if "link_up" in t else "-",
                f"{t['link_round_trip'] * 1000:.1f} ms" if "link_round_trip" in t else "-",
                _area_speeds(t),
                format_size(t["space_free"]) if "space_free" in t else "-",
            ]
            for t in found
        ),
    )


def target_show(client: Client, args: argparse.Namespace, out: Output) -> None:
    found = plain(client.call("GetTarget", "s", args.id))
    if out.as_json:
        out.json({"target": found})
        return
    out.fields(_rows(found))


def target_remove(client: Client, args: argparse.Namespace, out: Output) -> None:
    client.call("RemoveTarget", "s", args.id)
    if out.as_json:
        out.json({"removed": args.id})
    else:
        out.line(f"removed target {args.id}")


def client_key(client: Client, args: argparse.Namespace, out: Output) -> None:
    found = plain(client.call("ClientKey", "s", args.client))
    if out.as_json:
        out.json(found)
        return
    out.line(found["authorized_keys_line"])
    out.note(
        "put this line into the authorized_keys of the target's user; DIR is the "
        "directory of the pool there"
    )


def key_export(client: Client, args: argparse.Namespace, out: Output) -> None:
    found = plain(client.call("ExportKey"))
    key, warning = found["key"], found["warning"]
    if args.output:
        try:
            fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise CliError(
                f"{args.output} exists; key export never overwrites a file", ExitCode.USAGE
            ) from None
        except OSError as exc:
            raise CliError(f"cannot write {args.output}: {exc.strerror or exc}") from exc
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
    if out.as_json:
        out.json(
            {"key": None if args.output else key, "output": args.output or None, "warning": warning}
        )
        return
    if args.output:
        out.line(f"wrote the master key to {args.output}")
    else:
        out.line(key)
    out.note(f"warning: {text(warning)}")


def target_gc(client: Client, args: argparse.Namespace, out: Output) -> None:
    path = client.call("CollectTarget", "s", args.id)
    finish_job(client, path, args, out)


def target_import(client: Client, args: argparse.Namespace, out: Output) -> None:
    found = plain(client.call("ImportTarget", "s", args.id))
    if out.as_json:
        out.json({"import": found})
        return
    out.table(
        f"Generations on target {args.id}",
        (
            Column("volume", keep=True),
            Column("generation", keep=True),
            Column("kind"),
            Column("stored", drop=1),
        ),
        (
            [g["volume"], g["generation"], g["kind"], format_size(g["bytes"])]
            for g in found.get("generations", [])
        ),
    )
    for d in found.get("damaged", []):
        out.line(f"damaged: {d['volume']}@{d['generation']}: {d['reason']}")
    out.line(
        f"restore one with: blockguardctl restore VOLUME@GENERATION --from {args.id} --target DEV"
    )
