"""Browse mounts of generations: ``mount V@GEN DIR``, ``umount DIR``, the list, and the
cleanup of what a killed daemon left behind.

While mounted, a generation's whole chain is held in its pool: retention skips it and a
removal by hand is refused (Busy, naming the mount point).
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from pathlib import Path
from typing import Any

from blockguard.engine import ids
from blockguard.engine.pools import PoolRegistry
from blockguard.engine.restores import find_generation
from blockguard.engine.volumes import VolumeRegistry
from blockguard.errors import AlreadyExists, BlockguardError, InvalidInput, NotFound
from blockguard.storage.browse import BrowseMount, MountBook, MountRecord, teardown
from blockguard.storage.genimage import GenerationImage
from blockguard.storage.manifest import Manifest
from blockguard.storage.runner import Runner

log = logging.getLogger(__name__)


class Browser:
    """The daemon's browse mounts (their FUSE servers run in its threads).

    :param state_dir: records live in ``<state_dir>/mounts``, FUSE directories in
        ``<state_dir>/browse``.
    """

    def __init__(
        self, state_dir: Path, pools: PoolRegistry, volumes: VolumeRegistry, cmd: Runner
    ) -> None:
        self.book = MountBook(state_dir)
        self.fuse_root = Path(state_dir) / "browse"
        self.pools = pools
        self.volumes = volumes
        self.cmd = cmd
        self._lock = threading.Lock()
        self._mounts: dict[str, BrowseMount] = {}
        #: Generations served to file restores, by record name.
        self._served: dict[str, BrowseMount] = {}

    def clean_stale(self) -> list[str]:
        """Tear down every recorded mount (left by a daemon that was killed); returns the
        mount points cleaned. A failure is logged and its record kept for the next start."""
        cleaned = []
        for record in self.book.all():
            try:
                teardown(record, self.cmd)
            except (BlockguardError, OSError) as exc:
                log.error("stale %s not cleaned: %s", record.label, exc)
                continue
            self.book.drop(record)
            log.info("cleaned stale %s of %s", record.label, record.generation)
            cleaned.append(record.mountpoint or record.purpose)
        return cleaned

    def mount(self, generation: str, mountpoint: str) -> dict[str, Any]:
        """Make ``generation`` (``V@GEN``, any form the CLI takes) a read-only loop device
        for the caller to mount at ``mountpoint``; the record names the loop device, its
        file system and the mount options.

        :raises InvalidInput: the mount point is not an absolute path, or the generation
            holds no file system.
        :raises NotFound: no such volume or generation.
        """
        volume, _ = ids.split_public_id(generation)
        vol = self.volumes.catalog.get_volume(volume)
        if vol.pool is None:
            raise InvalidInput(detail=f"volume {volume} has no pool")
        point = _check_mountpoint(mountpoint)
        manifest = find_generation(self.volumes, volume, generation)
        with self._lock:
            if point in self._mounts:
                raise AlreadyExists(what="browse mount", name=point)
            mount = self._attach(volume, vol.pool, manifest, point, f"the browse mount at {point}")
            self._mounts[point] = mount
        log.info(
            "attached %s as %s for the mount at %s",
            mount.record.generation,
            mount.record.loop,
            point,
        )
        return mount.record.to_dict()

    def serve(self, volume: str, pool_name: str, manifest: Manifest, purpose: str) -> MountRecord:
        """Serve a generation as a read-only loop device for a client that reads it (a
        file restore: the files are written by the client, in its own mount namespace),
        until :meth:`release`. Its chain is held meanwhile; a daemon restart tears down
        one that was never released, like a browse mount.

        :param purpose: what it serves, for the log and the hold's ``Busy`` message.
        """
        with self._lock:
            mount = self._attach(volume, pool_name, manifest, "", purpose)
            self._served[mount.record.name] = mount
        log.info("attached %s as %s for %s", mount.record.generation, mount.record.loop, purpose)
        return mount.record

    def release(self, name: str) -> MountRecord:
        """Take down what :meth:`serve` set up (loop device, FUSE image, the hold).

        :raises NotFound: nothing served under ``name``.
        """
        with self._lock:
            mount = self._served.get(name)
            if mount is None:
                raise NotFound(what="served generation", name=name or '""')
            mount.stop(self.cmd)
            del self._served[name]
        log.info("released %s, served for %s", mount.record.generation, mount.record.purpose)
        return mount.record

    def _attach(
        self, volume: str, pool_name: str, manifest: Manifest, point: str, purpose: str
    ) -> BrowseMount:
        """FUSE image and read-only loop device of ``manifest``'s generation, its chain
        held (the lock is the caller's)."""
        pool = self.pools.backend(pool_name)
        public = ids.public_id(volume, manifest.generation_id)
        # Held before it is opened: a retention between the two would remove what the
        # image is about to read.
        chain = pool.chain(volume, manifest.generation_id)
        name = uuid.uuid4().hex[:12]
        holder = purpose if point else f"{purpose} ({name})"
        pool.hold([m.generation_id for m in chain], holder)
        try:
            image = GenerationImage(pool, volume, manifest.generation_id, chain)
        except BaseException:
            pool.release(holder)
            raise
        record = MountRecord(
            name=name,
            volume=volume,
            pool=pool_name,
            generation=public,
            chain=image.chain,
            mountpoint=point,
            fuse_dir=str(self.fuse_root / name),
            purpose="" if point else purpose,
        )
        # Released once the FUSE server ends (after a lazy unmount, when the last reader
        # lets go), or by a start that failed before serving.
        mount = BrowseMount(record, image, self.book, on_done=lambda: pool.release(holder))
        mount.start(self.cmd, probe_fs=bool(point))
        return mount

    def unmount(self, mountpoint: str) -> dict[str, Any]:
        """Take down the browse mount at ``mountpoint``: its file system if it is still
        mounted in the daemon's namespace (lazily if a process still uses it), the loop
        device (released by the kernel once the caller's mount of it is gone) and the FUSE
        image.

        :raises NotFound: no browse mount there.
        """
        point = os.path.normpath(mountpoint) if mountpoint else mountpoint
        with self._lock:
            mount = self._mounts.get(point)
            if mount is None:
                raise NotFound(what="browse mount", name=mountpoint or '""')
            mount.stop(self.cmd)
            del self._mounts[point]
        log.info("unmounted %s from %s", mount.record.generation, point)
        return mount.record.to_dict()

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [m.record.to_dict() for m in self._mounts.values()]

    def close(self) -> None:
        """Tear down every mount (the daemon stops: its FUSE servers end with it)."""
        with self._lock:
            for book in (self._mounts, self._served):
                for key, mount in list(book.items()):
                    try:
                        mount.stop(self.cmd)
                    except (BlockguardError, OSError) as exc:
                        log.error("%s not torn down: %s", mount.record.label, exc)
                    del book[key]


def _check_mountpoint(mountpoint: str) -> str:
    # Only its form: the directory is the caller's, in the caller's mount namespace (the
    # CLI checks it is an empty directory with nothing mounted), which need not be ours.
    if not mountpoint or not os.path.isabs(mountpoint):
        raise InvalidInput(detail=f"the mount point must be an absolute path: {mountpoint!r}")
    return os.path.normpath(mountpoint)
