"""The self-describing manifest of one generation, and its atomic commit.

A generation on a pool is a directory (or a prefix, for object stores) holding the data
(an image or packed chunks), a binary array of per-chunk checksums and ``manifest.json``.
The manifest is written last, atomically (temporary file, fsync, rename, fsync of the
directory): a generation whose manifest is not there was never committed and is garbage.
Everything needed to restore is in the manifest, so a pool can be read on another host
without the daemon's catalog.

The checksum array holds one little-endian ``u64`` xxh3_64 per *stored* chunk, in chunk
order: every chunk of the volume for a full, the changed chunks for a delta. Its own
xxh3_128 is in the manifest, and the manifest carries a digest of itself.
"""

from __future__ import annotations

import array
import base64
import contextlib
import json
import os
import random
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import xxhash
from pyroaring import BitMap

from blockguard.core.vocab import GenerationKind
from blockguard.errors import CorruptMetadata, EnvironmentProblem, InvalidChunkSize, InvalidInput

FORMAT = "blockguard-generation"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
CHECKSUM_ALGORITHM = "xxh3_64"

MIN_CHUNK_SIZE = 4096
MAX_CHUNK_SIZE = 16 << 20


@dataclass(frozen=True)
class VolumeIdentity:
    """The volume a generation belongs to.

    :param name: the volume's name in blockguard (a safe path component).
    :param size: size in bytes (a multiple of 512).
    :param device_id: a stable identity of the volume (e.g. an LV UUID or ``MAJ:MIN``).
    """

    name: str
    size: int
    device_id: str = ""

    def __post_init__(self) -> None:
        # Not the admin name rule: the pool also holds blockguard's own volumes ("@drill").
        check_component(self.name, "volume name")
        if self.size <= 0 or self.size % 512:
            raise InvalidInput(detail=f"volume size {self.size} is not a positive multiple of 512")


def check_component(value: str, what: str) -> None:
    """Refuse an id or label the storage layer makes (a generation id, a swap-in label of
    ``VOLUME-GENERATION``) unless it is one plain path component.

    Not a rule for names: the names an administrator gives pass :func:`vocab.check_name`.
    This one is wider (128 characters, ``@`` and ``:``) because labels compose a name and
    an id, and it must keep accepting what pools already hold.
    """
    ok = (
        value
        and len(value) <= 128
        and value not in (".", "..")
        and not value.startswith(".")
        and all(c.isalnum() or c in "-_.+@:" for c in value)
    )
    if not ok:
        raise InvalidInput(detail=f"{what} {value!r} must be 1-128 of [A-Za-z0-9-_.+@:]")


#: The spelling storage/pool/* still imports (the pool rework replaces it with
#: :func:`check_component` for ids and labels and :func:`vocab.check_name` for names).
check_name = check_component


def check_chunk_size(chunk_size: int) -> None:
    """Chunk sizes are powers of two between 4 KiB and 16 MiB (O_DIRECT alignment)."""
    if chunk_size < MIN_CHUNK_SIZE or chunk_size > MAX_CHUNK_SIZE or chunk_size & (chunk_size - 1):
        raise InvalidChunkSize(chunk_size=chunk_size)


def chunk_count(volume_size: int, chunk_size: int) -> int:
    """Number of chunks of a volume; the last one may be short."""
    return -(-volume_size // chunk_size)


#: The creation stamp that starts a generation id.
_ID_STAMP = "%Y%m%dT%H%M%S.%fZ"
_id_lock = threading.Lock()
_last_id_time = 0


#: Test hook: names a file holding seconds added to the clock that stamps new generations.
GENERATION_CLOCK_ENV = "BLOCKGUARD_TEST_GENERATION_CLOCK"


def generation_clock() -> float:
    """Now, as a new generation is stamped (its id and ``created``).

    Test hook: when :data:`GENERATION_CLOCK_ENV` names a file, the seconds it holds (read
    each time) are added, so a test of time-tiered retention can make the generations of
    a year without waiting for one. Unset (always, outside tests), it is ``time.time()``.
    """
    now = time.time()
    path = os.environ.get(GENERATION_CLOCK_ENV)
    if path:
        with contextlib.suppress(OSError, ValueError):
            now += float(Path(path).read_text().strip() or 0)
    return now


def new_generation_id(now: float | None = None) -> str:
    """A unique id that sorts by creation time: ``20261103T120501.123456Z-1a2b3c4d``.

    Strictly increasing within a process even when the clock stands still or steps back.

    :param now: the creation time (default: :func:`generation_clock`).
    """
    global _last_id_time
    micros = int((generation_clock() if now is None else now) * 1e6)
    with _id_lock:
        now_us = max(micros, _last_id_time + 1)
        _last_id_time = now_us
    stamp = datetime.fromtimestamp(now_us / 1e6, UTC).strftime(_ID_STAMP)
    return f"{stamp}-{random.getrandbits(32):08x}"


def generation_id_time(generation_id: str) -> float | None:
    """The creation time a generation id carries (:func:`new_generation_id`), or None
    when it has no stamp."""
    try:
        stamp = datetime.strptime(generation_id.split("-", 1)[0], _ID_STAMP)
    except ValueError:
        return None
    return stamp.replace(tzinfo=UTC).timestamp()


def bitmap_to_text(bm: BitMap) -> str:
    return base64.b64encode(bm.serialize()).decode("ascii")


def bitmap_from_text(text: str) -> BitMap:
    return BitMap.deserialize(base64.b64decode(text.encode("ascii"), validate=True))


@dataclass(frozen=True)
class Manifest:
    """Everything a pool knows about one committed generation.

    ``changed`` is the set of chunks written by this generation: relative to the parent for
    an incremental, to the base full for a differential, to ``cloned_from`` for a full made
    from a clone of the previous full, and every chunk for a full made from scratch.
    ``storage`` is the backend's own description of where the data is (file names, LV
    names, object keys); generic code never interprets it.
    """

    generation_id: str
    volume: VolumeIdentity
    chunk_size: int
    kind: GenerationKind
    base_id: str | None
    parent_id: str | None
    changed: BitMap
    cloned_from: str | None = None
    created: float = 0.0
    bytes_stored: int = 0
    checksum_count: int = 0
    checksum_digest: str = ""
    storage: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    #: The volume's running number of this generation (``db@7``), 0 when the manifest
    #: predates numbering: :func:`sequence_numbers` then numbers it by its place.
    sequence: int = 0

    @property
    def chunks(self) -> int:
        return chunk_count(self.volume.size, self.chunk_size)

    @property
    def is_full(self) -> bool:
        return self.kind is GenerationKind.FULL

    def stored_chunks(self) -> BitMap:
        """Chunks whose data this generation holds (all of them for a full)."""
        if self.is_full:
            return BitMap(range(self.chunks))
        return self.changed

    def chunk_bytes(self, chunk: int) -> int:
        """Length of a chunk (the last chunk of the volume may be short)."""
        return min(self.chunk_size, self.volume.size - chunk * self.chunk_size)

    def bytes_of(self, chunks: BitMap) -> int:
        """Bytes of the volume in ``chunks`` (O(1): only the last chunk may be short)."""
        n = len(chunks) * self.chunk_size
        last = self.chunks - 1
        if last in chunks:
            n -= self.chunk_size - self.chunk_bytes(last)
        return n

    def checksum_slot(self, chunk: int) -> int:
        """Index of ``chunk``'s checksum in the array (also its slot in a packed file)."""
        if self.is_full:
            return chunk
        if chunk not in self.changed:
            raise InvalidInput(detail=f"chunk {chunk} is not in generation {self.generation_id}")
        return self.changed.rank(chunk) - 1

    def with_(self, **changes: Any) -> Manifest:
        return replace(self, **changes)

    # --- serialisation ------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "format": FORMAT,
            "format_version": self.format_version,
            "generation_id": self.generation_id,
            "volume": {
                "name": self.volume.name,
                "size": self.volume.size,
                "device_id": self.volume.device_id,
            },
            "chunk_size": self.chunk_size,
            "kind": self.kind.value,
            "base_id": self.base_id,
            "parent_id": self.parent_id,
            "cloned_from": self.cloned_from,
            "changed": bitmap_to_text(self.changed),
            "changed_count": len(self.changed),
            "checksums": {
                "algorithm": CHECKSUM_ALGORITHM,
                "count": self.checksum_count,
                "digest": self.checksum_digest,
            },
            "created": self.created,
            "created_utc": datetime.fromtimestamp(self.created, UTC).isoformat(),
            "bytes_stored": self.bytes_stored,
            "storage": self.storage,
        }
        if self.sequence:
            # Left out when 0, so a manifest written before numbering keeps its digest.
            body["sequence"] = self.sequence
        body["digest"] = _digest(body)
        return body

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str = "manifest") -> Manifest:
        """Parse and check a manifest.

        :raises CorruptMetadata: bad JSON, unknown format, a wrong digest or bad fields.
        """
        try:
            body = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CorruptMetadata(what=where, detail=f"not JSON ({exc})") from None
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise CorruptMetadata(what=where, detail="not a blockguard generation manifest")
        if body.get("format_version") != FORMAT_VERSION:
            raise CorruptMetadata(
                what=where, detail=f"unsupported format version {body.get('format_version')!r}"
            )
        stored_digest = body.pop("digest", None)
        if stored_digest != _digest(body):
            raise CorruptMetadata(what=where, detail="its digest does not match its content")
        try:
            vol = body["volume"]
            sums = body["checksums"]
            if sums["algorithm"] != CHECKSUM_ALGORITHM:
                raise ValueError(f"checksum algorithm {sums['algorithm']!r}")
            manifest = cls(
                generation_id=str(body["generation_id"]),
                volume=VolumeIdentity(str(vol["name"]), int(vol["size"]), str(vol["device_id"])),
                chunk_size=int(body["chunk_size"]),
                kind=GenerationKind(body["kind"]),
                base_id=body["base_id"],
                parent_id=body["parent_id"],
                cloned_from=body["cloned_from"],
                changed=bitmap_from_text(body["changed"]),
                created=float(body["created"]),
                bytes_stored=int(body["bytes_stored"]),
                checksum_count=int(sums["count"]),
                checksum_digest=str(sums["digest"]),
                storage=dict(body["storage"]),
                sequence=int(body.get("sequence", 0)),
            )
            check_chunk_size(manifest.chunk_size)
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptMetadata(what=where, detail=f"bad field: {exc}") from None
        except Exception as exc:  # InvalidInput etc. from field checks
            raise CorruptMetadata(what=where, detail=str(exc)) from None
        expected = manifest.chunks if manifest.is_full else len(manifest.changed)
        if manifest.checksum_count != expected:
            raise CorruptMetadata(
                what=where,
                detail=f"{manifest.checksum_count} checksums for {expected} stored chunks",
            )
        return manifest


def sequence_numbers(manifests: list[Manifest]) -> dict[str, int]:
    """The running number of each generation of one volume: generation id -> number.

    A manifest keeps the number it was given at commit; one written before numbering
    (``sequence`` 0) takes the next number after the generation before it, oldest first,
    so every generation has a number and a pool read on another host gives the same ones.

    :param manifests: every readable manifest of one volume, in any order.
    """
    numbers: dict[str, int] = {}
    last = 0
    for m in sorted(manifests, key=lambda m: (m.created, m.generation_id)):
        last = m.sequence if m.sequence > last else last + 1
        numbers[m.generation_id] = last
    return numbers


def _digest(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return xxhash.xxh3_128_hexdigest(canonical)


# --- checksum arrays ------------------------------------------------------------------


def new_checksum_array(count: int) -> array.array[int]:
    return array.array("Q", bytes(8 * count))


def checksum_bytes(sums: array.array[int]) -> bytes:
    """The on-disk form of a checksum array: little-endian u64."""
    if sys.byteorder == "little":
        return sums.tobytes()
    swapped = array.array("Q", sums)
    swapped.byteswap()
    return swapped.tobytes()


def checksum_digest(raw: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(raw)


def checksums_from_bytes(raw: bytes, manifest: Manifest, where: str) -> array.array[int]:
    """Parse a checksum array and check it against the manifest.

    :raises CorruptMetadata: wrong length or digest.
    """
    if len(raw) != 8 * manifest.checksum_count or checksum_digest(raw) != manifest.checksum_digest:
        raise CorruptMetadata(what=where, detail="checksum array does not match its manifest")
    sums = array.array("Q")
    sums.frombytes(raw)
    if sys.byteorder != "little":
        sums.byteswap()
    return sums


# --- atomic files ---------------------------------------------------------------------


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes) -> None:
    """Write a new file and fsync it (its directory entry is the caller's to sync)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file so that it exists either complete or not at all, durably."""
    tmp = path.with_name(f".{path.name}.tmp")
    write_durable(tmp, data)
    crash_point(f"atomic-{path.name}")
    os.rename(tmp, path)
    fsync_dir(path.parent)


def read_manifest(directory: Path) -> Manifest:
    """Read ``manifest.json`` of a generation directory.

    :raises CorruptMetadata: unreadable or inconsistent manifest.
    """
    where = str(directory / MANIFEST_NAME)
    try:
        data = (directory / MANIFEST_NAME).read_bytes()
    except OSError as exc:
        raise CorruptMetadata(what=where, detail=exc.strerror or str(exc)) from None
    manifest = Manifest.from_json(data, where)
    if manifest.generation_id != directory.name:
        raise CorruptMetadata(
            what=where, detail=f"it names generation {manifest.generation_id}, not {directory.name}"
        )
    return manifest


# --- crash testing ----------------------------------------------------------------------

_crash_hits: dict[str, int] = {}
_fail_hits: dict[str, int] = {}


def _reached(wanted: str, name: str, hits: dict[str, int]) -> bool:
    point, _, nth = wanted.partition("@")
    if point != name:
        return False
    hits[name] = hits.get(name, 0) + 1
    if nth.endswith("+"):  # NAME@N+: the N-th time and every time after it
        return hits[name] >= int(nth[:-1] or 1)
    return hits[name] == int(nth or 1)


def crash_point(name: str) -> None:
    """Test hook: SIGKILL this process at a named point of the commit protocol.

    Active only when ``BLOCKGUARD_TEST_CRASH_AT`` is ``NAME`` or ``NAME@N`` (the N-th
    time the point is reached); crash tests use it to stop a backup exactly there.
    ``BLOCKGUARD_TEST_FAIL_AT`` (same form, or ``NAME@N+`` for the N-th time and every
    time after) raises :class:`EnvironmentProblem` there instead: a failure the process
    survives, for tests of what a failed commit leaves or of failing backups.
    """
    failing = os.environ.get("BLOCKGUARD_TEST_FAIL_AT")
    if failing and _reached(failing, name, _fail_hits):
        raise EnvironmentProblem(detail=f"test fault injected at {name} (BLOCKGUARD_TEST_FAIL_AT)")
    wanted = os.environ.get("BLOCKGUARD_TEST_CRASH_AT")
    if not wanted:
        return
    point, _, nth = wanted.partition("@")
    if point != name:
        return
    _crash_hits[name] = _crash_hits.get(name, 0) + 1
    if _crash_hits[name] >= int(nth or 1):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
