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
        )
