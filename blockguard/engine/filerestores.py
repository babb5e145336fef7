"""``restore-files GROUP[@GEN] [PATH...] --to DIR``: a file group's files from any
generation of its volume, as a job (a restore: it holds its volume like one).

Everything is checked when the job is asked for (the group, the generation, its file
list, the paths, the files already in the target), so a refused request writes nothing;
the job checks again when it starts, then reads the files' extents from the generation's
image (checksum-verified) and writes them (:mod:`blockguard.storage.filerestore`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blockguard.engine import ids
from blockguard.engine.filegroups import read_list
from blockguard.engine.jobs import ProgressReporter
from blockguard.engine.pools import PoolRegistry
from blockguard.engine.restores import find_generation
from blockguard.engine.volumes import VolumeRegistry
from blockguard.errors import InvalidInput, NotFound
from blockguard.storage.filelists import StoredFileList
from blockguard.storage.filerestore import FilesRestore, plan_files, write_files
from blockguard.storage.genimage import GenerationImage
from blockguard.storage.manifest import Manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FilesRequest:
    group: str
    volume: str
    pool: str
    manifest: Manifest
    stored: StoredFileList
    paths: tuple[str, ...]
    dest: Path
    overwrite: bool
    plan: FilesRestore
    #: The estimate before (None: the pool's read speed is not measured yet).
    estimated_seconds: float | None

    @property
    def generation(self) -> str:
        return ids.public_id(self.volume, self.manifest.generation_id)


def check_restore_files(
    volumes: VolumeRegistry,
    pools: PoolRegistry,
    group_at: str,
    paths: list[str],
    to: str,
    overwrite: bool,
) -> FilesRequest:
    """The request, checked (see :func:`~blockguard.storage.filerestore.plan_files`).

    :raises NotFound: no such group or generation, or the generation has no list of it.
    :raises InvalidInput: ``to`` is not an absolute directory; a path is refused.
    :raises AlreadyExists: a file exists in ``to`` and ``overwrite`` is False.
    """
    name, _, gen = group_at.partition("@")
    group = volumes.catalog.get_file_group(name)
    vol = volumes.catalog.get_volume(group.volume)
    if vol.pool is None:
        raise InvalidInput(detail=f"volume {group.volume} has no pool")
    if not to or not Path(to).is_absolute():
        raise InvalidInput(detail=f"the target must be an absolute path: {to!r}")
    manifest = find_generation(volumes, group.volume, f"{group.volume}@{gen}" if gen else "")
    pool = pools.backend(vol.pool)
    stored = read_list(pool, group.volume, manifest.generation_id, name)
    public = ids.public_id(group.volume, manifest.generation_id)
    if stored is None:
        raise NotFound(what=f"file list of group {name} in generation", name=public)
    dest = Path(to)
    plan = plan_files(stored, paths, dest, overwrite=overwrite)
    return FilesRequest(
        name,
        group.volume,
        vol.pool,
        manifest,
        stored,
        tuple(paths),
        dest,
        overwrite,
        plan,
        _estimate(pools, vol.pool, manifest, plan.data_bytes),
    )


def _estimate(pools: PoolRegistry, pool: str, manifest: Manifest, nbytes: int) -> float | None:
    """The files' bytes at the random-read speed of the pool disk holding the chain's
    full (their extents are scattered over the volume: random reads of chunks)."""
    try:
        backend = pools.backend(pool)
        full = backend.chain(manifest.volume.name, manifest.generation_id)[0]
        speed = pools.speeds(pool).get(pools.device_of(pool, full))
    except (NotFound, InvalidInput, OSError):
        return None
    if speed is None or speed.rand_read <= 0:
        return None
    return nbytes / speed.rand_read


def run_restore_files(
    request: FilesRequest, pools: PoolRegistry, progress: ProgressReporter
) -> dict[str, Any]:
    """The body of a restore-files job."""
    pool = pools.backend(request.pool)
    # Asked again: files may have appeared in the target since the request.
    plan = plan_files(request.stored, request.paths, request.dest, overwrite=request.overwrite)
    holder = f"the file restore of {request.group} into {request.dest}"
    started = time.monotonic()
    image = GenerationImage(pool, request.volume, request.manifest.generation_id)
    pool.hold(image.chain, holder)
    try:
        total = plan.data_bytes
        written = write_files(
            image,
            plan,
            request.dest,
            overwrite=request.overwrite,
            progress=lambda done: progress(done, total),
        )
    finally:
        pool.release(holder)
        image.close()
    seconds = time.monotonic() - started
    log.info(
        "restored %d entries of file group %s from %s into %s: %d bytes in %.2fs",
        len(plan.entries),
        request.group,
        request.generation,
        request.dest,
        written,
        seconds,
        extra={"VOLUME": request.volume, "GENERATION": request.generation},
    )
    return {
        "group": request.group,
        "generation": request.generation,
        "number": request.manifest.sequence,
        "target": str(request.dest),
        "files": sum(1 for e in plan.entries if e.kind != "dir"),
        "bytes": written,
        "estimated_seconds": request.estimated_seconds,
        "seconds": seconds,
    }
