"""Sealed packs and blobs, against a hostile target: what opens is exactly what was
sealed for that place with that key; anything else is a named error, never data."""

from __future__ import annotations

import dataclasses
import os

import pytest
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from blockguard.errors import (
    DataError,
    InvalidInput,
    TamperedData,
    TamperedPack,
    UnknownSealFormat,
)
from blockguard.storage.remote import seal
from blockguard.storage.remote.keys import MasterKey
from blockguard.storage.remote.seal import (
    BLOB_MAGIC,
    COMPRESSION_NONE,
    COMPRESSION_ZSTD,
    HEADER,
    MAX_PACK_PLAINTEXT,
    PACK_MAGIC,
    TAG_BYTES,
    BlobAAD,
    PackAAD,
    open_blob,
    open_pack,
    pack_nonce,
    seal_blob,
    seal_pack,
)

MiB = 1 << 20
MASTER = MasterKey(bytes(range(32)))
VOLUME = MASTER.volume_id("db")
GEN = "20261203T083000Z"

# Header fields by byte offset (see HEADER): magic 0-3, version 4, algorithm 5,
# compression 6, nonce 7-18, plaintext length 19-26.
MAGIC_AT, VERSION_AT, ALGORITHM_AT, COMPRESSION_AT = range(0, 4), 4, 5, 6
NONCE_AT = range(7, 19)
LENGTH_AT = range(19, HEADER.size)


def compressible(size: int) -> bytes:
    line = b"blockguard keeps every generation it promised; "
    return (line * (size // len(line) + 1))[:size]


def pack_aad(plaintext: bytes, pack: int = 7, **changes: object) -> PackAAD:
    aad = PackAAD(VOLUME, GEN, pack, pack * 64, 64, len(plaintext))
    return dataclasses.replace(aad, **changes)


def sealed(plaintext: bytes, **changes: object) -> tuple[bytes, PackAAD, bytes]:
    aad = pack_aad(plaintext, **changes)
    key = MASTER.pack_key(aad.volume_id, aad.generation_id)
    return key, aad, seal_pack(key, aad, plaintext)


def flipped(blob: bytes, at: int) -> bytes:
    out = bytearray(blob)
    out[at] ^= 0x01
    return bytes(out)


# --- round trips and compression -------------------------------------------------------


def test_compressible_pack_is_stored_compressed_and_opens_to_its_bytes() -> None:
    data = compressible(8 * MiB)
    key, aad, blob = sealed(data)
    assert blob[:4] == PACK_MAGIC
    assert blob[COMPRESSION_AT] == COMPRESSION_ZSTD
    assert len(blob) < len(data) // 10
    assert open_pack(key, aad, blob) == data


def test_incompressible_pack_is_stored_raw_and_opens_to_its_bytes() -> None:
    data = os.urandom(MiB)
    key, aad, blob = sealed(data)
    assert blob[COMPRESSION_AT] == COMPRESSION_NONE
    assert len(blob) == HEADER.size + len(data) + TAG_BYTES
    assert data not in blob  # sealed, not stored in the clear
    assert open_pack(key, aad, blob) == data


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=4096))
def test_any_plaintext_round_trips(data: bytes) -> None:
    key, aad, blob = sealed(data)
    assert open_pack(key, aad, blob) == data


def test_the_same_pack_sealed_twice_differs_by_its_random_nonce() -> None:
    data = compressible(4096)
    _, _, one = sealed(data)
    _, _, two = sealed(data)
    assert one[NONCE_AT.start : NONCE_AT.stop] != two[NONCE_AT.start : NONCE_AT.stop]
    assert one[HEADER.size :] != two[HEADER.size :]


def test_a_synthetic_nonce_seals_the_same_pack_to_the_same_bytes_and_differs_otherwise() -> None:
    # A resumed transfer re-makes packs the target holds: the same bytes, known digest.
    data = os.urandom(64 * 1024)
    aad = pack_aad(data)
    key = MASTER.pack_key(aad.volume_id, aad.generation_id)
    one = seal_pack(key, aad, data, nonce=pack_nonce(key, aad, data))
    assert one == seal_pack(key, aad, data, nonce=pack_nonce(key, aad, data))
    assert open_pack(key, aad, one) == data
    other = flipped(data, 5)
    assert pack_nonce(key, aad, other) != pack_nonce(key, aad, data)
    moved = dataclasses.replace(aad, pack=8)
    assert pack_nonce(key, moved, data) != pack_nonce(key, aad, data)
    with pytest.raises(InvalidInput, match="a nonce is 12 bytes"):
        seal_pack(key, aad, data, nonce=b"short")


@pytest.mark.parametrize("data", [compressible(64 * 1024), os.urandom(64 * 1024)])
def test_a_pack_sealed_from_a_view_of_its_buffer_is_the_same_bytes(data: bytes) -> None:
    # The writer seals a pack from its buffer (no copy): the same pack as from bytes.
    aad = pack_aad(data)
    key = MASTER.pack_key(aad.volume_id, aad.generation_id)
    buffer = bytearray(data)
    with memoryview(buffer) as view:
        from_view = seal_pack(key, aad, view, nonce=pack_nonce(key, aad, view))
    assert type(from_view) is bytes
    assert from_view == seal_pack(key, aad, data, nonce=pack_nonce(key, aad, data))
    assert open_pack(key, aad, from_view) == data


# --- a changed byte --------------------------------------------------------------------


@pytest.mark.parametrize("data", [compressible(64 * 1024), os.urandom(64 * 1024)])
def test_a_flipped_byte_anywhere_is_refused_by_name(data: bytes) -> None:
    key, aad, blob = sealed(data)
    body = range(HEADER.size, len(blob) - TAG_BYTES)
    tag = range(len(blob) - TAG_BYTES, len(blob))
    # The header is authenticated with the body: a changed compression id or nonce fails
    # the seal itself, before anything is decompressed.
    unsealed_at = [
        COMPRESSION_AT,
        *NONCE_AT,
        *body[:64],
        *body[len(body) // 2 : len(body) // 2 + 64],
        *body[-64:],
        *tag,
    ]
    for at in unsealed_at:
        with pytest.raises(TamperedPack, match="do not match its seal") as caught:
            open_pack(key, aad, flipped(blob, at))
        assert "pack 7 of generation 20261203T083000Z" in str(caught.value), at
    for at in LENGTH_AT:
        with pytest.raises(TamperedPack, match="its header says"):
            open_pack(key, aad, flipped(blob, at))
    # The bytes that name the format: a flip makes an unknown one, said as such.
    for at in [*MAGIC_AT, VERSION_AT, ALGORITHM_AT]:
        with pytest.raises(UnknownSealFormat, match="pack 7 of generation"):
            open_pack(key, aad, flipped(blob, at))
    assert open_pack(key, aad, blob) == data  # the original still opens


def test_truncated_and_extended_packs_are_refused() -> None:
    data = compressible(256 * 1024)
    key, aad, blob = sealed(data)
    for cut in (0, 3, HEADER.size, HEADER.size + TAG_BYTES - 1):
        with pytest.raises(TamperedPack, match=f"truncated: {cut} bytes"):
            open_pack(key, aad, blob[:cut])
    for cut in (HEADER.size + TAG_BYTES, len(blob) // 2, len(blob) - 1):
        with pytest.raises(TamperedPack, match="do not match its seal"):
            open_pack(key, aad, blob[:cut])
    with pytest.raises(TamperedPack, match="do not match its seal"):
        open_pack(key, aad, blob + b"\0")


# --- the right bytes in the wrong place --------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"pack": 8},
        {"first_chunk": 0},
        {"chunk_count": 63},
        {"generation_id": "20261202T083000Z"},
        {"volume_id": MASTER.volume_id("web")},
    ],
    ids=["pack", "first_chunk", "chunk_count", "generation", "volume"],
)
def test_a_pack_presented_as_another_is_refused(change: dict[str, object]) -> None:
    data = os.urandom(32 * 1024)
    key, aad, blob = sealed(data)
    elsewhere = dataclasses.replace(aad, **change)
    # The opener derives the key for the place it asks about, as a restore would.
    elsewhere_key = MASTER.pack_key(elsewhere.volume_id, elsewhere.generation_id)
    for opener_key in {key, elsewhere_key}:
        with pytest.raises(TamperedPack) as caught:
            open_pack(opener_key, elsewhere, blob)
        assert f"pack {elsewhere.pack} of generation {elsewhere.generation_id}" in str(caught.value)


def test_a_pack_of_another_length_is_refused_before_it_is_decrypted() -> None:
    key, aad, blob = sealed(compressible(4096))
    with pytest.raises(TamperedPack, match="4095 expected"):
        open_pack(key, dataclasses.replace(aad, plaintext_length=4095), blob)


def test_wrong_key_is_refused() -> None:
    data = compressible(4096)
    _, aad, blob = sealed(data)
    other = MasterKey(bytes(32))
    with pytest.raises(TamperedPack, match="or the key"):
        open_pack(other.pack_key(aad.volume_id, aad.generation_id), aad, blob)
    with pytest.raises(TamperedPack):
        open_pack(MASTER.blob_key(), aad, blob)


def test_a_blob_where_a_pack_belongs_and_a_pack_where_a_blob_belongs_are_refused() -> None:
    data = compressible(4096)
    key, aad, pack = sealed(data)
    blob_aad = BlobAAD("manifest", VOLUME, GEN)
    blob = seal_blob(MASTER.blob_key(), blob_aad, data)
    assert blob[:4] == BLOB_MAGIC
    with pytest.raises(TamperedPack, match="a sealed blob is stored in its place"):
        open_pack(key, aad, blob)
    with pytest.raises(TamperedData, match="a sealed pack is stored in its place"):
        open_blob(MASTER.blob_key(), blob_aad, pack)


# --- formats this blockguard does not know ------------------------------------------------


def reseal(
    key: bytes,
    aad: PackAAD,
    body: bytes,
    *,
    magic: bytes = PACK_MAGIC,
    version: int = 1,
    algorithm: int = 1,
    compression: int = COMPRESSION_ZSTD,
    length: int | None = None,
) -> bytes:
    """What a writer holding the key could seal: any header, any body, authenticated."""
    nonce = os.urandom(12)
    size = aad.plaintext_length if length is None else length
    header = HEADER.pack(magic, version, algorithm, compression, nonce, size)
    return header + ChaCha20Poly1305(key).encrypt(nonce, body, header + aad.encode())


def test_unknown_magic_version_algorithm_and_compression_are_named() -> None:
    data = compressible(4096)
    key, aad, _ = sealed(data)
    body = zstandard.ZstdCompressor().compress(data)
    cases = {
        "starts with b'BGXX'": reseal(key, aad, body, magic=b"BGXX"),
        "format version 2 is unknown": reseal(key, aad, body, version=2),
        "algorithm 9 is unknown": reseal(key, aad, body, algorithm=9),
        "compression 7 is unknown": reseal(key, aad, body, compression=7),
    }
    for words, blob in cases.items():
        with pytest.raises(UnknownSealFormat, match=words):
            open_pack(key, aad, blob)
    assert open_pack(key, aad, reseal(key, aad, body)) == data  # the helper is faithful


# --- decompression is bounded ----------------------------------------------------------


def test_a_decompression_bomb_is_refused_without_inflating_it() -> None:
    data = compressible(MiB)
    key, aad, _ = sealed(data)
    # 256 MiB of zeros in one frame whose header does not say its size (a stream).
    stream = zstandard.ZstdCompressor(level=3).compressobj()
    chunk = bytes(MiB)
    bomb = b"".join(stream.compress(chunk) for _ in range(256)) + stream.flush()
    assert len(bomb) < MiB
    assert zstandard.frame_content_size(bomb) == -1
    with pytest.raises(TamperedPack, match="declares -1 bytes"):
        open_pack(key, aad, reseal(key, aad, bomb))
    # A frame that says more than the pack holds.
    bigger = zstandard.ZstdCompressor().compress(compressible(2 * MiB))
    with pytest.raises(TamperedPack, match=f"declares {2 * MiB} bytes"):
        open_pack(key, aad, reseal(key, aad, bigger))
    # The right frame with a second one behind it.
    frame = zstandard.ZstdCompressor().compress(data)
    with pytest.raises(TamperedPack, match="does not decompress"):
        open_pack(key, aad, reseal(key, aad, frame + frame))
    # A raw body that is not the length the header says.
    with pytest.raises(TamperedPack, match=f"not {MiB}"):
        open_pack(key, aad, reseal(key, aad, data[:-1], compression=COMPRESSION_NONE))
    assert isinstance(TamperedPack(pack=1, generation="g", reason="r"), DataError)


def test_a_pack_larger_than_a_pack_may_be_is_refused_when_described() -> None:
    with pytest.raises(InvalidInput, match="over the"):
        PackAAD(VOLUME, GEN, 0, 0, 1, MAX_PACK_PLAINTEXT + 1)
    key, aad, _ = sealed(b"x")
    with pytest.raises(InvalidInput, match="its AAD says 1"):
        seal_pack(key, aad, b"xy")


@pytest.mark.parametrize(
    "fields",
    [
        ("", GEN, 0, 0, 1, 1),
        (VOLUME, "", 0, 0, 1, 1),
        (VOLUME, GEN, -1, 0, 1, 1),
        (VOLUME, GEN, 0, True, 1, 1),
        (VOLUME, GEN, 0, 0, 1.0, 1),
    ],
)
def test_a_malformed_description_is_refused(fields: tuple) -> None:
    with pytest.raises(InvalidInput):
        PackAAD(*fields)


# --- blobs ------------------------------------------------------------------------------


def test_blobs_round_trip_and_are_bound_to_their_kind_volume_and_name() -> None:
    key = MASTER.blob_key()
    aad = BlobAAD("manifest", VOLUME, GEN)
    for data in (b"", b'{"generation": "x"}' * 1000, os.urandom(5000)):
        assert open_blob(key, aad, seal_blob(key, aad, data)) == data
    blob = seal_blob(key, aad, b'{"chunks": 12}')
    for other in (
        BlobAAD("record", VOLUME, GEN),
        BlobAAD("manifest", MASTER.volume_id("web"), GEN),
        BlobAAD("manifest", VOLUME, "20261202T083000Z"),
    ):
        with pytest.raises(TamperedData, match=f"{other.kind} {other.name} of volume"):
            open_blob(key, other, blob)
    with pytest.raises(TamperedData):
        open_blob(MASTER.pack_key(VOLUME, GEN), aad, blob)
    for at in (COMPRESSION_AT, NONCE_AT.start, LENGTH_AT.stop - 1, HEADER.size, len(blob) - 1):
        with pytest.raises(TamperedData):
            open_blob(key, aad, flipped(blob, at))


def test_a_blob_claiming_more_than_a_blob_may_hold_is_refused_unopened() -> None:
    key = MASTER.blob_key()
    aad = BlobAAD("record", VOLUME, "db")
    blob = bytearray(seal_blob(key, aad, b"x" * 100))
    blob[LENGTH_AT.start : LENGTH_AT.stop] = (seal.MAX_BLOB_PLAINTEXT + 1).to_bytes(8, "big")
    with pytest.raises(TamperedData, match="over"):
        open_blob(key, aad, bytes(blob))
