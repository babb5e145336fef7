"""What-if questions asked of the restore-time model before a backup is taken: the
change sets a backup would copy, the restore estimate after each kind of backup, and how
many changed bytes still restore within a time budget."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from blockguard.core.perftable import DeviceSpeed
from blockguard.core.restore_model import (
    DEFAULT_EXTENT_BYTES,
    Chain,
    RestoreEstimate,
    TermBook,
    check_bytes,
    estimate_chain,
    restore_target,
    speed_of,
    terms_for,
    write_rate_of,
)
from blockguard.core.vocab import GenerationKind, RestoreMode
from blockguard.errors import InvalidInput


@dataclass(frozen=True)
class ChangeSets:
    """What a backup taken now would copy, and how the change tracker stands.

    :param incremental_bytes: changed since the previous backup of any kind.
    :param differential_bytes: changed since the last full.
    :param volume_bytes: the size of a new full.
    :param tracker_exact: ``False`` if change tracking was lost (crash, overflow): only a
        full backup is then safe.
    :param scattered: whether the changed chunks are scattered (random I/O on restore).
    :param incremental_extents: runs of adjacent chunks of the incremental change set,
        when known.
    :param differential_extents: the same for the differential change set.
    """

    incremental_bytes: int
    differential_bytes: int
    volume_bytes: int
    tracker_exact: bool = True
    scattered: bool = True
    incremental_extents: int | None = None
    differential_extents: int | None = None

    def __post_init__(self) -> None:
        check_bytes("incremental change-set size", self.incremental_bytes)
        check_bytes("differential change-set size", self.differential_bytes)
        check_bytes("volume size", self.volume_bytes)

    def nbytes(self, method: GenerationKind) -> int:
        """Bytes a backup of ``method`` would store."""
        return {
            GenerationKind.INCREMENTAL: self.incremental_bytes,
            GenerationKind.DIFFERENTIAL: self.differential_bytes,
            GenerationKind.FULL: self.volume_bytes,
        }[GenerationKind(method)]

    def extents(self, method: GenerationKind) -> int | None:
        """Runs of adjacent chunks a delta of ``method`` would store (None: not known)."""
        return {
            GenerationKind.INCREMENTAL: self.incremental_extents,
            GenerationKind.DIFFERENTIAL: self.differential_extents,
            GenerationKind.FULL: None,
        }[GenerationKind(method)]


def what_if(
    chain: Chain | None,
    changes: ChangeSets,
    device_id: str,
    speeds: Mapping[str, DeviceSpeed],
    mode: RestoreMode,
    copy_target: DeviceSpeed | None = None,
    correction: float = 1.0,
    terms: TermBook | None = None,
) -> dict[GenerationKind, RestoreEstimate]:
    """Estimated restore time of the newest state after taking each kind of backup now.

    Methods that cannot be taken (no full yet) are left out.

    :param chain: the current chain, or ``None`` when there is no full yet.
    :param changes: the current change sets.
    :param device_id: the pool device the new data would go to.
    :param speeds: speeds of the pool devices by identity.
    :param mode: the restore mode.
    :param copy_target: the restore target's speed in copy mode.
    :param correction: factor learnt from real restores.
    :param terms: fitted restore-path terms (see :func:`estimate_chain`).
    """
    base = chain if chain is not None else Chain(changes.volume_bytes, device_id)
    result: dict[GenerationKind, RestoreEstimate] = {}
    for method in GenerationKind:
        if chain is None and method is not GenerationKind.FULL:
            continue
        after = base.with_backup(
            method,
            changes.nbytes(method),
            device_id,
            changes.scattered,
            changes.extents(method),
        )
        result[method] = estimate_chain(after, speeds, mode, copy_target, correction, terms)
    return result


def bytes_restorable_within(
    budget: timedelta,
    chain: Chain | None,
    device_id: str,
    speeds: Mapping[str, DeviceSpeed],
    mode: RestoreMode,
    copy_target: DeviceSpeed | None = None,
    correction: float = 1.0,
    scattered: bool = True,
    terms: TermBook | None = None,
) -> int:
    """How many more changed bytes an incremental on ``device_id`` could hold and the newest
    state still restore within ``budget`` (the seed's reference value when only an RTO is
    given). 0 when the chain alone already takes the whole budget.

    :param budget: the RTO.
    :param chain: the current chain (``None``: no full yet, the budget is measured from an
        empty chain on ``device_id``).
    :param device_id: where the next delta would be stored.
    :param speeds: speeds of the pool devices by identity.
    :param mode: the restore mode.
    :param copy_target: the restore target's speed in copy mode.
    :param correction: factor learnt from real restores.
    :param scattered: whether the changed chunks are scattered.
    :param terms: fitted restore-path terms; when the device holding the full has them,
        the upper estimate is held against the budget, and a new delta costs one
        generation plus one extent per :data:`DEFAULT_EXTENT_BYTES` (scattered).
    """
    mode = RestoreMode(mode)
    full_device = chain.full_device_id if chain is not None else device_id
    fitted = terms_for(terms, full_device, mode)
    if fitted is not None:
        if chain is None:
            current = fitted.seconds(Chain(0, device_id).shape())
            factor = fitted.upper_factor
        else:
            estimate = estimate_chain(chain, speeds, mode, copy_target, correction, terms)
            current, factor = estimate.seconds, estimate.upper_factor
        left = budget.total_seconds() / factor - current - fitted.per_generation
        per_byte = fitted.per_extent / DEFAULT_EXTENT_BYTES if scattered else 0.0
        if left <= 0:
            return 0
        if per_byte <= 0:
            # The fit sees no cost in a delta's size: any size fits; the rate of the
            # probe-only model still bounds what can be moved.
            rate = min(speed_of(speeds, device_id).read(scattered), write_rate_of(copy_target))
            return int(left * rate)
        return int(left / per_byte)
    if chain is None:
        current = 0.0
        target = speed_of(speeds, device_id) if mode is RestoreMode.SWAP_IN else copy_target
        if target is None:
            raise InvalidInput(detail="a copy-mode estimate needs the target device's speed")
    else:
        current = estimate_chain(chain, speeds, mode, copy_target, correction).seconds
        target = restore_target(chain, speeds, mode, copy_target)
    left = budget.total_seconds() - current
    if left <= 0:
        return 0
    rate = min(speed_of(speeds, device_id).read(scattered), target.write(scattered))
    return int(left / correction * rate)
