"""The planner (the seed's Fig. 7): examples, then properties over random situations."""

from __future__ import annotations

import math
from datetime import timedelta

import pytest
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from blockguard.core.objectives import IntervalRPO, RecoveryObjectives
from blockguard.core.perftable import DeviceSpeed
from blockguard.core.planner import PlanDecision, plan_backup
from blockguard.core.restore_model import (
    Chain,
    StoredDelta,
    estimate_chain,
)
from blockguard.core.units import format_duration, format_rate, format_size
from blockguard.core.vocab import GenerationKind, RestoreMode
from blockguard.core.what_if import ChangeSets
from blockguard.errors import InvalidInput

MB = 10**6
GB = 10**9
INCR = GenerationKind.INCREMENTAL
DIFF = GenerationKind.DIFFERENTIAL
FULL = GenerationKind.FULL

SPEEDS = {
    "hdd": DeviceSpeed(150 * MB, 140 * MB, 10 * MB, 10 * MB),
    "ssd": DeviceSpeed(500 * MB, 450 * MB, 200 * MB, 150 * MB),
}


def _rto(seconds: float, mode: RestoreMode = RestoreMode.SWAP_IN) -> RecoveryObjectives:
    return RecoveryObjectives(rto=timedelta(seconds=seconds), restore_mode=mode)


def _text(decision: PlanDecision) -> str:
    return " | ".join(decision.reasons)


# --- examples -------------------------------------------------------------------------------


def test_no_full_yet_means_full() -> None:
    changes = ChangeSets(0, 0, 100 * GB)
    decision = plan_backup(None, changes, SPEEDS, _rto(300), candidates=["hdd", "ssd"])
    assert decision.method is FULL
    assert decision.device_id == "hdd"
    assert decision.nbytes == 100 * GB
    assert decision.feasible
    assert "no full backup yet" in _text(decision)


def test_unknown_tracker_means_full_even_if_an_incremental_would_fit() -> None:
    chain = Chain(100 * GB, "ssd")
    changes = ChangeSets(1 * MB, 1 * MB, 100 * GB, tracker_exact=False)
    decision = plan_backup(chain, changes, SPEEDS, _rto(3600))
    assert decision.method is FULL
    assert "change tracking is not exact" in _text(decision)
    no_rto = RecoveryObjectives(
        rpo=IntervalRPO(timedelta(hours=1)), restore_mode=RestoreMode.SWAP_IN
    )
    assert plan_backup(chain, changes, SPEEDS, no_rto).method is FULL


def test_caller_can_require_a_full() -> None:
    chain = Chain(100 * GB, "ssd")
    decision = plan_backup(
        chain, ChangeSets(1, 1, 100 * GB), SPEEDS, _rto(3600), full_required="chain damaged"
    )
    assert decision.method is FULL
    assert "chain damaged" in _text(decision)


def test_incremental_when_the_whole_chain_fits() -> None:
    # Two incrementals of 1 GB on hdd (random 10 MB/s), one more of 1 GB: 300 s.
    chain = Chain(100 * GB, "hdd", (StoredDelta(INCR, GB, "hdd"), StoredDelta(INCR, GB, "hdd")))
    decision = plan_backup(chain, ChangeSets(GB, 2 * GB, 100 * GB), SPEEDS, _rto(300))
    assert decision.method is INCR
    assert decision.device_id == "hdd"
    assert decision.estimate.seconds == pytest.approx(300)
    assert decision.feasible
    assert "incremental chain 3 generations (this one 953.7 MiB) on hdd" in _text(decision)
    assert "restores 2.8 GiB, est 5m <= RTO 5m" in _text(decision)


def test_differential_when_the_chain_is_too_long() -> None:
    # Hot-spot rewrites: 3 x 1 GB incrementals but only 1.2 GB changed since the full.
    chain = Chain(100 * GB, "hdd", (StoredDelta(INCR, GB, "hdd"), StoredDelta(INCR, GB, "hdd")))
    changes = ChangeSets(GB, 1200 * MB, 100 * GB)
    decision = plan_backup(chain, changes, SPEEDS, _rto(200), candidates=["hdd"])
    assert decision.method is DIFF
    assert decision.estimate.seconds == pytest.approx(120)
    text = _text(decision)
    assert "incremental chain 3 generations" in text and "est 5m > RTO 3m20s" in text
    assert "differential 1.1 GiB on hdd, restores 1.1 GiB, est 2m <= RTO 3m20s" in text


def test_faster_device_keeps_the_cheaper_method() -> None:
    # Full on ssd (swap-in target writes 150 MB/s at random); deltas on hdd read at 10 MB/s.
    chain = Chain(100 * GB, "ssd", (StoredDelta(INCR, GB, "ssd"),))
    changes = ChangeSets(3 * GB, 4 * GB, 100 * GB)
    decision = plan_backup(chain, changes, SPEEDS, _rto(60), candidates=["hdd", "ssd"])
    assert decision.method is INCR
    assert decision.device_id == "ssd"
    assert decision.estimate.seconds == pytest.approx(4000 / 150)
    text = _text(decision)
    assert "on hdd, restores 3.7 GiB, est 5m7s > RTO 1m" in text
    assert "on faster device ssd, restores 3.7 GiB, est 26.7s <= RTO 1m" in text


def test_full_when_no_delta_fits_in_swap_in_mode() -> None:
    chain = Chain(100 * GB, "hdd", (StoredDelta(INCR, 5 * GB, "hdd"),))
    changes = ChangeSets(GB, 6 * GB, 100 * GB)
    decision = plan_backup(chain, changes, SPEEDS, _rto(60))
    assert decision.method is FULL
    assert decision.feasible
    assert decision.estimate.seconds == 0  # the full is switched in
    assert "differential 5.6 GiB on hdd, restores 5.6 GiB, est 10m > RTO 1m" in _text(decision)


def test_infeasible_copy_restore_still_backs_up_and_says_what_is_needed() -> None:
    target = DeviceSpeed.uniform(1000 * MB)
    chain = Chain(1000 * GB, "hdd", (StoredDelta(INCR, GB, "hdd"),))
    changes = ChangeSets(GB, 2 * GB, 1000 * GB)
    objectives = _rto(3600, RestoreMode.COPY)
    decision = plan_backup(chain, changes, SPEEDS, objectives, copy_target=target)
    # A full on ssd copies 1000 GB at 500 MB/s: 2000 s... fits; so use only the hdd.
    assert decision.method is FULL and decision.device_id == "ssd" and decision.feasible
    decision = plan_backup(
        chain, changes, SPEEDS, objectives, candidates=["hdd"], copy_target=target
    )
    assert not decision.feasible
    assert decision.method is FULL  # 1000 GB at 150 MB/s beats the same plus deltas
    assert decision.estimate.seconds == pytest.approx(1000 * GB / (150 * MB))
    assert decision.needed_rate == pytest.approx(1000 * GB / 3600)
    text = _text(decision)
    assert "RTO 1h cannot be met" in text
    assert f"at least {format_rate(1000 * GB / 3600)}" in text
    assert "est 1h51m7s" in text
    assert f"reads {format_rate(150 * MB)} sequentially" in text


def test_no_rto_prefers_the_cheapest_backup() -> None:
    chain = Chain(100 * GB, "hdd", tuple(StoredDelta(INCR, 50 * GB, "hdd") for _ in range(20)))
    objectives = RecoveryObjectives(
        rpo=IntervalRPO(timedelta(hours=1)), restore_mode=RestoreMode.SWAP_IN
    )
    decision = plan_backup(chain, ChangeSets(GB, 90 * GB, 100 * GB), SPEEDS, objectives)
    assert decision.method is INCR and decision.feasible
    assert "no RTO set" in _text(decision)
    assert format_duration(decision.estimate.seconds) in _text(decision)


def test_bad_calls() -> None:
    chain = Chain(100 * GB, "hdd")
    with pytest.raises(InvalidInput, match="room"):
        plan_backup(chain, ChangeSets(1, 1, 1), SPEEDS, _rto(60), candidates=[])
    with pytest.raises(InvalidInput, match="nvme7"):
        plan_backup(chain, ChangeSets(1, 1, 1), SPEEDS, _rto(60), candidates=["nvme7"])
    with pytest.raises(InvalidInput, match="target"):
        plan_backup(chain, ChangeSets(1, 1, 1), SPEEDS, _rto(60, RestoreMode.COPY))


# --- properties -----------------------------------------------------------------------------

_rate = st.integers(1 * MB, 3000 * MB)


@st.composite
def _speed(draw: st.DrawFn) -> DeviceSpeed:
    seq_read, seq_write = draw(_rate), draw(_rate)
    return DeviceSpeed(
        seq_read,
        seq_write,
        draw(st.integers(MB // 10, seq_read)),
        draw(st.integers(MB // 10, seq_write)),
    )


@st.composite
def _situation(draw: st.DrawFn, building: bool = False, min_devices: int = 1) -> dict:
    """A random planning situation; ``building``: a chain exists, tracking is exact, RTO set."""
    names = [f"d{i}" for i in range(draw(st.integers(min_devices, 4)))]
    speeds = {name: draw(_speed()) for name in names}
    volume = draw(st.integers(GB, 2000 * GB))
    chain = None
    if building or draw(st.booleans()):
        deltas = draw(
            st.lists(
                st.builds(
                    StoredDelta,
                    st.sampled_from([INCR, DIFF]),
                    st.integers(0, volume // 4),
                    st.sampled_from(names),
                    st.booleans(),
                ),
                max_size=8,
            )
        )
        chain = Chain(volume, draw(st.sampled_from(names)), tuple(deltas))
    incremental = draw(st.integers(0, volume // 4))
    differential = draw(st.integers(incremental, volume))
    changes = ChangeSets(
        incremental, differential, volume, building or draw(st.booleans()), draw(st.booleans())
    )
    mode = draw(st.sampled_from(list(RestoreMode)))
    # Log-uniform, so that RTOs land among the estimates (seconds to days), not mostly above.
    rto = draw(
        (st.nothing() if building else st.none())
        | st.floats(0, math.log(30 * 86400)).map(lambda x: max(1, round(math.exp(x))))
    )
    objectives = (
        RecoveryObjectives(rpo=IntervalRPO(timedelta(hours=1)), restore_mode=mode)
        if rto is None
        else RecoveryObjectives(rto=timedelta(seconds=rto), restore_mode=mode)
    )
    candidates = draw(
        st.permutations(names).flatmap(
            lambda p: st.integers(min_devices, len(p)).map(lambda n: p[:n])
        )
    )
    return {
        "chain": chain,
        "changes": changes,
        "speeds": speeds,
        "objectives": objectives,
        "candidates": candidates,
        "copy_target": draw(_speed()),
        "correction": draw(st.floats(0.5, 4.0)),
    }


def _best_per_method(s: dict) -> dict[GenerationKind, float]:
    """Brute force: the lowest estimate of each possible method over all candidate devices."""
    chain, changes = s["chain"], s["changes"]
    methods = [FULL] if chain is None or not changes.tracker_exact else [INCR, DIFF, FULL]
    best = {}
    for method in methods:
        best[method] = min(
            estimate_chain(
                (chain or Chain(changes.volume_bytes, device)).with_backup(
                    method, changes.nbytes(method), device, changes.scattered
                ),
                s["speeds"],
                s["objectives"].restore_mode,
                s["copy_target"],
                s["correction"],
            ).seconds
            for device in s["candidates"]
        )
    return best


@settings(max_examples=600, deadline=None)
@given(st.booleans().flatmap(lambda building: _situation(building)))
def test_planner_picks_the_cheapest_feasible_method(s: dict) -> None:
    decision = plan_backup(
        s["chain"],
        s["changes"],
        s["speeds"],
        s["objectives"],
        candidates=s["candidates"],
        copy_target=s["copy_target"],
        correction=s["correction"],
    )
    best = _best_per_method(s)
    rto = s["objectives"].rto
    assert decision.method in best
    assert decision.device_id in s["candidates"]
    if rto is None:
        assert decision.method is next(iter(best))  # the cheapest possible backup
        assert decision.feasible
        return
    limit = rto.total_seconds()
    feasible = [m for m, seconds in best.items() if seconds <= limit]
    event(f"feasible={feasible[:1]} placed on preferred={decision.device_id == s['candidates'][0]}")
    if feasible:
        # Cheapest feasible, never a costlier one, and its own estimate within the RTO.
        assert decision.method is feasible[0]
        assert decision.estimate.seconds <= limit
        assert decision.feasible
        assert decision.needed_rate is None
    else:
        assert not decision.feasible
        assert decision.estimate.seconds == pytest.approx(min(best.values()))
        assert decision.needed_rate == pytest.approx(
            decision.estimate.nbytes * s["correction"] / limit
        )


@settings(max_examples=300, deadline=None)
@given(_situation())
def test_planner_never_builds_on_unknown_tracking_or_no_full(s: dict) -> None:
    decision = plan_backup(
        s["chain"],
        s["changes"],
        s["speeds"],
        s["objectives"],
        candidates=s["candidates"],
        copy_target=s["copy_target"],
        correction=s["correction"],
    )
    if s["chain"] is None or not s["changes"].tracker_exact:
        assert decision.method is FULL
        assert decision.nbytes == s["changes"].volume_bytes


@settings(max_examples=300, deadline=None)
@given(_situation())
def test_reasons_carry_the_numbers_used(s: dict) -> None:
    decision = plan_backup(
        s["chain"],
        s["changes"],
        s["speeds"],
        s["objectives"],
        candidates=s["candidates"],
        copy_target=s["copy_target"],
        correction=s["correction"],
    )
    text = _text(decision)
    # The estimate recomputes from what the decision says it did.
    base = s["chain"] or Chain(s["changes"].volume_bytes, decision.device_id)
    again = estimate_chain(
        base.with_backup(
            decision.method, decision.nbytes, decision.device_id, s["changes"].scattered
        ),
        s["speeds"],
        s["objectives"].restore_mode,
        s["copy_target"],
        s["correction"],
    )
    assert again.seconds == pytest.approx(decision.estimate.seconds)
    assert f"est {format_duration(decision.estimate.seconds)}" in text
    assert f"restores {format_size(decision.estimate.nbytes)}" in text
    assert decision.device_id in text
    assert decision.method.value in text
    rto = s["objectives"].rto
    if rto is not None:
        assert f"RTO {format_duration(rto)}" in text
    if not decision.feasible:
        assert decision.needed_rate is not None
        assert f"at least {format_rate(decision.needed_rate)}" in text


def _incremental_estimates(s: dict) -> dict[str, float]:
    changes = s["changes"]
    return {
        device: estimate_chain(
            s["chain"].with_backup(INCR, changes.incremental_bytes, device, changes.scattered),
            s["speeds"],
            s["objectives"].restore_mode,
            s["copy_target"],
            s["correction"],
        ).seconds
        for device in s["candidates"]
    }


@settings(max_examples=300, deadline=None)
@given(_situation(building=True, min_devices=2), st.floats(0, 1))
def test_a_faster_device_is_tried_before_a_costlier_method(s: dict, where: float) -> None:
    """With the RTO between the incremental on the preferred device and on a faster one, the
    planner keeps the incremental and moves it to the faster device."""
    estimates = _incremental_estimates(s)
    # Make the slowest place the pool's preference, so that a faster one exists.
    slowest = max(estimates, key=estimates.__getitem__)
    s["candidates"] = [slowest, *(d for d in s["candidates"] if d != slowest)]
    preferred = estimates[s["candidates"][0]]
    fastest = min(estimates.values())
    assume(fastest < preferred)
    limit = fastest + where * (preferred - fastest)
    assume(1 <= limit < preferred and limit <= 30 * 86400)
    rto = timedelta(seconds=limit)
    assume(fastest <= rto.total_seconds() < preferred)  # after timedelta's rounding
    objectives = RecoveryObjectives(rto=rto, restore_mode=s["objectives"].restore_mode)
    decision = plan_backup(
        s["chain"],
        s["changes"],
        s["speeds"],
        objectives,
        candidates=s["candidates"],
        copy_target=s["copy_target"],
        correction=s["correction"],
    )
    assert decision.method is INCR
    assert decision.device_id != s["candidates"][0]
    assert decision.estimate.seconds <= rto.total_seconds()
    assert "on faster device" in _text(decision)
