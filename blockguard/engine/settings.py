"""Tunables of the real service, read once when the daemon starts.

Each field of :class:`Settings` (except ``state_dir``, a command-line option) can be set in
the configuration file ``/etc/blockguard/blockguard.toml`` (``BLOCKGUARD_CONFIG`` or
``blockguardd --config`` name another) under its own name, and in the environment as
``BLOCKGUARD_<NAME>``; the environment wins over the file, the file over the defaults. A
key the file does not know is an error naming the key, so a typo never goes unnoticed.
docs/configuration.md documents every key. Defaults are what a production daemon wants;
tests (and slow or fast hosts) override them:

``probe_seconds`` (``BLOCKGUARD_PROBE_SECONDS``)
    seconds per probe test when a pool disk is registered (default 1); ``0`` skips the
    probe and uses the unmeasured default entry below.
``default_speed`` (``BLOCKGUARD_DEFAULT_SPEED``)
    bytes/s assumed for every figure of a device that was not measured (default 100 MB/s),
    and for a copy restore's target writes until a drill of the pool measured its scratch.
``scheduler_interval`` (``BLOCKGUARD_SCHEDULER_INTERVAL``)
    the shortest time between two looks at one volume whose objectives need looks
    (default 30); ``0`` turns the scheduler off. A volume is looked at (its tracker and pool
    read) only when its objectives need it: never without objectives or drills, at the due
    time of an interval or daily RPO, and for an amount of changed data (or an RTO without
    RPO) at a rate that fits the amount left and the volume's recent change rate.
``scheduler_max_interval`` (``BLOCKGUARD_SCHEDULER_MAX_INTERVAL``)
    the longest time between two looks at a volume whose backup an amount of changed data
    makes due (default 300): a volume that stopped changing is looked at this often.
``mount_root`` (``BLOCKGUARD_MOUNT_ROOT``)
    where pool areas are mounted (default ``STATE_DIR/pools``).
``cow_size`` (``BLOCKGUARD_COW_SIZE``)
    bytes of the exception store of a backup's point-in-time copy (dm-snapshot on pool
    space); default 0: a quarter of the volume, at least 4 MiB. Writes to the volume
    during a backup beyond it make the backup fail (the volume is never affected).
``drill_bytes`` (``BLOCKGUARD_DRILL_BYTES``)
    size of a restore drill's synthetic volume (default 64 MiB; a multiple of 128 KiB).
``drill_auto`` (``BLOCKGUARD_DRILL_AUTO``)
    true (default): drill a pool when it is created or extended and when a volume is
    protected on it; false: only on request (``blockguardctl pool drill``).
``alert_pool_free_percent`` (``BLOCKGUARD_ALERT_POOL_FREE_PERCENT``)
    a pool with less free space than this share of its size raises an alert (default 10).
``alert_failed_backups`` (``BLOCKGUARD_ALERT_FAILED_BACKUPS``)
    this many failed backups of a volume in a row raise an alert (default 3).
``alert_rpo_grace`` (``BLOCKGUARD_ALERT_RPO_GRACE``)
    an RPO counts as missed when the last success is older than RPO * (1 + this)
    (default 0.1: a backup due now needs time to run).
``alert_dir`` (``BLOCKGUARD_ALERT_DIR``)
    every executable in it is run with each alert as JSON on stdin (default
    ``/etc/blockguard/alert.d``; see docs/alerts.md).
``alert_hook_timeout`` (``BLOCKGUARD_ALERT_HOOK_TIMEOUT``)
    seconds an alert hook may run before it is killed (default 30).
``health_interval`` (``BLOCKGUARD_HEALTH_INTERVAL``)
    seconds between two health assessments when nothing happens (default 600; events such
    as a finished or failed backup assess at once, and so does an RPO becoming missed by
    time alone); ``0`` turns the periodic look off. The periodic look catches what changes
    unannounced, such as a pool's space used by others.
``retry_base`` / ``retry_cap`` (``BLOCKGUARD_RETRY_BASE`` / ``BLOCKGUARD_RETRY_CAP``)
    a volume whose scheduled backups fail is retried after BASE seconds, doubled for
    each further failure, at most CAP (defaults 60 and 3600). ``BackupNow`` is not held.
``thin_metadata_wait`` (``BLOCKGUARD_THIN_METADATA_WAIT``)
    seconds a backup of a thin volume waits while another process (thin_ls, thin_dump,
    a second backup tool) holds the thin pool's one metadata snapshot (default 300); then
    the backup fails with MetadataSnapshotBusy and is retried later, still incremental.
``thin_metadata_quiet`` (``BLOCKGUARD_THIN_METADATA_QUIET``)
    seconds to listen for another process's hold of that snapshot before reserving it
    when one was seen lately (default 5): reserving right after its release, not just
    before its next reservation, keeps it from failing.
``idle_quiet`` (``BLOCKGUARD_IDLE_QUIET``)
    seconds a pool must be without any job before the work made ahead for its next
    backup is done (an lvm pool's spare delta area; default 5; see
    :mod:`blockguard.engine.idle`).
``s3_gc_grace`` (``BLOCKGUARD_S3_GC_GRACE``)
    seconds a pack of an object-store target no generation references is kept after a
    garbage-collection sweep marked it (default 86400). A backup may run longer: its
    writer lease holds the collection back (docs/design/s3.md).
``s3_gc_interval`` (``BLOCKGUARD_S3_GC_INTERVAL``)
    seconds between two scheduled sweeps of an object-store target's bucket (default
    21600): a transfer sweeps after its commit only when no host of the bucket swept it
    within this time (the store's clock); ``0`` sweeps after every transfer.
    ``blockguardctl target gc ID`` sweeps at once.
``s3_lease_timeout`` (``BLOCKGUARD_S3_LEASE_TIMEOUT``)
    seconds a writer's lease in an object-store target lives without a renewal (default
    600; renewed every fifth of it). A writer that could not renew for longer commits
    nothing (``LeaseLost``); a crashed writer's lease stops holding the collection back
    after it.
``metrics_file`` (``BLOCKGUARD_METRICS_FILE``)
    the Prometheus textfile-collector file written after each assessment (default
    ``/var/lib/prometheus/node-exporter/blockguard.prom``, written only if that directory
    exists; empty: none).
``test_clock_file`` (``BLOCKGUARD_TEST_CLOCK_FILE``)
    test hook: a file holding seconds added to the health assessment's clock (read at
    each assessment), so a test can age the last backup without waiting.
``drill_read_delay`` (``BLOCKGUARD_TEST_DRILL_DELAY``)
    test hook, a fault: seconds every generation read of a volume's restore drill takes
    more (a slow pool disk as the drill sees it).
``backup_delay`` (``BLOCKGUARD_TEST_BACKUP_DELAY``)
    test hook: seconds to sleep after each extent a backup writes (makes a backup slow
    enough to be killed in the middle).

A new field needs no code here: its type (float, int, bool, Path or str) says how the
file's value and the environment's text are read.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blockguard.errors import InvalidConfig

DEFAULT_ALERT_DIR = Path("/etc/blockguard/alert.d")
DEFAULT_METRICS_FILE = Path("/var/lib/prometheus/node-exporter/blockguard.prom")
#: The configuration file read when neither ``--config`` nor ``BLOCKGUARD_CONFIG`` names one.
DEFAULT_CONFIG = Path("/etc/blockguard/blockguard.toml")
CONFIG_ENV = "BLOCKGUARD_CONFIG"
ENV_PREFIX = "BLOCKGUARD_"
#: Fields that are not configuration (given on the command line).
NOT_CONFIG = frozenset({"state_dir"})
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Settings:
    """See the module docstring for what each field means."""

    state_dir: Path
    mount_root: Path
    probe_seconds: float = 1.0
    default_speed: float = 100e6
    scheduler_interval: float = 30.0
    scheduler_max_interval: float = 300.0
    backup_delay: float = field(default=0.0, metadata={"env": "BLOCKGUARD_TEST_BACKUP_DELAY"})
    cow_size: int = 0
    drill_bytes: int = 64 * 1024 * 1024
    drill_auto: bool = True
    alert_pool_free_percent: float = 10.0
    alert_failed_backups: int = 3
    alert_rpo_grace: float = 0.1
    alert_dir: Path = DEFAULT_ALERT_DIR
    alert_hook_timeout: float = 30.0
    health_interval: float = 600.0
    retry_base: float = 60.0
    retry_cap: float = 3600.0
    thin_metadata_wait: float = 300.0
    thin_metadata_quiet: float = 5.0
    idle_quiet: float = 5.0
    s3_gc_grace: float = 86400.0
    s3_gc_interval: float = 21600.0
    s3_lease_timeout: float = 600.0
    #: empty (in the file or the environment): no metrics file
    metrics_file: Path | None = DEFAULT_METRICS_FILE
    test_clock_file: Path | None = None
    drill_read_delay: float = field(default=0.0, metadata={"env": "BLOCKGUARD_TEST_DRILL_DELAY"})

    @classmethod
    def keys(cls) -> dict[str, str]:
        """Configuration key -> its environment variable, for every configurable field."""
        return {
            f.name: f.metadata.get("env", ENV_PREFIX + f.name.upper())
            for f in dataclasses.fields(cls)
            if f.name not in NOT_CONFIG
        }

    @classmethod
    def from_env(
        cls,
        state_dir: Path,
        env: Mapping[str, str] | None = None,
        config: Path | None = None,
    ) -> Settings:
        """Defaults, then the configuration file, then the environment.

        :param state_dir: the daemon's state directory.
        :param env: the environment (default ``os.environ``).
        :param config: the configuration file; default ``$BLOCKGUARD_CONFIG`` or
            :data:`DEFAULT_CONFIG`. Only the default may be missing.
        :raises InvalidConfig: an unknown key, a value of the wrong type, a missing named file.
        """
        env = os.environ if env is None else env
        state_dir = Path(state_dir)
        path, from_file = _read_config(config, env)
        types = typing.get_type_hints(cls)
        keys = cls.keys()
        values: dict[str, Any] = {"mount_root": state_dir / "pools"}
        for key, raw in from_file.items():
            if key not in keys:
                raise InvalidConfig(
                    source=str(path),
                    detail=f"unknown key {key!r} (known keys: {', '.join(sorted(keys))})",
                )
            values[key] = _from_toml(types[key], raw, f"{path}: {key}")
        for key, name in keys.items():
            text = env.get(name, "")
            if text:
                values[key] = _from_text(types[key], text, f"{name}={text!r}")
            elif name in env and _optional(types[key]):
                values[key] = None  # set and empty: turned off
        settings = cls(state_dir=state_dir, **values)
        for key, bad, why in (
            ("default_speed", settings.default_speed <= 0, "must be positive"),
            ("alert_pool_free_percent", settings.alert_pool_free_percent > 100, "is over 100"),
            ("alert_failed_backups", settings.alert_failed_backups < 1, "must be at least 1"),
            ("alert_hook_timeout", settings.alert_hook_timeout <= 0, "must be positive"),
            ("s3_lease_timeout", settings.s3_lease_timeout <= 0, "must be positive"),
        ):
            if bad:
                raise InvalidConfig(source=key, detail=why)
        return settings


def config_path(config: Path | None = None, env: Mapping[str, str] | None = None) -> Path:
    """The configuration file in force (``config``, ``$BLOCKGUARD_CONFIG`` or the default)."""
    env = os.environ if env is None else env
    return Path(config or env.get(CONFIG_ENV) or DEFAULT_CONFIG)


def _read_config(config: Path | None, env: Mapping[str, str]) -> tuple[Path, dict[str, Any]]:
    path = config_path(config, env)
    named = bool(config or env.get(CONFIG_ENV))
    try:
        with open(path, "rb") as f:
            return path, tomllib.load(f)
    except FileNotFoundError:
        if named:
            raise InvalidConfig(source=str(path), detail="no such file") from None
        return path, {}
    except tomllib.TOMLDecodeError as exc:
        raise InvalidConfig(source=str(path), detail=f"not valid TOML: {exc}") from None
    except OSError as exc:
        raise InvalidConfig(source=str(path), detail=exc.strerror or str(exc)) from None


def _base(kind: Any) -> Any:
    """``float`` for ``float``; ``Path`` for ``Path | None``."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and args:
        return args[0]
    return kind


def _optional(kind: Any) -> bool:
    """Whether a field may be None (an empty value turns it off)."""
    return type(None) in typing.get_args(kind)


def _from_toml(kind: Any, raw: Any, where: str) -> Any:
    if raw == "" and _optional(kind):
        return None
    kind = _base(kind)
    if kind is bool:
        if not isinstance(raw, bool):
            raise InvalidConfig(source=where, detail=f"{raw!r} is not true or false")
        return raw
    if kind in (int, float):
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise InvalidConfig(source=where, detail=f"{raw!r} is not a number")
        if kind is int and raw != int(raw):
            raise InvalidConfig(source=where, detail=f"{raw!r} is not a whole number")
        if raw < 0:
            raise InvalidConfig(source=where, detail=f"{raw!r} is negative")
        return kind(raw)
    if kind in (Path, str):
        if not isinstance(raw, str) or not raw:
            raise InvalidConfig(source=where, detail=f"{raw!r} is not a non-empty string")
        return kind(raw)
    return raw


def _from_text(kind: Any, text: str, where: str) -> Any:
    kind = _base(kind)
    if kind is bool:
        word = text.strip().lower()
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
        raise InvalidConfig(source=where, detail="is not one of 1/0, true/false, yes/no")
    if kind in (int, float):
        try:
            value = float(text)
        except ValueError:
            raise InvalidConfig(source=where, detail="is not a number") from None
        if value < 0:
            raise InvalidConfig(source=where, detail="is negative")
        return int(value) if kind is int else value
    if kind in (Path, str):
        return kind(text)
    return text
