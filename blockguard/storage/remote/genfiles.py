"""The generation directories of one client on a backup target, and the protocol that
writes them: begin, put, commit (with the index as the commit point) and link
(issue 11, docs/design/remote.md, "What is committed when")::

    generations/GEN/meta.json          what ``begin`` was given (written at begin)
    generations/GEN/packs/NNNNNN.pack  one pack each, durable before ``put`` returns
    generations/GEN/manifest.sealed    written by ``commit``
    generations/GEN/index.json         written last by ``commit``: the commit point
    generations/GEN/.writing           flocked while a connection writes GEN
    generations/GEN.deleted/           a removal whose rename (its commit point) is done

Every path is the client's root joined with names checked to be one plain component
(:func:`~blockguard.storage.manifest.check_component`); no operation takes a path. The
client's namespace itself (its root, listing, reading, space, removal) is
:class:`~blockguard.storage.remote.packstore.PackStore`, built on this.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import xxhash

from blockguard.errors import (
    AlreadyExists,
    BlockguardError,
    Busy,
    DataError,
    InvalidInput,
    NotFound,
    PoolSpaceLow,
)
from blockguard.storage.ioedge import SPACE, map_oserror
from blockguard.storage.manifest import (
    check_component,
    crash_point,
    fsync_dir,
    write_atomic,
    write_durable,
)
from blockguard.storage.pool.gendir import DELETED_SUFFIX
from blockguard.storage.remote.packvalues import (
    INDEX_FORMAT,
    PACK_NAME,
    GenerationState,
    index_entries,
    json_object,
    pack_digest,
    pack_name,
    read_index,
)

GENERATIONS = "generations"
PACKS = "packs"
META = "meta.json"
MANIFEST = "manifest.sealed"
INDEX = "index.json"
LOCK = ".writing"
#: The largest ``meta`` a client may store with a generation (it is read on every list).
MAX_META = 64 << 10
_READ = 1 << 20


class GenerationFiles:
    """The generation directories under ``ROOT/generations`` of one client, written by
    the commit protocol; :meth:`close` releases the generations begun here (their writes
    stay; a later connection resumes them).

    :param label: how errors name the store (as a pool), never a path of the target.
    """

    def __init__(self, root: Path, client: str, label: str) -> None:
        self.root = root
        self.client = client
        self.label = label
        self._gens = root / GENERATIONS
        self._held: dict[str, int] = {}

    def close(self) -> None:
        """Release the generations this store holds open."""
        for fd in self._held.values():
            os.close(fd)
        self._held.clear()

    # --- writing a generation ---------------------------------------------------------

    def begin(self, gen: str, meta: Mapping[str, Any], needed: int = 0) -> GenerationState:
        """Open generation ``gen`` for :meth:`put`: a new one, or one a cut left open.

        :param meta: stored with it (the client's, opaque here); a resumed generation
            must be begun with the meta it was begun with.
        :param needed: bytes the client will send; refused up front if they do not fit.
        :raises AlreadyExists: ``gen`` is committed.
        :raises Busy: another connection is writing ``gen``.
        :raises PoolSpaceLow: ``needed`` exceeds the free space.
        """
        gdir = self._dir(gen)
        meta_bytes = json.dumps(dict(meta), sort_keys=True).encode()
        if len(meta_bytes) > MAX_META:
            raise InvalidInput(detail=f"the meta of generation {gen} exceeds {MAX_META} bytes")
        if (gdir / INDEX).exists():
            raise AlreadyExists(what="generation", name=gen)
        fresh = gen not in self._held
        if fresh:
            if needed > (free := self._free()):
                raise PoolSpaceLow(pool=self.label, free=free, needed=needed)
            with self._edge(gen, "creating"):
                with contextlib.suppress(FileExistsError):
                    gdir.mkdir()
                    fsync_dir(self._gens)
                self._held[gen] = self._lock(gen, gdir)
        stored = json_object(gdir / META)
        problem = None
        if (gdir / INDEX).exists():  # committed by another connection meanwhile
            problem = AlreadyExists(what="generation", name=gen)
        elif stored is not None and stored != json.loads(meta_bytes):
            problem = InvalidInput(detail=f"generation {gen} was begun with another meta")
        if problem is not None:
            if fresh:
                os.close(self._held.pop(gen))
            raise problem
        with self._edge(gen, "writing"):
            (gdir / PACKS).mkdir(exist_ok=True)
            if stored is None:
                write_atomic(gdir / META, meta_bytes)
        return self.status(gen)

    def put(self, gen: str, number: int, data: bytes) -> None:
        """Store pack ``number`` of the open generation ``gen``, durably, before returning.

        A pack is written under a temporary name and renamed: a cut leaves the old pack
        or none, never part of one. Putting a pack again replaces it (a re-send).
        """
        gdir = self._writing(gen)
        name = pack_name(number)
        if len(data) > (free := self._free()):
            raise PoolSpaceLow(pool=self.label, free=free, needed=len(data))
        packs = gdir / PACKS
        tmp = packs / f".{name}.tmp"
        try:
            with self._edge(f"{gen}/{PACKS}/{name}", "writing", needed=len(data)):
                # A leftover temporary name may be a hard link to a committed pack (a link
                # cut before its rename): writing through it would rewrite that pack.
                tmp.unlink(missing_ok=True)
                write_durable(tmp, data)
                crash_point("remote-pack")
                os.rename(tmp, packs / name)
                fsync_dir(packs)
        except BlockguardError:
            # A half-written pack (ENOSPC, EIO) gives its space back at once; the
            # generation stays open with the packs stored before it.
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise

    def commit(self, gen: str, index: Mapping[str, Any], manifest: bytes) -> GenerationState:
        """Commit ``gen``: check every pack ``index`` names, then write the manifest and
        the index (the commit point). A cut before it leaves ``gen`` open, not listed.

        :param index: ``{"packs": [{"pack": N, "size": BYTES, "xxh3_128": HEX}, ...]}``
            naming every stored pack.
        :param manifest: the sealed manifest (opaque here).
        :raises DataError: a stored pack is not what the index says.
        :raises InvalidInput: the index is malformed, names a pack not stored or leaves
            one out.
        """
        gdir = self._dir(gen)
        entries = index_entries(gen, index)
        record = {
            "packs": entries,
            "manifest": {"size": len(manifest), "xxh3_128": pack_digest(manifest)},
        }
        if (gdir / INDEX).exists():  # a retry after a cut that came after the commit point
            if {k: v for k, v in self._index(gen).items() if k in record} == record:
                return self.status(gen)
            raise AlreadyExists(what="generation", name=gen)
        gdir = self._writing(gen)
        stored = self.status(gen).packs
        for entry in entries:
            number = entry["pack"]
            if number not in stored:
                raise InvalidInput(
                    detail=f"generation {gen}: its index names pack {number}, which is not stored"
                )
            size, digest = stored[number], self._digest(gen, number)
            if (size, digest) != (entry["size"], entry["xxh3_128"]):
                raise DataError(
                    detail=f"generation {gen}: pack {number} is stored as {size} bytes"
                    f" {digest}, its index says {entry['size']} bytes {entry['xxh3_128']}"
                )
        extra = sorted(set(stored) - {e["pack"] for e in entries})
        if extra:
            raise InvalidInput(
                detail=f"generation {gen}: packs {extra} are stored but not in its index"
            )
        body = {"format": INDEX_FORMAT, "generation": gen, "committed": time.time(), **record}
        with self._edge(gen, "committing"):
            write_atomic(gdir / MANIFEST, manifest)
            write_atomic(gdir / INDEX, json.dumps(body, sort_keys=True).encode())
            (gdir / LOCK).unlink()
        os.close(self._held.pop(gen))
        return self.status(gen)

    def link(self, gen: str, source: str, packs: list[tuple[int, int]]) -> list[dict[str, Any]]:
        """Make packs of the open generation ``gen`` from packs of the committed generation
        ``source`` of this client (a synthesized full: its unchanged packs never cross the
        link again). Each is a hard link (a copy where the file system has none): pack
        files never change once committed, so both generations stay self-contained and
        removing either never touches the other's packs (no reference counting).

        Everything is checked before anything is made: a refusal creates nothing.

        :param packs: ``(source pack, pack of gen)`` pairs.
        :returns: the index entry of each pack made (``pack``, ``size``, ``xxh3_128``,
            as the source's index has them; the commit checks them again).
        :raises NotFound: no committed ``source`` (in this client's root: another
            client's generation is never found), or it has no such pack.
        :raises InvalidInput: ``source`` was begun with another meta (another volume),
            or ``gen`` is not open on this connection.
        """
        gdir = self._writing(gen)
        sdir = self._dir(source)
        if not (sdir / INDEX).is_file():
            raise NotFound(what="generation", name=source)
        if json_object(sdir / META) != json_object(gdir / META):
            raise InvalidInput(
                detail=f"generation {source} was begun with another meta than {gen}: "
                "packs are linked only within one volume"
            )
        index = {p["pack"]: p for p in self._index(source)["packs"]}
        made = []
        for src, dst in packs:
            entry = index.get(src)
            if entry is None or not (sdir / PACKS / pack_name(src)).is_file():
                raise NotFound(what="pack", name=f"{src} of generation {source}")
            pack_name(dst)  # checks the number
            made.append(
                (src, dst, {"pack": dst, "size": entry["size"], "xxh3_128": entry["xxh3_128"]})
            )
        target = gdir / PACKS
        for src, dst, _ in made:
            name = pack_name(dst)
            tmp = target / f".{name}.tmp"
            origin = sdir / PACKS / pack_name(src)
            with self._edge(f"{gen}/{PACKS}/{name}", "linking", needed=0):
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                with contextlib.suppress(FileNotFoundError):
                    if os.path.samefile(origin, target / name):
                        continue  # linked already (a resumed synthesized full)
                try:
                    os.link(origin, tmp)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                        raise
                    write_durable(tmp, origin.read_bytes())
                os.rename(tmp, target / name)
                # rename(2) of two names of one file does nothing: never leave a second
                # name of a committed pack behind, which a later put would write through.
                tmp.unlink(missing_ok=True)
        with self._edge(gen, "linking"):
            fsync_dir(target)
        return [entry for _, _, entry in made]

    def status(self, gen: str) -> GenerationState:
        """Which packs of ``gen`` are stored, and whether it is committed.

        :raises NotFound: no generation ``gen`` (begun or committed).
        """
        gdir = self._dir(gen)
        if not gdir.is_dir():
            raise NotFound(what="generation", name=gen)
        packs: dict[int, int] = {}
        with self._edge(gen, "reading"):
            entries = list(os.scandir(gdir / PACKS)) if (gdir / PACKS).is_dir() else []
            for entry in entries:
                m = PACK_NAME.fullmatch(entry.name)
                if m and entry.is_file(follow_symlinks=False):
                    packs[int(m.group(1))] = entry.stat(follow_symlinks=False).st_size
            meta = json_object(gdir / META) or {}
        return GenerationState(gen, (gdir / INDEX).exists(), dict(sorted(packs.items())), meta)

    # --- helpers --------------------------------------------------------------------------

    def _dir(self, gen: str) -> Path:
        check_component(gen, "generation")
        if gen.endswith(DELETED_SUFFIX):
            raise InvalidInput(detail=f"generation {gen!r} must not end in {DELETED_SUFFIX}")
        return self._gens / gen

    def _writing(self, gen: str) -> Path:
        """The directory of ``gen`` if this store began it; else why it cannot be written."""
        gdir = self._dir(gen)
        if gen in self._held:
            return gdir
        if not gdir.is_dir():
            raise NotFound(what="generation", name=gen)
        if (gdir / INDEX).exists():
            raise InvalidInput(detail=f"generation {gen} is committed: its packs cannot change")
        raise InvalidInput(detail=f"generation {gen} is not begun on this connection")

    def _lock(self, gen: str, gdir: Path) -> int:
        try:
            fd = os.open(gdir / LOCK, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except FileNotFoundError:  # removed by another connection meanwhile
            raise NotFound(what="generation", name=gen) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # A removal may have renamed the directory between our open and flock.
            if os.stat(gdir / LOCK).st_ino != os.fstat(fd).st_ino:
                raise NotFound(what="generation", name=gen)
        except BlockingIOError:
            os.close(fd)
            raise Busy(
                what=f"generation {gen}", reason="another connection is writing it"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _index(self, gen: str) -> dict[str, Any]:
        return read_index(gen, self._dir(gen) / INDEX)

    def _digest(self, gen: str, number: int) -> str:
        digest = xxhash.xxh3_128()
        name = pack_name(number)
        with (
            self._edge(f"{gen}/{PACKS}/{name}", "reading"),
            open(self._dir(gen) / PACKS / name, "rb") as f,
        ):
            while chunk := f.read(_READ):
                digest.update(chunk)
        return digest.hexdigest()

    def _free(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    @contextlib.contextmanager
    def _edge(self, where: str, op: str, needed: int | None = None) -> Iterator[None]:
        """OSError to a named error, naming the place relative to the client's root (the
        message goes to the client: the target's paths are not its business)."""
        try:
            yield
        except OSError as exc:
            shown = f"{self.client}/{where}".rstrip("/")
            if exc.errno in SPACE:
                raise PoolSpaceLow(
                    pool=self.label, free=self._free(), needed=needed, path=shown
                ) from exc
            if exc.errno == errno.ENOENT:
                raise NotFound(what="generation file", name=shown) from exc
            raise map_oserror(exc, path=shown, op=op) from exc
