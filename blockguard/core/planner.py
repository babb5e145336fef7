"""The backup planner (the seed's Fig. 7): which method, on which pool device, and why.

One pure function, :func:`plan_backup`. It only decides; the daemon does. The rule: take an
incremental if the whole chain since the full plus this one restores within the RTO; else a
differential; else a full. Before falling back to a costlier method, try placing the new
data on a faster pool device. If not even a full meets the RTO, still back up (with the
lowest estimated restore time) and say the objective is infeasible and what speed it needs.
Only a full is possible without a full to build on or when change tracking is not exact.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from blockguard.core.objectives import RecoveryObjectives
from blockguard.core.perftable import DeviceSpeed
from blockguard.core.restore_model import (
    Chain,
    RestoreEstimate,
    TermBook,
    estimate_chain,
)
from blockguard.core.units import format_duration, format_rate, format_size
from blockguard.core.vocab import GenerationKind, RestoreMode
from blockguard.core.what_if import ChangeSets
from blockguard.errors import InvalidInput


@dataclass(frozen=True)
class Placement:
    """One (method, device) the planner considered, with its restore estimate."""

    method: GenerationKind
    device_id: str
    nbytes: int
    estimate: RestoreEstimate


@dataclass(frozen=True)
class PlanDecision:
    """What to back up now, where, and why.

    :param method: full, differential or incremental.
    :param device_id: the pool device to put the new data on.
    :param nbytes: bytes the backup stores.
    :param estimate: estimated restore time of the newest state after this backup.
    :param feasible: ``False`` if the RTO cannot be met by any method on any device.
    :param reasons: human-readable reasons, with the numbers used.
    :param needed_rate: when infeasible, the restore rate (pool read and target write,
        bytes/s) that would meet the RTO.
    :param considered: the best placement found for each method that was possible.
    """

    method: GenerationKind
    device_id: str
    nbytes: int
    estimate: RestoreEstimate
    feasible: bool
    reasons: tuple[str, ...]
    needed_rate: float | None = None
    considered: tuple[Placement, ...] = ()

    def describe(self) -> str:
        """The reasons as one paragraph."""
        return "; ".join(self.reasons)


def _what(method: GenerationKind, chain: Chain | None, nbytes: int) -> str:
    """How the restore of ``method`` reads, e.g. "incremental chain 3 generations, 12.0 GiB"."""
    if method is GenerationKind.INCREMENTAL and chain is not None:
        generations = chain.incrementals_since_base() + 1
        has_diff = any(d.method is GenerationKind.DIFFERENTIAL for d in chain.restore_deltas())
        base = " on a differential" if has_diff else ""
        return f"incremental chain {generations} generations{base} (this one {format_size(nbytes)})"
    if method is GenerationKind.DIFFERENTIAL:
        return f"differential {format_size(nbytes)}"
    if method is GenerationKind.FULL:
        return f"full {format_size(nbytes)}"
    return f"{method.value} {format_size(nbytes)}"


def _est(placement: Placement) -> str:
    e = placement.estimate
    upper = ""
    if e.upper_seconds != e.seconds:
        upper = f" (upper {format_duration(e.upper_seconds)})"
    return f"restores {format_size(e.nbytes)}, est {format_duration(e.seconds)}{upper}"


def plan_backup(
    chain: Chain | None,
    changes: ChangeSets,
    speeds: Mapping[str, DeviceSpeed],
    objectives: RecoveryObjectives,
    *,
    candidates: Sequence[str] | None = None,
    copy_target: DeviceSpeed | None = None,
    correction: float = 1.0,
    full_required: str | None = None,
    terms: TermBook | None = None,
    floors: Mapping[GenerationKind, float] | None = None,
) -> PlanDecision:
    """Decide the method and placement of the backup to take now.

    :param chain: the generations since the last full, or ``None`` if there is no full yet.
    :param changes: the current change-set sizes and tracker state.
    :param speeds: speeds of all pool devices by identity (the chain's devices included).
    :param objectives: the volume's objectives; only the RTO and restore mode matter here.
    :param candidates: pool devices with room for the new data, in the pool's order of
        preference (the first is where the data goes unless a faster one is needed);
        default: all of ``speeds``.
    :param copy_target: speed of the restore target in copy mode (the protected volume's
        own entry stands in for its replacement); unused in swap-in mode.
    :param correction: factor learnt from real restores.
    :param full_required: a reason the caller needs a full (e.g. a damaged chain), or ``None``.
    :param terms: fitted restore-path terms by (pool device, mode); the RTO is held against
        the upper estimate (the point estimate times the spread of its recent errors).
    :param floors: seconds a restore after a backup of this method is known to take at
        least, whatever the model says: a restore drill measured a chain that the new chain
        contains (an incremental extends the drilled chain), and reading more never makes
        a restore quicker.
    :raises InvalidInput: if there is no candidate device, or copy mode lacks ``copy_target``.
    :raises NotFound: if a device of the chain has no speed.
    """
    order = _candidate_order(speeds, candidates)
    mode = objectives.restore_mode
    if mode is RestoreMode.COPY and copy_target is None:
        raise InvalidInput(detail="copy-mode objectives need the restore target's speed")

    methods, reasons = _possible_methods(chain, changes, full_required)
    base = chain if chain is not None else Chain(changes.volume_bytes, order[0])

    def estimate(after: Chain) -> RestoreEstimate:
        return estimate_chain(after, speeds, mode, copy_target, correction, terms)

    placements = {m: _placements(m, base, changes, order, estimate) for m in methods}
    best = {m: min(ps, key=lambda p: p.estimate.upper_seconds) for m, ps in placements.items()}
    considered = tuple(best[m] for m in methods)

    if objectives.rto is None:
        choice = placements[methods[0]][0]
        reasons.append(
            f"no RTO set: {choice.method.value} is the cheapest backup; "
            f"{_what(choice.method, chain, choice.nbytes)} on {choice.device_id}, {_est(choice)}"
        )
        return _decision(choice, reasons, considered)

    limit = objectives.rto.total_seconds()
    rto_text = format_duration(objectives.rto)
    floor = dict(floors or {})
    for method in methods:
        if floor.get(method, 0.0) > limit:
            what = _what(method, chain, placements[method][0].nbytes)
            reasons.append(
                f"{what}: a restore drill measured {format_duration(floor[method])} for the "
                f"chain it extends > RTO {rto_text}"
            )
            continue
        choice, reason = _within_rto(placements[method], best[method], chain, limit, rto_text)
        reasons.append(reason)
        if choice is not None:
            return _decision(choice, reasons, considered)

    # Nothing meets the RTO: still protect the data, with the quickest restore available.
    choice = min(
        considered,
        key=lambda p: (max(p.estimate.upper_seconds, floor.get(p.method, 0.0)), p.method.cost_rank),
    )
    needed = choice.estimate.nbytes * choice.estimate.correction / limit
    reasons.append(_infeasible_reason(choice, needed, rto_text, speeds, order, mode, copy_target))
    return _decision(choice, reasons, considered, feasible=False, needed_rate=needed)


def _candidate_order(
    speeds: Mapping[str, DeviceSpeed], candidates: Sequence[str] | None
) -> list[str]:
    """The candidate devices in the pool's order of preference, each with a speed."""
    order = list(speeds) if candidates is None else list(candidates)
    if not order:
        raise InvalidInput(detail="no pool device has room for the backup")
    for device in order:
        if device not in speeds:
            raise InvalidInput(detail=f"candidate pool device {device} has no performance entry")
    return order


def _possible_methods(
    chain: Chain | None, changes: ChangeSets, full_required: str | None
) -> tuple[list[GenerationKind], list[str]]:
    """The methods possible now, cheapest first, and the reason when only a full is."""
    only_full = []
    if chain is None:
        only_full.append("no full backup yet")
    if not changes.tracker_exact:
        only_full.append("change tracking is not exact")
    if full_required:
        only_full.append(full_required)
    if only_full:
        return [GenerationKind.FULL], [f"full needed: {'; '.join(only_full)}"]
    return list(GenerationKind), []


def _placements(
    method: GenerationKind,
    base: Chain,
    changes: ChangeSets,
    order: Sequence[str],
    estimate: Callable[[Chain], RestoreEstimate],
) -> list[Placement]:
    """``method`` placed on each candidate: the preferred device first, then the fastest
    restore first (stable for equal estimates)."""
    nbytes = changes.nbytes(method)
    result = [
        Placement(
            method,
            device,
            nbytes,
            estimate(
                base.with_backup(method, nbytes, device, changes.scattered, changes.extents(method))
            ),
        )
        for device in order
    ]
    return [result[0], *sorted(result[1:], key=lambda p: p.estimate.upper_seconds)]


def _within_rto(
    placements: Sequence[Placement],
    fastest: Placement,
    chain: Chain | None,
    limit: float,
    rto_text: str,
) -> tuple[Placement | None, str]:
    """The placement of one method that meets the RTO (on the preferred device if it can,
    else the fastest that fits), or None; and the reason either way."""
    first = placements[0]
    what = _what(first.method, chain, first.nbytes)
    if first.estimate.upper_seconds <= limit:
        return first, f"{what} on {first.device_id}, {_est(first)} <= RTO {rto_text}"
    fitting = [p for p in placements[1:] if p.estimate.upper_seconds <= limit]
    if fitting:
        # Fastest that fits: it leaves the most room for the deltas that will follow.
        chosen = fitting[0]
        return chosen, (
            f"{what} on {first.device_id}, {_est(first)} > RTO {rto_text}; "
            f"on faster device {chosen.device_id}, {_est(chosen)} <= RTO {rto_text}"
        )
    on_fastest = (
        f" (fastest device {fastest.device_id}: "
        f"est {format_duration(fastest.estimate.upper_seconds)})"
        if fastest.device_id != first.device_id
        else ""
    )
    return None, f"{what} on {first.device_id}, {_est(first)} > RTO {rto_text}{on_fastest}"


def _infeasible_reason(
    choice: Placement,
    needed: float,
    rto_text: str,
    speeds: Mapping[str, DeviceSpeed],
    order: Sequence[str],
    mode: RestoreMode,
    copy_target: DeviceSpeed | None,
) -> str:
    """Why no method meets the RTO, and what restore rate would."""
    best_seq = max(speeds[d].seq_read for d in order)
    best_rand = max(speeds[d].rand_read for d in order)
    target_note = ""
    if copy_target is not None and mode is RestoreMode.COPY:
        target_note = f", the target writes {format_rate(copy_target.seq_write)} sequentially"
    return (
        f"RTO {rto_text} cannot be met: the quickest restore, after a {choice.method.value} on "
        f"{choice.device_id}, {_est(choice)}; it needs a restore rate of at least "
        f"{format_rate(needed)} (pool read and target write), the fastest pool device reads "
        f"{format_rate(best_seq)} sequentially and {format_rate(best_rand)} at random{target_note}"
    )


def _decision(
    choice: Placement,
    reasons: Sequence[str],
    considered: tuple[Placement, ...],
    *,
    feasible: bool = True,
    needed_rate: float | None = None,
) -> PlanDecision:
    return PlanDecision(
        method=choice.method,
        device_id=choice.device_id,
        nbytes=choice.nbytes,
        estimate=choice.estimate,
        feasible=feasible,
        reasons=tuple(reasons),
        needed_rate=needed_rate,
        considered=considered,
    )
