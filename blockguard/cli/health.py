"""``blockguardctl status``: the daemon's health, per volume and pool; ``--check`` for
monitoring.

``status --check`` exits with the monitoring-plugin convention (Nagios, Icinga, and
systemd ``ExecCondition`` scripts read it the same way):

- 0 OK: every objective is met, nothing needs attention;
- 1 WARNING: something will go wrong if nobody acts (pool space below the threshold,
  backups failing in a row, change tracking lost, a degraded pool);
- 2 CRITICAL: an objective is missed (RPO age past the RPO, restore estimate past the
  RTO, or the planner cannot meet the objectives);
- 3 UNKNOWN: the daemon could not be asked (not running, bus unreachable, refused).

Its first line is ``BLOCKGUARD <LEVEL>: <reasons>``. These codes differ from the other
commands' (:class:`~blockguard.errors.ExitCode`) only with ``--check``.
"""

from __future__ import annotations

import sys
import time

from blockguard.cli.client import RemoteError, plain
from blockguard.cli.output import Column, Output, drill_text, human_seconds
from blockguard.core.formats import format_ago, format_size

TYPE_CHECKING = False  # typing is not imported to run (issue 16)
if TYPE_CHECKING:
    import argparse
    from typing import Any

    from blockguard.cli.client import Client


class CheckCode:
    """Exit codes of ``status --check`` (see the module docstring): plain numbers, not an
    IntEnum (enum is 2 ms of the start-up of a command made for monitoring, issue 16)."""

    OK = 0
    WARNING = 1
    CRITICAL = 2
    UNKNOWN = 3
    ALL = (OK, WARNING, CRITICAL, UNKNOWN)


def _ago(unix: float, now: float) -> str:
    if not unix:
        return "never"
    return format_ago(min(unix, now), now)


def _seconds(value: float) -> str:
    return "-" if value is None or value < 0 else human_seconds(value)


def _versus(value: float, limit: float) -> str:
    """``"4m / 15m"``: a measured figure against its objective."""
    if limit is None or limit < 0:
        return _seconds(value)
    return f"{_seconds(value)} / {human_seconds(limit)}"


#: Why a daemon (or a bus policy) older than GetStatusAndHealth refuses it.
_OLDER = ("org.freedesktop.DBus.Error.UnknownMethod", "org.freedesktop.DBus.Error.AccessDenied")


def _fetch(client: Client) -> tuple[dict[str, Any], dict[str, Any]]:
    """The status and the health, in one call (issue 16) or, from an older daemon, two."""
    try:
        both = plain(client.call("GetStatusAndHealth"))
        return both["status"], both["health"]
    except RemoteError as exc:
        if exc.name not in _OLDER:
            raise
    health = plain(client.call("GetHealth"))
    # After GetHealth: the summary then tells the level just assessed.
    return plain(client.call("GetStatus")), health


def _headline(health: dict[str, Any]) -> str:
    level = str(health.get("level", "unknown")).upper()
    reasons = [str(a["message"]) for a in health.get("alerts", [])]
    return f"BLOCKGUARD {level}: " + ("; ".join(reasons) if reasons else "all objectives met")


def _headline_out(line: str) -> None:
    """The first line for monitoring: one line whatever the terminal's width."""
    sys.stdout.write(" ".join(line.split()) + "\n")
    sys.stdout.flush()


def _show(out: Output, summary: dict[str, Any], health: dict[str, Any]) -> None:
    # The assessment's own clock, so "ago" and the RPO age agree.
    now = float(health.get("time") or time.time())
    out.line(str(summary.get("summary", "")))
    volumes = health.get("volumes", [])
    if volumes:
        out.table(
            "Volumes",
            [
                Column("volume", keep=True),
                Column("health"),
                Column("last success"),
                Column("RPO age / objective"),
                Column("restore / RTO"),
                Column("pool", drop=1),
            ],
            (
                [
                    v["name"],
                    v["level"],
                    _ago(v["last_success"], now),
                    _versus(v["rpo_age_seconds"], v["rpo_seconds"]),
                    _versus(v["estimate_upper_seconds"], v["rto_seconds"]),
                    v["pool"],
                ]
                for v in volumes
            ),
        )
    pools = health.get("pools", [])
    if pools:
        out.table(
            "Pools",
            [
                Column("pool", keep=True),
                Column("health"),
                Column("state"),
                Column("free"),
                Column("size"),
                Column("metadata free", drop=1),
            ],
            (
                [
                    p["name"],
                    p["level"],
                    p["state"],
                    f"{format_size(p['free_bytes'])} "
                    f"({100 * p['free_bytes'] / p['size_bytes']:.0f}%)"
                    if p["size_bytes"]
                    else "-",
                    format_size(p["size_bytes"]),
                    f"{format_size(p['metadata_free_bytes'])} "
                    f"({100 * p['metadata_free_bytes'] / p['metadata_size_bytes']:.0f}%)"
                    if p.get("metadata_size_bytes")
                    else "-",
                ]
                for p in pools
            ),
        )
    for name, drill in sorted(summary.get("drills", {}).items()):
        out.line(f"{name}: last restore drill {drill_text(drill)}")
    for alert in health.get("alerts", []):
        out.line(f"{alert['severity']}: {alert['message']}")


def status(client: Client, args: argparse.Namespace, out: Output) -> None:
    """Show the health; with ``--check`` exit with a :class:`CheckCode`."""
    if not getattr(args, "check", False):
        summary, health = _fetch(client)
        if out.as_json:
            out.json({**summary, "health": health})
        else:
            _show(out, summary, health)
        return
    try:
        summary, health = _fetch(client)
    except Exception as exc:
        from blockguard.cli.errors import explain

        message, _ = explain(exc)
        if out.as_json:
            out.json({"level": "unknown", "code": CheckCode.UNKNOWN, "message": message})
        else:
            _headline_out(f"BLOCKGUARD UNKNOWN: {message}")
        raise SystemExit(CheckCode.UNKNOWN) from None
    code = int(health.get("code", CheckCode.UNKNOWN))
    if code not in CheckCode.ALL:
        raise ValueError(f"{code} is not a valid CheckCode")
    if out.as_json:
        out.json({**summary, "health": health})
    else:
        _headline_out(_headline(health))
        _show(out, summary, health)
    raise SystemExit(code)
