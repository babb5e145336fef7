"""A thin pool's space from its dmsetup status, and the admission decision on it.

The lines are in the kernel's thin-pool status format (Documentation/admin-guide/
device-mapper/thin-provisioning.rst); the guest test parses the real device's line too.
"""

from __future__ import annotations

import pytest

from blockguard.errors import CorruptMetadata, PoolSpaceLow
from blockguard.storage.pool.base import SpaceAlert
from blockguard.storage.pool.thinspace import (
    DATA,
    META_BLOCK,
    METADATA,
    data_block_of,
    metadata_needed,
    parse_thin_status,
    thin_shortfall,
)

MiB = 1 << 20
BLOCK = 64 << 10
TABLE = "0 2097152 thin-pool 253:1 253:2 128 0 1 skip_block_zeroing error_if_no_space"
# 1 GiB of 64 KiB blocks (16384), 4 MiB of metadata (1024 blocks).
EMPTY = "0 2097152 thin-pool 0 11/1024 0/16384 - rw no_discard_passdown error_if_no_space - 768"
DATA_FULL = (
    "0 2097152 thin-pool 4 300/1024 16000/16384 - rw discard_passdown error_if_no_space - 768"
)
META_FULL = (
    "0 2097152 thin-pool 9 1010/1024 100/16384 - rw discard_passdown error_if_no_space - 768"
)
OUT = (
    "0 2097152 thin-pool 4 300/1024 16384/16384 - out_of_data_space discard_passdown "
    "error_if_no_space - 768"
)
NEEDS_CHECK = (
    "0 2097152 thin-pool 4 30/1024 10/16384 - ro discard_passdown error_if_no_space needs_check 768"
)


def test_block_size_comes_from_the_table() -> None:
    assert data_block_of(TABLE) == BLOCK
    with pytest.raises(CorruptMetadata, match="thin pool table"):
        data_block_of("0 2048 linear 7:0 0")


def test_status_gives_data_and_metadata_in_bytes() -> None:
    s = parse_thin_status(DATA_FULL, BLOCK)
    assert (s.data_total, s.data_free) == (16384 * BLOCK, 384 * BLOCK)
    assert (s.meta_total, s.meta_free) == (1024 * META_BLOCK, 724 * META_BLOCK)
    assert s.writable
    assert not parse_thin_status(OUT, BLOCK).writable
    checked = parse_thin_status(NEEDS_CHECK, BLOCK)
    assert checked.needs_check and not checked.writable
    failed = parse_thin_status("0 2097152 thin-pool Fail", BLOCK)
    assert not failed.writable and failed.data_free == 0
    with pytest.raises(CorruptMetadata, match="thin pool status"):
        parse_thin_status("0 2097152 thin 77 2097151", BLOCK)


def test_an_empty_pool_admits_a_full_within_its_margin() -> None:
    s = parse_thin_status(EMPTY, BLOCK)
    assert thin_shortfall(s, 512 * MiB, 512 * MiB) is None
    # 1 GiB less the 5 % data margin does not hold 1 GiB.
    short = thin_shortfall(s, 1 << 30, 1 << 30)
    assert short is not None and short.resource == DATA
    assert short.free == 1 << 30 and short.needed > 1 << 30


def test_data_nearly_full_refuses_naming_data() -> None:
    short = thin_shortfall(parse_thin_status(DATA_FULL, BLOCK), 8 * MiB, 8 * MiB)
    assert short is not None and short.resource == DATA
    assert short.free == 384 * BLOCK


def test_metadata_nearly_full_refuses_with_data_free() -> None:
    s = parse_thin_status(META_FULL, BLOCK)
    assert s.data_free > 900 * MiB
    short = thin_shortfall(s, 8 * MiB, 8 * MiB)
    assert short is not None and short.resource == METADATA
    assert short.free == 14 * META_BLOCK
    assert short.needed >= metadata_needed(8 * MiB, 8 * MiB, BLOCK)


def test_a_pool_refusing_writes_admits_nothing_and_says_why() -> None:
    short = thin_shortfall(parse_thin_status(NEEDS_CHECK, BLOCK), BLOCK, MiB)
    assert short is not None and short.resource == "data (ro, needs check)"


def test_metadata_estimate_counts_mappings_and_copied_leaves() -> None:
    # One changed block copies one leaf; a whole volume copies at most every leaf.
    assert metadata_needed(BLOCK, 1 << 30, BLOCK) == META_BLOCK + 32
    whole = metadata_needed(1 << 30, 1 << 30, BLOCK)
    assert whole < 16384 * META_BLOCK
    assert whole == (16384 // 126 + 1) * META_BLOCK + 16384 * 32


def test_the_refusal_and_alert_name_the_metadata() -> None:
    err = PoolSpaceLow(pool="p", free=100, needed=200, resource=METADATA)
    assert "thin pool's metadata has 100 bytes free, 200 bytes needed" in str(err)
    alert = SpaceAlert("p", 100, 200, "vol", METADATA)
    assert (
        alert.message == "pool p's thin pool metadata has 100 bytes free, 200 needed for volume vol"
    )
    assert "thin pool" not in SpaceAlert("p", 1, 2).message
