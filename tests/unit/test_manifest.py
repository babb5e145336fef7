"""Generation manifests: round trip, self-check, checksum arrays, ids, atomic writes."""

from __future__ import annotations

import array
import json
from pathlib import Path

import pytest
from pyroaring import BitMap

from blockguard.core.vocab import GenerationKind
from blockguard.errors import CorruptMetadata, InvalidChunkSize, InvalidInput
from blockguard.storage.copyengine import extents
from blockguard.storage.manifest import (
    MANIFEST_NAME,
    Manifest,
    VolumeIdentity,
    check_chunk_size,
    checksum_bytes,
    checksum_digest,
    checksums_from_bytes,
    generation_id_time,
    new_generation_id,
    read_manifest,
    write_atomic,
)


def sample(kind: GenerationKind = GenerationKind.INCREMENTAL) -> Manifest:
    changed = BitMap([1, 2, 3, 100, 4095])
    sums = array.array("Q", range(len(changed)))
    return Manifest(
        generation_id=new_generation_id(),
        volume=VolumeIdentity("vol-a", 4096 * 65536, "253:7"),
        chunk_size=65536,
        kind=kind,
        base_id="20260101T000000.000000Z-00000001",
        parent_id="20260101T000000.000000Z-00000002",
        changed=changed,
        created=1_800_000_000.5,
        bytes_stored=len(changed) * 65536,
        checksum_count=len(changed),
        checksum_digest=checksum_digest(checksum_bytes(sums)),
        storage={"layout": "packed", "data": "chunks"},
    )


def test_round_trip() -> None:
    m = sample()
    back = Manifest.from_json(m.to_json())
    assert back == m
    assert back.changed == BitMap([1, 2, 3, 100, 4095])
    body = json.loads(m.to_json())
    assert body["format_version"] == 1 and body["kind"] == "incremental"
    assert body["volume"] == {"name": "vol-a", "size": 4096 * 65536, "device_id": "253:7"}


def test_tampering_is_detected() -> None:
    body = json.loads(sample().to_json())
    body["parent_id"] = "20260101T000000.000000Z-99999999"
    with pytest.raises(CorruptMetadata, match="digest"):
        Manifest.from_json(json.dumps(body).encode())


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        (b"{not json", "not JSON"),
        (b'{"format": "something-else"}', "not a blockguard"),
        (b'{"format": "blockguard-generation", "format_version": 99}', "version 99"),
    ],
)
def test_bad_manifests_are_refused(data: bytes, detail: str) -> None:
    with pytest.raises(CorruptMetadata, match=detail):
        Manifest.from_json(data)


def test_checksum_count_must_match_stored_chunks() -> None:
    m = sample().with_(checksum_count=4)
    with pytest.raises(CorruptMetadata, match="4 checksums for 5 stored chunks"):
        Manifest.from_json(m.to_json())


def test_slots_and_stored_chunks() -> None:
    m = sample()
    assert [m.checksum_slot(c) for c in (1, 2, 3, 100, 4095)] == [0, 1, 2, 3, 4]
    with pytest.raises(InvalidInput):
        m.checksum_slot(5)
    full = m.with_(kind=GenerationKind.FULL)
    assert full.checksum_slot(5) == 5 and len(full.stored_chunks()) == 4096


def test_checksum_array_round_trip_and_damage() -> None:
    sums = array.array("Q", [0, 1, 2**64 - 1, 12345, 7])
    raw = checksum_bytes(sums)
    m = sample().with_(checksum_count=5, checksum_digest=checksum_digest(raw))
    assert list(checksums_from_bytes(raw, m, "x")) == list(sums)
    bad = bytearray(raw)
    bad[9] ^= 1
    with pytest.raises(CorruptMetadata, match="checksum array"):
        checksums_from_bytes(bytes(bad), m, "x")
    with pytest.raises(CorruptMetadata):
        checksums_from_bytes(raw[:-8], m, "x")


def test_ids_sort_by_creation_and_are_unique() -> None:
    ids = [new_generation_id() for _ in range(1000)]
    assert ids == sorted(ids) and len(set(ids)) == 1000


def test_an_id_carries_its_creation_time() -> None:
    assert generation_id_time(new_generation_id(1_800_000_000.25)) == 1_800_000_000.25
    assert generation_id_time("imported-volume-copy") is None


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", ".hidden", "x" * 129, "a b"])
def test_unsafe_volume_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidInput):
        VolumeIdentity(name, 4096)


@pytest.mark.parametrize("size", [0, 1000, 2048, 3 << 20, 32 << 20])
def test_chunk_size_rules(size: int) -> None:
    with pytest.raises(InvalidChunkSize):
        check_chunk_size(size)


def test_atomic_write_and_read_manifest(tmp_path: Path) -> None:
    m = sample()
    gen = tmp_path / m.generation_id
    gen.mkdir()
    write_atomic(gen / MANIFEST_NAME, m.to_json())
    assert [p.name for p in gen.iterdir()] == [MANIFEST_NAME]
    assert read_manifest(gen) == m
    other = tmp_path / "20260101T000000.000000Z-0000000f"
    other.mkdir()
    write_atomic(other / MANIFEST_NAME, m.to_json())
    with pytest.raises(CorruptMetadata, match="names generation"):
        read_manifest(other)


def test_extents_coalesce_and_split() -> None:
    assert list(extents(BitMap([0, 1, 2, 5, 6, 9]), 10, 100)) == [(0, 3), (5, 2), (9, 1)]
    assert list(extents(BitMap(range(10)), 10, 4)) == [(0, 4), (4, 4), (8, 2)]
    assert list(extents(None, 10, 4)) == [(0, 4), (4, 4), (8, 2)]
    assert list(extents(BitMap([3, 20]), 10, 4)) == [(3, 1)]  # beyond the volume: ignored
    assert list(extents(BitMap(), 10, 4)) == []


def test_fail_point_raises_at_the_nth_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    from blockguard.errors import EnvironmentProblem
    from blockguard.storage import manifest as mod

    monkeypatch.setattr(mod, "_fail_hits", {})
    monkeypatch.setenv("BLOCKGUARD_TEST_FAIL_AT", "some-point@2")
    mod.crash_point("other-point")
    mod.crash_point("some-point")
    with pytest.raises(EnvironmentProblem, match="fault injected at some-point"):
        mod.crash_point("some-point")
    mod.crash_point("some-point")  # only the N-th pass fails


def test_volume_record_round_trip_and_refusals() -> None:
    from blockguard.storage.pool.base import VolumeRecord

    record = VolumeRecord(
        name="db",
        device_path="/dev/vg0/db",
        major=253,
        minor=4,
        size=1 << 30,
        serial=None,
        chunk_size=65536,
        tracker_backend="era",
        objectives={"rto": "5m", "generations": 9},
        group="web",
        group_objectives={"rpo": "every 1h"},
        updated=12.5,
    )
    assert VolumeRecord.from_json(record.to_json(), "r") == record
    for bad in (
        b"not json",
        b"[]",
        b'{"format": "other"}',
        record.to_json().replace(b'"db"', b'"../x"'),
        record.to_json().replace(b'"chunk_size"', b'"chunk"'),
    ):
        with pytest.raises(CorruptMetadata):
            VolumeRecord.from_json(bad, "r")
