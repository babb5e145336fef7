"""What a pool says of itself on its disks: its pool file and its volume records.

``pool.json`` names the pool (format, name, uuid, backend details) in every area; one
``records/VOLUME.json`` per volume in every record directory of the pool (each ``dir``
area holds a full copy) keeps what a catalog needs to be rebuilt from the pool alone.
Both are written atomically.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from blockguard.errors import CorruptMetadata
from blockguard.storage.manifest import check_name, fsync_dir, write_atomic

log = logging.getLogger(__name__)

POOL_FILE = "pool.json"


def write_pool_file(directory: Path, info: dict[str, Any]) -> None:
    """Write ``directory``'s pool file (atomically)."""
    write_atomic(directory / POOL_FILE, json.dumps(info, indent=1).encode())


def read_pool_file(directory: Path, fmt: str, backend: str) -> dict[str, Any]:
    """The pool file in ``directory``.

    :param fmt: the ``format`` it must have.
    :raises CorruptMetadata: missing, unreadable or not a ``backend`` pool's.
    """
    path = directory / POOL_FILE
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CorruptMetadata(what=str(path), detail=str(exc)) from None
    if not isinstance(info, dict) or info.get("format") != fmt:
        raise CorruptMetadata(what=str(path), detail=f"not a blockguard {backend} pool")
    return info


RECORDS_DIR = "records"
RECORD_FORMAT = "blockguard-volume"


@dataclass(frozen=True)
class VolumeRecord:
    """What the pool keeps about a volume so a catalog can be rebuilt from it alone.

    Tracking references are not kept: an imported volume starts tracking afresh (its
    next backup is a full).

    ``serial`` is the device's key from :mod:`blockguard.storage.devidentity` (written
    since volumes record it; None in older records and for devices the kernel knows
    nothing stable of). Keeping the old field, not adding one, lets an older daemon
    still read the record; to it the key matches no device, so it leaves the volume
    detached rather than guessing.
    """

    name: str
    device_path: str
    major: int
    minor: int
    size: int
    serial: str | None
    chunk_size: int
    tracker_backend: str
    objectives: dict[str, Any] = field(default_factory=dict)
    group: str | None = None
    group_objectives: dict[str, Any] = field(default_factory=dict)
    updated: float = 0.0

    def to_json(self) -> bytes:
        return (json.dumps({"format": RECORD_FORMAT, **asdict(self)}, indent=1) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> VolumeRecord:
        """:raises CorruptMetadata: not a readable volume record."""
        try:
            body = json.loads(data)
            if not isinstance(body, dict) or body.pop("format", None) != RECORD_FORMAT:
                raise ValueError("not a blockguard volume record")
            record = cls(**body)
            check_name(record.name, "volume name")
            if not isinstance(record.objectives, dict):
                raise ValueError("objectives is not a mapping")
        except (ValueError, TypeError, UnicodeDecodeError) as exc:
            raise CorruptMetadata(what=where, detail=str(exc)) from None
        except Exception as exc:  # InvalidInput of a bad name
            raise CorruptMetadata(what=where, detail=str(exc)) from None
        return record


def write_volume_record(directories: Iterable[Path], record: VolumeRecord) -> None:
    """Store (replace) the record of ``record.name`` atomically, in every directory."""
    check_name(record.name, "volume name")
    for directory in directories:
        new = not directory.exists()
        directory.mkdir(exist_ok=True)
        if new:
            fsync_dir(directory.parent)
        write_atomic(directory / f"{record.name}.json", record.to_json())


def remove_volume_record(directories: Iterable[Path], name: str) -> None:
    """Forget the record of ``name`` in every directory."""
    check_name(name, "volume name")
    for directory in directories:
        path = directory / f"{name}.json"
        if path.exists():
            path.unlink()
            fsync_dir(directory)


def read_volume_records(directories: Iterable[Path]) -> dict[str, VolumeRecord]:
    """Every readable record by volume name (the newest copy when directories differ);
    unreadable ones are logged and left out."""
    found: dict[str, VolumeRecord] = {}
    for directory in directories:
        try:
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            continue
        for entry in names:
            if not entry.endswith(".json") or entry.startswith("."):
                continue
            path = directory / entry
            try:
                record = VolumeRecord.from_json(path.read_bytes(), str(path))
            except (OSError, CorruptMetadata) as exc:
                log.error("volume record %s: %s", path, exc)
                continue
            old = found.get(record.name)
            if old is None or record.updated > old.updated:
                found[record.name] = record
    return found
