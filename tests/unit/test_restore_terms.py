"""The restore path's fitted terms: known shapes give known seconds, the fit recovers terms."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest

from blockguard.core.objectives import RecoveryObjectives
from blockguard.core.perftable import DeviceSpeed
from blockguard.core.planner import plan_backup
from blockguard.core.restore_model import (
    Chain,
    StoredDelta,
    estimate_chain,
)
from blockguard.core.restore_terms import (
    PathSample,
    PathTerms,
    RestoreShape,
    fit_terms,
    nnls,
    upper_factor,
)
from blockguard.core.units import MiB
from blockguard.core.vocab import GenerationKind, RestoreMode
from blockguard.core.what_if import ChangeSets, bytes_restorable_within
from blockguard.errors import InvalidInput

MB = 10**6
INCR = GenerationKind.INCREMENTAL
DIFF = GenerationKind.DIFFERENTIAL
TRUE = PathTerms(fixed=0.4, per_generation=0.06, per_extent=0.0015, per_byte=1 / (150 * MB))


def test_a_known_shape_gives_known_seconds() -> None:
    shape = RestoreShape(generations=5, chunks=800, extents=400, nbytes=300 * MB)
    b = TRUE.breakdown(shape)
    assert b.fixed == pytest.approx(0.4)
    assert b.generations == pytest.approx(0.3)
    assert b.extents == pytest.approx(0.6)
    assert b.transfer == pytest.approx(2.0)
    assert TRUE.seconds(shape) == pytest.approx(3.3)
    assert TRUE.bandwidth == pytest.approx(150 * MB)


def test_bad_terms_and_shapes_are_refused_by_name() -> None:
    with pytest.raises(InvalidInput, match="per_extent"):
        PathTerms(per_extent=-1.0)
    with pytest.raises(InvalidInput, match="upper factor"):
        PathTerms(upper_factor=0.5)
    with pytest.raises(InvalidInput, match="extents written"):
        RestoreShape(1, 1, -3, 10)


def _shapes() -> list[RestoreShape]:
    shapes = []
    for size in (32 * MiB, 64 * MiB):
        for gens, extents in [(1, 0), (2, 10), (5, 40), (9, 80), (4, 400), (3, 30)]:
            shapes.append(RestoreShape(gens, size // (64 * 1024), extents, size))
    return shapes


def test_fit_recovers_terms_from_noisy_samples_with_an_outlier() -> None:
    rnd = random.Random(14)
    samples = [
        PathSample(s, TRUE.seconds(s) * (1 + rnd.gauss(0, 0.02))) for s in _shapes() for _ in (0, 1)
    ]
    # One restore that waited on a lock: ten times too slow.
    samples.append(PathSample(_shapes()[3], 10 * TRUE.seconds(_shapes()[3])))
    fitted = fit_terms(samples)
    assert fitted is not None
    assert fitted.samples == len(samples)
    for shape in _shapes():
        assert fitted.seconds(shape) == pytest.approx(TRUE.seconds(shape), rel=0.05)
    assert fitted.per_generation == pytest.approx(TRUE.per_generation, rel=0.25)
    assert fitted.per_extent == pytest.approx(TRUE.per_extent, rel=0.25)
    # The outlier is not the 90th percentile: the upper factor stays near the noise.
    assert 1.0 <= fitted.upper_factor < 1.2


def test_fit_needs_enough_samples_and_terms_stay_non_negative() -> None:
    shapes = _shapes()
    assert fit_terms([PathSample(s, 1.0) for s in shapes[:3]]) is None
    # Longer chains restoring faster would need a negative per-generation cost.
    odd = [PathSample(s, 2.0 - 0.1 * s.generations) for s in shapes]
    fitted = fit_terms(odd)
    assert fitted is not None
    assert min(fitted.fixed, fitted.per_generation, fitted.per_extent, fitted.per_byte) >= 0


def test_the_bytes_term_is_held_to_the_disks_read_rate() -> None:
    """Restores of 32 and 64 MiB that ran ahead of the disk's rate (a throttle's burst)
    fit a fixed cost and a bytes term faster than the disk; held to its probed read rate,
    the fit's estimate of a 128 MiB restore is what such a restore takes, and a fit
    already slower than the floor does not change."""
    disk = 100 * MB  # its probed sequential read rate
    shapes = [RestoreShape(g, 0, 0, size) for size in (32 * MiB, 64 * MiB) for g in (1, 3, 5, 9)]
    # What the host's throttled disk measured: 0.24 s + 5.8 ns/B, faster than 10 ns/B.
    bursty = [PathSample(s, 0.24 + 5.8e-9 * s.nbytes) for s in shapes]
    large = RestoreShape(1, 0, 0, 128 * MiB)
    free = fit_terms(bursty)
    held = fit_terms(bursty, min_per_byte=1 / disk)
    assert free is not None and held is not None
    assert free.per_byte < 1 / disk <= held.per_byte
    assert held.seconds(large) >= large.nbytes / disk
    assert free.seconds(large) < large.nbytes / disk
    # Terms slower than the floor are the same with it.
    slow = [PathSample(s, TRUE.seconds(s)) for s in _shapes()]
    a, b = fit_terms(slow), fit_terms(slow, min_per_byte=1 / (300 * MB))
    assert a is not None and b is not None
    assert b.per_byte == pytest.approx(a.per_byte, rel=1e-6)
    with pytest.raises(InvalidInput, match="seconds per byte"):
        fit_terms(slow, min_per_byte=-1.0)


def test_nnls_solves_an_exact_system() -> None:
    rows = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    assert nnls(rows, [2.0, 3.0, 5.0], [1.0, 1.0, 1.0]) == pytest.approx([2.0, 3.0])
    # The unconstrained answer would be negative: clamped to 0, the rest refitted.
    assert nnls(rows, [-1.0, 3.0, 2.0], [1.0, 1.0, 1.0])[0] == 0.0


def test_upper_factor_is_a_quantile_at_least_one() -> None:
    assert upper_factor([]) == 1.0
    assert upper_factor([0.5, 0.7]) == 1.0
    assert upper_factor([1.0] * 9 + [3.0]) == 1.0  # nearest rank 9 of 10
    assert upper_factor([1.1, 1.3, 1.2]) == pytest.approx(1.3)


# --- the model with fitted terms -----------------------------------------------------------


SPEEDS = {"pool": DeviceSpeed.uniform(100 * MB)}


def test_estimate_uses_the_terms_of_the_fulls_device_and_mode() -> None:
    chain = Chain(300 * MB, "pool", (StoredDelta(INCR, 10 * MB, "pool", extents=100),) * 4)
    terms = {("pool", "swap-in"): PathTerms(0.4, 0.06, 0.0015, 1 / (150 * MB), 8, 1.25)}
    est = estimate_chain(chain, SPEEDS, RestoreMode.SWAP_IN, terms=terms)
    assert est.calibrated
    # 0.4 + 5 x 0.06 + 400 x 0.0015 + 300 MB / 150 MB/s
    assert est.seconds == pytest.approx(3.3)
    assert est.breakdown.as_dict() == pytest.approx(
        {"fixed": 0.4, "generations": 0.3, "extents": 0.6, "transfer": 2.0}
    )
    assert est.upper_seconds == pytest.approx(3.3 * 1.25)
    assert est.upper_seconds >= est.seconds
    # Copy mode of the same device has no terms: the probe-only model, uncalibrated.
    copy = estimate_chain(
        chain, SPEEDS, RestoreMode.COPY, DeviceSpeed.uniform(100 * MB), 1.0, terms
    )
    assert not copy.calibrated
    assert copy.upper_seconds == copy.seconds
    assert copy.breakdown.transfer == pytest.approx(copy.seconds)


def test_a_copy_adds_its_targets_writes_to_a_rehearsed_read_side() -> None:
    # Terms from rehearsals (write_rate 0): the read side alone; copies were measured to
    # take about read + write, not the larger of the two.
    terms = {("pool", "copy"): PathTerms(0.5, 0.0, 0.0, 1 / (500 * MB), 8, 2.0)}
    est = estimate_chain(
        Chain(100 * MB, "pool"), SPEEDS, RestoreMode.COPY, DeviceSpeed.uniform(50 * MB), 1.0, terms
    )
    # 0.5 + 100 MB read at 500 MB/s + 100 MB written at the target's 50 MB/s
    assert est.seconds == pytest.approx(0.5 + 0.2 + 2.0)
    assert est.breakdown.transfer == pytest.approx(2.2)
    # The spread widens the measured path (0.5 + 0.2 s) only, not the target's writes.
    assert est.upper_seconds == pytest.approx(2.7 + 0.7)


def test_a_copy_drilled_into_scratch_adds_only_a_slower_targets_extra() -> None:
    # Terms from real copies into a 200 MB/s scratch device: their per byte holds its writes.
    drilled = PathTerms(0.5, 0.0, 0.0, 1 / (100 * MB), 8, 1.5, write_rate=200 * MB)
    terms = {("pool", "copy"): drilled}
    chain = Chain(100 * MB, "pool")
    slow = estimate_chain(chain, SPEEDS, RestoreMode.COPY, DeviceSpeed.uniform(50 * MB), 1.0, terms)
    # 0.5 + 1.0 s measured + 100 MB x (1/50 - 1/200 MB/s) = 1.5 s more for the slower target
    assert slow.seconds == pytest.approx(0.5 + 1.0 + 1.5)
    # A faster target is not counted as faster than the drill measured.
    fast = estimate_chain(
        chain, SPEEDS, RestoreMode.COPY, DeviceSpeed.uniform(1000 * MB), 1.0, terms
    )
    assert fast.seconds == pytest.approx(1.5)
    assert fast.upper_seconds == pytest.approx(1.5 * 1.5)
    with pytest.raises(InvalidInput):
        PathTerms(write_rate=-1.0)


def test_planner_holds_the_rto_against_the_upper_estimate() -> None:
    chain = Chain(100 * MB, "pool")
    changes = ChangeSets(1 * MB, 1 * MB, 100 * MB, incremental_extents=16, differential_extents=16)
    # point: 1 + 2 x 0.1 + 16 x 0.01 + 1 = 2.36 s; upper x1.5 = 3.54 s
    terms = {("pool", "swap-in"): PathTerms(1.0, 0.1, 0.01, 1 / (100 * MB), 8, 1.5)}
    # full: (1 + 0.1 + 1) x 1.5 = 3.15 s; deltas: 2.36 x 1.5 = 3.54 s
    objectives = RecoveryObjectives(rto=timedelta(seconds=3.3), restore_mode=RestoreMode.SWAP_IN)
    decision = plan_backup(chain, changes, SPEEDS, objectives, terms=terms)
    # The point estimate of an incremental (2.36 s) is within the RTO; its upper is not.
    assert decision.method is GenerationKind.FULL
    assert decision.feasible
    assert decision.estimate.upper_seconds == pytest.approx(3.15)
    roomy = RecoveryObjectives(rto=timedelta(seconds=4), restore_mode=RestoreMode.SWAP_IN)
    assert plan_backup(chain, changes, SPEEDS, roomy, terms=terms).method is INCR


def test_bytes_restorable_within_uses_the_extent_cost() -> None:
    chain = Chain(100 * MB, "pool")
    terms = {("pool", "swap-in"): PathTerms(1.0, 0.5, 0.01, 1 / (100 * MB), 8, 1.0)}
    # 10 s budget - (1 + 0.5 + 1) now - 0.5 for one more generation = 7 s; 0.01 s per 64 KiB.
    left = bytes_restorable_within(
        timedelta(seconds=10), chain, "pool", SPEEDS, RestoreMode.SWAP_IN, terms=terms
    )
    assert left == pytest.approx(700 * 64 * 1024, rel=1e-6)


def test_upper_factor_covers_a_shape_only_its_own_repeats_vouch_for() -> None:
    # A drill restores every shape twice. Only one shape is dominated by scattered extents,
    # and it runs 1.6x what the other shapes' terms predict: a fit that keeps its twin
    # while judging one of the pair learns the extent cost from the twin and calls it exact.
    kinds = [(1, 0, 32), (1, 0, 64), (2, 10, 64), (5, 15, 64), (9, 80, 64), (3, 60, 32)]
    plain = [RestoreShape(g, 1024, e, n * MiB) for g, e, n in kinds]
    scattered = RestoreShape(3, 1024, 600, 64 * MiB)
    samples = [PathSample(s, TRUE.seconds(s)) for s in plain for _ in (0, 1)]
    samples += [PathSample(scattered, 1.6 * TRUE.seconds(scattered))] * 2
    fitted = fit_terms(samples)
    assert fitted is not None
    # The fitted point estimate of the odd shape may be right; its upper estimate must
    # also cover it as if it were unseen, so the other shapes' 1.6x gap shows.
    assert fitted.upper_factor >= 1.5
    assert fitted.seconds(scattered) * fitted.upper_factor >= 1.6 * TRUE.seconds(scattered) * 0.95
