"""A generation directory: what every pool keeps of a generation on its file system.

``volumes/VOLUME/GENERATION_ID/`` holds ``checksums.xxh3`` and, committed last,
``manifest.json`` (the ``dir`` pool also keeps the chunks there; the ``lvm`` pool keeps
them in an LV the manifest names). While a writer owns it, it holds an flock on the
``.writing`` file; a directory with no manifest whose lock can be taken is garbage, as is
a ``*.deleted`` one (an interrupted removal: the rename is the removal's commit point).
A ``damaged.json`` records damage that a verify or a restore found.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from blockguard.errors import CorruptMetadata, EnvironmentProblem
from blockguard.storage.ioedge import io_edge
from blockguard.storage.manifest import (
    MANIFEST_NAME,
    Manifest,
    fsync_dir,
    read_manifest,
    write_atomic,
)
from blockguard.storage.pool.values import DamagedGeneration, PoolScan

log = logging.getLogger(__name__)

CHECKSUMS = "checksums.xxh3"
LOCK = ".writing"
#: Name suffix of a generation directory whose removal was committed.
DELETED_SUFFIX = ".deleted"
#: A generation directory's record of damage found on use (see ``mark_damaged``).
DAMAGE_RECORD = "damaged.json"


def subdirs(path: Path) -> list[Path]:
    """The real (not symlinked) subdirectories of ``path``, sorted; [] when it is missing."""
    try:
        return sorted(p for p in path.iterdir() if p.is_dir() and not p.is_symlink())
    except FileNotFoundError:
        return []


# --- the writer's lock ------------------------------------------------------------------

_creating: set[str] = set()
_creating_lock = threading.Lock()


@contextlib.contextmanager
def creating(gen: Path) -> Iterator[None]:
    """Mark ``gen`` as being created by a writer of this process until its lock is held.

    Between a writer's mkdir and its flock the directory has no locked ``.writing`` file;
    a garbage collection of this process that looked then would take it for garbage. It
    asks :func:`writer_alive`, which knows these directories. (Pools are written by one
    process: the daemon holding its state directory; a writer of a killed process left
    garbage, whatever its age.)"""
    key = str(gen)
    with _creating_lock:
        _creating.add(key)
    try:
        yield
    finally:
        with _creating_lock:
            _creating.discard(key)


def writer_alive(gen: Path) -> bool:
    """True while a live writer holds the generation's lock or is creating it."""
    with _creating_lock:
        if str(gen) in _creating:
            return True
    try:
        fd = os.open(gen / LOCK, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def lock_generation_dir(gen_dir: Path, pool: str | None = None) -> int:
    """Make ``gen_dir`` and hold its ``.writing`` flock; returns the lock's fd.

    :raises EnvironmentProblem: a concurrent garbage collection removed it meanwhile.
    """
    with creating(gen_dir):
        with io_edge(gen_dir, "creating", pool=pool):
            gen_dir.mkdir(parents=True)
        try:
            with io_edge(gen_dir / LOCK, "creating", pool=pool):
                fd = os.open(gen_dir / LOCK, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except BaseException:
            shutil.rmtree(gen_dir, ignore_errors=True)
            raise
        fcntl.flock(fd, fcntl.LOCK_EX)
    # A concurrent open() may have taken the directory for garbage between our mkdir and
    # flock: then the lock we hold is on a removed file.
    try:
        same = os.stat(gen_dir / LOCK).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        same = False
    if not same:
        os.close(fd)
        shutil.rmtree(gen_dir, ignore_errors=True)
        raise EnvironmentProblem(detail=f"{gen_dir} was removed while being created")
    return fd


# --- reading what is committed ----------------------------------------------------------


def scan_generation_dirs(
    volume_dirs: Iterable[Path], files_problem: Callable[[Path, Manifest], str | None]
) -> PoolScan:
    """Read the committed generation directories of some volumes.

    A directory with a manifest is committed; an unreadable manifest, or a readable one
    whose files ``files_problem`` finds wrong, is reported as damaged (never removed:
    the garbage collector only takes what was never committed).
    """
    good: list[Manifest] = []
    damaged: list[DamagedGeneration] = []
    for vol in volume_dirs:
        for gen in subdirs(vol):
            if gen.name.endswith(DELETED_SUFFIX) or not (gen / MANIFEST_NAME).exists():
                continue
            try:
                manifest = read_manifest(gen)
            except CorruptMetadata as exc:
                log.error("%s", exc)
                damaged.append(
                    DamagedGeneration(vol.name, gen.name, f"its manifest is unreadable: {exc}")
                )
                continue
            record = read_damage_record(gen)
            if record is not None:
                reason, chunk = record
                damaged.append(DamagedGeneration(vol.name, gen.name, reason, manifest, True, chunk))
                continue
            problem = files_problem(gen, manifest)
            if problem:
                log.error("generation %s/%s is damaged: %s", vol.name, gen.name, problem)
                damaged.append(DamagedGeneration(vol.name, gen.name, problem, manifest))
            else:
                good.append(manifest)
    good.sort(key=lambda m: (m.created, m.generation_id))
    damaged.sort(key=lambda d: d.generation_id)
    return PoolScan(good, damaged)


def file_problem(path: Path, what: str, min_size: int, exact: bool = False) -> str | None:
    """Why a generation's file cannot be what its manifest says, or None (one stat)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"its {what} {path.name} is missing"
    except OSError as exc:
        return f"its {what} {path.name} cannot be read: {exc.strerror or exc}"
    if size < min_size or (exact and size != min_size):
        return f"its {what} {path.name} has {size} bytes, {min_size} expected"
    return None


def checksums_problem(gen: Path, m: Manifest) -> str | None:
    """Why the generation's checksum array is not what its manifest says, or None."""
    return file_problem(
        gen / m.storage.get("checksums", CHECKSUMS),
        "checksum array",
        8 * m.checksum_count,
        exact=True,
    )


def manifests_of(scan: PoolScan) -> list[Manifest]:
    """Every readable manifest of a scan (good and damaged), oldest first."""
    found = scan.manifests + [d.manifest for d in scan.damaged if d.manifest is not None]
    return sorted(found, key=lambda m: (m.created, m.generation_id))


# --- damage found on use ----------------------------------------------------------------


def write_damage_record(gen: Path, reason: str, chunk: int | None) -> None:
    """Write a generation directory's :data:`DAMAGE_RECORD` (atomically)."""
    body = {"reason": reason, "chunk": chunk, "recorded": time.time()}
    write_atomic(gen / DAMAGE_RECORD, json.dumps(body).encode())


def read_damage_record(gen: Path) -> tuple[str, int | None] | None:
    """(reason, chunk) of a :data:`DAMAGE_RECORD`, or None without one.

    An unreadable record still means the generation was found damaged.
    """
    try:
        body = json.loads((gen / DAMAGE_RECORD).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return "a verify or restore found it damaged", None
    if not isinstance(body, dict):
        return "a verify or restore found it damaged", None
    chunk = body.get("chunk")
    return str(body.get("reason") or "found damaged"), chunk if isinstance(chunk, int) else None


def remove_damage_record(gen: Path) -> None:
    try:
        (gen / DAMAGE_RECORD).unlink()
    except FileNotFoundError:
        return
    fsync_dir(gen)
