"""The values and formats of a client's pack store on a target (:mod:`.packstore`): what
``status`` and ``list`` return, pack names, and the index a client commits."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from blockguard.errors import DataError, InvalidInput

#: Pack numbers are six digits in file names: 10^6 packs of 8 MiB is ~8 TiB a generation.
MAX_PACK = 999_999
INDEX_FORMAT = 1
PACK_NAME = re.compile(r"([0-9]{6})\.pack")
_DIGEST = re.compile(r"[0-9a-f]{32}")


def pack_digest(data: bytes) -> str:
    """The checksum an index names for a pack: xxh3_128 of the bytes stored, in hex."""
    return xxhash.xxh3_128_hexdigest(data)


@dataclass(frozen=True)
class GenerationState:
    """What ``status`` says of a generation: its stored packs (number -> bytes)."""

    generation: str
    committed: bool
    packs: dict[int, int]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StoredGeneration:
    """A committed generation as ``list`` shows it; ``problem`` names damage found."""

    generation: str
    meta: dict[str, Any]
    packs: int
    size: int
    committed: float
    manifest: bytes
    problem: str | None = None


@dataclass(frozen=True)
class Space:
    """The area's file system (``free``, ``total``) and what this client uses of it."""

    free: int
    total: int
    used: int


def pack_name(number: int) -> str:
    if type(number) is not int or not 0 <= number <= MAX_PACK:
        raise InvalidInput(detail=f"pack number {number!r} must be an integer 0-{MAX_PACK}")
    return f"{number:06d}.pack"


def index_entries(gen: str, index: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The pack entries of a client's index, checked (unique numbers, sizes, digests)."""
    packs = index.get("packs") if isinstance(index, Mapping) else None
    if not isinstance(packs, list):
        raise InvalidInput(detail=f"generation {gen}: its index has no list of packs")
    entries, seen = [], set()
    for item in packs:
        ok = (
            isinstance(item, Mapping)
            and set(item) == {"pack", "size", "xxh3_128"}
            and type(item["size"]) is int
            and item["size"] >= 0
            and isinstance(item["xxh3_128"], str)
            and _DIGEST.fullmatch(item["xxh3_128"]) is not None
        )
        if not ok:
            raise InvalidInput(detail=f"generation {gen}: a malformed index entry {item!r:.200}")
        pack_name(item["pack"])
        if item["pack"] in seen:
            raise InvalidInput(
                detail=f"generation {gen}: its index names pack {item['pack']} twice"
            )
        seen.add(item["pack"])
        entries.append({"pack": item["pack"], "size": item["size"], "xxh3_128": item["xxh3_128"]})
    return sorted(entries, key=lambda e: e["pack"])


def json_object(path: Path) -> dict[str, Any] | None:
    """A JSON object file, or None when it is missing or not one."""
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_index(gen: str, path: Path) -> dict[str, Any]:
    """The committed index of ``gen`` at ``path``, checked as far as list and get rely on it.

    :raises DataError: missing, unreadable or malformed (damage on the target).
    """
    index = json_object(path)
    manifest = index.get("manifest") if index else None
    try:
        ok = (
            index is not None
            and index.get("format") == INDEX_FORMAT
            and isinstance(index.get("committed"), int | float)
            and isinstance(manifest, dict)
            and isinstance(manifest.get("xxh3_128"), str)
            and index_entries(gen, index) == index["packs"]
        )
    except InvalidInput:
        ok = False
    if index is None or not ok:
        raise DataError(detail=f"generation {gen}: its index is unreadable")
    return index
