"""Changed-block tracking: one :class:`ChangeTracker` interface, several backends.

``scan`` (any readable block device, full read per query) lives in
:mod:`blockguard.storage.tracking.scan`; ``era`` and ``thin`` (device-mapper) live beside it.
"""

from blockguard.storage.tracking.base import (
    DEFAULT_CHUNK_SIZE,
    DIGEST_SIZE,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    MIN_VOLUME_SIZE,
    ChangeSet,
    ChangeTracker,
    ChunkHashes,
    Exactness,
    TrackerState,
    VerificationResult,
    check_protectable,
    chunk_digest,
    validate_chunk_size,
    validate_reference_name,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DIGEST_SIZE",
    "MAX_CHUNK_SIZE",
    "MIN_CHUNK_SIZE",
    "MIN_VOLUME_SIZE",
    "ChangeSet",
    "ChangeTracker",
    "ChunkHashes",
    "Exactness",
    "TrackerState",
    "VerificationResult",
    "check_protectable",
    "chunk_digest",
    "validate_chunk_size",
    "validate_reference_name",
]
