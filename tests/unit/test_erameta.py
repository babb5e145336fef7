"""The direct dm-era metadata reader against the real kernel's metadata and era_invalidate.

The fixtures (tests/data/era, see its README) are metadata devices written by dm-era in
the guest kernel, with what ``era_invalidate`` 0.9.0 said about them and the blocks that
were really written in each era.
"""

from __future__ import annotations

import io
import json
import lzma
import struct
from functools import cache
from pathlib import Path

import pytest
from pyroaring import BitMap

from blockguard.errors import CorruptMetadata, NotABlockDevice, NotFound
from blockguard.storage.tracking.era import parse_era_invalidate
from blockguard.storage.tracking.erameta import (
    MD_BLOCK,
    _dm_checksum,
    bitmap_from_bits,
    read_superblock,
    read_written_since,
)

DATA = Path(__file__).resolve().parent.parent / "data" / "era"
CASES = ["small", "big"]
# image -> (key of era_invalidate's answers in the json, read the held snapshot?)
IMAGES = {"held": ("era_invalidate", True), "offline": ("era_invalidate_offline", False)}
SB_XOR, BTREE_XOR, ARRAY_XOR = 146538381, 121107, 595846735


@cache
def _info(case: str) -> dict:
    return json.loads((DATA / f"{case}.json").read_text())


@cache
def _image(case: str, image: str) -> bytes:
    return lzma.decompress((DATA / f"{case}-{image}.img.xz").read_bytes())


def _written_in_rounds(case: str, since: int) -> BitMap:
    blocks = BitMap()
    for r in _info(case)["rounds"]:
        if r["era"] >= since:
            blocks.update(r["blocks"])
    return blocks


@pytest.fixture(params=[(c, i) for c in CASES for i in IMAGES], ids=lambda p: "-".join(p))
def fixture_image(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str, Path]:
    case, image = request.param
    path = tmp_path / f"{case}-{image}.img"
    path.write_bytes(_image(case, image))
    return case, image, path


# --- equal to era_invalidate and to what was written ----------------------------------------


@pytest.mark.parametrize("full_scan", [False, True], ids=["tree-shortcut", "full-scan"])
def test_sets_equal_era_invalidate_and_the_writes(
    fixture_image: tuple[str, str, Path], full_scan: bool
) -> None:
    case, image, path = fixture_image
    key, snap = IMAGES[image]
    answers = _info(case)[key]
    eras = [int(n) for n in answers]
    got = read_written_since(path, eras, snap, allow_file=True, full_scan=full_scan)
    assert sorted(got) == sorted(eras)
    for n in eras:
        assert got[n] == parse_era_invalidate(answers[str(n)]), f"since era {n}"
        assert got[n] == _written_in_rounds(case, n), f"since era {n}"
    assert len(got[eras[0]]) > 100  # the fixtures do exercise something


def test_every_checksum_verifies_on_kernel_metadata(fixture_image: tuple[str, str, Path]) -> None:
    case, image, path = fixture_image
    key, snap = IMAGES[image]
    eras = [int(n) for n in _info(case)[key]]
    got = read_written_since(path, eras, snap, allow_file=True, checksums="all", full_scan=True)
    assert all(got[n] == _written_in_rounds(case, n) for n in eras)


def test_file_object_reads_the_same() -> None:
    answers = _info("big")["era_invalidate"]
    got = read_written_since(io.BytesIO(_image("big", "held")), [1, 5], True)
    assert got[1] == parse_era_invalidate(answers["1"])
    assert got[5] == parse_era_invalidate(answers["5"])


def test_era_zero_means_every_block_like_era_invalidate() -> None:
    got = read_written_since(io.BytesIO(_image("small", "held")), [0], True)
    assert got[0] == BitMap(range(256))


def test_superblock_matches_dmsetup_status() -> None:
    # "0 32768 era 8 18/4096 6 73": current era 6, snapshot held at block 73
    status = _info("small")["status_with_snap"].split()
    sb = read_superblock(io.BytesIO(_image("small", "held")))
    assert (sb.current_era, sb.metadata_snap) == (int(status[5]), int(status[6]))
    assert sb.nr_blocks == 256 and sb.data_block_size == 128
    assert sb.metadata_nr_blocks == int(status[4].split("/")[1])
    offline = read_superblock(io.BytesIO(_image("small", "offline")))
    assert offline.metadata_snap == 0 and offline.current_writeset_root == 0


def test_snapshot_asked_but_none_held() -> None:
    with pytest.raises(NotFound, match="metadata snapshot"):
        read_written_since(io.BytesIO(_image("small", "offline")), [1], True)


def test_regular_file_refused_unless_allowed(tmp_path: Path) -> None:
    path = tmp_path / "md.img"
    path.write_bytes(_image("small", "held"))
    with pytest.raises(NotABlockDevice):
        read_written_since(path, [1], True)
    with pytest.raises(NotABlockDevice):
        read_superblock(path)


# --- corruption is named, never a smaller set ---------------------------------------------


def _block(img: bytearray, b: int) -> memoryview:
    return memoryview(img)[b * MD_BLOCK : (b + 1) * MD_BLOCK]


def _sign(img: bytearray, b: int, xor: int) -> None:
    blk = _block(img, b)
    struct.pack_into("<I", blk, 0, _dm_checksum(blk[4:], xor))


def _held(case: str = "small") -> tuple[bytearray, int]:
    img = bytearray(_image(case, "held"))
    (snap,) = struct.unpack_from("<Q", img, 216)
    return img, snap


def _snap_roots(img: bytearray, snap: int) -> tuple[int, int]:
    tree, era_array = struct.unpack_from("<QQ", _block(img, snap), 200)
    return tree, era_array


def _read(img: bytearray, **kw: object) -> dict[int, BitMap]:
    return read_written_since(io.BytesIO(bytes(img)), [1, 3], True, full_scan=True, **kw)


def test_flipped_magic() -> None:
    img, _ = _held()
    img[32] ^= 0x01
    with pytest.raises(CorruptMetadata, match="bad magic"):
        _read(img)


def test_flipped_magic_of_the_snapshot_superblock() -> None:
    img, snap = _held()
    _block(img, snap)[33] ^= 0x01
    with pytest.raises(CorruptMetadata, match=f"snapshot superblock {snap}: bad magic"):
        _read(img)


def test_truncated_image() -> None:
    img, _ = _held()
    with pytest.raises(CorruptMetadata, match="truncated"):
        _read(img[: 1 << 20])
    with pytest.raises(CorruptMetadata, match="too small"):
        _read(img[:100])


def test_superblock_checksum() -> None:
    img, _ = _held()
    img[180] ^= 0x01  # nr_blocks
    with pytest.raises(CorruptMetadata, match="superblock: checksum"):
        _read(img)


def test_node_pointing_outside_the_device() -> None:
    img, snap = _held()
    tree, _ = _snap_roots(img, snap)
    node = _block(img, tree)
    flags, nr, max_entries = (
        *struct.unpack_from("<I", node, 4),
        *struct.unpack_from("<II", node, 16),
    )
    assert flags == 2 and nr >= 1  # a leaf of (era -> writeset_disk)
    value = 32 + 8 * max_entries  # first value: u32 nr_bits, u64 bitset root
    struct.pack_into("<Q", node, value + 4, 10**6)
    _sign(img, tree, BTREE_XOR)
    with pytest.raises(CorruptMetadata, match="at block 1000000 is outside the device"):
        _read(img)


def test_loop_in_a_btree() -> None:
    img, snap = _held()
    spare = 4000  # within the space map's 4096 blocks, unused by these fixtures
    node = _block(img, spare)
    # an internal node whose only child is itself
    struct.pack_into("<IIQIIII", node, 0, 0, 1, spare, 1, 254, 8, 0)
    struct.pack_into("<Q", node, 32, 0)  # key
    struct.pack_into("<Q", node, 32 + 8 * 254, spare)  # child
    _sign(img, spare, BTREE_XOR)
    struct.pack_into("<Q", _block(img, snap), 200, spare)  # the writeset tree root
    _sign(img, snap, SB_XOR)
    with pytest.raises(CorruptMetadata, match=f"node {spare} is reached twice \\(a loop\\)"):
        _read(img)


def test_node_header_nr_entries_above_max() -> None:
    img, snap = _held()
    tree, _ = _snap_roots(img, snap)
    node = _block(img, tree)
    (max_entries,) = struct.unpack_from("<I", node, 20)
    struct.pack_into("<I", node, 16, max_entries + 1)
    _sign(img, tree, BTREE_XOR)
    with pytest.raises(CorruptMetadata, match=r"nr_entries .* > max_entries"):
        _read(img)


def test_node_checksum() -> None:
    img, snap = _held()
    tree, _ = _snap_roots(img, snap)
    _block(img, tree)[40] ^= 0x01  # a key
    with pytest.raises(CorruptMetadata, match=f"writeset tree node {tree}: checksum"):
        _read(img)


def test_array_block_header_and_checksum() -> None:
    img, snap = _held()
    _, era_array = _snap_roots(img, snap)
    index = _block(img, era_array)  # the era array's index: a leaf of block numbers
    (max_entries,) = struct.unpack_from("<I", index, 20)
    (ablock,) = struct.unpack_from("<Q", index, 32 + 8 * max_entries)
    data = _block(img, ablock)
    struct.pack_into("<I", data, 8, 5)  # nr_entries
    _sign(img, ablock, ARRAY_XOR)
    with pytest.raises(CorruptMetadata, match=r"era array block 0 .* 5/1018 entries"):
        _read(img)
    img, snap = _held()
    _block(img, ablock)[24] ^= 0x04  # an era value: only the checksum can tell
    with pytest.raises(CorruptMetadata, match=r"era array block 0 .* checksum"):
        _read(img, checksums="all")


# --- bitsets to BitMaps ----------------------------------------------------------------------


@pytest.mark.parametrize("density", [0.0, 0.0005, 0.05, 0.5, 1.0])
def test_bitmap_from_bits_matches_naive(density: float) -> None:
    import random

    rng = random.Random(int(density * 1000))
    nbits = 3 * 65536 + 777
    want = BitMap(i for i in range(nbits) if rng.random() < density)
    data = bytearray(-(-nbits // 8))
    for i in want:
        data[i // 8] |= 1 << (i % 8)
    assert bitmap_from_bits(data) == want


@pytest.mark.parametrize("card", [4095, 4096, 4097])
def test_bitmap_from_bits_at_the_array_bitset_boundary(card: int) -> None:
    want = BitMap(range(65536 + 3, 65536 + 3 + 15 * card, 15))
    data = bytearray(3 * 8192)
    for i in want:
        data[i // 8] |= 1 << (i % 8)
    assert bitmap_from_bits(data) == want
