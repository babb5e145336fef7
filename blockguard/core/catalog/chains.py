"""The rules a generation chain obeys, and reading generation rows from pool manifests.

Shared by generations added one at a time and by a catalog rebuilt from the pool, so
both are held to the same rules.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sized
from typing import Any, NamedTuple

from blockguard.core.catalog.rows import (
    check_count,
    check_number,
    check_text,
    check_uuid,
    encode_json,
)
from blockguard.core.vocab import GENERATION_KINDS, GenerationKind, check_choice
from blockguard.errors import CorruptMetadata, InvalidInput


class Link(NamedTuple):
    """What the chain rules need to know of a generation."""

    volume: str
    kind: str
    base: str | None
    state: str


def chain_problem(
    gid: str,
    volume: str,
    kind: str,
    base: str | None,
    parent: str | None,
    committed: bool,
    lookup: Callable[[str], Link | None],
) -> tuple[str, str | None] | None:
    """Why this generation's links are wrong, or ``None``.

    :returns: (problem, the id that does not exist if that is the problem)
    """
    if kind == GenerationKind.FULL:
        # A new full may be made from the previous one, but once made it stands alone:
        # linking it would keep the old full from ever being removed.
        if base is not None or parent is not None:
            return f"full generation {gid} cannot have a base or parent", None
    elif base is None:
        return f"{kind} generation {gid} needs a base full", None
    if kind == GenerationKind.INCREMENTAL and parent is None:
        return f"incremental generation {gid} needs a parent", None
    if kind == GenerationKind.DIFFERENTIAL and parent != base:
        return f"differential generation {gid} must have its base {base} as parent", None
    for role, other in (("base", base), ("parent", parent)):
        if other is None:
            continue
        if other == gid:
            return f"generation {gid} cannot be its own {role}", None
        link = lookup(other)
        if link is None:
            return f"{role} generation {other} of {gid} does not exist", other
        if link.volume != volume:
            return f"{role} generation {other} of {gid} belongs to volume {link.volume}", None
        if role == "base" and link.kind != GenerationKind.FULL:
            return f"base generation {other} of {gid} is {link.kind}, not full", None
        if (
            role == "parent"
            and kind == GenerationKind.INCREMENTAL
            and other != base
            and link.base != base
        ):
            return f"parent generation {other} of {gid} is not in the chain of {base}", None
        if committed and link.state != "committed":
            return f"{role} generation {other} of committed {gid} is not committed", None
    return None


def manifest_fields(volume: str, pool: str, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The row a manifest dict describes; :raises CorruptMetadata: what is wrong with it."""
    raw_id = manifest.get("id") if isinstance(manifest, Mapping) else None
    what = f"manifest of generation {raw_id}" if raw_id else f"manifest of volume {volume}"
    if not isinstance(manifest, Mapping):
        raise CorruptMetadata(what=what, detail=f"it is a {type(manifest).__name__}, not a dict")
    for key in ("id", "kind", "created"):
        if manifest.get(key) is None:
            raise CorruptMetadata(what=what, detail=f"it has no {key!r}")
    if manifest.get("volume", volume) != volume:
        raise CorruptMetadata(
            what=what, detail=f"it belongs to volume {manifest['volume']}, not {volume}"
        )
    chunks = manifest.get("chunks", 0)
    try:
        gid = check_uuid("generation", manifest["id"])
        base = manifest.get("base")
        parent = manifest.get("parent")
        return {
            "id": gid,
            "volume": volume,
            "pool": check_text("pool name", manifest.get("pool", pool)),
            "kind": check_choice("generation kind", manifest["kind"], GENERATION_KINDS),
            "base": None if base is None else check_uuid("base generation", base),
            "parent": None if parent is None else check_uuid("parent generation", parent),
            "created": check_number("creation time", manifest["created"]),
            "bytes_stored": check_count(
                "bytes stored", manifest.get("bytes_stored", manifest.get("bytes", 0))
            ),
            "chunks": check_count(
                "chunk count",
                len(chunks)
                if isinstance(chunks, Sized) and not isinstance(chunks, str)
                else chunks,
            ),
            "committed": bool(manifest.get("committed", True)),
            "committed_at": check_number(
                "commit time", manifest.get("committed_at", manifest["created"])
            ),
            "location": encode_json("location", manifest.get("location") or {}),
            "manifest_checksum": manifest.get("manifest_checksum", manifest.get("checksum")),
        }
    except InvalidInput as e:
        raise CorruptMetadata(what=what, detail=str(e)) from None
