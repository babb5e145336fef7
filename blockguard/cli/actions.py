"""The actions of blockguardctl: each is a few lines over :class:`~blockguard.cli.client.Client`.

Every action gets the client, the parsed arguments and an :class:`Output`, and either prints
a human table (rich) or, with ``--json``, one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from blockguard.cli.client import JOB, POOL, VOLUME, Client, RemoteError, variant
from blockguard.cli.errors import CliError
from blockguard.errors import ExitCode

GENERATION_FIELDS = ("id", "method", "parent", "created", "bytes", "state")


def human_size(nbytes: float) -> str:
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024 or unit == "PiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} PiB"


def human_time(unix: int) -> str:
    if not unix:
        return "-"
    return datetime.datetime.fromtimestamp(unix).strftime("%Y-%m-%d %H:%M:%S")


def human_seconds(seconds: float) -> str:
    if seconds < 0:
        return "?"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


class Output:
    """Human tables on stdout, or JSON with ``--json``; progress always goes to stderr."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.console = Console(highlight=False)
        self.err = Console(stderr=True, highlight=False)

    def json(self, data: Any) -> None:
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")

    def table(
        self, title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]
    ) -> None:
        table = Table(title=title)
        for column in columns:
            table.add_column(column)
        for row in rows:
            table.add_row(*(str(c) for c in row))
        self.console.print(table)

    def fields(self, pairs: Iterable[tuple[str, Any]]) -> None:
        table = Table(show_header=False, box=None)
        table.add_column(style="bold")
        table.add_column()
        for key, value in pairs:
            table.add_row(key, str(value))
        self.console.print(table)

    def line(self, text: str) -> None:
        self.console.print(text)


def generations_as_dicts(structs: Iterable[Sequence[Any]]) -> list[dict[str, Any]]:
    return [dict(zip(GENERATION_FIELDS, s, strict=True)) for s in structs]


def _find(client: Client, interface: str, what: str, name: str) -> tuple[str, dict[str, Any]]:
    for path, props in client.objects(interface).items():
        if props.get("Name") == name:
            return path, props
    raise CliError(f"{what} {name} does not exist", ExitCode.NOT_FOUND)


# --- jobs ---------------------------------------------------------------------------------


def _job_row(path: str, job: dict[str, Any]) -> list[Any]:
    error = job.get("Error") or ["", ""]
    return [
        job["Id"],
        job["Kind"],
        job["Target"],
        job["State"],
        f"{job['Progress'] * 100:.0f}%",
        human_size(job["BytesDone"]),
        f"{human_size(job['Rate'])}/s" if job["Rate"] else "-",
        error[1] or "",
    ]


def _raise_if_failed(job: dict[str, Any]) -> None:
    """A failed job's D-Bus error, raised as the command's error."""
    if job["State"] == "failed":
        name, message = job["Error"]
        raise RemoteError(name, message)


def _drill(
    client: Client, method: str, args: argparse.Namespace, out: Output
) -> dict[str, Any] | None:
    """Start a drill (``method`` on ``args.name``) and wait for its result.

    With ``--no-wait`` or ``--json`` the job is reported as any job is, and None returned.
    """
    from blockguard.cli.client import plain

    path = client.call(method, "s", args.name)
    if args.no_wait or out.as_json:
        finish_job(client, path, args, out)
        return None
    job = plain(client.wait_job(path))
    _raise_if_failed(job)
    return job.get("Result", {})


def finish_job(client: Client, path: str, args: argparse.Namespace, out: Output) -> None:
    """Wait for a job (with a progress bar) unless ``--no-wait``; fail if the job failed."""
    if args.no_wait:
        if out.as_json:
            out.json({"job": path})
        else:
            out.line(f"started job {path.rsplit('/', 1)[-1]} ({path})")
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeRemainingColumn(),
        console=out.err,
        disable=not out.err.is_terminal,
        transient=True,
    ) as progress:
        task = progress.add_task(path.rsplit("/", 1)[-1], total=1.0)

        def show(job: dict[str, Any]) -> None:
            progress.update(
                task, completed=job["Progress"], description=f"{job['Kind']} {job['Target']}"
            )

        job = client.wait_job(path, on_progress=show)
    if out.as_json:
        out.json({"job": path, **job})
    _raise_if_failed(job)
    if not out.as_json:
        result = ", ".join(f"{k}={v}" for k, v in sorted(job.get("Result", {}).items()))
        out.line(f"{job['Kind']} of {job['Target']} done" + (f": {result}" if result else ""))


def jobs(client: Client, args: argparse.Namespace, out: Output) -> None:
    found = client.objects(JOB)
    if out.as_json:
        out.json([{"path": p, **j} for p, j in found.items()])
        return
    out.table(
        "Jobs",
        ["id", "kind", "target", "state", "progress", "bytes", "rate", "error"],
        (_job_row(p, j) for p, j in sorted(found.items(), key=lambda pj: pj[1]["Id"])),
    )


# --- pools --------------------------------------------------------------------------------


def pool_create(client: Client, args: argparse.Namespace, out: Output) -> None:
    path = client.call("CreatePool", "ssasb", args.name, args.backend, args.devices, args.force)
    _report_path(out, "created pool", args.name, path)


def pool_extend(client: Client, args: argparse.Namespace, out: Output) -> None:
    path = client.call("ExtendPool", "sasb", args.name, args.devices, args.force)
    _report_path(out, "extended pool", args.name, path)


def pool_remove(client: Client, args: argparse.Namespace, out: Output) -> None:
    client.call("RemovePool", "sbb", args.name, args.force, args.delete_generations)
    _report_path(out, "removed pool", args.name, None)


def pool_import(client: Client, args: argparse.Namespace, out: Output) -> None:
    name = client.call("ImportPool", "as", args.devices)
    _report_path(out, "imported pool", name, None)


def pool_list(client: Client, args: argparse.Namespace, out: Output) -> None:
    found = client.objects(POOL)
    if out.as_json:
        out.json([{"path": p, **v} for p, v in found.items()])
        return
    out.table(
        "Pools",
        ["name", "backend", "state", "capacity", "free", "devices"],
        (
            [
                p["Name"],
                p["Backend"],
                p["State"],
                human_size(p["Capacity"]),
                human_size(p["Free"]),
                " ".join(d[0] for d in p["Devices"]),
            ]
            for p in found.values()
        ),
    )


def pool_drill(client: Client, args: argparse.Namespace, out: Output) -> None:
    """Run a restore drill and show what each restore took and the terms fitted."""
    result = _drill(client, "Drill", args, out)
    if result is None:
        return
    out.table(
        f"Restore drill of pool {args.name}",
        ["shape", "mode", "generations", "extents", "size", "took", "predicted before"],
        (
            [
                s["shape"],
                s["mode"],
                s["generations"],
                s["extents"],
                human_size(s["bytes"]),
                human_seconds(s["seconds"]),
                "-" if s["predicted_seconds"] < 0 else human_seconds(s["predicted_seconds"]),
            ]
            for s in result.get("samples", [])
        ),
    )
    for key, t in sorted(result.get("terms", {}).items()):
        out.line(f"{key}: {_terms_text(t)}")


def _terms_text(t: dict[str, Any]) -> str:
    bandwidth = t.get("bandwidth", 0.0)
    rate = "unlimited" if not bandwidth else f"{human_size(int(bandwidth))}/s"
    return (
        f"fixed {t['fixed_seconds']:.3f}s + {t['seconds_per_generation']:.4f}s per generation "
        f"+ {1000 * t['seconds_per_extent']:.3f}ms per extent, bandwidth {rate} "
        f"({int(t['samples'])} samples, upper x{t['upper_factor']:.2f})"
    )


def _breakdown_text(breakdown: dict[str, float]) -> str:
    return " + ".join(f"{k} {human_seconds(v)}" for k, v in breakdown.items())


def _report_path(out: Output, verb: str, name: str, path: str | None) -> None:
    if out.as_json:
        out.json({"name": name, "path": path})
    else:
        out.line(f"{verb} {name}" + (f" ({path})" if path else ""))


# --- volumes ------------------------------------------------------------------------------


def protect(client: Client, args: argparse.Namespace, out: Output) -> None:
    # One call: the daemon checks the objectives before it creates anything, so a refused
    # objective leaves no volume behind.
    path = client.call(
        "Protect",
        "sstssa{sv}",
        args.device,
        args.name,
        args.chunk_size,
        args.backend,
        args.pool,
        _objectives(args),
    )
    _report_path(out, "protecting", args.name, path)


def unprotect(client: Client, args: argparse.Namespace, out: Output) -> None:
    client.call("Unprotect", "sb", args.name, args.delete_generations)
    verb = "no longer protecting" if args.delete_generations else "detached (generations kept)"
    _report_path(out, verb, args.name, None)


def _objectives(args: argparse.Namespace) -> dict[str, Any]:
    given = {
        "rpo": args.rpo,
        "rto": args.rto,
        "restore_mode": args.restore_mode,
        "generations": args.generations,
        "tz": args.tz,
        "drill": args.drill,
    }
    return {k: variant(v) for k, v in given.items() if v is not None}


def objectives(client: Client, args: argparse.Namespace, out: Output) -> None:
    values = _objectives(args)
    if not values:
        raise CliError(
            "give at least one of --rpo, --rto, --restore-mode, --generations, --tz, --drill "
            '(only those are set; "" clears one)',
            ExitCode.USAGE,
        )
    paths = client.call("SetObjectives", "sa{sv}", args.target, values)
    if out.as_json:
        out.json({"volumes": paths})
    else:
        out.line(f"objectives set for {len(paths)} volume(s)")


def _volume_json(path: str, v: dict[str, Any]) -> dict[str, Any]:
    return {"path": path, **v, "Generations": generations_as_dicts(v["Generations"])}


def volume_list(client: Client, args: argparse.Namespace, out: Output) -> None:
    found = client.objects(VOLUME)
    if out.as_json:
        out.json([_volume_json(p, v) for p, v in found.items()])
        return
    out.table(
        "Volumes",
        ["name", "device", "pool", "tracking", "generations", "next", "next backup"],
        (
            [
                v["Name"],
                v["Device"],
                v["Pool"],
                v["TrackerState"],
                len(v["Generations"]),
                v["NextMethod"],
                human_time(v["NextBackup"]),
            ]
            for v in found.values()
        ),
    )


def volume_show(client: Client, args: argparse.Namespace, out: Output) -> None:
    path, v = _find(client, VOLUME, "volume", args.name)
    if out.as_json:
        out.json(_volume_json(path, v))
        return
    objectives = ", ".join(f"{k}={val}" for k, val in sorted(v["Objectives"].items())) or "-"
    estimates = ", ".join(
        f"{k} {human_seconds(s)}" for k, s in sorted(v["EstimatedRestoreSeconds"].items())
    )
    out.fields(
        [
            ("name", v["Name"]),
            ("device", v["Device"]),
            ("pool", v["Pool"]),
            ("tracking", f"{v['TrackerState']} ({v['Backend']}, chunk {v['ChunkSize']})"),
            ("objectives", objectives),
            ("changed since backup", human_size(v["ChangedBytesSinceBackup"])),
            ("changed since full", human_size(v["ChangedBytesSinceFull"])),
            ("restore estimates", estimates or "-"),
            *_estimate_fields(v.get("RestoreEstimate", {})),
            ("next method", f"{v['NextMethod']}: {'; '.join(v['NextMethodReasons'])}"),
            ("next backup", human_time(v["NextBackup"])),
            ("last drill", drill_text(v.get("LastDrill", {}))),
            ("next drill", human_time(v.get("NextDrill", 0))),
            ("generations", len(v["Generations"])),
            ("object", path),
        ]
    )


def drill_text(drill: dict[str, Any]) -> str:
    """A volume's last restore drill in one line: when, result, measured vs predicted."""
    if not drill:
        return "-"
    when = human_time(int(drill["at"]))
    if drill.get("measured_seconds", -1) < 0:
        return f"{when}: {drill['result']}: {drill.get('problem', '')}"
    rto = drill.get("rto_seconds", 0)
    held = f" against RTO {human_seconds(rto)}" if rto else " (no RTO)"
    text = (
        f"{when}: {drill['result']}, {drill.get('generation', '')} restored in "
        f"{human_seconds(drill['measured_seconds'])} ({drill.get('mode', '')}; predicted "
        f"{human_seconds(drill['predicted_seconds'])}, upper "
        f"{human_seconds(drill['upper_seconds'])}){held}"
    )
    return text + (f": {drill['problem']}" if drill.get("problem") else "")


def volume_drill(client: Client, args: argparse.Namespace, out: Output) -> None:
    """Run a volume's restore drill now; a drill that failed its RTO fails the command."""
    result = _drill(client, "DrillVolume", args, out)
    if result is None:
        return
    out.line(f"restore drill of {args.name}: {drill_text(result)}")
    if result.get("result") != "ok":
        raise CliError(f"the restore drill of {args.name} failed: {result.get('problem')}")


def _estimate_fields(est: dict[str, Any]) -> list[tuple[str, Any]]:
    if not est:
        return []
    return [
        (
            "restore estimate",
            f"{human_seconds(est['seconds'])}, upper {human_seconds(est['upper_seconds'])} "
            f"({est['mode']})",
        ),
        ("restore calibration", est["calibration"]),
        ("restore breakdown", _breakdown_text(est["breakdown"])),
    ]


def generations(client: Client, args: argparse.Namespace, out: Output) -> None:
    gens = generations_as_dicts(client.call("ListGenerations", "s", args.volume))
    if out.as_json:
        out.json(gens)
        return
    out.table(
        f"Generations of {args.volume}",
        ["id", "method", "based on", "created", "size", "state"],
        (
            [
                g["id"],
                g["method"],
                g["parent"] or "-",
                human_time(g["created"]),
                human_size(g["bytes"]),
                g["state"],
            ]
            for g in gens
        ),
    )


def plan(client: Client, args: argparse.Namespace, out: Output) -> None:
    from blockguard.cli.client import plain

    decision = plain(client.call("Plan", "s", args.volume))
    if out.as_json:
        out.json(decision)
        return
    feasible = "" if decision.get("feasible", True) else " (the objectives cannot be met!)"
    out.line(f"The next backup of {args.volume} would be [bold]{decision['method']}[/]{feasible}.")
    for reason in decision.get("reasons", []):
        out.line(f"  because {reason}")
    if "estimated_upper_seconds" in decision:
        out.line(
            f"Restore estimate {human_seconds(decision['estimated_seconds'])}, upper "
            f"{human_seconds(decision['estimated_upper_seconds'])} "
            f"({decision['restore_mode']}; {decision['calibration']})"
        )
        out.line(f"  by term: {_breakdown_text(decision['restore_breakdown'])}")
        if "restore_terms" in decision:
            out.line(f"  terms: {_terms_text(decision['restore_terms'])}")
    estimates = decision.get("estimated_restore_seconds", {})
    uppers = decision.get("upper_restore_seconds", {})
    if estimates:
        out.table(
            "Estimated restore time",
            ["method", "estimate", "upper"],
            (
                [k, human_seconds(s), human_seconds(uppers[k]) if k in uppers else "-"]
                for k, s in sorted(estimates.items())
            ),
        )


# --- long operations ----------------------------------------------------------------------


def backup(client: Client, args: argparse.Namespace, out: Output) -> None:
    finish_job(client, client.call("BackupNow", "s", args.volume), args, out)


def restore(client: Client, args: argparse.Namespace, out: Output) -> None:
    path = client.call(
        "Restore", "ssssb", args.volume, args.generation, args.mode, args.target, args.force
    )
    finish_job(client, path, args, out)


def verify(client: Client, args: argparse.Namespace, out: Output) -> None:
    finish_job(client, client.call("Verify", "s", args.generation), args, out)
