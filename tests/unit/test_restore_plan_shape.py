"""The model counts what the restore plan really does: each delta chunk once, and adjacent
chunks as one run whichever generation they come from (issue 14: a chunk changed in every
incremental of a chain was charged once per incremental by the per-extent term)."""

from __future__ import annotations

from pyroaring import BitMap

from blockguard.core.perftable import DeviceSpeed
from blockguard.core.restore_model import Chain, MergedDeltas, estimate_chain
from blockguard.core.restore_terms import PathTerms
from blockguard.core.vocab import GenerationKind, RestoreMode
from blockguard.engine.planning import chain_view
from blockguard.storage.manifest import Manifest, VolumeIdentity
from blockguard.storage.restore import merged_deltas, plan_chunks

CHUNK = 64 * 1024
NCHUNKS = 1024
SIZE = NCHUNKS * CHUNK
HOT = BitMap(range(0, 200, 2))  # 100 scattered chunks, rewritten by every incremental


def manifest(
    gid: str, kind: GenerationKind, changed: BitMap, parent: str | None, base: str | None = None
) -> Manifest:
    full = kind is GenerationKind.FULL
    return Manifest(
        generation_id=gid,
        volume=VolumeIdentity("db", SIZE),
        chunk_size=CHUNK,
        kind=kind,
        base_id=None if full else (base or "f"),
        parent_id=parent,
        changed=BitMap(range(NCHUNKS)) if full else changed,
    )


def hot_chain(incrementals: int) -> list[Manifest]:
    chain = [manifest("f", GenerationKind.FULL, BitMap(), None)]
    for i in range(incrementals):
        chain.append(manifest(f"i{i}", GenerationKind.INCREMENTAL, HOT, chain[-1].generation_id))
    return chain


def test_a_chunk_changed_in_four_incrementals_is_one_extent_of_the_restore() -> None:
    chain = hot_chain(4)
    # The plan takes the hot chunks from the newest incremental only.
    plan = plan_chunks(chain)
    assert [len(own) for _, own in plan[1:]] == [0, 0, 0, 100]
    assert merged_deltas(chain) == MergedDeltas(chunks=100, extents=100)
    view = chain_view(chain, lambda m: "disk0")
    assert view.chain is not None
    shape = view.chain.shape()
    assert (shape.generations, shape.chunks, shape.extents) == (5, 100, 100)


def test_the_estimate_charges_the_per_extent_term_once_per_run_written() -> None:
    chain = hot_chain(4)
    view = chain_view(chain, lambda m: "disk0")
    assert view.chain is not None
    terms = PathTerms(fixed=0.1, per_generation=0.01, per_extent=0.001, per_byte=1e-9, samples=8)
    estimate = estimate_chain(
        view.chain,
        {"disk0": DeviceSpeed.uniform(1e9)},
        RestoreMode.SWAP_IN,
        terms={("disk0", RestoreMode.SWAP_IN.value): terms},
    )
    assert estimate.breakdown.extents == 100 * 0.001
    # Summing each incremental's own extents charged them four times.
    unmerged = Chain(view.chain.full_bytes, "disk0", view.chain.deltas)
    assert unmerged.shape().extents == 400


def test_adjacent_chunks_of_different_generations_are_one_run() -> None:
    chain = [manifest("f", GenerationKind.FULL, BitMap(), None)]
    chain.append(manifest("i0", GenerationKind.INCREMENTAL, BitMap([10, 12]), "f"))
    chain.append(manifest("i1", GenerationKind.INCREMENTAL, BitMap([11, 12, 13]), "i0"))
    # 10 from i0, 11-13 from i1 (12 only once): one window 10-13 written.
    assert merged_deltas(chain) == MergedDeltas(chunks=4, extents=1)


def test_a_differential_restarts_the_merge_and_later_backups_stay_an_upper_bound() -> None:
    chain = hot_chain(3)
    chain.append(manifest("d", GenerationKind.DIFFERENTIAL, HOT | BitMap([500, 501]), "f"))
    chain.append(manifest("j", GenerationKind.INCREMENTAL, BitMap([501, 700]), "d"))
    view = chain_view(chain, lambda m: "disk0")
    assert view.chain is not None
    # The restore applies the differential and j: the hot chunks, 500-501, 700.
    assert view.chain.merged == MergedDeltas(chunks=103, extents=102)
    grown = view.chain.with_backup(GenerationKind.INCREMENTAL, 3 * CHUNK, "disk0", extents=3)
    assert grown.shape().extents == 105 and grown.shape().chunks == 106
    restarted = view.chain.with_backup(GenerationKind.DIFFERENTIAL, 2 * CHUNK, "disk0", extents=2)
    assert restarted.shape().extents == 2
