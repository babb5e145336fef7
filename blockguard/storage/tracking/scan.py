"""The scan backend: per-chunk hashes per reference, compared with a full read.

(One thing at ~580 lines: the scan tracker and the reference files only it writes and reads.)

Works on any readable block device, with no device-mapper. A reference is a file of one
:func:`~blockguard.storage.tracking.base.chunk_digest` per chunk of the content at that
point; :meth:`ScanTracker.changed` reads the whole device (large sequential ``O_DIRECT``
reads) and reports the chunks whose hash differs. It is always exact about *content*:
a chunk rewritten with the same bytes is not a change, which is what a backup needs.
It costs a full read, so it is not for frequent polling (``cheap_polling`` is false).

State directory layout (one per volume)::

    state.json       index: the references and which ones are no longer vouched for
    NAME.ref         the hashes of reference NAME (binary, see ``_RefHeader``)

Every file is written atomically (temporary file, fsync, rename, fsync of the directory),
the reference file before the index, so a crash leaves either the old or the new state,
and at worst an orphan file that nothing lists. Mutations take an ``flock`` on the
directory, so two processes cannot interleave updates.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import random
import struct
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import xxhash
from pyroaring import BitMap

from blockguard.errors import (
    AlreadyExists,
    BlockguardError,
    InvalidInput,
    NotFound,
    TrackingLost,
)
from blockguard.storage.blockdev import BlockDevice, aligned_buffer
from blockguard.storage.tracking.base import (
    DEFAULT_CHUNK_SIZE,
    DIGEST_SIZE,
    ChangeSet,
    ChangeTracker,
    ChunkHashes,
    MiB,
    TrackerState,
    VerificationResult,
    chunk_count,
    chunk_digest,
    differing_chunks,
    validate_chunk_size,
    validate_reference_name,
)

log = logging.getLogger(__name__)

#: Bytes per read of a full scan: large enough to run at device speed, small enough
#: to stay out of the way of the page cache and other readers.
DEFAULT_READ_SIZE = 8 * MiB
INDEX_NAME = "state.json"
REF_SUFFIX = ".ref"
_ALGO_XXH3_128 = 1


@dataclass(frozen=True)
class ScanStats:
    """How the last full read went (for the performance table and logs)."""

    path: str
    bytes_read: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.bytes_read / 1e6 / self.seconds if self.seconds > 0 else float("inf")


# --- reading a device -------------------------------------------------------------------


def _digest_blocks(
    dev: BlockDevice, chunk_size: int, read_size: int
) -> Iterator[tuple[int, bytes]]:
    """``(first_chunk, packed digests)`` per read of a full sequential pass over ``dev``.

    One ``preadv`` per ``read_size`` bytes. Two aligned buffers take turns: a reader
    thread fills the next one while this thread hashes the current one, so the pass runs
    at the speed of the slower of the two, not of their sum (hashing a 64 KiB chunk with
    xxh3 is only a few times faster than a fast disk reads it). Hashing slices of the
    buffers copies nothing.
    """
    per_read = max(1, read_size // chunk_size)
    size = dev.size
    starts = range(0, chunk_count(size, chunk_size), per_read)
    buffers = [aligned_buffer(per_read * chunk_size) for _ in range(2)]
    views = [memoryview(b) for b in buffers]

    def read(k: int) -> memoryview:
        offset = starts[k] * chunk_size
        block = views[k % 2][: min(per_read * chunk_size, size - offset)]
        if dev.pread_into(block, offset) != len(block):
            raise TrackingLost(
                volume=dev.path,
                reason=f"short read at byte {offset}: did the device shrink during the scan?",
            )
        return block

    pending: Future[memoryview] | None = None
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="scan-read") as reader:
            pending = reader.submit(read, 0) if starts else None
            for k, first in enumerate(starts):
                assert pending is not None
                block = pending.result()
                pending = reader.submit(read, k + 1) if k + 1 < len(starts) else None
                digests = b"".join(
                    chunk_digest(block[lo : lo + chunk_size])
                    for lo in range(0, len(block), chunk_size)
                )
                block.release()
                yield first, digests
    finally:
        # A consumer that stops early (or an error) must not free a buffer that the
        # reader is still filling: the executor's exit has waited for it by now, and a
        # block it read but nobody took still holds the buffer.
        if pending is not None and pending.done() and pending.exception() is None:
            pending.result().release()
        for view in views:
            view.release()
        for buf in buffers:
            buf.close()


def hash_device(
    path: str | os.PathLike[str],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    read_size: int = DEFAULT_READ_SIZE,
) -> ChunkHashes:
    """The :class:`ChunkHashes` of a whole device, read once, sequentially, ``O_DIRECT``."""
    validate_chunk_size(chunk_size)
    with BlockDevice(path, direct=True) as dev:
        digests = bytearray()
        for _first, block in _digest_blocks(dev, chunk_size, read_size):
            digests += block
        return ChunkHashes(chunk_size, dev.size, digests)


# --- the reference file -------------------------------------------------------------------


@dataclass(frozen=True)
class _RefHeader:
    """Fixed header of a ``.ref`` file, followed by ``n_chunks * DIGEST_SIZE`` bytes."""

    chunk_size: int
    volume_size: int
    created_ns: int
    payload_check: int

    MAGIC: ClassVar[bytes] = b"BGSCANH1"
    # magic, version, algorithm, digest size, reserved, chunk size, reserved,
    # volume size, chunk count, created (ns), payload xxh3-64; then xxh3-64 of all that.
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<8sHHHHIIQQQQ")
    SIZE: ClassVar[int] = STRUCT.size + 8

    def pack(self) -> bytes:
        head = self.STRUCT.pack(
            self.MAGIC,
            1,
            _ALGO_XXH3_128,
            DIGEST_SIZE,
            0,
            self.chunk_size,
            0,
            self.volume_size,
            chunk_count(self.volume_size, self.chunk_size),
            self.created_ns,
            self.payload_check,
        )
        return head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head))

    @classmethod
    def unpack(cls, data: bytes, file_size: int) -> _RefHeader:
        """:raises ValueError: with what is wrong, in words."""
        if len(data) < cls.SIZE:
            raise ValueError(f"hash file is truncated ({file_size} bytes)")
        head = data[: cls.STRUCT.size]
        (check,) = struct.unpack_from("<Q", data, cls.STRUCT.size)
        if check != xxhash.xxh3_64_intdigest(head):
            raise ValueError("hash file header is corrupt (checksum mismatch)")
        fields = cls.STRUCT.unpack(head)
        magic, version, algo, digest_size, _r1, chunk_size, _r2, volume_size, n, created, pc = (
            fields
        )
        if magic != cls.MAGIC or version != 1 or algo != _ALGO_XXH3_128:
            raise ValueError("not a blockguard scan hash file of a known version")
        if digest_size != DIGEST_SIZE or n != chunk_count(volume_size, chunk_size):
            raise ValueError("hash file header is inconsistent")
        if file_size != cls.SIZE + n * DIGEST_SIZE:
            raise ValueError(
                f"hash file has {file_size} bytes, its header says {cls.SIZE + n * DIGEST_SIZE}"
            )
        return cls(chunk_size, volume_size, created, pc)


def _write_atomic(directory: Path, name: str, parts: Iterable[bytes | bytearray]) -> None:
    """Write ``directory/name`` so that it is either the old or the whole new file."""
    tmp = directory / f".{name}.tmp-{os.getpid()}-{random.getrandbits(32):08x}"
    try:
        with open(tmp, "xb") as f:
            for part in parts:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / name)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- the index ----------------------------------------------------------------------------


@dataclass
class _Index:
    """References held -> why each is no longer vouched for (``None``: it is exact)."""

    refs: dict[str, str | None]
    #: Set when the index itself was lost: every reference found on disk is suspect.
    problem: str | None = None


# --- the tracker --------------------------------------------------------------------------


class ScanTracker(ChangeTracker):
    """Change tracking by hashing the whole device (see the module docstring).

    :param volume: the protected device.
    :param state_dir: this volume's own directory (created if missing).
    :param chunk_size: bytes per chunk (power of two, 4 KiB..16 MiB).
    :param read_size: bytes per read of a full scan.
    """

    backend = "scan"
    cheap_polling = False

    def __init__(
        self,
        volume: str | os.PathLike[str],
        state_dir: str | os.PathLike[str],
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        *,
        read_size: int = DEFAULT_READ_SIZE,
    ) -> None:
        super().__init__(volume, chunk_size)
        self.state_dir = Path(state_dir)
        self.read_size = max(read_size, chunk_size)
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._locked():
            # Leftovers of writes that a crash interrupted; the lock keeps live ones safe.
            for tmp in self.state_dir.glob(".*.tmp-*"):
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        #: The last full read (``changed``, ``add_reference``), for throughput figures.
        self.last_scan: ScanStats | None = None
        # What changed() last reported per reference in this process: the "claimed"
        # set that verify_reference checks.
        self._reported: dict[str, ChangeSet] = {}

    # --- queries ------------------------------------------------------------------

    def references(self) -> list[str]:
        return sorted(self._load_index().refs)

    def state(self) -> TrackerState:
        """Cheap: reads the index and each reference's header, and the volume's size."""
        index = self._load_index()
        try:
            with BlockDevice(self.volume) as dev:
                size: int | None = dev.size
        except BlockguardError as exc:
            if index.refs:
                return TrackerState.unknown(f"cannot read the volume: {exc}")
            size = None
        problems = []
        for name in sorted(index.refs):
            why = index.refs[name]
            if why is None:
                try:
                    header = self._read_header(name)
                    why = self._geometry_problem(header, size)
                except ValueError as exc:
                    why = str(exc)
            if why:
                problems.append(f"reference {name}: {why}")
        return TrackerState.unknown("; ".join(problems)) if problems else TrackerState.exact()

    def changed(self, name: str) -> ChangeSet:
        """Chunks whose content differs from reference ``name``: one full read.

        :raises NotFound: no such reference.
        :raises TrackingLost: the reference is not vouched for, its hash file is missing or
            corrupt, or the volume's size differs from the reference's.
        """
        return self.changed_many([name])[name]

    def changed_many(self, names: Iterable[str]) -> dict[str, ChangeSet]:
        """:meth:`changed` for several references with a single full read."""
        names = list(dict.fromkeys(names))
        if not names:
            return {}
        index = self._load_index()
        stored = {name: self._load_hashes(name, index) for name in names}
        found: dict[str, BitMap] = {name: BitMap() for name in names}
        with BlockDevice(self.volume, direct=True) as dev:
            for name, hashes in stored.items():
                if why := self._geometry_problem(hashes, dev.size):
                    raise TrackingLost(volume=self.volume, reason=f"reference {name}: {why}")
            t0 = time.monotonic()
            for first, block in _digest_blocks(dev, self.chunk_size, self.read_size):
                for name, hashes in stored.items():
                    found[name].update(differing_chunks(first, block, hashes))
            self.last_scan = ScanStats(self.volume, dev.size, time.monotonic() - t0)
            size = dev.size
        result = {name: ChangeSet(self.chunk_size, size, bm) for name, bm in found.items()}
        self._reported.update(result)
        log.info(
            "scanned %s at %.0f MB/s: %s",
            self.volume,
            self.last_scan.mb_per_s,
            ", ".join(f"{n}: {len(cs)} chunks changed" for n, cs in result.items()),
        )
        return result

    def stored_hashes(self, name: str) -> ChunkHashes:
        """The content hashes of reference ``name`` (verified against their checksum).

        :raises NotFound: no such reference.
        :raises TrackingLost: not vouched for, missing or corrupt.
        """
        return self._load_hashes(name, self._load_index())

    # --- changes --------------------------------------------------------------------

    def add_reference(
        self,
        name: str,
        *,
        replace: bool = False,
        source: str | os.PathLike[str] | None = None,
        hashes: ChunkHashes | None = None,
    ) -> None:
        """Store the content hashes of "now" as reference ``name``.

        "Now" is the content the backup being taken copies. A backup reads a point-in-time
        snapshot, not the live volume: pass that snapshot as ``source``, or better, the
        :class:`ChunkHashes` the backup computed while copying as ``hashes`` (no second
        full read). With neither, the live volume is read.

        :param replace: move an existing reference ``name`` to now (atomically).
        :raises AlreadyExists: ``name`` exists and ``replace`` is false.
        :raises InvalidInput: bad name; both ``source`` and ``hashes``; a chunk size or a
            size that is not the volume's.
        """
        validate_reference_name(name)
        if source is not None and hashes is not None:
            raise InvalidInput(detail="give either a source device or the hashes, not both")
        if not replace and name in self._load_index().refs:
            raise AlreadyExists(what="reference", name=name)
        with BlockDevice(self.volume) as dev:
            volume_size = dev.size
        if hashes is None:
            path = os.fspath(source) if source is not None else self.volume
            t0 = time.monotonic()
            hashes = hash_device(path, self.chunk_size, read_size=self.read_size)
            self.last_scan = ScanStats(path, hashes.volume_size, time.monotonic() - t0)
        if hashes.chunk_size != self.chunk_size or hashes.volume_size != volume_size:
            raise InvalidInput(
                detail=f"hashes for {hashes.volume_size} bytes in {hashes.chunk_size}-byte "
                f"chunks do not fit {self.volume} ({volume_size} bytes, "
                f"{self.chunk_size}-byte chunks)"
            )
        header = _RefHeader(
            chunk_size=self.chunk_size,
            volume_size=volume_size,
            created_ns=time.time_ns(),
            payload_check=xxhash.xxh3_64_intdigest(hashes.digests),
        )
        with self._locked():
            index = self._load_index()
            if not replace and name in index.refs:
                raise AlreadyExists(what="reference", name=name)
            # The hashes first, then the index: a crash in between leaves an orphan file
            # (or, on replace, a new file still listed with its old taint: conservative).
            _write_atomic(self.state_dir, name + REF_SUFFIX, [header.pack(), hashes.digests])
            index.refs[name] = None
            self._save_index(index)
        self._reported.pop(name, None)

    def drop_reference(self, name: str) -> None:
        """Forget reference ``name`` and delete its hashes.

        :raises NotFound: no such reference.
        """
        with self._locked():
            index = self._load_index()
            if name not in index.refs:
                raise NotFound(what="reference", name=name)
            del index.refs[name]
            self._save_index(index)
            with contextlib.suppress(FileNotFoundError):
                (self.state_dir / (name + REF_SUFFIX)).unlink()
            _fsync_dir(self.state_dir)
        self._reported.pop(name, None)

    def mark_unknown(self, reason: str) -> None:
        """Stop vouching for every reference held now (persistently), because of ``reason``."""
        with self._locked():
            index = self._load_index()
            for name, why in index.refs.items():
                if why is None:
                    index.refs[name] = reason
            self._save_index(index)
        log.warning("change tracking of %s is now unknown: %s", self.volume, reason)

    def verify_reference(
        self,
        name: str,
        *,
        claimed: ChangeSet | None = None,
        count: int | None = None,
        fraction: float | None = None,
        rng: random.Random | None = None,
        source: str | os.PathLike[str] | None = None,
    ) -> VerificationResult:
        """:meth:`verify_sample` against reference ``name``'s own stored hashes.

        Re-reads a sample of the chunks reported unchanged since ``name`` (``claimed``, by
        default what :meth:`changed` last reported in this process) and compares them with
        the stored hashes; a mismatch marks the tracker unknown.

        :raises InvalidInput: no ``claimed`` given and nothing reported yet.
        """
        hashes = self.stored_hashes(name)
        claimed = claimed if claimed is not None else self._reported.get(name)
        if claimed is None:
            raise InvalidInput(
                detail=f"no change set of reference {name} to verify: call changed() first "
                "or pass the claimed change set"
            )
        return self.verify_sample(
            hashes, claimed, count=count, fraction=fraction, rng=rng, source=source
        )

    # --- internals -------------------------------------------------------------------

    def _geometry_problem(self, stored: ChunkHashes | _RefHeader, size: int | None) -> str:
        if stored.chunk_size != self.chunk_size:
            return (
                f"its hashes use {stored.chunk_size}-byte chunks, the tracker "
                f"{self.chunk_size}-byte chunks"
            )
        if size is not None and stored.volume_size != size:
            return (
                f"the volume is now {size} bytes but was {stored.volume_size} bytes at the "
                "reference (resized)"
            )
        return ""

    def _read_header(self, name: str) -> _RefHeader:
        path = self.state_dir / (name + REF_SUFFIX)
        try:
            with open(path, "rb") as f:
                return _RefHeader.unpack(f.read(_RefHeader.SIZE), os.fstat(f.fileno()).st_size)
        except FileNotFoundError:
            raise ValueError(f"its hash file {path} is missing") from None
        except OSError as exc:
            raise ValueError(f"its hash file {path} cannot be read: {exc.strerror}") from None

    def _load_hashes(self, name: str, index: _Index) -> ChunkHashes:
        if name not in index.refs:
            raise NotFound(what="reference", name=name)
        if why := index.refs[name]:
            raise TrackingLost(volume=self.volume, reason=f"reference {name}: {why}")
        path = self.state_dir / (name + REF_SUFFIX)
        try:
            with open(path, "rb") as f:
                data = f.read()
            header = _RefHeader.unpack(data, len(data))
            payload = memoryview(data)[_RefHeader.SIZE :]
            if xxhash.xxh3_64_intdigest(payload) != header.payload_check:
                raise ValueError(f"its hash file {path} is corrupt (checksum mismatch)")
        except FileNotFoundError:
            why = f"its hash file {path} is missing"
        except (OSError, ValueError) as exc:
            why = str(exc) if isinstance(exc, ValueError) else f"cannot read {path}: {exc}"
        else:
            return ChunkHashes(header.chunk_size, header.volume_size, payload)
        # A lost reference stays lost even if a file reappears later.
        self._taint(name, why)
        raise TrackingLost(volume=self.volume, reason=f"reference {name}: {why}")

    def _taint(self, name: str, why: str) -> None:
        with self._locked():
            index = self._load_index()
            if name in index.refs and index.refs[name] is None:
                index.refs[name] = why
                self._save_index(index)
        log.warning("reference %s of %s is not vouched for: %s", name, self.volume, why)

    def _load_index(self) -> _Index:
        path = self.state_dir / INDEX_NAME
        on_disk = sorted(
            p.name[: -len(REF_SUFFIX)]
            for p in self.state_dir.glob("*" + REF_SUFFIX)
            if not p.name.startswith(".")
        )
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            if not on_disk:
                return _Index({})
            problem = f"the reference index {path} is missing"
        else:
            try:
                doc = json.loads(raw)
                if doc.get("format") != 1 or not isinstance(doc.get("references"), dict):
                    raise ValueError("unknown format")
                refs = {}
                for name, why in doc["references"].items():
                    validate_reference_name(name)
                    if why is not None and not isinstance(why, str):
                        raise ValueError(f"bad entry for {name}")
                    refs[name] = why
                return _Index(refs)
            except (ValueError, AttributeError, InvalidInput) as exc:
                problem = f"the reference index {path} is corrupt ({exc})"
        # Whatever the lost index said about these references is gone: vouch for none.
        return _Index(dict.fromkeys(on_disk, problem), problem=problem)

    def _save_index(self, index: _Index) -> None:
        doc = {
            "format": 1,
            "volume": self.volume,
            "chunk_size": self.chunk_size,
            "references": dict(sorted(index.refs.items())),
        }
        _write_atomic(self.state_dir, INDEX_NAME, [json.dumps(doc, indent=1).encode() + b"\n"])

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
