"""Names and identifiers: what clients see versus what the catalog and the pool store.

The pool names a generation ``20261103T120501.123456Z-1a2b3c4d`` (unique per volume, sorts
by time); the catalog wants a UUID; clients see ``VOLUME@POOLID``. The catalog UUID is
derived from the other two, so a catalog rebuilt from the pool gets the same ids.
"""

from __future__ import annotations

import uuid

from blockguard.core.vocab import NAME_RE
from blockguard.errors import InvalidInput

_NAMESPACE = uuid.UUID("6f1c1c2e-5b0e-4d59-9d0c-6b6c6f636b67")


def catalog_id(volume: str, pool_id: str) -> str:
    """The catalog's UUID of a generation."""
    return str(uuid.uuid5(_NAMESPACE, f"{volume}/{pool_id}"))


def public_id(volume: str, pool_id: str) -> str:
    """The id clients see, e.g. ``db@20261103T120501.123456Z-1a2b3c4d``."""
    return f"{volume}@{pool_id}"


def split_public_id(generation: str) -> tuple[str, str]:
    """``(volume, pool id)`` of a client's generation id.

    :raises InvalidInput: it is not ``VOLUME@ID``.
    """
    volume, sep, pool_id = (
        generation.partition("@") if isinstance(generation, str) else ("", "", "")
    )
    if not sep or not NAME_RE.fullmatch(volume) or not pool_id or "/" in pool_id:
        raise InvalidInput(
            detail=f"generation {generation!r} is not a generation id such as VOLUME@ID"
        )
    return volume, pool_id
