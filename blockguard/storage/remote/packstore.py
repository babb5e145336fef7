"""One client's pack store on a backup target (issue 11, docs/design/remote.md): its
namespace ``AREA/clients/CLIENT/``, what it lists and reads, its space and removals.
How a generation's directory is written and committed is :mod:`.genfiles`.

The client id is fixed when the store is opened, so one client never reaches another's
root. A generation key is opaque here: the client makes it unique among its volumes.

Unlike a local pool's, an uncommitted generation is no garbage after a restart: the
client resumes it (``status`` says which packs are stored) and commits it later.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from blockguard.core.vocab import check_name
from blockguard.errors import DataError, InvalidInput, NotFound
from blockguard.storage.manifest import fsync_dir
from blockguard.storage.pool.gendir import (
    DELETED_SUFFIX,
    read_damage_record,
    subdirs,
    write_damage_record,
)
from blockguard.storage.remote.genfiles import (
    GENERATIONS,
    INDEX,
    LOCK,
    MANIFEST,
    META,
    PACKS,
    GenerationFiles,
)
from blockguard.storage.remote.packvalues import (
    Space,
    StoredGeneration,
    json_object,
    pack_digest,
    pack_name,
)

__all__ = ["PackStore", "pack_digest"]

log = logging.getLogger(__name__)

CLIENTS = "clients"
MAX_REASON = 1000


class PackStore(GenerationFiles):
    """The generations of one client under ``AREA/clients/CLIENT``.

    Open with :meth:`open` (or :meth:`create`); :meth:`close` releases the generations
    this store began (their writes stay; a later store resumes them).

    :param label: how errors name the store (as a pool), never a path of the target.
    """

    @classmethod
    def create(cls, area: Path, client: str) -> PackStore:
        """Make the client's root (an administrator's step: authorizing a client)."""
        root = cls._root_of(area, client)
        (root / GENERATIONS).mkdir(parents=True, exist_ok=True)
        fsync_dir(root)
        fsync_dir(root.parent)
        return cls.open(area, client)

    @classmethod
    def open(cls, area: Path, client: str) -> PackStore:
        """The store of ``client`` on ``area``; finishes removals a cut interrupted.

        :raises NotFound: the client has no root on this area.
        """
        root = cls._root_of(area, client)
        if not (root / GENERATIONS).is_dir() or root.is_symlink():
            raise NotFound(what="client", name=client, hint="not authorized on this target")
        store = cls(root, client, f"area of client {client}")
        for gen in subdirs(store._gens):
            if gen.name.endswith(DELETED_SUFFIX):
                shutil.rmtree(gen, ignore_errors=True)
        return store

    @staticmethod
    def _root_of(area: Path, client: str) -> Path:
        return area / CLIENTS / check_name("client", client)

    def __enter__(self) -> PackStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- reading ----------------------------------------------------------------------

    def list(self) -> list[StoredGeneration]:
        """The committed generations, oldest commit first."""
        found = []
        for gdir in subdirs(self._gens):
            gen = gdir.name
            if gen.endswith(DELETED_SUFFIX) or not (gdir / INDEX).exists():
                continue
            try:
                self._dir(gen)
            except InvalidInput:  # not made by this store (nor reachable by a client)
                continue
            meta = json_object(gdir / META) or {}
            try:
                index = self._index(gen)
                manifest = (gdir / MANIFEST).read_bytes()
            except (OSError, DataError) as exc:
                log.error("client %s generation %s: %s", self.client, gen, exc)
                found.append(StoredGeneration(gen, meta, 0, 0, 0.0, b"", f"unreadable: {exc}"))
                continue
            packs = index["packs"]
            problem = None
            if pack_digest(manifest) != index["manifest"]["xxh3_128"]:
                problem = "its manifest does not match its index"
            elif (record := read_damage_record(gdir)) is not None:
                reason, chunk = record
                at = "" if chunk is None else f" (chunk {chunk})"
                problem = f"marked damaged: {reason}{at}"
            size = sum(p["size"] for p in packs)
            found.append(
                StoredGeneration(gen, meta, len(packs), size, index["committed"], manifest, problem)
            )
        return sorted(found, key=lambda g: (g.committed, g.generation))

    def get(self, gen: str, number: int) -> bytes:
        """Pack ``number`` of the committed generation ``gen``.

        :raises NotFound: no such committed generation, or no such pack in it.
        :raises DataError: the stored pack is not what the index says (bit rot).
        """
        name = pack_name(number)
        gdir = self._dir(gen)
        if not (gdir / INDEX).is_file():
            raise NotFound(what="generation", name=gen)
        entry = next((p for p in self._index(gen)["packs"] if p["pack"] == number), None)
        if entry is None:
            raise NotFound(what="pack", name=f"{number} of generation {gen}")
        with self._edge(f"{gen}/{PACKS}/{name}", "reading"):
            data = (gdir / PACKS / name).read_bytes()
        if (len(data), pack_digest(data)) != (entry["size"], entry["xxh3_128"]):
            raise DataError(detail=f"generation {gen}: pack {number} changed on the target")
        return data

    def space(self) -> Space:
        """Free and total bytes of the area, and the bytes this client's files take."""
        with self._edge("", "reading"):
            st = os.statvfs(self.root)
            # A pack linked into several generations (a synthesized full) is stored once.
            sizes: dict[tuple[int, int], int] = {}
            for f in self.root.rglob("*"):
                if f.is_file() and not f.is_symlink():
                    fst = f.stat()
                    sizes[fst.st_dev, fst.st_ino] = fst.st_size
            used = sum(sizes.values())
        return Space(st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize, used)

    def mark_damaged(self, gen: str, reason: str, chunk: int | None = None) -> None:
        """Record that a client found committed ``gen`` damaged (a restore or verify
        failed), so that :meth:`list` shows it to every host of this client.

        :raises NotFound: no committed generation ``gen``.
        """
        gdir = self._dir(gen)
        if not reason or len(reason) > MAX_REASON or not reason.isprintable():
            raise InvalidInput(detail=f"a damage reason is 1-{MAX_REASON} printable characters")
        if not (gdir / INDEX).is_file():
            raise NotFound(what="generation", name=gen)
        with self._edge(gen, "writing"):
            write_damage_record(gdir, reason, chunk)

    # --- removing -----------------------------------------------------------------------

    def remove(self, gen: str) -> None:
        """Remove ``gen``, committed or open: renamed to ``*.deleted`` first (the commit
        point: a cut after it finishes at the next open), then deleted.

        :raises NotFound: no generation ``gen``.
        :raises Busy: another connection is writing it.
        """
        gdir = self._dir(gen)
        if not gdir.is_dir():
            raise NotFound(what="generation", name=gen)
        fd = self._held.pop(gen, None)
        if fd is None and (gdir / LOCK).exists():
            fd = self._lock(gen, gdir)
        doomed = self._gens / f"{gen}{DELETED_SUFFIX}"
        try:
            with self._edge(gen, "removing"):
                shutil.rmtree(doomed, ignore_errors=True)
                os.rename(gdir, doomed)
                fsync_dir(self._gens)
        finally:
            if fd is not None:
                os.close(fd)
        shutil.rmtree(doomed, ignore_errors=True)
        fsync_dir(self._gens)
