"""A direct reader of dm-era metadata: which blocks were written since era N.

(One thing at ~490 lines: one on-disk format read end to end, superblock to checksums.)

It answers what ``era_invalidate --written-since N [--metadata-snapshot]`` answers, from
the on-disk format (the kernel's ``dm-era-target.c`` and ``persistent-data``; all
little-endian, 4 KiB metadata blocks), without a subprocess per era and without XML:
a block was written since N if the era array gives it an era >= N, or if it is set in the
writeset (a dm-bitset) of an era >= N that is still in the writeset tree.

What it reads: the superblock (block 0, or the held snapshot copy named by its
``metadata_snap`` field), the writeset tree, the bitsets of the eras asked about and, only
when an asked era is older than every writeset still in the tree, the era array. That
shortcut is exact: the kernel digests writesets into the era array lowest era first and
removes a writeset from the tree only after it is fully transcribed, so the array never
holds an era above the lowest one in the tree, and the blocks it gives that era are in
that era's writeset too.

Everything is checked as it is read (magic, checksums of the superblock and btree nodes,
each block's self-reference, node headers, key order, array sizes, block numbers within
the device, loops); anything wrong raises :class:`CorruptMetadata` naming it, so a caller
never gets a smaller set silently. Array blocks (the bulk) are checked by header, not
checksum by default: CRC-32C has no C implementation in the standard library, and the
pure-Python one costs ~0.3 ms per block (``checksums="all"`` pays it).

Without a metadata snapshot the live superblock is read: only meaningful while no
dm-era target is active on the device (offline metadata), as ``era_invalidate`` without
``--metadata-snapshot``. The live current writeset is then included too (after a clean
suspend it is archived and empty).
"""

from __future__ import annotations

import os
import stat
import struct
import sys
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise
from typing import BinaryIO, Literal, Protocol

from pyroaring import BitMap

from blockguard.errors import CorruptMetadata, NotABlockDevice, NotFound
from blockguard.storage.blockdev import BlockDevice, aligned_buffer

MD_BLOCK = 4096
SUPERBLOCK_MAGIC = 2126579579
_SB_CSUM_XOR = 146538381
_BTREE_CSUM_XOR = 121107
_INTERNAL_NODE, _LEAF_NODE = 1, 2
_NODE_HEADER = 32  # csum, flags, blocknr, nr_entries, max_entries, value_size, padding
_ARRAY_HEADER = 24  # csum, max_entries, nr_entries, value_size, blocknr
_ARRAY_CSUM_XOR = 595846735
_MAX_DEPTH = 16  # a btree of 4 KiB nodes this deep would index more than 2^64 keys
_READ_RUN = 256  # blocks per coalesced read (1 MiB)

Source = str | os.PathLike[str] | BinaryIO
#: Which checksums to verify: superblock and btree nodes (cheap), also array blocks (pure
#: Python CRC-32C, ~0.3 ms per 4 KiB block), or none.
Checksums = Literal["nodes", "all", "none"]


@dataclass(frozen=True)
class EraSuperblock:
    """The fields of a dm-era superblock (``struct superblock_disk``) blockguard uses."""

    location: int  # metadata block it was read from (0, or the held snapshot)
    data_block_size: int  # sectors per tracked block
    nr_blocks: int  # tracked blocks of the origin
    current_era: int
    current_writeset_bits: int
    current_writeset_root: int  # 0: none
    writeset_tree_root: int
    era_array_root: int
    metadata_snap: int  # held snapshot's superblock location, 0: none held
    metadata_nr_blocks: int  # size of the metadata device per its space map


class _Device(Protocol):
    size: int

    def pread_into(self, buf: memoryview, offset: int) -> int: ...


class _FileDevice:
    """A regular file or a caller's file object, read like a :class:`BlockDevice`."""

    def __init__(self, f: BinaryIO | int) -> None:
        self._f = f
        if isinstance(f, int):
            self.size = os.fstat(f).st_size
        else:
            self.size = f.seek(0, os.SEEK_END)

    def pread_into(self, buf: memoryview, offset: int) -> int:
        if isinstance(self._f, int):
            done = 0
            while done < len(buf):
                n = os.preadv(self._f, [buf[done:]], offset + done)
                if n == 0:
                    break
                done += n
            return done
        self._f.seek(offset)
        return self._f.readinto(buf) or 0


class _Metadata:
    """Checked access to the metadata blocks of one device."""

    def __init__(self, dev: _Device, name: str, checksums: Checksums) -> None:
        self.dev = dev
        self.name = name
        self.verify = checksums != "none"
        self.verify_arrays = checksums == "all"
        self.nr_blocks = dev.size // MD_BLOCK  # narrowed to the space map's size later

    def corrupt(self, detail: str) -> CorruptMetadata:
        return CorruptMetadata(what=f"dm-era metadata on {self.name}", detail=detail)

    def read(self, blocks: Iterable[int], what: str) -> dict[int, memoryview]:
        """Read ``blocks`` (coalescing neighbours into one read each)."""
        wanted = sorted(set(blocks))
        for b in wanted:
            if not 0 <= b < self.nr_blocks:
                raise self.corrupt(
                    f"{what} at block {b} is outside the device ({self.nr_blocks} blocks)"
                )
        out: dict[int, memoryview] = {}
        i = 0
        while i < len(wanted):
            j = i + 1
            while j < len(wanted) and wanted[j] == wanted[j - 1] + 1 and j - i < _READ_RUN:
                j += 1
            first, count = wanted[i], j - i
            buf = memoryview(aligned_buffer(count * MD_BLOCK))  # O_DIRECT-ready
            if self.dev.pread_into(buf, first * MD_BLOCK) != len(buf):
                raise self.corrupt(f"{what}: short read at block {first} (device truncated?)")
            for k in range(count):
                out[first + k] = buf[k * MD_BLOCK : (k + 1) * MD_BLOCK]
            i = j
        return out

    def superblock(self, location: int) -> EraSuperblock:
        what = "superblock" if location == 0 else f"metadata snapshot superblock {location}"
        if self.dev.size < MD_BLOCK:
            raise self.corrupt(f"the device is too small for a superblock ({self.dev.size} B)")
        data = self.read([location], what)[location]
        csum, _flags, blocknr = struct.unpack_from("<IIQ", data, 0)
        (magic,) = struct.unpack_from("<Q", data, 32)
        if magic != SUPERBLOCK_MAGIC:
            raise self.corrupt(f"{what}: bad magic {magic} (expected {SUPERBLOCK_MAGIC})")
        if blocknr != location:
            raise self.corrupt(f"{what}: it says it is block {blocknr}")
        if self.verify and (want := _dm_checksum(data[4:], _SB_CSUM_XOR)) != csum:
            raise self.corrupt(f"{what}: checksum {csum:#x}, computed {want:#x}")
        (version,) = struct.unpack_from("<I", data, 40)
        if version != 1:
            raise self.corrupt(f"{what}: unsupported metadata version {version}")
        (sm_blocks,) = struct.unpack_from("<Q", data, 44)
        dbs, mbs, nr_blocks, era, ws_bits = struct.unpack_from("<5I", data, 172)
        ws_root, tree_root, array_root, snap = struct.unpack_from("<4Q", data, 192)
        if mbs != MD_BLOCK // 512:
            raise self.corrupt(f"{what}: metadata block size {mbs} sectors, expected 8")
        return EraSuperblock(location, dbs, nr_blocks, era, ws_bits, ws_root, tree_root,
                             array_root, snap, sm_blocks)  # fmt: skip

    def btree(self, root: int, value_size: int, what: str) -> list[tuple[int, memoryview]]:
        """All (key, value) pairs of a one-level dm-btree, in key order, checked."""
        pairs: list[tuple[int, memoryview]] = []
        seen: set[int] = set()
        level = [root]
        for _level in range(_MAX_DEPTH):
            for b in level:
                if b in seen:
                    raise self.corrupt(f"{what}: node {b} is reached twice (a loop)")
                seen.add(b)
            nodes = self.read(level, f"{what} node")
            children: list[int] = []
            leaves = None
            last_key = -1
            for b in level:
                is_leaf, keys, values = self._node(b, nodes[b], value_size, what)
                if leaves is None:
                    leaves = is_leaf
                elif leaves != is_leaf:
                    raise self.corrupt(f"{what}: leaves at different depths (node {b})")
                if keys and keys[0] <= last_key:
                    raise self.corrupt(f"{what}: keys out of order at node {b}")
                if keys:
                    last_key = keys[-1]
                if is_leaf:
                    pairs.extend(zip(keys, values, strict=True))
                else:
                    children.extend(struct.unpack("<Q", v)[0] for v in values)
            if leaves:
                return pairs
            level = children
        raise self.corrupt(f"{what}: deeper than {_MAX_DEPTH} levels (a loop?)")

    def _node(
        self, b: int, data: memoryview, value_size: int, what: str
    ) -> tuple[bool, list[int], list[memoryview]]:
        csum, flags, blocknr, nr, max_entries, vsize = struct.unpack_from("<IIQIII", data, 0)
        where = f"{what} node {b}"
        if blocknr != b:
            raise self.corrupt(f"{where}: it says it is block {blocknr}")
        if self.verify and (want := _dm_checksum(data[4:], _BTREE_CSUM_XOR)) != csum:
            raise self.corrupt(f"{where}: checksum {csum:#x}, computed {want:#x}")
        if flags not in (_INTERNAL_NODE, _LEAF_NODE):
            raise self.corrupt(f"{where}: flags {flags} are neither internal nor leaf")
        is_leaf = flags == _LEAF_NODE
        expect = value_size if is_leaf else 8
        if vsize != expect:
            raise self.corrupt(f"{where}: value size {vsize}, expected {expect}")
        if max_entries == 0 or _NODE_HEADER + (8 + vsize) * max_entries > MD_BLOCK:
            raise self.corrupt(f"{where}: max_entries {max_entries} does not fit a block")
        if nr > max_entries:
            raise self.corrupt(f"{where}: nr_entries {nr} > max_entries {max_entries}")
        if nr == 0 and not is_leaf:
            raise self.corrupt(f"{where}: an internal node without entries")
        keys = list(struct.unpack_from(f"<{nr}Q", data, _NODE_HEADER))
        if any(k2 <= k1 for k1, k2 in pairwise(keys)):
            raise self.corrupt(f"{where}: keys not in ascending order")
        base = _NODE_HEADER + 8 * max_entries
        values = [data[base + i * vsize : base + (i + 1) * vsize] for i in range(nr)]
        return is_leaf, keys, values

    def array(self, root: int, value_size: int, nr_entries: int, what: str) -> list[memoryview]:
        """The value areas of a dm-array's blocks, in index order, checked."""
        per_block = (MD_BLOCK - _ARRAY_HEADER) // value_size
        nr_ablocks = -(-nr_entries // per_block)
        index = self.btree(root, 8, f"{what} index")
        if [k for k, _ in index] != list(range(len(index))) or len(index) != nr_ablocks:
            raise self.corrupt(
                f"{what}: index has {len(index)} entries, expected blocks 0..{nr_ablocks - 1}"
            )
        locations = [struct.unpack("<Q", v)[0] for _, v in index]
        blocks = self.read(locations, f"{what} block")  # shared blocks are read once
        out: list[memoryview] = []
        for i, b in enumerate(locations):
            data = blocks[b]
            max_e, nr, vsize, blocknr = struct.unpack_from("<IIIQ", data, 4)
            want_nr = min(per_block, nr_entries - i * per_block)
            if blocknr != b or max_e != per_block or vsize != value_size or nr != want_nr:
                raise self.corrupt(
                    f"{what} block {i} (at {b}): header says block {blocknr}, "
                    f"{nr}/{max_e} entries of {vsize} B; expected block {b}, "
                    f"{want_nr}/{per_block} of {value_size} B"
                )
            if self.verify_arrays:
                csum = struct.unpack_from("<I", data, 0)[0]
                if (want := _dm_checksum(data[4:], _ARRAY_CSUM_XOR)) != csum:
                    raise self.corrupt(
                        f"{what} block {i} (at {b}): checksum {csum:#x}, computed {want:#x}"
                    )
            out.append(data[_ARRAY_HEADER : _ARRAY_HEADER + nr * vsize])
        return out


def read_superblock(
    source: Source, *, allow_file: bool = False, checksums: Checksums = "nodes"
) -> EraSuperblock:
    """The live superblock (block 0) of dm-era metadata.

    :param source: a block device path, or (``allow_file``) a regular file, or an open
        binary file object.
    :raises CorruptMetadata: it is not valid dm-era metadata.
    """
    with _opened(source, allow_file) as (dev, name):
        md = _Metadata(dev, name, checksums)
        sb = md.superblock(0)
        _check_size(md, sb)
        return sb


def read_written_since(
    source: Source,
    eras: Iterable[int],
    use_metadata_snapshot: bool,
    *,
    allow_file: bool = False,
    checksums: Checksums = "nodes",
    full_scan: bool = False,
) -> dict[int, BitMap]:
    """For each era N in ``eras``, the blocks written since N (``era_invalidate``'s set).

    :param use_metadata_snapshot: read the snapshot held with ``take_metadata_snap``
        (the only consistent view while the era device is live).
    :param checksums: see :data:`Checksums`; array blocks always get their headers checked.
    :param full_scan: read the era array even when the writeset tree alone answers.
    :raises NotFound: ``use_metadata_snapshot`` but no snapshot is held.
    :raises CorruptMetadata: anything inconsistent, named.
    """
    asked = sorted({int(e) for e in eras})
    if any(not 0 <= e < 1 << 32 for e in asked):
        raise ValueError(f"eras are u32: {asked}")
    with _opened(source, allow_file) as (dev, name):
        md = _Metadata(dev, name, checksums)
        sb = md.superblock(0)
        _check_size(md, sb)
        if use_metadata_snapshot:
            if sb.metadata_snap == 0:
                raise NotFound(what="dm-era metadata snapshot on", name=name)
            sb = md.superblock(sb.metadata_snap)
        result = {e: BitMap() for e in asked}
        if not asked:
            return result
        writesets = [
            (era, *struct.unpack("<IQ", v))
            for era, v in md.btree(sb.writeset_tree_root, 12, "writeset tree")
        ]
        if not use_metadata_snapshot and sb.current_writeset_root:
            # Offline metadata of a device that was not suspended cleanly.
            writesets.append((sb.current_era, sb.current_writeset_bits, sb.current_writeset_root))
        for era, nr_bits, root in writesets:
            if era < asked[0]:
                continue
            bits = _bitset(md, root, nr_bits, f"writeset of era {era}")
            for n in asked:
                if era >= n:
                    result[n] |= bits
        oldest = min((era for era, _, _ in writesets), default=None)
        need_array = [n for n in asked if full_scan or oldest is None or n < oldest]
        if need_array:
            for n, bm in _era_array_since(md, sb, need_array).items():
                result[n] |= bm
        return result


def _check_size(md: _Metadata, sb: EraSuperblock) -> None:
    if sb.metadata_nr_blocks > md.nr_blocks:
        raise md.corrupt(
            f"its space map covers {sb.metadata_nr_blocks} blocks but the device has only "
            f"{md.nr_blocks} (truncated?)"
        )
    md.nr_blocks = sb.metadata_nr_blocks


def _bitset(md: _Metadata, root: int, nr_bits: int, what: str) -> BitMap:
    words = md.array(root, 8, -(-nr_bits // 64), what)
    data = b"".join(words)
    if nr_bits % 64:  # bits past the end are not blocks (era_invalidate ignores them too)
        last = int.from_bytes(data[-8:], "little") & ((1 << nr_bits % 64) - 1)
        data = data[:-8] + last.to_bytes(8, "little")
    return bitmap_from_bits(data)


def _era_array_since(md: _Metadata, sb: EraSuperblock, asked: list[int]) -> dict[int, BitMap]:
    """Blocks whose era-array entry is >= each of ``asked`` (sorted ascending)."""
    lowest = asked[0]
    if lowest == 0:  # every entry is >= 0, written or not (as era_invalidate says)
        return {n: BitMap(range(sb.nr_blocks)) for n in asked if n == 0} | (
            _era_array_since(md, sb, asked[1:]) if len(asked) > 1 else {}
        )
    hits: list[int] = []
    pairs: list[tuple[int, int]] = []
    base = 0
    for area in md.array(sb.era_array_root, 4, sb.nr_blocks, "era array"):
        values = _u32(area)
        # The scan is the cost for big volumes: one comprehension per array block.
        if len(asked) == 1:
            hits += [i for i, v in enumerate(values, base) if v >= lowest]
        else:
            pairs += [(i, v) for i, v in enumerate(values, base) if v >= lowest]
        base += len(values)
    if len(asked) == 1:
        return {lowest: BitMap(array("I", hits))}
    return {n: BitMap(array("I", [i for i, v in pairs if v >= n])) for n in asked}


def _u32(area: memoryview) -> memoryview | array:
    if sys.byteorder == "little":
        return area.cast("I")
    values = array("I", area)
    values.byteswap()
    return values


# --- bitsets to roaring bitmaps at C speed ----------------------------------------------

_COOKIE_NO_RUNS = 12346
_CHUNK = 8192  # bytes of bits per roaring container (2^16 values)
_INVERT = bytes(255 - i for i in range(256))


def bitmap_from_bits(data: bytes | bytearray | memoryview) -> BitMap:
    """A BitMap of the set bits of ``data`` (bit i = byte i//8, bit i%8: dm-bitset order).

    Built from roaring's portable serialization, with no per-bit Python work: a chunk of
    2^16 bits with more than 4096 set is copied as a bitset container; a sparser one (which
    the format wants as a sorted array) is inverted, copied as a bitset, and subtracted
    from its full range.
    """
    data = bytes(data)
    dense: list[tuple[int, int, bytes]] = []
    inverted: list[tuple[int, int, bytes]] = []
    for key, start in enumerate(range(0, len(data), _CHUNK)):
        chunk = data[start : start + _CHUNK].ljust(_CHUNK, b"\x00")
        card = int.from_bytes(chunk, "little").bit_count()
        if card > 4096:
            dense.append((key, card, chunk))
        elif card:
            inverted.append((key, 65536 - card, chunk.translate(_INVERT)))
    result = _deserialize_bitsets(dense)
    if inverted:
        full = BitMap()
        for key, _, _ in inverted:
            full.add_range(key << 16, (key + 1) << 16)
        result |= full - _deserialize_bitsets(inverted)
    return result


def _deserialize_bitsets(containers: list[tuple[int, int, bytes]]) -> BitMap:
    """Roaring's portable format with only bitset containers (each card > 4096)."""
    head = [struct.pack("<II", _COOKIE_NO_RUNS, len(containers))]
    head += [struct.pack("<HH", key, card - 1) for key, card, _ in containers]
    first = 8 + 8 * len(containers)
    head += [struct.pack("<I", first + i * _CHUNK) for i in range(len(containers))]
    return BitMap.deserialize(b"".join(head + [bits for _, _, bits in containers]))


# --- CRC-32C as dm-persistent-data uses it ------------------------------------------------


def _crc_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C = _crc_table()


def _dm_checksum(data: memoryview | bytes, xor: int) -> int:
    """``dm_bm_checksum``: CRC-32C seeded with ~0, not inverted, xored with a constant."""
    crc = 0xFFFFFFFF
    table = _CRC32C
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ xor


# --- opening -----------------------------------------------------------------------------


class _opened:
    """Context manager yielding ``(device, name)`` for a path or a file object."""

    def __init__(self, source: Source, allow_file: bool) -> None:
        self._source = source
        self._allow_file = allow_file
        self._close: list[BlockDevice | int] = []

    def __enter__(self) -> tuple[_Device, str]:
        src = self._source
        if not isinstance(src, str | os.PathLike):
            return _FileDevice(src), getattr(src, "name", None) or "<file object>"
        path = os.fspath(src)
        if self._allow_file:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            mode = os.fstat(fd).st_mode
            if stat.S_ISREG(mode):
                self._close.append(fd)
                return _FileDevice(fd), path
            os.close(fd)
            if not stat.S_ISBLK(mode):
                raise NotABlockDevice(path, "nor a regular file")
        # O_DIRECT: dm-era writes through dm-bufio, not the page cache, so buffered reads
        # could return blocks cached by an earlier poll (era_invalidate reads direct too).
        dev = BlockDevice(path, direct=True)  # verifies S_ISBLK after open
        self._close.append(dev)
        return dev, path

    def __exit__(self, *exc: object) -> None:
        for item in self._close:
            if isinstance(item, int):
                os.close(item)
            else:
                item.close()
