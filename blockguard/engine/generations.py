"""A volume's generations as its pool holds them: what is damaged and what that makes
unusable, the catalog's rows of them and what clients see of them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from blockguard.core.damage import Damage, DamageCause, full_required_reason, unusable
from blockguard.core.retention import GenerationRef
from blockguard.engine import ids
from blockguard.engine import service as svc
from blockguard.errors import BlockguardError, ChecksumMismatch, CorruptMetadata
from blockguard.storage.manifest import Manifest, generation_id_time, sequence_numbers
from blockguard.storage.pool.base import DamagedGeneration, PoolBackend


def manifest_row(m: Manifest) -> dict[str, Any]:
    """A pool manifest as the catalog's ``rebuild_generations`` reads it."""
    vol = m.volume.name
    return {
        "id": ids.catalog_id(vol, m.generation_id),
        "kind": m.kind.value,
        "created": m.created,
        "base": None if m.base_id is None else ids.catalog_id(vol, m.base_id),
        "parent": None if m.parent_id is None else ids.catalog_id(vol, m.parent_id),
        "bytes_stored": m.bytes_stored,
        "chunks": len(m.stored_chunks()) if not m.is_full else m.chunks,
        "location": {"pool_id": m.generation_id},
        "manifest_checksum": m.checksum_digest or None,
    }


def generation_ref(m: Manifest) -> GenerationRef:
    return GenerationRef(m.generation_id, m.kind, m.base_id, m.parent_id, m.created)


def id_time(pool_id: str) -> float:
    """Creation time from a pool id (``20261103T120501.123456Z-...``; 0 if it has none)."""
    return generation_id_time(pool_id) or 0.0


@dataclass(frozen=True)
class VolumeGenerations:
    """What the pool holds of one volume, and what of it is usable.

    :param manifests: every readable manifest, oldest first (corrupt ones included).
    :param damaged: what the pool reported damaged (an unreadable manifest has no manifest).
    :param corrupt: pool id -> why it cannot be used: damaged, found corrupt by a verify
        or a restore, or depending on such a generation.
    :param full_required: why the next backup must be a full, or None.
    :param found_on_use: ids a verify or restore found damaged (a verify may read them again).
    """

    manifests: list[Manifest]
    damaged: list[DamagedGeneration]
    corrupt: dict[str, Damage]
    full_required: str | None
    found_on_use: frozenset[str] = frozenset()

    def newest_id(self) -> str | None:
        """The newest generation's id, usable or not (an unreadable one by its id's time)."""
        stamps = [(m.created, m.generation_id) for m in self.manifests]
        stamps += [(id_time(d.generation_id), d.generation_id) for d in self.damaged]
        return max(stamps)[1] if stamps else None

    def numbers(self) -> dict[str, int]:
        """Pool id -> running number, for every readable manifest."""
        return sequence_numbers(self.manifests)

    def selectable(self) -> list[tuple[str, int]]:
        """``(pool id, number)`` of every generation, oldest first, as
        :func:`~blockguard.engine.ids.resolve_generation` takes them (an unreadable one
        has no number, 0)."""
        numbers = self.numbers()
        found = [(m.created, m.generation_id, numbers[m.generation_id]) for m in self.manifests]
        found += [
            (id_time(d.generation_id), d.generation_id, 0)
            for d in self.damaged
            if d.manifest is None
        ]
        return [(gid, n) for _, gid, n in sorted(found)]

    @property
    def usable(self) -> list[Manifest]:
        return [m for m in self.manifests if m.generation_id not in self.corrupt]

    def error(self, volume: str, pool_id: str) -> BlockguardError | None:
        """The error a use of this generation raises, or None when it is usable."""
        damage = self.corrupt.get(pool_id)
        if damage is None:
            return None
        public = ids.public_id(volume, pool_id)
        if damage.cause is DamageCause.CHECKSUM and damage.source == pool_id:
            return ChecksumMismatch(generation=public, chunk=damage.chunk)
        return CorruptMetadata(what=f"generation {public}", detail=damage.describe(pool_id))


def scan_generations(
    backend: PoolBackend, name: str, found_on_use: Mapping[str, Damage]
) -> VolumeGenerations:
    """The pool's generations of ``name`` with their damage and its consequences.

    :param found_on_use: damage a verify or restore of this daemon found (the pool may
        not have been able to record it).
    """
    found = backend.scan(name)
    readable = found.manifests + [d.manifest for d in found.damaged if d.manifest]
    readable.sort(key=lambda m: (m.created, m.generation_id))
    damaged = {
        d.generation_id: Damage(
            d.generation_id,
            DamageCause.METADATA if d.chunk is None else DamageCause.CHECKSUM,
            d.reason,
            d.chunk,
        )
        for d in found.damaged
    }
    on_use = {d.generation_id for d in found.damaged if d.found_on_use}
    for gid, d in found_on_use.items():
        if gid not in damaged and any(m.generation_id == gid for m in readable):
            damaged[gid] = d
            on_use.add(gid)
    refs = [generation_ref(m) for m in readable]
    corrupt = unusable(refs, damaged)
    created = {d.generation_id: id_time(d.generation_id) for d in found.damaged}
    return VolumeGenerations(
        readable,
        found.damaged,
        corrupt,
        full_required_reason(refs, corrupt, created),
        frozenset(on_use),
    )


def catalog_rows(gens: VolumeGenerations) -> list[dict[str, Any]]:
    """The rows the catalog mirrors: only generations whose whole chain has readable
    manifests (its chain rules refuse a row whose parent is not there); the others are
    still listed to clients, as corrupt, from the pool."""
    rows = []
    included: set[str] = set()
    for m in gens.manifests:  # oldest first: a parent comes before its dependents
        if all(d is None or d in included for d in (m.parent_id, m.base_id)):
            included.add(m.generation_id)
            rows.append(manifest_row(m))
    return rows


def generation_infos(name: str, gens: VolumeGenerations) -> tuple[svc.GenerationInfo, ...]:
    """Every generation the pool holds, corrupt ones included (state ``corrupt``)."""
    numbers = gens.numbers()
    infos = [
        svc.GenerationInfo(
            id=ids.public_id(name, m.generation_id),
            number=numbers[m.generation_id],
            volume=name,
            method=m.kind.value,
            parent="" if m.parent_id is None else ids.public_id(name, m.parent_id),
            created=int(m.created),
            bytes=m.bytes_stored,
            state="corrupt" if m.generation_id in gens.corrupt else "ok",
        )
        for m in gens.manifests
    ]
    # An unreadable manifest tells nothing but its id (which carries its time).
    infos.extend(
        svc.GenerationInfo(
            id=ids.public_id(name, d.generation_id),
            volume=name,
            method="unknown",
            parent="",
            created=int(id_time(d.generation_id)),
            bytes=0,
            state="corrupt",
        )
        for d in gens.damaged
        if d.manifest is None
    )
    infos.sort(key=lambda g: (g.created, g.id))
    return tuple(infos)
