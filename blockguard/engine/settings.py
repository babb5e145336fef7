"""Tunables of the real service, read once from the environment when the daemon starts.

Defaults are what a production daemon wants; tests (and slow or fast hosts) override them:

``BLOCKGUARD_PROBE_SECONDS``
    seconds per probe test when a pool disk is registered (default 1); ``0`` skips the
    probe and uses the unmeasured default entry below.
``BLOCKGUARD_DEFAULT_SPEED``
    bytes/s assumed for every figure of a device that was not measured (default 100 MB/s).
``BLOCKGUARD_SCHEDULER_INTERVAL``
    seconds between two looks of the scheduler (default 30); ``0`` turns it off.
``BLOCKGUARD_MOUNT_ROOT``
    where pool areas are mounted (default ``STATE_DIR/pools``).
``BLOCKGUARD_COW_SIZE``
    bytes of the exception store of a backup's point-in-time copy (dm-snapshot on pool
    space); default 0: a quarter of the volume, at least 4 MiB. Writes to the volume
    during a backup beyond it make the backup fail (the volume is never affected).
``BLOCKGUARD_DRILL_BYTES``
    size of a restore drill's synthetic volume (default 64 MiB; a multiple of 128 KiB).
``BLOCKGUARD_DRILL_AUTO``
    ``1`` (default): drill a pool when it is created or extended and when a volume is
    protected on it; ``0``: only on request (``blockguardctl pool drill``).
``BLOCKGUARD_ALERT_POOL_FREE_PERCENT``
    a pool with less free space than this share of its size raises an alert (default 10).
``BLOCKGUARD_ALERT_FAILED_BACKUPS``
    this many failed backups of a volume in a row raise an alert (default 3).
``BLOCKGUARD_ALERT_RPO_GRACE``
    an RPO counts as missed when the last success is older than RPO * (1 + this)
    (default 0.1: a backup due now needs time to run).
``BLOCKGUARD_ALERT_DIR``
    every executable in it is run with each alert as JSON on stdin (default
    ``/etc/blockguard/alert.d``; see docs/alerts.md).
``BLOCKGUARD_ALERT_HOOK_TIMEOUT``
    seconds an alert hook may run before it is killed (default 30).
``BLOCKGUARD_HEALTH_INTERVAL``
    seconds between two health assessments when nothing happens (default 60; events such
    as a finished or failed backup assess at once); ``0`` turns the periodic look off.
``BLOCKGUARD_RETRY_BASE`` / ``BLOCKGUARD_RETRY_CAP``
    a volume whose scheduled backups fail is retried after BASE seconds, doubled for
    each further failure, at most CAP (defaults 60 and 3600). ``BackupNow`` is not held.
``BLOCKGUARD_METRICS_FILE``
    the Prometheus textfile-collector file written after each assessment (default
    ``/var/lib/prometheus/node-exporter/blockguard.prom``, written only if that directory
    exists; empty: none).
``BLOCKGUARD_TEST_CLOCK_FILE``
    test hook: a file holding seconds added to the health assessment's clock (read at
    each assessment), so a test can age the last backup without waiting.
``BLOCKGUARD_TEST_DRILL_DELAY``
    test hook, a fault: seconds every generation read of a volume's restore drill takes
    more (a slow pool disk as the drill sees it).
``BLOCKGUARD_TEST_BACKUP_DELAY``
    test hook: seconds to sleep after each extent a backup writes (makes a backup slow
    enough to be killed in the middle).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from blockguard.errors import InvalidInput

DEFAULT_ALERT_DIR = Path("/etc/blockguard/alert.d")
DEFAULT_METRICS_FILE = Path("/var/lib/prometheus/node-exporter/blockguard.prom")


def _number(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "")
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InvalidInput(detail=f"{name}={raw!r} is not a number") from None
    if value < 0:
        raise InvalidInput(detail=f"{name}={raw!r} is negative")
    return value


def _path(env: Mapping[str, str], name: str, default: Path | None) -> Path | None:
    """A path setting: unset means ``default``, an empty value means none."""
    if name not in env:
        return default
    return Path(env[name]) if env[name] else None


@dataclass(frozen=True)
class Settings:
    """See the module docstring for what each field means."""

    state_dir: Path
    mount_root: Path
    probe_seconds: float = 1.0
    default_speed: float = 100e6
    scheduler_interval: float = 30.0
    backup_delay: float = 0.0
    cow_size: int = 0
    drill_bytes: int = 64 * 1024 * 1024
    drill_auto: bool = True
    alert_pool_free_percent: float = 10.0
    alert_failed_backups: int = 3
    alert_rpo_grace: float = 0.1
    alert_dir: Path = DEFAULT_ALERT_DIR
    alert_hook_timeout: float = 30.0
    health_interval: float = 60.0
    retry_base: float = 60.0
    retry_cap: float = 3600.0
    metrics_file: Path | None = DEFAULT_METRICS_FILE
    test_clock_file: Path | None = None
    drill_read_delay: float = 0.0

    @classmethod
    def from_env(cls, state_dir: Path, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        state_dir = Path(state_dir)
        speed = _number(env, "BLOCKGUARD_DEFAULT_SPEED", 100e6)
        if speed <= 0:
            raise InvalidInput(detail="BLOCKGUARD_DEFAULT_SPEED must be positive")
        return cls(
            state_dir=state_dir,
            mount_root=Path(env.get("BLOCKGUARD_MOUNT_ROOT") or state_dir / "pools"),
            probe_seconds=_number(env, "BLOCKGUARD_PROBE_SECONDS", 1.0),
            default_speed=speed,
            scheduler_interval=_number(env, "BLOCKGUARD_SCHEDULER_INTERVAL", 30.0),
            backup_delay=_number(env, "BLOCKGUARD_TEST_BACKUP_DELAY", 0.0),
            cow_size=int(_number(env, "BLOCKGUARD_COW_SIZE", 0)),
            drill_bytes=int(_number(env, "BLOCKGUARD_DRILL_BYTES", 64 * 1024 * 1024)),
            drill_auto=bool(_number(env, "BLOCKGUARD_DRILL_AUTO", 1)),
            alert_pool_free_percent=min(
                100.0, _number(env, "BLOCKGUARD_ALERT_POOL_FREE_PERCENT", 10.0)
            ),
            alert_failed_backups=max(1, int(_number(env, "BLOCKGUARD_ALERT_FAILED_BACKUPS", 3))),
            alert_rpo_grace=_number(env, "BLOCKGUARD_ALERT_RPO_GRACE", 0.1),
            alert_dir=Path(env.get("BLOCKGUARD_ALERT_DIR") or DEFAULT_ALERT_DIR),
            alert_hook_timeout=_number(env, "BLOCKGUARD_ALERT_HOOK_TIMEOUT", 30.0) or 30.0,
            health_interval=_number(env, "BLOCKGUARD_HEALTH_INTERVAL", 60.0),
            retry_base=_number(env, "BLOCKGUARD_RETRY_BASE", 60.0),
            retry_cap=_number(env, "BLOCKGUARD_RETRY_CAP", 3600.0),
            metrics_file=_path(env, "BLOCKGUARD_METRICS_FILE", DEFAULT_METRICS_FILE),
            test_clock_file=_path(env, "BLOCKGUARD_TEST_CLOCK_FILE", None),
            drill_read_delay=_number(env, "BLOCKGUARD_TEST_DRILL_DELAY", 0.0),
        )
