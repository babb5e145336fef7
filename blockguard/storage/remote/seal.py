"""Sealed packs and blobs: what a protected host stores on a backup target.

A pack (the chunks of one generation, about 8 MiB) and a blob (a manifest, a volume
record) are sealed the same way (docs/design/remote.md, "Key material, encryption,
compression"): a header, then the ChaCha20-Poly1305 ciphertext of the zstd-compressed
plaintext, or of the plaintext itself when zstd does not shrink it.

    header   magic (4) | format version (1) | algorithm (1) | compression (1)
             | nonce (12, random) | plaintext length (8, big-endian)
    body     ciphertext and its 16-byte tag

The AEAD authenticates the header and the description of where the data belongs (the
AAD: :class:`PackAAD`, :class:`BlobAAD`), which the opener gives from its own catalog,
never from the target. So a flipped byte, a pack moved to another number, generation or
volume, a replayed old pack, a blob where a pack belongs or another key all fail to
open: :class:`~blockguard.errors.TamperedPack` (a ``DataError``). An unknown magic,
version, algorithm or compression is :class:`~blockguard.errors.UnknownSealFormat`.
Decompression is bounded by the authenticated length: a bomb never takes more memory
than the plaintext it claims, which is at most :data:`MAX_PACK_PLAINTEXT`.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from blockguard.errors import (
    DataError,
    InvalidInput,
    TamperedData,
    TamperedPack,
    UnknownSealFormat,
)
from blockguard.storage.remote.keys import encode_fields

MiB = 1 << 20
FORMAT_VERSION = 1
FORMAT_VERSIONS = frozenset({1})
PACK_MAGIC = b"BGPK"
BLOB_MAGIC = b"BGSB"
ALGORITHM_CHACHA20_POLY1305 = 1
ALGORITHMS = {ALGORITHM_CHACHA20_POLY1305: ChaCha20Poly1305}
COMPRESSION_NONE = 0
COMPRESSION_ZSTD = 1
COMPRESSIONS = frozenset({COMPRESSION_NONE, COMPRESSION_ZSTD})
ZSTD_LEVEL = 3
NONCE_BYTES = 12
TAG_BYTES = 16
HEADER = struct.Struct(">4sBBB12sQ")
#: A pack gathers chunks up to 8 MiB; a chunk of the largest size (16 MiB) travels alone,
#: and 24 MiB and the header stay under the wire's 32 MiB frame.
MAX_PACK_PLAINTEXT = 24 * MiB
#: Manifests and records; a checksum array travels beside its manifest, not in it.
MAX_BLOB_PLAINTEXT = 64 * MiB
_COUNT_LIMIT = 1 << 63


@dataclass(frozen=True)
class PackAAD:
    """Where a pack belongs: authenticated with it, given by the opener from its catalog.

    :param volume_id: the volume's id on the target (:meth:`MasterKey.volume_id`).
    :param generation_id: the generation the pack is part of.
    :param pack: its number in the generation.
    :param first_chunk: the volume chunk its first chunk is.
    :param chunk_count: how many chunks it holds.
    :param plaintext_length: the bytes it holds before compression.
    """

    volume_id: str
    generation_id: str
    pack: int
    first_chunk: int
    chunk_count: int
    plaintext_length: int
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        _check_text(self.volume_id, "volume id")
        _check_text(self.generation_id, "generation id")
        for name in ("pack", "first_chunk", "chunk_count", "plaintext_length"):
            _check_count(getattr(self, name), name.replace("_", " "))
        if self.plaintext_length > MAX_PACK_PLAINTEXT:
            raise InvalidInput(
                detail=f"a pack of {self.plaintext_length} bytes is over the "
                f"{MAX_PACK_PLAINTEXT} a pack may hold"
            )
        _check_version(self.format_version)

    def encode(self) -> bytes:
        return encode_fields(
            "pack",
            self.format_version,
            self.volume_id,
            self.generation_id,
            self.pack,
            self.first_chunk,
            self.chunk_count,
            self.plaintext_length,
        )

    def tampered(self, reason: str) -> TamperedPack:
        return TamperedPack(pack=self.pack, generation=self.generation_id, reason=reason)

    def describe(self) -> str:
        return f"pack {self.pack} of generation {self.generation_id}"


@dataclass(frozen=True)
class BlobAAD:
    """What a sealed blob is: its kind (``"manifest"``, ``"record"``), the volume and the
    name of the thing (a generation id, a record name)."""

    kind: str
    volume_id: str
    name: str
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        _check_text(self.kind, "blob kind")
        _check_text(self.volume_id, "volume id")
        _check_text(self.name, "blob name")
        _check_version(self.format_version)

    def encode(self) -> bytes:
        return encode_fields("blob", self.format_version, self.kind, self.volume_id, self.name)

    def tampered(self, reason: str) -> TamperedData:
        return TamperedData(what=self.describe(), reason=reason)

    def describe(self) -> str:
        return f"{self.kind} {self.name} of volume {self.volume_id}"


def seal_pack(
    key: bytes, aad: PackAAD, plaintext: bytes | memoryview, *, nonce: bytes | None = None
) -> bytes:
    """Seal a pack with its generation's pack key (:meth:`MasterKey.pack_key`).

    :param nonce: the nonce to use (:func:`pack_nonce`), else a random one.
    :raises InvalidInput: ``plaintext`` is not ``aad.plaintext_length`` bytes long.
    """
    if len(plaintext) != aad.plaintext_length:
        raise InvalidInput(
            detail=f"{aad.describe()} has {len(plaintext)} bytes, its AAD says "
            f"{aad.plaintext_length}"
        )
    return _seal(PACK_MAGIC, key, aad.format_version, aad.encode(), plaintext, nonce)


def pack_nonce(key: bytes, aad: PackAAD, plaintext: bytes | memoryview) -> bytes:
    """A synthetic nonce: a keyed BLAKE2b of the pack's place and plaintext.

    The same pack sealed twice (a resumed transfer re-making a pack the target already
    holds) is then the same bytes, so the client knows its digest without fetching it;
    a different plaintext in the same place gets a different nonce (a collision of 96
    bits is as unlikely as a random nonce's), so no nonce is used with two plaintexts.
    It shows the target only that a re-sent pack is the same as before.
    """
    mac = hashlib.blake2b(key=key, digest_size=NONCE_BYTES, person=b"bg pack nonce")
    mac.update(aad.encode())
    mac.update(plaintext)
    return mac.digest()


def open_pack(key: bytes, aad: PackAAD, blob: bytes) -> bytes:
    """The plaintext of a sealed pack, if it is the pack ``aad`` describes, sealed with
    ``key``, unchanged.

    :raises TamperedPack: anything else (a changed byte, another place, another key,
        truncated, a length that does not match).
    :raises UnknownSealFormat: not a sealed pack, or of an unknown version, algorithm
        or compression.
    """
    return _open(PACK_MAGIC, key, aad, blob, aad.plaintext_length)


def seal_blob(key: bytes, aad: BlobAAD, plaintext: bytes) -> bytes:
    """Seal a manifest or a record with the blob key (:meth:`MasterKey.blob_key`)."""
    if len(plaintext) > MAX_BLOB_PLAINTEXT:
        raise InvalidInput(
            detail=f"{aad.describe()} has {len(plaintext)} bytes, at most "
            f"{MAX_BLOB_PLAINTEXT} are sealed as one blob"
        )
    return _seal(BLOB_MAGIC, key, aad.format_version, aad.encode(), plaintext)


def open_blob(key: bytes, aad: BlobAAD, blob: bytes) -> bytes:
    """The plaintext of a sealed blob (errors as :func:`open_pack`, the tampering one
    being :class:`~blockguard.errors.TamperedData`)."""
    return _open(BLOB_MAGIC, key, aad, blob, None)


# --- the work -------------------------------------------------------------------------


def _seal(
    magic: bytes,
    key: bytes,
    version: int,
    aad: bytes,
    plaintext: bytes | memoryview,
    nonce: bytes | None = None,
) -> bytes:
    if nonce is None:
        nonce = os.urandom(NONCE_BYTES)
    elif type(nonce) is not bytes or len(nonce) != NONCE_BYTES:
        raise InvalidInput(detail=f"a nonce is {NONCE_BYTES} bytes")
    body, compression = _compress(plaintext)
    header = HEADER.pack(
        magic, version, ALGORITHM_CHACHA20_POLY1305, compression, nonce, len(plaintext)
    )
    return header + _cipher(ALGORITHM_CHACHA20_POLY1305, key).encrypt(nonce, body, header + aad)


def _compress(plaintext: bytes | memoryview) -> tuple[bytes | memoryview, int]:
    """zstd of ``plaintext`` (its frame names its length), or the plaintext itself when
    that is not smaller."""
    packed = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(plaintext)
    if len(packed) < len(plaintext):
        return packed, COMPRESSION_ZSTD
    return plaintext, COMPRESSION_NONE


def _open(
    magic: bytes, key: bytes, aad: PackAAD | BlobAAD, blob: bytes, length: int | None
) -> bytes:
    tampered = aad.tampered
    what = aad.describe()
    view = memoryview(blob)
    if len(view) >= 4 and view[:4] not in (PACK_MAGIC, BLOB_MAGIC):
        raise UnknownSealFormat(what=what, reason=f"it starts with {bytes(view[:4])!r}")
    if len(view) < HEADER.size + TAG_BYTES:
        raise tampered(
            f"it is truncated: {len(view)} bytes, a sealed one has at least "
            f"{HEADER.size + TAG_BYTES}"
        )
    found, version, algorithm, compression, nonce, size = HEADER.unpack_from(view)
    if found != magic:
        other = "pack" if found == PACK_MAGIC else "blob"
        raise tampered(f"a sealed {other} is stored in its place")
    if version not in FORMAT_VERSIONS:
        raise UnknownSealFormat(
            what=what, reason=_unknown("format version", version, FORMAT_VERSIONS)
        )
    if version != aad.format_version:
        raise tampered(f"it is of format version {version}, not {aad.format_version}")
    if algorithm not in ALGORITHMS:
        raise UnknownSealFormat(what=what, reason=_unknown("algorithm", algorithm, ALGORITHMS))
    if compression not in COMPRESSIONS:
        raise UnknownSealFormat(
            what=what, reason=_unknown("compression", compression, COMPRESSIONS)
        )
    if length is not None and size != length:
        raise tampered(f"its header says {size} bytes of data, {length} expected")
    if length is None and size > MAX_BLOB_PLAINTEXT:
        raise tampered(f"its header says {size} bytes of data, over {MAX_BLOB_PLAINTEXT}")
    try:
        body = _cipher(algorithm, key).decrypt(
            nonce, view[HEADER.size :], bytes(view[: HEADER.size]) + aad.encode()
        )
    except InvalidTag:
        raise tampered("its bytes, its place or the key do not match its seal") from None
    return _decompress(body, compression, size, tampered)


def _decompress(
    body: bytes, compression: int, size: int, tampered: Callable[[str], DataError]
) -> bytes:
    """The plaintext of an authenticated body, never more than ``size`` bytes: a frame
    that does not say ``size`` up front is refused before it is decompressed."""
    if compression == COMPRESSION_NONE:
        plain = body
    else:
        try:
            declared = zstandard.frame_content_size(body)
            if declared != size:
                raise tampered(f"its zstd frame declares {declared} bytes, not {size}")
            plain = zstandard.ZstdDecompressor().decompress(
                body, max_output_size=size, allow_extra_data=False
            )
        except zstandard.ZstdError as exc:
            raise tampered(f"its data does not decompress ({exc})") from None
    if len(plain) != size:
        raise tampered(f"it holds {len(plain)} bytes, not {size}")
    return plain


def _cipher(algorithm: int, key: bytes) -> ChaCha20Poly1305:
    if type(key) is not bytes or len(key) != 32:
        raise InvalidInput(detail="a sealing key is 32 bytes (a sub-key of the master key)")
    return ALGORITHMS[algorithm](key)


def _unknown(field: str, value: object, known: Iterable[int]) -> str:
    return (
        f"{field} {value} is unknown here (this blockguard reads {sorted(known)}): "
        "written by a newer blockguard, or damaged"
    )


def _check_text(value: object, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise InvalidInput(detail=f"{what} {value!r} must be a non-empty string")


def _check_count(value: object, what: str) -> None:
    if type(value) is not int or not 0 <= value < _COUNT_LIMIT:
        raise InvalidInput(detail=f"{what} {value!r} must be an integer 0 or more")


def _check_version(version: object) -> None:
    if version not in FORMAT_VERSIONS:
        raise InvalidInput(detail=_unknown("format version", version, FORMAT_VERSIONS))
