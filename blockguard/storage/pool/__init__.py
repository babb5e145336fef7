"""Pools of backup space: the backend interface and the ``dir`` (XFS reflink) backend."""

from blockguard.storage.pool.base import (
    AlertCallback,
    FreedGeneration,
    GenerationReader,
    GenerationWriter,
    PoolBackend,
    PoolCapacity,
    PoolDevice,
    RetentionResult,
    SpaceAlert,
    SwapInVolume,
)

__all__ = [
    "AlertCallback",
    "FreedGeneration",
    "GenerationReader",
    "GenerationWriter",
    "PoolBackend",
    "PoolCapacity",
    "PoolDevice",
    "RetentionResult",
    "SpaceAlert",
    "SwapInVolume",
]
