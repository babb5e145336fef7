"""The daemon's catalog: an SQLite file that remembers everything across restarts.

Volumes and groups with their objectives, pools and pool devices, the performance
table, generations (a mirror of the pool manifests, rebuildable from them), jobs with
their history, measured restores, backup targets and file groups. Standard library only;
see :class:`Catalog`.
"""

from __future__ import annotations

from blockguard.core.catalog._db import BUSY_TIMEOUT, DEFAULT_STATE_DIR, default_catalog_path
from blockguard.core.catalog.filegroups import FileGroup, FileGroupStore
from blockguard.core.catalog.generations import GenerationStore
from blockguard.core.catalog.jobs import JobStore
from blockguard.core.catalog.pools import PoolStore
from blockguard.core.catalog.remote import RemoteGenerationStore
from blockguard.core.catalog.rows import (
    DeviceIdentity,
    Generation,
    Group,
    Job,
    JobEvent,
    PathSampleRecord,
    PerfEntry,
    Pool,
    PoolDevice,
    RemoteGenerationRow,
    RestoreRecord,
    Target,
    Volume,
    area_of_perf_key,
    area_perf_key,
    link_perf_key,
)
from blockguard.core.catalog.schema import CURRENT_VERSION
from blockguard.core.catalog.targets import TargetStore
from blockguard.core.catalog.volumes import UNSET, VolumeStore


class Catalog(
    FileGroupStore,
    VolumeStore,
    TargetStore,
    RemoteGenerationStore,
    PoolStore,
    GenerationStore,
    JobStore,
):
    """The catalog. One SQLite connection, safe to share between threads.

    ``Catalog()`` opens (creating or upgrading) the catalog at
    :func:`default_catalog_path`; ``Catalog(path)`` opens another file. Every method is
    one transaction: it changes everything it should or, raising, nothing. Wrap several
    calls in :meth:`transaction` to make them one.

    :raises CorruptMetadata: the file is not a blockguard catalog, is damaged, or was
        written by a newer blockguard (it is then left unchanged)
    :raises EnvironmentProblem: the file or its directory cannot be created or opened
    """

    def __enter__(self) -> Catalog:
        return self


__all__ = [
    "BUSY_TIMEOUT",
    "CURRENT_VERSION",
    "DEFAULT_STATE_DIR",
    "UNSET",
    "Catalog",
    "DeviceIdentity",
    "FileGroup",
    "Generation",
    "Group",
    "Job",
    "JobEvent",
    "PathSampleRecord",
    "PerfEntry",
    "Pool",
    "PoolDevice",
    "RemoteGenerationRow",
    "RestoreRecord",
    "Target",
    "Volume",
    "area_of_perf_key",
    "area_perf_key",
    "default_catalog_path",
    "link_perf_key",
]
