"""Restore-time model and performance table (pure arithmetic, no devices)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockguard.core.perftable import (
    DeviceRole,
    DeviceSpeed,
    PerformanceEntry,
    PerformanceTable,
    SpeedKind,
    Transport,
)
from blockguard.core.restore_model import (
    CORRECTION_MAX,
    CORRECTION_MIN,
    Chain,
    RestorePiece,
    RestoreSample,
    StoredDelta,
    correction_factor,
    estimate_chain,
    estimate_pieces,
    piece_time,
)
from blockguard.core.units import GiB, KiB, MiB
from blockguard.core.vocab import GenerationKind, RestoreMode
from blockguard.core.what_if import ChangeSets, bytes_restorable_within, what_if
from blockguard.errors import InvalidInput, NotFound

MB = 10**6
GB = 10**9
INCR = GenerationKind.INCREMENTAL
DIFF = GenerationKind.DIFFERENTIAL
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


# --- the seed's example (step 704) --------------------------------------------------------


@pytest.mark.parametrize(("rate_mb", "minutes"), [(100, 100), (20, 500)])
def test_seed_example_600_gb_cumulative(rate_mb: int, minutes: int) -> None:
    """600 GB of changes since the full at 100 MB/s takes 100 min; at 20 MB/s, 500 min."""
    pool = DeviceSpeed.uniform(rate_mb * MB)
    fast_target = DeviceSpeed.uniform(10_000 * MB)
    # Three incrementals since the full, 600 GB in all, on the pool device.
    chain = Chain(
        2000 * GB,
        "full-dev",
        (
            StoredDelta(INCR, 250 * GB, "pool"),
            StoredDelta(INCR, 200 * GB, "pool"),
            StoredDelta(INCR, 150 * GB, "pool"),
        ),
    )
    estimate = estimate_chain(chain, {"full-dev": fast_target, "pool": pool}, RestoreMode.SWAP_IN)
    assert estimate.nbytes == 600 * GB
    assert estimate.seconds == pytest.approx(minutes * 60)
    assert estimate.duration == timedelta(minutes=minutes)


def test_slower_side_decides_the_rate() -> None:
    """min(read where stored, write of the target): the seed takes the lower of the two."""
    piece = RestorePiece("d", 600 * GB, DeviceSpeed.uniform(100 * MB), scattered=False)
    assert piece_time(piece, DeviceSpeed.uniform(20 * MB)).seconds == pytest.approx(30_000)
    assert piece_time(piece, DeviceSpeed.uniform(500 * MB)).seconds == pytest.approx(6_000)


def test_scattered_uses_random_figures_and_contiguous_sequential() -> None:
    source = DeviceSpeed(seq_read=400 * MB, seq_write=1, rand_read=40 * MB, rand_write=1)
    target = DeviceSpeed(seq_read=1, seq_write=200 * MB, rand_read=1, rand_write=10 * MB)
    contiguous = piece_time(RestorePiece("c", 2 * GB, source, False), target)
    scattered = piece_time(RestorePiece("s", 2 * GB, source, True), target)
    assert contiguous.rate == 200 * MB  # min(400 seq read, 200 seq write)
    assert scattered.rate == 10 * MB  # min(40 rand read, 10 rand write)
    assert scattered.seconds == pytest.approx(200)


# --- restore modes ---------------------------------------------------------------------------


def _speeds() -> dict[str, DeviceSpeed]:
    return {
        "hdd": DeviceSpeed(150 * MB, 140 * MB, 10 * MB, 8 * MB),
        "ssd": DeviceSpeed(500 * MB, 450 * MB, 200 * MB, 150 * MB),
    }


def test_swap_in_full_is_instant_and_target_is_the_full_device() -> None:
    chain = Chain(100 * GB, "ssd", (StoredDelta(INCR, 1 * GB, "hdd"),))
    estimate = estimate_chain(chain, _speeds(), RestoreMode.SWAP_IN)
    # Only the delta is copied: read at random from hdd (10 MB/s), written onto ssd (150).
    assert [p.piece.nbytes for p in estimate.parts] == [1 * GB]
    assert estimate.seconds == pytest.approx(100)
    assert estimate_chain(Chain(100 * GB, "ssd"), _speeds(), RestoreMode.SWAP_IN).seconds == 0


def test_copy_mode_copies_the_full_sequentially_then_deltas() -> None:
    target = DeviceSpeed(1000 * MB, 100 * MB, 1000 * MB, 50 * MB)
    chain = Chain(100 * GB, "ssd", (StoredDelta(INCR, 1 * GB, "ssd"),))
    estimate = estimate_chain(chain, _speeds(), RestoreMode.COPY, copy_target=target)
    full, delta = estimate.parts
    assert full.rate == 100 * MB and full.seconds == pytest.approx(1000)
    assert delta.rate == 50 * MB and delta.seconds == pytest.approx(20)
    assert estimate.seconds == pytest.approx(1020)
    with pytest.raises(InvalidInput, match="target"):
        estimate_chain(chain, _speeds(), RestoreMode.COPY)


def test_restore_applies_last_differential_and_later_incrementals_only() -> None:
    chain = Chain(
        100 * GB,
        "ssd",
        (
            StoredDelta(INCR, 1 * GB, "hdd"),
            StoredDelta(DIFF, 3 * GB, "ssd"),
            StoredDelta(INCR, 2 * GB, "hdd"),
            StoredDelta(DIFF, 4 * GB, "ssd"),
            StoredDelta(INCR, 5 * GB, "hdd"),
            StoredDelta(INCR, 6 * GB, "hdd"),
        ),
    )
    assert [d.nbytes for d in chain.restore_deltas()] == [4 * GB, 5 * GB, 6 * GB]
    assert chain.incrementals_since_base() == 2
    estimate = estimate_chain(chain, _speeds(), RestoreMode.SWAP_IN)
    # 4 GB at min(200, 150) + 11 GB at min(10, 150)
    assert estimate.seconds == pytest.approx(4000 / 150 + 11000 / 10)


def test_unknown_device_is_not_found() -> None:
    with pytest.raises(NotFound, match="nvme9"):
        estimate_chain(Chain(1 * GB, "nvme9"), _speeds(), RestoreMode.SWAP_IN)


def test_what_if_answers_for_each_method() -> None:
    chain = Chain(100 * GB, "ssd", (StoredDelta(INCR, 10 * GB, "hdd"),))
    changes = ChangeSets(
        incremental_bytes=2 * GB, differential_bytes=11 * GB, volume_bytes=100 * GB
    )
    answers = what_if(chain, changes, "hdd", _speeds(), RestoreMode.SWAP_IN)
    assert answers[INCR].seconds == pytest.approx(1200)  # 12 GB at 10 MB/s
    assert answers[DIFF].seconds == pytest.approx(1100)  # 11 GB at 10 MB/s
    assert answers[GenerationKind.FULL].seconds == 0
    assert set(what_if(None, changes, "hdd", _speeds(), RestoreMode.SWAP_IN)) == {
        GenerationKind.FULL
    }


# --- correction from real restores -----------------------------------------------------------


def test_correction_is_the_median_of_recent_ratios() -> None:
    history = [RestoreSample(100, 300)] * 10 + [
        RestoreSample(100, 110),
        RestoreSample(100, 150),
        RestoreSample(100, 120),
        RestoreSample(100, 900),  # an outlier does not move the median
        RestoreSample(100, 130),
    ]
    # The last 5: 1.1, 1.5, 1.2, 9.0, 1.3 -> median 1.3; the older 3.0s are out of the window.
    assert correction_factor(history) == pytest.approx(1.3)


def test_correction_is_clamped_and_ignores_empty_samples() -> None:
    assert correction_factor([]) == 1.0
    assert correction_factor([RestoreSample(0, 50), RestoreSample(10, 0)]) == 1.0
    assert correction_factor([RestoreSample(100, 1)] * 3) == CORRECTION_MIN == 0.5
    assert correction_factor([RestoreSample(1, 100)] * 3) == CORRECTION_MAX == 10.0
    # A steady slowdown inside the range is learnt as it is, not cut off.
    assert correction_factor([RestoreSample(1, 4.6)] * 3) == pytest.approx(4.6)


def test_correction_multiplies_the_estimate() -> None:
    piece = RestorePiece("d", 100 * MB, DeviceSpeed.uniform(10 * MB), True)
    target = DeviceSpeed.uniform(10 * MB)
    estimate = estimate_pieces(None, [piece], target, RestoreMode.SWAP_IN, correction=1.5)
    assert estimate.predicted_seconds == pytest.approx(10)
    assert estimate.seconds == pytest.approx(15)
    with pytest.raises(InvalidInput):
        estimate_pieces(None, [piece], target, RestoreMode.SWAP_IN, correction=0)


# --- headroom for the RTO-only trigger -------------------------------------------------------


def test_bytes_restorable_within_is_what_is_left_of_the_rto() -> None:
    speeds = {"pool": DeviceSpeed.uniform(10 * MB)}
    chain = Chain(100 * GB, "pool", (StoredDelta(INCR, 1 * GB, "pool"),))  # 100 s already
    left = bytes_restorable_within(
        timedelta(seconds=300), chain, "pool", speeds, RestoreMode.SWAP_IN
    )
    assert left == 2 * GB
    with_correction = bytes_restorable_within(
        timedelta(seconds=300), chain, "pool", speeds, RestoreMode.SWAP_IN, correction=2.0
    )
    assert with_correction == 500 * MB  # (300 - 200) / 2 * 10 MB/s
    assert bytes_restorable_within(timedelta(seconds=50), chain, "pool", speeds, "swap-in") == 0
    fresh = bytes_restorable_within(timedelta(seconds=10), None, "pool", speeds, "swap-in")
    assert fresh == 100 * MB


@given(
    st.lists(st.integers(0, 10**12), max_size=6),
    st.integers(1, 10**10),
    st.integers(1, 10**10),
)
def test_estimate_grows_with_every_delta(sizes: list[int], read: int, write: int) -> None:
    speeds = {"a": DeviceSpeed.uniform(read), "b": DeviceSpeed.uniform(write)}
    chain = Chain(10**12, "b")
    previous = 0.0
    for size in sizes:
        chain = chain.with_backup(INCR, size, "a")
        seconds = estimate_chain(chain, speeds, RestoreMode.SWAP_IN).seconds
        assert seconds == pytest.approx(previous + size / min(read, write))
        previous = seconds


# --- performance table ---------------------------------------------------------------------


def _entry(device_id: str = "wwn-0x5000c500a1b2c3d4", rate: float = 100 * MiB) -> PerformanceEntry:
    return PerformanceEntry(
        device_id=device_id,
        role=DeviceRole.POOL,
        capacity=4 * 1024 * GiB,
        rotational=True,
        transport=Transport.SATA,
        layout="2D+1P",
        speed=DeviceSpeed(rate, rate, rate / 10, rate / 20, 64 * KiB),
        measured_at=NOW,
    )


def test_live_observation_is_smoothed_exponentially() -> None:
    speed = DeviceSpeed.uniform(100 * MB)
    updated = speed.observed(SpeedKind.SEQ_READ, 200 * MB, alpha=0.25)
    assert updated.seq_read == pytest.approx(125 * MB)
    assert (updated.seq_write, updated.rand_read, updated.rand_write) == (100 * MB,) * 3
    assert speed.seq_read == 100 * MB  # frozen: the old figure is untouched
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(InvalidInput):
            speed.observed(SpeedKind.SEQ_READ, bad)
    with pytest.raises(InvalidInput):
        speed.observed(SpeedKind.SEQ_READ, 1, alpha=0)


def test_repeated_observations_converge() -> None:
    table = PerformanceTable([_entry()])
    for minute in range(40):
        entry = table.observe(
            "wwn-0x5000c500a1b2c3d4",
            SpeedKind.RAND_WRITE,
            30 * MiB,
            NOW + timedelta(minutes=minute),
        )
    assert entry.speed.rand_write == pytest.approx(30 * MiB, rel=1e-3)
    assert table.get("wwn-0x5000c500a1b2c3d4").measured_at == NOW + timedelta(minutes=39)


def test_table_lookup_and_json_round_trip() -> None:
    table = PerformanceTable([_entry("a", 100 * MiB), _entry("b", 300 * MiB)])
    assert len(table) == 2 and "a" in table and "c" not in table
    assert table.speeds(DeviceRole.POOL)["b"].seq_read == 300 * MiB
    assert table.speeds(DeviceRole.VOLUME) == {}
    with pytest.raises(NotFound, match="c"):
        table.get("c")
    back = PerformanceTable.from_list(json.loads(json.dumps(table.to_list())))
    assert list(back) == list(table)


@pytest.mark.parametrize(
    "bad",
    [
        {"seq_read": 0},
        {"rand_write": -5.0},
        {"chunk_size": 0},
        {"seq_write": "fast"},
    ],
)
def test_device_speed_validation(bad: dict[str, object]) -> None:
    values: dict[str, object] = {
        "seq_read": 1.0,
        "seq_write": 1.0,
        "rand_read": 1.0,
        "rand_write": 1.0,
        **bad,
    }
    with pytest.raises(InvalidInput):
        DeviceSpeed(**values)  # type: ignore[arg-type]  # deliberately wrong


def test_entry_needs_an_aware_time_and_positive_capacity() -> None:
    good = _entry()
    with pytest.raises(InvalidInput, match="time zone"):
        PerformanceEntry(**{**good.__dict__, "measured_at": datetime(2026, 1, 1)})
    with pytest.raises(InvalidInput, match="capacity"):
        PerformanceEntry(**{**good.__dict__, "capacity": 0})
