"""Metrics in the Prometheus text exposition format, for node_exporter's textfile collector.

A file, not an HTTP endpoint: blockguardd runs as root, and a file keeps it without a
listening socket (no port to secure, no ``PrivateNetwork=`` trade-off); node_exporter,
which admins run anyway, serves it (``--collector.textfile.directory``). The file is
replaced atomically (the collector never reads half of it) after a health assessment that
changed a figure other than an age, and every :data:`REWRITE_AFTER` seconds for the ages
(which move by time alone; ``last_success_timestamp`` gives the exact age at any time):
an idle daemon does not rewrite it every minute. The format is simple enough to write
directly (the project's tests read it back with ``prometheus_client``'s parser).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from blockguard.core.health import Health, Level
from blockguard.storage.manifest import write_atomic

log = logging.getLogger(__name__)

#: Seconds after which the file is rewritten even if only the ages changed.
REWRITE_AFTER = 300.0
#: The families that change by time alone.
AGE_FAMILIES = ("blockguard_volume_rpo_age_seconds",)

Labels = Mapping[str, str]
Sample = tuple[Labels, float]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value != value:  # NaN
        return "NaN"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def family(name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> list[str]:
    """One metric family's lines (HELP, TYPE, one line per sample)."""
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(labels.items()))
        lines.append(f"{name}{{{inner}}} {_number(value)}" if inner else f"{name} {_number(value)}")
    return lines


def render(
    health: Health,
    jobs: Sequence[tuple[str, str]],
    active_alerts: Sequence[Mapping[str, Any]],
) -> str:
    """The whole exposition.

    :param health: the assessment (its volume and pool rows carry the numbers).
    :param jobs: ``(kind, state)`` of every job the catalog records.
    :param active_alerts: the alert records currently raised.
    """
    levels = {lv.label: int(lv) for lv in Level}
    vols = health.volumes
    pools = health.pools

    def per_volume(key: str, *, skip_negative: bool = True) -> list[Sample]:
        return [
            ({"volume": v["name"], "pool": v["pool"]}, float(v[key]))
            for v in vols
            if not (skip_negative and float(v[key]) < 0)
        ]

    out: list[str] = []
    out += family(
        "blockguard_health",
        "gauge",
        "Overall health: 0 ok, 1 warning, 2 critical.",
        [({}, int(health.level))],
    )
    out += family(
        "blockguard_volume_health",
        "gauge",
        "Health of a volume: 0 ok, 1 warning, 2 critical.",
        [({"volume": v["name"], "pool": v["pool"]}, levels[v["level"]]) for v in vols],
    )
    out += family(
        "blockguard_volume_last_success_timestamp_seconds",
        "gauge",
        "Unix time of the point in time of the newest usable generation (0: none).",
        per_volume("last_success", skip_negative=False),
    )
    out += family(
        "blockguard_volume_rpo_age_seconds",
        "gauge",
        "Seconds since the point in time of the newest usable generation.",
        per_volume("rpo_age_seconds"),
    )
    out += family(
        "blockguard_volume_rpo_seconds",
        "gauge",
        "The recovery point objective as an age limit (volumes with a time RPO).",
        per_volume("rpo_seconds"),
    )
    out += family(
        "blockguard_volume_restore_estimate_upper_seconds",
        "gauge",
        "Upper estimate of the restore time.",
        per_volume("estimate_upper_seconds"),
    )
    out += family(
        "blockguard_volume_rto_seconds",
        "gauge",
        "The recovery time objective (volumes with an RTO).",
        per_volume("rto_seconds"),
    )
    out += family(
        "blockguard_volume_generations",
        "gauge",
        "Generations the pool holds for the volume.",
        per_volume("generations", skip_negative=False),
    )
    out += family(
        "blockguard_volume_stored_bytes",
        "gauge",
        "Bytes stored for the volume's generations.",
        per_volume("bytes_stored", skip_negative=False),
    )
    out += family(
        "blockguard_volume_backup_failures_in_row",
        "gauge",
        "Failed backups since the volume's last successful one.",
        per_volume("failures_in_row", skip_negative=False),
    )
    out += family(
        "blockguard_pool_size_bytes",
        "gauge",
        "Size of a pool.",
        [({"pool": p["name"]}, float(p["size_bytes"])) for p in pools],
    )
    out += family(
        "blockguard_pool_free_bytes",
        "gauge",
        "Free space of a pool.",
        [({"pool": p["name"]}, float(p["free_bytes"])) for p in pools],
    )
    counts = Counter(jobs)
    kinds = sorted({k for k, _ in jobs})
    out += family(
        "blockguard_jobs",
        "gauge",
        "Jobs the catalog records, by kind and final or current state.",
        [({"kind": k, "state": s}, n) for (k, s), n in sorted(counts.items())],
    )
    out += family(
        "blockguard_job_failures",
        "gauge",
        "Failed jobs the catalog records, by kind.",
        [({"kind": k}, counts.get((k, "failed"), 0)) for k in kinds],
    )
    out += family(
        "blockguard_alert_active",
        "gauge",
        "1 for each alert raised and not yet resolved.",
        [
            ({"kind": str(a["kind"]), "subject": str(a["subject"])}, 1)
            for a in sorted(active_alerts, key=lambda a: (a["kind"], a["subject"]))
        ],
    )
    return "\n".join(out) + "\n"


def write(path: Path | None, text: str) -> bool:
    """Replace the metrics file atomically; nothing if no path is set or its directory
    does not exist (node_exporter is not installed). Returns whether it was written."""
    if path is None or not path.parent.is_dir():
        return False
    try:
        write_atomic(path, text.encode())
    except OSError as exc:
        log.error("cannot write the metrics file %s: %s", path, exc)
        return False
    # node_exporter runs as its own user: the file must be readable by it.
    try:
        path.chmod(0o644)
    except OSError as exc:
        log.warning("cannot make %s readable: %s", path, exc)
    return True


def steady(text: str) -> str:
    """``text`` without the sample lines of :data:`AGE_FAMILIES` (what an assessment
    changes other than by time passing)."""
    return "\n".join(line for line in text.splitlines() if not line.startswith(AGE_FAMILIES))


def rewrite_due(text: str, last: tuple[str, float] | None, now: float) -> bool:
    """Whether the file should be rewritten with ``text``.

    :param last: the steady part (:func:`steady`) and time of the last write, if any.
    :param now: the time (any clock, the same as ``last``'s).
    """
    return last is None or last[0] != steady(text) or now - last[1] >= REWRITE_AFTER
