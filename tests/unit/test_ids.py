"""Generation ids people type: running numbers, latest~N, unique prefixes (engine/ids.py),
and the numbers a manifest keeps (storage/manifest.py)."""

from __future__ import annotations

import json

import pytest
from pyroaring import BitMap

from blockguard.engine.ids import resolve_generation, short_id
from blockguard.errors import AmbiguousGeneration, InvalidInput, NotFound
from blockguard.storage.manifest import (
    GenerationKind,
    Manifest,
    VolumeIdentity,
    sequence_numbers,
)

GENS = [
    ("20261201T184511.860410Z-0cf76af3", 1),
    ("20261201T184602.000001Z-11111111", 2),
    ("20261202T090000.000000Z-22222222", 0),  # unreadable manifest: no number
    ("20261202T100000.000000Z-33333333", 4),
]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("db@1", GENS[0][0]),
        ("db@4", GENS[3][0]),
        ("4", GENS[3][0]),
        ("db@latest", GENS[3][0]),
        ("latest", GENS[3][0]),
        ("db@latest~1", GENS[2][0]),
        ("db@latest~3", GENS[0][0]),
        ("db@20261202T10", GENS[3][0]),
        ("db@20261201T1846", GENS[1][0]),
        (f"db@{GENS[0][0]}", GENS[0][0]),
    ],
)
def test_every_form_names_one_generation(text: str, expected: str) -> None:
    assert resolve_generation("db", text, GENS) == expected


def test_an_ambiguous_prefix_lists_the_candidates() -> None:
    with pytest.raises(AmbiguousGeneration) as err:
        resolve_generation("db", "db@20261201T18", GENS)
    message = str(err.value)
    assert "db@1 (db@20261201T184511.860410Z-0cf76af3)" in message
    assert "db@2 (db@20261201T184602.000001Z-11111111)" in message
    assert "db@4" not in message


@pytest.mark.parametrize("text", ["db@3", "db@9", "db@latest~4", "db@2027", "db@20261203"])
def test_nothing_matching_says_what_there_is(text: str) -> None:
    with pytest.raises(NotFound) as err:
        resolve_generation("db", text, GENS)
    assert text in str(err.value)
    assert "numbered 1..4" in str(err.value)
    assert "blockguardctl generations db lists them" in str(err.value)


@pytest.mark.parametrize("text", ["db@nonsense", "db@latest~x", "db@2026120xT", "db@-1", "db@"])
def test_what_cannot_be_a_generation_is_a_usage_error(text: str) -> None:
    with pytest.raises(InvalidInput) as err:
        resolve_generation("db", text, GENS)
    assert not isinstance(err.value, NotFound)


def test_another_volumes_generation_is_refused() -> None:
    with pytest.raises(InvalidInput, match="belongs to volume web"):
        resolve_generation("db", "web@1", GENS)


def test_no_generations_yet() -> None:
    with pytest.raises(NotFound, match="db has no generations yet"):
        resolve_generation("db", "db@latest", [])


def test_short_id() -> None:
    assert short_id("db", 7) == "db@7"
    assert short_id("db", 0) == ""


def _manifest(gid: str, created: float, sequence: int = 0) -> Manifest:
    return Manifest(
        generation_id=gid,
        volume=VolumeIdentity("db", 65536),
        chunk_size=65536,
        kind=GenerationKind.FULL,
        base_id=None,
        parent_id=None,
        changed=BitMap(),
        created=created,
        checksum_count=1,
        sequence=sequence,
    )


def test_the_number_is_kept_in_the_manifest_and_old_manifests_keep_their_digest() -> None:
    numbered = _manifest("20261201T000000.000000Z-00000001", 1.0, sequence=7)
    assert json.loads(numbered.to_json())["sequence"] == 7
    assert Manifest.from_json(numbered.to_json()).sequence == 7
    old = _manifest("20261201T000000.000000Z-00000002", 2.0)
    assert "sequence" not in json.loads(old.to_json())
    assert Manifest.from_json(old.to_json()).sequence == 0


def test_unnumbered_generations_are_numbered_by_their_order() -> None:
    old1 = _manifest("20261201T000000.000000Z-00000001", 1.0)
    old2 = _manifest("20261201T000000.000000Z-00000002", 2.0)
    new = _manifest("20261201T000000.000000Z-00000003", 3.0, sequence=5)
    after = _manifest("20261201T000000.000000Z-00000004", 4.0)
    numbers = sequence_numbers([new, old2, after, old1])
    assert numbers == {
        old1.generation_id: 1,
        old2.generation_id: 2,
        new.generation_id: 5,
        after.generation_id: 6,
    }
