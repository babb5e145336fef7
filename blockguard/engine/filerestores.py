"""``restore-files GROUP[@GEN] [PATH...] --to DIR``: a file group's files from any
generation of its volume.

The daemon checks the request (the group, the generation, its file list, the paths,
files it cannot vouch for) and serves the generation's checksum-verified image as a
read-only loop device, its chain held, as a browse mount does; the client reads the
files' extents from it and writes them in its own mount namespace
(:mod:`blockguard.cli.filewriter`), then reports what it did, and the device is released.
Under the systemd unit the daemon could not write the admin's directories itself
(docs/design/filegroups.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from blockguard.engine import ids
from blockguard.engine.browsing import Browser
from blockguard.engine.filegroups import read_list
from blockguard.engine.pools import PoolRegistry
from blockguard.engine.restores import find_generation
from blockguard.engine.volumes import VolumeRegistry
from blockguard.errors import InvalidInput, NotFound
from blockguard.storage.filerestore import FilesRestore, encode_items, plan_files
from blockguard.storage.manifest import Manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FilesRequest:
    group: str
    volume: str
    pool: str
    manifest: Manifest
    target: str
    plan: FilesRestore
    #: The estimate before (None: the pool's read speed is not measured yet).
    estimated_seconds: float | None

    @property
    def generation(self) -> str:
        return ids.public_id(self.volume, self.manifest.generation_id)


def check_restore_files(
    volumes: VolumeRegistry, pools: PoolRegistry, group_at: str, paths: list[str], to: str
) -> FilesRequest:
    """The request, checked (see :func:`~blockguard.storage.filerestore.plan_files`).
    The target directory is the client's (its mount namespace): only its form is
    checked here.

    :raises NotFound: no such group or generation, or the generation has no list of it.
    :raises InvalidInput: ``to`` is not an absolute path; a path is refused.
    """
    name, _, gen = group_at.partition("@")
    group = volumes.catalog.get_file_group(name)
    vol = volumes.catalog.get_volume(group.volume)
    if vol.pool is None:
        raise InvalidInput(detail=f"volume {group.volume} has no pool")
    if not to or not PurePosixPath(to).is_absolute():
        raise InvalidInput(detail=f"the target must be an absolute path: {to!r}")
    manifest = find_generation(volumes, group.volume, f"{group.volume}@{gen}" if gen else "")
    stored = read_list(pools.backend(vol.pool), group.volume, manifest.generation_id, name)
    public = ids.public_id(group.volume, manifest.generation_id)
    if stored is None:
        raise NotFound(what=f"file list of group {name} in generation", name=public)
    plan = plan_files(stored, paths)
    return FilesRequest(
        name,
        group.volume,
        vol.pool,
        manifest,
        to,
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


def serve_restore_files(request: FilesRequest, browser: Browser) -> dict[str, Any]:
    """Serve the request's generation to the client; what the client needs to write the
    files: ``id`` (to give back to :func:`finish_restore_files`), ``device`` (the
    read-only loop device), ``entries`` (what to write, compressed JSON:
    :func:`~blockguard.storage.filerestore.encode_items`), and the request's summary."""
    purpose = f"the file restore of {request.group} into {request.target}"
    record = browser.serve(request.volume, request.pool, request.manifest, purpose)
    log.info(
        "file restore of %s from %s into %s: %d entries, %d bytes, served as %s",
        request.group,
        request.generation,
        request.target,
        len(request.plan.entries),
        request.plan.data_bytes,
        record.loop,
        extra={"VOLUME": request.volume, "GENERATION": request.generation},
    )
    return {
        "id": record.name,
        "device": record.loop,
        "entries": encode_items(request.plan),
        "group": request.group,
        "generation": request.generation,
        "number": request.manifest.sequence,
        "target": request.target,
        "files": request.plan.files,
        "bytes": request.plan.data_bytes,
        "estimated_seconds": request.estimated_seconds,
    }


def finish_restore_files(browser: Browser, served_id: str, result: dict[str, Any]) -> None:
    """Release what :func:`serve_restore_files` served, and log the client's result
    (``files``, ``bytes``, ``seconds``, or ``error``).

    :raises NotFound: nothing served under ``served_id``.
    """
    record = browser.release(served_id)
    if result.get("error"):
        log.error("%s failed: %s", record.purpose, result["error"], extra={"VOLUME": record.volume})
    else:
        log.info(
            "%s from %s: %s files, %s bytes in %.2fs",
            record.purpose,
            record.generation,
            result.get("files"),
            result.get("bytes"),
            float(result.get("seconds", 0.0)),
            extra={"VOLUME": record.volume, "GENERATION": record.generation},
        )
