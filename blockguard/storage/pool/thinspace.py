"""A thin pool's space as the kernel sees it: data blocks and metadata blocks.

Thin LVs are overcommitted, so neither the VG's free space nor the LVs' sizes say what
a thin pool can still take. What matters is what ``dmsetup status`` of the pool's
``-tpool`` device reports: used/total metadata blocks (4 KiB each) and used/total data
blocks (the block size is in its table). A pool whose metadata is full fails every
write that needs a new mapping, however much data space is free; so both are checked.

The parsing and the decision are pure functions (tested with recorded status lines);
reading the device is :func:`read_thin_space`.
"""

from __future__ import annotations

from dataclasses import dataclass

from blockguard.errors import CorruptMetadata
from blockguard.storage.dm import DeviceMapper

#: dm-thin's metadata block size (fixed by the kernel: THIN_METADATA_BLOCK_SIZE).
META_BLOCK = 4096
SECTOR = 512
#: Mappings a metadata btree leaf holds when half full (a 4 KiB leaf holds ~252 of
#: 16 bytes); writing into a snapshot copies every shared leaf it touches.
_MAPPINGS_PER_LEAF = 126
DATA = "data"
METADATA = "metadata"


@dataclass(frozen=True)
class ThinSpace:
    """One thin pool's space (bytes derived from blocks).

    :param mode: ``rw``, ``ro`` or ``out_of_data_space`` as the kernel reports it.
    :param needs_check: the kernel asks for ``thin_check`` before the pool is trusted.
    """

    data_block: int
    data_used_blocks: int
    data_total_blocks: int
    meta_used_blocks: int
    meta_total_blocks: int
    mode: str = "rw"
    needs_check: bool = False

    @property
    def data_total(self) -> int:
        return self.data_total_blocks * self.data_block

    @property
    def data_free(self) -> int:
        return (self.data_total_blocks - self.data_used_blocks) * self.data_block

    @property
    def meta_total(self) -> int:
        return self.meta_total_blocks * META_BLOCK

    @property
    def meta_free(self) -> int:
        return (self.meta_total_blocks - self.meta_used_blocks) * META_BLOCK

    @property
    def meta_percent(self) -> float:
        return 100.0 * self.meta_used_blocks / max(1, self.meta_total_blocks)

    @property
    def writable(self) -> bool:
        return self.mode == "rw" and not self.needs_check


@dataclass(frozen=True)
class ThinShortfall:
    """What a thin pool lacks for a write: ``resource`` is :data:`DATA` or :data:`METADATA`
    (followed by the pool's state when it refuses writes at all); bytes free and needed (with
    the margin)."""

    resource: str
    free: int
    needed: int


def data_block_of(table: str) -> int:
    """The data block size in bytes from a thin-pool table line
    (``START LEN thin-pool META DATA BLOCK_SECTORS LOW_WATER [features]``).

    :raises CorruptMetadata: not a thin-pool table.
    """
    f = table.split()
    if len(f) < 7 or f[2] != "thin-pool" or not f[5].isdigit():
        raise CorruptMetadata(what="thin pool table", detail=repr(table))
    return int(f[5]) * SECTOR


def parse_thin_status(status: str, data_block: int) -> ThinSpace:
    """A thin pool's space from its ``dmsetup status`` line:
    ``START LEN thin-pool TRANSID MUSED/MTOTAL DUSED/DTOTAL HELD_ROOT MODE ...``
    (``Fail`` alone when the pool has failed: then it takes nothing).

    :raises CorruptMetadata: not a thin-pool status line.
    """
    f = status.split()
    if len(f) >= 4 and f[2] == "thin-pool" and f[3] == "Fail":
        return ThinSpace(data_block, 0, 0, 0, 0, mode="fail", needs_check=True)
    try:
        if len(f) < 8 or f[2] != "thin-pool":
            raise ValueError(status)
        mused, mtotal = (int(x) for x in f[4].split("/"))
        dused, dtotal = (int(x) for x in f[5].split("/"))
    except ValueError:
        raise CorruptMetadata(what="thin pool status", detail=repr(status)) from None
    return ThinSpace(data_block, dused, dtotal, mused, mtotal, f[7], "needs_check" in f[8:])


def metadata_needed(data_bytes: int, volume_size: int, data_block: int) -> int:
    """Metadata bytes a write of ``data_bytes`` into a thin snapshot of a ``volume_size``
    volume may take: the new mappings, and a copy of each shared btree leaf they touch
    (at most every leaf of the volume's mapping tree). An estimate, on the safe side."""
    blocks = -(-data_bytes // data_block)
    leaves = -(-volume_size // data_block) // _MAPPINGS_PER_LEAF + 1
    return min(blocks, leaves) * META_BLOCK + blocks * 32


def data_margin(space: ThinSpace) -> int:
    """Data a thin pool keeps free beyond what is admitted: 5 %, at least 16 MiB."""
    return max(16 << 20, space.data_total // 20)


def meta_margin(space: ThinSpace) -> int:
    """Metadata a thin pool keeps free beyond what is admitted: 5 %, at least 256 KiB
    (a full metadata device fails every write, and the kernel needs some to commit)."""
    return max(256 << 10, space.meta_total // 20)


def thin_shortfall(space: ThinSpace, data_bytes: int, volume_size: int) -> ThinShortfall | None:
    """Decide whether ``space`` admits a write of ``data_bytes`` into a thin LV of a
    ``volume_size`` volume with both margins kept; None when it does, else what lacks
    (data is reported first when both do)."""
    if not space.writable:
        state = space.mode + (", needs check" if space.needs_check else "")
        return ThinShortfall(f"{DATA} ({state})", 0, data_bytes)
    need_data = data_bytes + data_margin(space)
    if space.data_free < need_data:
        return ThinShortfall(DATA, space.data_free, need_data)
    need_meta = metadata_needed(data_bytes, volume_size, space.data_block) + meta_margin(space)
    if space.meta_free < need_meta:
        return ThinShortfall(METADATA, space.meta_free, need_meta)
    return None


def read_thin_space(dm: DeviceMapper, names: tuple[str, ...]) -> ThinSpace | None:
    """The space of the thin pool whose thin-pool target is the first active one of
    ``names`` (two dmsetup calls, table and status, no LVM scan); None when none is active.

    LVM puts the target on ``VG-POOL-tpool`` when the pool has thin LVs, and may activate
    an unused pool with the target on ``VG-POOL`` itself.
    """
    for name in names:
        # The table alone says whether NAME exists (an ``info`` first would cost a
        # second call per name: this is read on every look at a pool's space).
        table = dm.table_if_exists(name)
        if table is not None and table.split()[2:3] == ["thin-pool"]:
            return parse_thin_status(dm.status(name), data_block_of(table))
    return None
