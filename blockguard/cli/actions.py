"""The actions of blockguardctl: each is a few lines over :class:`~blockguard.cli.client.Client`.

Every action gets the client, the parsed arguments and an :class:`Output`, and either prints
a human table (rich) or, with ``--json``, one JSON document on stdout. rich's progress bars
and spinners are imported only when they are drawn (on a terminal).
"""

from __future__ import annotations

from blockguard.cli import shapes
from blockguard.cli.client import JOB, POOL, VOLUME, Client, RemoteError, plain, variant
from blockguard.cli.errors import CliError
from blockguard.cli.output import Column, Output, drill_text, human_seconds, text
from blockguard.core.vocab import (
    DEFAULT_GENERATIONS,
    RETENTION_TIERS,
    format_ago,
    format_duration,
    format_rate,
    format_size,
)
from blockguard.errors import ExitCode

TYPE_CHECKING = False  # not imported to run: argparse is a fifth of a call (issue 16)
if TYPE_CHECKING:
    import argparse
    from typing import Any

__all__ = ["Output", "drill_text", "human_seconds"]

JOB_PATH = "/org/blockguard1/job/"


def _find(client: Client, interface: str, what: str, name: str) -> tuple[str, dict[str, Any]]:
    for path, props in client.objects(interface).items():
        if props.get("Name") == name:
            return path, props
    listing = "pool list" if interface == POOL else "volume list"
    raise CliError(
        f"{what} {name} does not exist; blockguardctl {listing} shows them", ExitCode.NOT_FOUND
    )


# --- jobs ---------------------------------------------------------------------------------


def _job_row(job: dict[str, Any]) -> list[Any]:
    error = job.get("Error") or ["", ""]
    return [
        job["Id"],
        job["Kind"],
        job["Target"],
        job["State"],
        f"{job['Progress'] * 100:.0f}%",
        format_size(job["BytesDone"]),
        format_rate(job["Rate"]) if job["Rate"] else "-",
        format_ago(job.get("Started", 0)),
        error[1] or "",
    ]


JOB_COLUMNS = (
    Column("id", keep=True),
    Column("kind"),
    Column("target", keep=True),
    Column("state"),
    Column("progress", drop=3),
    Column("bytes", drop=2),
    Column("rate", drop=1),
    Column("started", drop=4),
    Column("error", drop=5),
)


def _job_id(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def finish_job(client: Client, path: str, args: argparse.Namespace, out: Output) -> None:
    """Wait for a job (with a progress bar) unless ``--no-wait``; fail if the job failed.

    Ctrl-C stops the waiting, not the job: it says so, and how to follow it, and exits 130.
    """
    job_id = _job_id(path)
    if getattr(args, "no_wait", False):
        if out.as_json:
            out.json({"job": {"id": int(job_id), "path": path}})
        else:
            out.line(f"started job {job_id}; blockguardctl jobs wait {job_id} follows it")
        return
    try:
        job = _wait_with_bar(client, path, out)
    except KeyboardInterrupt:
        raise CliError(
            f"stopped waiting; job {job_id} goes on in the daemon: "
            f"blockguardctl jobs wait {job_id} follows it, blockguardctl jobs lists it",
            ExitCode.INTERRUPTED,
        ) from None
    if out.as_json:
        out.json({"job": shapes.job(path, job)})
    if job["State"] == "failed":
        name, message = job["Error"]
        raise RemoteError(name, message)
    if not out.as_json:
        out.line(_result_line(job))


def _wait_with_bar(client: Client, path: str, out: Output) -> dict[str, Any]:
    if not out.err_is_terminal:
        return client.wait_job(path)
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        # Sizes and rates in the vocabulary's units, like every other line.
        TextColumn("{task.fields[done]}"),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=out.err,
        transient=True,
    ) as progress:
        task = progress.add_task(f"job {_job_id(path)}", total=None, done="", rate="")

        def show(job: dict[str, Any]) -> None:
            total = job.get("BytesTotal") or 0
            done = format_size(job["BytesDone"])
            progress.update(
                task,
                total=total or None,
                completed=job["BytesDone"] if total else 0,
                description=f"{job['Kind']} {job['Target']}",
                done=f"{done} of {format_size(total)}" if total else done,
                rate=format_rate(job["Rate"]) if job.get("Rate") else "",
            )

        return client.wait_job(path, on_progress=show)


def _result_line(job: dict[str, Any]) -> str:
    """``backup of db done: full db@3 (db@2026...), 32.0 MiB in 2.1s`` — every value
    formatted for a person; warnings on lines of their own."""
    result = plain(job.get("Result", {}))
    parts = []
    what = " ".join(str(result[k]) for k in ("method", "mode") if result.get(k))
    generation = result.get("generation", "")
    if generation and result.get("number"):
        generation = f"{generation.partition('@')[0]}@{result['number']} ({generation})"
    if what or generation:
        parts.append(f"{what} {generation}".strip())
    if "bytes" in result:
        took = f" in {format_duration(result['seconds'])}" if "seconds" in result else ""
        parts.append(f"{format_size(result['bytes'])}{took}")
    if result.get("target"):
        parts.append(f"onto {result['target']}")
    if result.get("from_target"):
        parts.append(f"from target {result['from_target']}")
    if result.get("predicted_seconds") is not None and result.get("from_target"):
        parts.append(f"estimated {format_duration(result['predicted_seconds'])}")
    if result.get("estimated_seconds") is not None and result.get("group"):
        parts.append(f"estimated {format_duration(result['estimated_seconds'])}")
    if result.get("to_target"):
        parts.append(f"to target {result['to_target']}")
    if result.get("up_to_date"):
        parts.append("the newest generation is there already")
    if "ok" in result:
        parts.append(f"ok {text(result['ok'])}")
    if result.get("freed"):
        parts.append(f"retention removed {text(result['freed'])}")
    if "gc_marked" in result:
        parts.append(
            f"swept: {result['gc_marked']} pack(s) marked, {result['gc_deleted']} deleted, "
            f"{result['gc_spared']} spared"
        )
        if result.get("gc_held"):
            parts.append(
                f"{result['gc_held']} mark(s) held back by {result['gc_leases']} running backup(s)"
            )
        for lease in result.get("gc_expired_leases", []) or []:
            parts.append(f"expired lease removed: {text(lease)}")
    if job["Kind"] == "target":
        swept = "gc_marked" in result
        done = (
            f"sweep of target {job['Target']} done"
            if swept
            else f"target {job['Target']} registered"
        )
    else:
        done = f"{job['Kind']} of {job['Target']} done"
    line = done + (f": {', '.join(parts)}" if parts else "")
    for warning in result.get("warnings", []) or []:
        line += f"\nwarning: {warning}"
    for note in result.get("notes", []) or []:
        line += f"\nnote: {note}"
    if result.get("mode") == "swap-in" and result.get("target"):
        line += (
            f"\nservice can resume on {result['target']}; once it moved off it again: "
            f"blockguardctl restore --release {result['target']}"
        )
    return line


def jobs(client: Client, args: argparse.Namespace, out: Output) -> None:
    found = client.objects(JOB)
    ordered = sorted(found.items(), key=lambda pj: pj[1]["Id"])
    if out.as_json:
        out.json({"jobs": [shapes.job(p, j) for p, j in ordered]})
        return
    out.table("Jobs", JOB_COLUMNS, (_job_row(j) for _, j in ordered))


def jobs_wait(client: Client, args: argparse.Namespace, out: Output) -> None:
    """Follow a job started earlier (``--no-wait``, another terminal, the scheduler)."""
    finish_job(client, f"{JOB_PATH}{args.id}", args, out)


def jobs_cancel(client: Client, args: argparse.Namespace, out: Output) -> None:
    """Cancel a job and (unless ``--no-wait``) wait until it stopped."""
    client.call("CancelJob", "t", args.id)
    path = f"{JOB_PATH}{args.id}"
    job = client.properties(path, JOB) if args.no_wait else client.wait_job(path)
    if out.as_json:
        out.json({"job": shapes.job(path, job)})
    elif job["State"] == "done":
        out.line(f"job {args.id} ended before it could stop: {_result_line(job)}")
    elif job["State"] == "failed":
        out.line(job["Error"][1])
    else:
        out.line(f"job {args.id} is stopping")


# --- pools --------------------------------------------------------------------------------


def _probing(out: Output, message: str) -> Any:
    """A spinner on stderr while the daemon probes disks (a call of many seconds)."""
    import contextlib

    if out.as_json or not out.err_is_terminal:
        return contextlib.nullcontext()
    return out.err.status(message)


def pool_create(client: Client, args: argparse.Namespace, out: Output) -> None:
    disks = ", ".join(args.devices)
    with _probing(out, f"creating pool {args.name}: checking and probing the speed of {disks}"):
        path = client.call("CreatePool", "ssasb", args.name, args.backend, args.devices, args.force)
    _report_path(out, "created pool", args.name, path)


def pool_extend(client: Client, args: argparse.Namespace, out: Output) -> None:
    disks = ", ".join(args.devices)
    with _probing(out, f"extending pool {args.name}: probing the speed of {disks}"):
        path = client.call("ExtendPool", "sasb", args.name, args.devices, args.force)
    _report_path(out, "extended pool", args.name, path)


def pool_remove(client: Client, args: argparse.Namespace, out: Output) -> None:
    client.call("RemovePool", "sbb", args.name, args.force, args.delete_generations)
    _report_path(out, "removed pool", args.name, None)


def pool_import(client: Client, args: argparse.Namespace, out: Output) -> None:
    name = client.call("ImportPool", "as", args.devices)
    _report_path(out, "imported pool", name, None)


def _metadata_free(p: dict[str, Any]) -> str:
    """The thin pool's free metadata and its share ("-" for a pool without one)."""
    size = p.get("MetadataSize", 0)
    if not size:
        return "-"
    return f"{format_size(p['MetadataFree'])} ({100 * p['MetadataFree'] / size:.0f}%)"


def pool_list(client: Client, args: argparse.Namespace, out: Output) -> None:
    found = client.objects(POOL)
    if out.as_json:
        out.json({"pools": [shapes.pool(p, v) for p, v in found.items()]})
        return
    out.table(
        "Pools",
        (
            Column("name", keep=True),
            Column("backend", drop=2),
            Column("state"),
            Column("capacity", drop=3),
            Column("free"),
            Column("metadata free", drop=4),
            Column("devices", drop=1),
        ),
        (
            [
                p["Name"],
                p["Backend"],
                p["State"],
                format_size(p["Capacity"]),
                format_size(p["Free"]),
                _metadata_free(p),
                " ".join(d[0] for d in p["Devices"]),
            ]
            for p in found.values()
        ),
    )


def _wait_drill(
    client: Client, method: str, args: argparse.Namespace, out: Output
) -> dict[str, Any] | None:
    """Start a drill (``method`` of ``args.name``) and wait for its result; with
    ``--no-wait`` or ``--json`` the job is reported as any job is and None returned."""
    path = client.call(method, "s", args.name)
    if args.no_wait or out.as_json:
        finish_job(client, path, args, out)
        return None
    job = plain(client.wait_job(path))
    if job["State"] == "failed":
        name, message = job["Error"]
        raise RemoteError(name, message)
    return job.get("Result", {})


def pool_drill(client: Client, args: argparse.Namespace, out: Output) -> None:
    """Run a restore drill and show what each restore took and the terms fitted."""
    result = _wait_drill(client, "Drill", args, out)
    if result is None:
        return
    out.table(
        f"Restore drill of pool {args.name}",
        [
            Column("shape"),
            Column("mode"),
            Column("generations"),
            Column("extents"),
            Column("size"),
            Column("took"),
            Column("predicted before"),
        ],
        (
            [
                s["shape"],
                s["mode"],
                s["generations"],
                s["extents"],
                format_size(s["bytes"]),
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
    rate = "unlimited" if not bandwidth else f"{format_rate(int(bandwidth))}"
    return (
        f"fixed {t['fixed_seconds']:.3f}s + {t['seconds_per_generation']:.4f}s per generation "
        f"+ {1000 * t['seconds_per_extent']:.3f}ms per extent, bandwidth {rate} "
        f"({int(t['samples'])} samples, upper x{t['upper_factor']:.2f})"
    )


def _breakdown_text(breakdown: dict[str, float]) -> str:
    return " + ".join(f"{k} {human_seconds(v)}" for k, v in breakdown.items())


def _report_path(out: Output, verb: str, name: str, path: str | None) -> None:
    if out.as_json:
        out.json({"name": name, "path": path or None})
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
        "keep_hourly": args.keep_hourly,
        "keep_daily": args.keep_daily,
        "keep_weekly": args.keep_weekly,
        "keep_monthly": args.keep_monthly,
        "tz": args.tz,
        "drill": args.drill,
        # Only `objectives` has them (`protect` names no target).
        **{
            key: getattr(args, key, None)
            for key in ("remote_target", "remote_rpo", "remote_rto", "remote_generations")
        },
    }
    return {k: variant(v) for k, v in given.items() if v is not None}


def objectives(client: Client, args: argparse.Namespace, out: Output) -> None:
    values = _objectives(args)
    if not values:
        raise CliError(
            "give at least one of --rpo, --rto, --restore-mode, --generations (--keep-last), "
            "--keep-hourly, --keep-daily, --keep-weekly, --keep-monthly, --tz, --drill, "
            "--target, --remote-rpo, --remote-rto, --remote-generations "
            '(only those are set; "" clears one)',
            ExitCode.USAGE,
        )
    paths = client.call("SetObjectives", "sa{sv}", args.target, values)
    if out.as_json:
        out.json({"volumes": paths})
    else:
        out.line(f"objectives set for {len(paths)} volume(s)")


def volume_list(client: Client, args: argparse.Namespace, out: Output) -> None:
    found = client.objects(VOLUME)
    if out.as_json:
        out.json({"volumes": [shapes.volume(p, v) for p, v in found.items()]})
        return
    out.table(
        "Volumes",
        (
            Column("name", keep=True),
            Column("device", drop=2),
            Column("pool", drop=4),
            Column("tracking", drop=3),
            Column("generations"),
            Column("latest", keep=True),
            Column("next"),
            Column("next backup", drop=1),
        ),
        (
            [
                v["Name"],
                v["Device"],
                v["Pool"],
                v["TrackerState"],
                len(v["Generations"]),
                _latest(v["Generations"]),
                v["NextMethod"],
                format_ago(v["NextBackup"]),
            ]
            for v in found.values()
        ),
    )


def _latest(structs: list[Any]) -> str:
    gens = shapes.generations(structs)
    if not gens:
        return "-"
    newest = max(gens, key=lambda g: (g["created"], g["id"]))
    return f"{newest['short_id'] or newest['id']} ({format_ago(newest['created'])})"


def volume_show(client: Client, args: argparse.Namespace, out: Output) -> None:
    path, v = _find(client, VOLUME, "volume", args.name)
    if out.as_json:
        out.json({"volume": shapes.volume(path, v)})
        return
    estimates = ", ".join(
        f"{k} {human_seconds(s)}" for k, s in sorted(v["EstimatedRestoreSeconds"].items())
    )
    out.fields(
        [
            ("name", v["Name"]),
            ("device", v["Device"]),
            ("pool", v["Pool"]),
            ("tracking", f"{v['TrackerState']} ({v['Backend']}, chunk {v['ChunkSize']})"),
            ("objectives", dict(sorted(v["Objectives"].items()))),
            ("retention", retention_text(v["Objectives"])),
            *_restore_mode_field(v.get("RestoreEstimate", {})),
            ("changed since backup", format_size(v["ChangedBytesSinceBackup"])),
            ("changed since full", format_size(v["ChangedBytesSinceFull"])),
            ("restore estimates", estimates),
            *_estimate_fields(v.get("RestoreEstimate", {})),
            ("next method", f"{v['NextMethod']}: {'; '.join(v['NextMethodReasons'])}"),
            ("next backup", format_ago(v["NextBackup"])),
            ("last drill", drill_text(v.get("LastDrill", {}))),
            ("next drill", format_ago(v.get("NextDrill", 0))),
            ("generations", len(v["Generations"])),
            ("latest", _latest(v["Generations"])),
            ("object", path),
        ]
    )


def retention_text(objectives: dict[str, Any]) -> str:
    """The retention a volume's objectives ask for, as ``Plan`` words it:
    ``last 7, daily 7, weekly 4 (local time)`` (``last 7`` alone without tiers)."""
    parts = [f"last {objectives.get('generations') or DEFAULT_GENERATIONS}"]
    parts += [
        f"{tier} {objectives[f'keep_{tier}']}"
        for tier in RETENTION_TIERS
        if objectives.get(f"keep_{tier}")
    ]
    if len(parts) == 1:
        return parts[0]
    return f"{', '.join(parts)} ({objectives.get('tz') or 'local time'})"


def _retention_line(retention: dict[str, Any]) -> str:
    """``Retention: last 7, daily 7 (local time): keeps 9 generations (db@3 needed by ...)``."""
    kept = retention.get("kept", [])
    line = f"Retention: {retention['policy']}: keeps {len(kept)} generation(s)"
    doomed = retention.get("would_delete", [])
    if doomed:
        line += f"; would delete {len(doomed)} now (at the next backup)"
    return line


def volume_drill(client: Client, args: argparse.Namespace, out: Output) -> None:
    """Run a volume's restore drill now; a drill that failed its RTO fails the command."""
    result = _wait_drill(client, "DrillVolume", args, out)
    if result is None:
        return
    out.line(f"restore drill of {args.name}: {drill_text(result)}")
    if result.get("result") != "ok":
        raise CliError(f"the restore drill of {args.name} failed: {result.get('problem')}")


def _restore_mode_field(est: dict[str, Any]) -> list[tuple[str, Any]]:
    """The restore a volume gets without --mode, which its RTO and estimates are for."""
    if not est.get("mode"):
        return []
    return [("restore mode", f"{est['mode']} (without --mode; the RTO refers to it)")]


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
        *(
            [("copy target writes", est["copy_target"].get("source", "?"))]
            if est["mode"] == "copy" and isinstance(est.get("copy_target"), dict)
            else []
        ),
    ]


def generations(client: Client, args: argparse.Namespace, out: Output) -> None:
    gens = shapes.generations(client.call("ListGenerations", "s", args.volume))
    if out.as_json:
        out.json({"volume": args.volume, "generations": gens})
        return
    numbers = {g["id"]: g["short_id"] for g in gens}
    out.table(
        f"Generations of {args.volume}",
        (
            Column("#", keep=True),
            Column("id", keep=True),
            Column("method"),
            Column("based on", drop=1),
            Column("created", drop=2),
            Column("size"),
            Column("state"),
        ),
        (
            [
                g["number"] or "-",
                g["id"],
                g["method"],
                numbers.get(g["parent"]) or g["parent"] or "-",
                format_ago(g["created"]),
                format_size(g["bytes"]),
                g["state"],
            ]
            for g in gens
        ),
    )


def _remote_plan_lines(volume: str, remote: dict[str, Any], out: Output) -> None:
    """The remote copy's part of `plan`: what the next transfer would send, and why."""
    target = remote.get("target", "?")
    if remote.get("problem"):
        out.line(f"Copy to target {target}: {remote['problem']}")
        return
    if remote.get("up_to_date"):
        out.line(f"Copy to target {target}: up to date ({remote.get('objectives', '')})")
        return
    feasible = "" if remote.get("feasible", True) else " (the remote RTO cannot be met!)"
    out.line(
        f"The next transfer of {volume} to target {target} would be "
        f"[bold]{remote['method']}[/]{feasible}, of {remote.get('source', '?')}.",
        markup=True,
    )
    for reason in remote.get("reasons", []):
        out.line(f"  because {reason}")
    measured = "" if remote.get("link_measured", True) else " (link not measured: default speed)"
    out.line(
        f"  restore estimate from the target {human_seconds(remote['estimated_seconds'])}, "
        f"upper {human_seconds(remote['estimated_upper_seconds'])}{measured}"
    )


def plan(client: Client, args: argparse.Namespace, out: Output) -> None:
    decision = plain(client.call("Plan", "s", args.volume))
    if out.as_json:
        out.json({"volume": args.volume, "plan": decision})
        return
    feasible = "" if decision.get("feasible", True) else " (the objectives cannot be met!)"
    out.line(
        f"The next backup of {args.volume} would be [bold]{decision['method']}[/]{feasible}.",
        markup=True,
    )
    for reason in decision.get("reasons", []):
        out.line(f"  because {reason}")
    if "estimated_upper_seconds" in decision:
        out.line(
            f"Restore estimate {human_seconds(decision['estimated_seconds'])}, upper "
            f"{human_seconds(decision['estimated_upper_seconds'])} "
            f"({decision['restore_mode']}; {decision['calibration']})"
        )
        out.line(
            f"  for a {decision['restore_mode']} restore: what `restore {args.volume}` does "
            "without --mode, and what the RTO is held against"
        )
        out.line(f"  by term: {_breakdown_text(decision['restore_breakdown'])}")
        if "restore_terms" in decision:
            out.line(f"  terms: {_terms_text(decision['restore_terms'])}")
        copy_target = decision.get("copy_target")
        if decision["restore_mode"] == "copy" and isinstance(copy_target, dict):
            out.line(f"  copy target writes: {copy_target.get('source', '?')}")
    remote = decision.get("remote")
    if isinstance(remote, dict):
        _remote_plan_lines(args.volume, remote, out)
    retention = decision.get("retention")
    if retention:
        out.line(_retention_line(retention))
        out.table(
            "Kept by retention",
            [Column("generation", keep=True), Column("why")],
            (
                [
                    f"{args.volume}@{k['number']}" if k.get("number") else k["generation"],
                    ", ".join(k["reasons"]),
                ]
                for k in retention.get("kept", [])
            ),
        )
    estimates = decision.get("estimated_restore_seconds", {})
    uppers = decision.get("upper_restore_seconds", {})
    if estimates:
        out.table(
            "Estimated restore time",
            [Column("method"), Column("estimate"), Column("upper")],
            (
                [k, human_seconds(s), human_seconds(uppers[k]) if k in uppers else "-"]
                for k, s in sorted(estimates.items())
            ),
        )


# --- long operations ----------------------------------------------------------------------


def backup(client: Client, args: argparse.Namespace, out: Output) -> None:
    if args.full:
        path = client.call("BackupNowWithOptions", "sa{sv}", args.volume, {"full": variant(True)})
    else:
        path = client.call("BackupNow", "s", args.volume)
    finish_job(client, path, args, out)


def transfer(client: Client, args: argparse.Namespace, out: Output) -> None:
    finish_job(client, client.call("TransferNow", "s", args.volume), args, out)


def restore(client: Client, args: argparse.Namespace, out: Output) -> None:
    if args.swap_ins or args.release:
        if args.volume or (args.swap_ins and args.release):
            raise CliError("give --swap-ins or --release alone", ExitCode.USAGE)
        (swap_ins if args.swap_ins else release_swap_in)(client, args, out)
        return
    if not args.volume:
        raise CliError("give the volume (or VOLUME@GENERATION) to restore", ExitCode.USAGE)
    # "restore db@2" names the volume and the generation at once.
    volume, at, _ = args.volume.partition("@")
    if at and args.generation:
        raise CliError(
            f"{args.volume} already names a generation; leave out --generation", ExitCode.USAGE
        )
    if args.from_target:
        if args.mode == "swap-in":
            raise CliError(
                "a restore from a target is a copy: give no --mode swap-in", ExitCode.USAGE
            )
        path = client.call(
            "RestoreFromTarget",
            "ssssb",
            volume,
            args.volume if at else args.generation,
            args.from_target,
            args.target,
            args.force,
        )
        finish_job(client, path, args, out)
        return
    path = client.call(
        "Restore",
        "ssssb",
        volume,
        args.volume if at else args.generation,
        args.mode,
        args.target,
        args.force,
    )
    finish_job(client, path, args, out)


def swap_ins(client: Client, args: argparse.Namespace, out: Output) -> None:
    found = [
        {"pool": pool, "name": name, "device": device or None}
        for pool, name, device in client.call("ListSwapIns")
    ]
    if out.as_json:
        out.json({"swap_ins": found})
        return
    out.table(
        "Swap-ins",
        (Column("device", keep=True), Column("pool"), Column("name", keep=True)),
        ([s["device"] or "(detached)", s["pool"], s["name"]] for s in found),
    )


def release_swap_in(client: Client, args: argparse.Namespace, out: Output) -> None:
    client.call("ReleaseSwapIn", "s", args.release)
    if out.as_json:
        out.json({"released": args.release})
    else:
        out.line(f"released swap-in {args.release}")


def verify(client: Client, args: argparse.Namespace, out: Output) -> None:
    finish_job(client, client.call("Verify", "s", args.generation), args, out)
