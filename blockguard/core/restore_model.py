"""The restore-time model: how long would a restore take, and why.

(One thing at ~450 lines: the chain, its pieces and their estimate, each term explained;
the questions asked of it before a backup are in :mod:`blockguard.core.what_if`.)

For each piece to restore, time = bytes / min(read speed where it is stored, write speed of
the restore target), with the random-at-chunk-size figures for scattered chunks and the
sequential ones for contiguous data (the seed, step 704). The full base costs nothing in
swap-in mode (it is switched in as a reflink/thin snapshot; only the deltas are written onto
it, so the target is the device holding the full) and is copied sequentially in copy mode.
That probe-only sum is multiplied by a correction learnt from real restores (median of
measured / predicted of the last few, clamped).

Once the pool device holding the full has been measured on its real restore path (a drill
or enough real restores, see :mod:`blockguard.core.restore_terms`), its fitted terms
replace the probe-only model: fixed cost + per generation read + per scattered extent +
bytes x the path's cost per byte, plus, for a copy, its target's writes where the drill did
not write them itself (:func:`copy_write_cost`). Either way the estimate carries its breakdown by
term and an upper estimate (point x the spread of recent measured / predicted), which is
what the planner holds against the RTO, so that the model answers, at any moment, "if this
volume failed now, the restore would take X, at most Y".
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

from blockguard.core.perftable import DeviceSpeed
from blockguard.core.restore_terms import PathTerms, RestoreShape, TermBreakdown
from blockguard.core.units import format_duration, format_rate, format_size
from blockguard.core.vocab import GenerationKind, RestoreMode
from blockguard.errors import InvalidInput, NotFound

#: How many recent real restores the correction looks at.
CORRECTION_WINDOW = 5
#: A correction outside this range means the model or a measurement is broken; clamping keeps
#: one bad sample (a restore that waited on a lock, a cached read) from steering the planner.
#: The range is lopsided on purpose: learning that restores are slower than the devices
#: suggest only makes the planner choose faster-restoring methods (safe), and a steady 4-5x
#: was measured where the restore path, not the disks, is the bottleneck (bench in the guest
#: kernel: copy 4.3-4.9x, swap-in 4.3-5.5x); learning that they are faster could break the RTO.
CORRECTION_MIN = 0.5
CORRECTION_MAX = 10.0
#: Size of one scattered extent of a delta whose extents are not known (one 64 KiB chunk:
#: the worst case of the default chunk size).
DEFAULT_EXTENT_BYTES = 64 * 1024

#: Fitted restore-path terms by (pool device, restore mode value).
TermBook = Mapping[tuple[str, str], PathTerms]


def check_bytes(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(detail=f"{name} {value!r} is not a byte count >= 0")
    return value


@dataclass(frozen=True)
class StoredDelta:
    """A differential or incremental generation as stored in the pool.

    :param method: ``DIFFERENTIAL`` or ``INCREMENTAL``.
    :param nbytes: bytes of changed chunks it holds.
    :param device_id: pool device it is stored on.
    :param scattered: whether its chunks land scattered on the target (random I/O).
    :param extents: runs of adjacent chunks it holds; None: not known (every
        :data:`DEFAULT_EXTENT_BYTES` its own extent when scattered, one when not).
    """

    method: GenerationKind
    nbytes: int
    device_id: str
    scattered: bool = True
    extents: int | None = None

    def __post_init__(self) -> None:
        method = GenerationKind(self.method)
        if method is GenerationKind.FULL:
            raise InvalidInput(detail="a stored delta cannot be a full backup")
        object.__setattr__(self, "method", method)
        check_bytes("delta size", self.nbytes)
        if self.extents is not None:
            check_bytes("delta extents", self.extents)

    @property
    def extent_count(self) -> int:
        """Its extents, or the guess when they are not known."""
        if self.extents is not None:
            return self.extents
        if not self.scattered:
            return 1 if self.nbytes else 0
        return -(-self.nbytes // DEFAULT_EXTENT_BYTES)


@dataclass(frozen=True)
class MergedDeltas:
    """What a restore of a chain's newest generation really writes of its deltas.

    The restore plan takes each chunk once, from the newest generation holding it, and
    writes adjacent chunks as one run whichever generation they come from; so a chunk
    changed in four incrementals is one chunk, and summing the deltas' own extents
    over-counts (issue 14: the per-extent term of long chains). Computed from the
    manifests' chunk sets, without reading data
    (:func:`blockguard.storage.restore.merged_deltas`).

    :param chunks: distinct delta chunks the restore writes.
    :param extents: runs of adjacent chunks in their union.
    """

    chunks: int
    extents: int

    def __post_init__(self) -> None:
        check_bytes("merged delta chunks", self.chunks)
        check_bytes("merged delta extents", self.extents)


@dataclass(frozen=True)
class Chain:
    """The generations since (and including) the last full, oldest first.

    :param full_bytes: size of the full base.
    :param full_device_id: pool device holding the full.
    :param deltas: the differentials and incrementals taken since, oldest first.
    :param merged: the restore plan's distinct chunks and runs of the newest generation's
        deltas, when the chain's chunk sets are known; None: the deltas' own sizes and
        extents are summed (an upper bound).
    """

    full_bytes: int
    full_device_id: str
    deltas: tuple[StoredDelta, ...] = ()
    merged: MergedDeltas | None = None

    def __post_init__(self) -> None:
        check_bytes("full size", self.full_bytes)
        object.__setattr__(self, "deltas", tuple(self.deltas))

    def restore_deltas(self) -> tuple[StoredDelta, ...]:
        """The deltas a restore of the newest generation applies, in order.

        A differential holds everything since the full, so the restore needs the last
        differential and the incrementals after it; without a differential, all incrementals.
        """
        start = 0
        for index, delta in enumerate(self.deltas):
            if delta.method is GenerationKind.DIFFERENTIAL:
                start = index
        return self.deltas[start:]

    def incrementals_since_base(self) -> int:
        """How many incrementals the newest generation stacks on its full or differential."""
        return sum(1 for d in self.restore_deltas() if d.method is GenerationKind.INCREMENTAL)

    def with_backup(
        self,
        method: GenerationKind,
        nbytes: int,
        device_id: str,
        scattered: bool = True,
        extents: int | None = None,
    ) -> Chain:
        """The chain after taking one more backup (a full starts a new chain).

        :param method: the kind of the new backup.
        :param nbytes: its size (the volume size for a full).
        :param device_id: the pool device it is placed on.
        :param scattered: whether a delta's chunks are scattered.
        :param extents: a delta's runs of adjacent chunks, when known.
        """
        method = GenerationKind(method)
        if method is GenerationKind.FULL:
            return Chain(nbytes, device_id)
        delta = StoredDelta(method, nbytes, device_id, scattered, extents)
        merged = None
        if method is GenerationKind.INCREMENTAL and self.merged is not None:
            # Where the new chunks fall is not known yet: adding them all is an upper
            # bound (a union's runs never outnumber its parts' runs).
            merged = MergedDeltas(
                self.merged.chunks + -(-nbytes // DEFAULT_EXTENT_BYTES),
                self.merged.extents + delta.extent_count,
            )
        # A differential holds everything since the full: the restore applies it alone,
        # and its own extents are exact (merged None sums just it).
        return Chain(self.full_bytes, self.full_device_id, (*self.deltas, delta), merged)

    def shape(self) -> RestoreShape:
        """The shape of a restore of the newest generation (see :class:`RestoreShape`).

        Every chunk is moved once (copy: read and written; swap-in: the deltas written and
        the rest of the clone read back to verify it), so the bytes are the full's size.
        The deltas' chunks and extents are those of the restore plan (:attr:`merged`)
        when known; otherwise overlaps between deltas are not known and their own chunks
        and extents are summed (an upper bound).
        """
        deltas = self.restore_deltas()
        if self.merged is not None:
            chunks, extents = self.merged.chunks, self.merged.extents
        else:
            chunks = -(-sum(d.nbytes for d in deltas) // DEFAULT_EXTENT_BYTES)
            extents = sum(d.extent_count for d in deltas)
        return RestoreShape(
            generations=1 + len(deltas), chunks=chunks, extents=extents, nbytes=self.full_bytes
        )


@dataclass(frozen=True)
class RestorePiece:
    """One piece of a restore: bytes read from one place and written to the target.

    :param label: for display, e.g. ``"incremental 3 on nvme0"``.
    :param nbytes: bytes to copy.
    :param source: speed of the device it is read from.
    :param scattered: random at chunk size (``True``) or sequential (``False``).
    """

    label: str
    nbytes: int
    source: DeviceSpeed
    scattered: bool


@dataclass(frozen=True)
class PieceTime:
    """A piece with the rate used and the time it takes (before correction)."""

    piece: RestorePiece
    rate: float
    seconds: float

    def describe(self) -> str:
        """e.g. ``"incremental 1 on hdd0: 2.0 GiB at 20.0 MiB/s = 1m42s"``."""
        return (
            f"{self.piece.label}: {format_size(self.piece.nbytes)} at "
            f"{format_rate(self.rate)} = {format_duration(self.seconds)}"
        )


@dataclass(frozen=True)
class RestoreEstimate:
    """An estimated restore time with its breakdown.

    :param mode: the restore mode estimated.
    :param parts: the pieces copied, with rates and times (before correction).
    :param correction: factor applied to the predicted sum (from real restores).
    :param terms: the fitted terms' breakdown, when the pool device and mode are
        calibrated (the pieces are then only the probe-only model's view, for display).
    :param upper_factor: the upper estimate is the estimate times this (>= 1).
    :param device_id: the pool device whose terms were used (the full's).
    """

    mode: RestoreMode
    parts: tuple[PieceTime, ...]
    correction: float = 1.0
    terms: TermBreakdown | None = None
    upper_factor: float = 1.0
    device_id: str = ""

    @property
    def calibrated(self) -> bool:
        """Whether fitted terms (a drill or real restores) made this estimate."""
        return self.terms is not None

    @property
    def breakdown(self) -> TermBreakdown:
        """Seconds by term (the probe-only model puts everything under transfer)."""
        if self.terms is not None:
            return self.terms
        return TermBreakdown(transfer=self.predicted_seconds * self.correction)

    @property
    def predicted_seconds(self) -> float:
        """The model's time before correction."""
        if self.terms is not None:
            return self.terms.total
        return sum(p.seconds for p in self.parts)

    @property
    def upper_seconds(self) -> float:
        """The upper estimate: what the planner holds against the RTO."""
        return self.seconds * self.upper_factor

    @property
    def seconds(self) -> float:
        """The corrected estimate in seconds."""
        return self.predicted_seconds * self.correction

    @property
    def duration(self) -> timedelta:
        """The corrected estimate."""
        return timedelta(seconds=self.seconds)

    @property
    def nbytes(self) -> int:
        """Bytes the restore copies."""
        return sum(p.piece.nbytes for p in self.parts)

    def describe(self) -> str:
        """e.g. ``"est 5m12s for 12.0 GiB (3 pieces, correction x1.10)"``."""
        correction = f", correction x{self.correction:.2f}" if self.correction != 1.0 else ""
        if self.terms is not None:
            t = self.terms
            return (
                f"est {format_duration(self.seconds)} (upper {format_duration(self.upper_seconds)})"
                f" for {format_size(self.nbytes)} ({self.mode.value}: fixed "
                f"{format_duration(t.fixed)} + generations {format_duration(t.generations)} + "
                f"extents {format_duration(t.extents)} + transfer {format_duration(t.transfer)})"
            )
        return (
            f"est {format_duration(self.seconds)} for {format_size(self.nbytes)} "
            f"({len(self.parts)} pieces copied, {self.mode.value}{correction}, uncalibrated)"
        )


def piece_time(piece: RestorePiece, target: DeviceSpeed) -> PieceTime:
    """Time of one piece: bytes / min(source read, target write) for its access pattern.

    :param piece: what is copied, from where.
    :param target: speed of the device written during the restore.
    """
    rate = min(piece.source.read(piece.scattered), target.write(piece.scattered))
    return PieceTime(piece, rate, piece.nbytes / rate)


def estimate_pieces(
    full: RestorePiece | None,
    deltas: Sequence[RestorePiece],
    target: DeviceSpeed,
    mode: RestoreMode,
    correction: float = 1.0,
) -> RestoreEstimate:
    """Estimate a restore made of a full base and deltas applied on top.

    :param full: the full base, or ``None`` if there is nothing to copy for it. In swap-in
        mode it is switched in and costs nothing; in copy mode it is copied sequentially.
    :param deltas: the deltas to apply, in order.
    :param target: the device written: the device holding the full (swap-in) or the new
        device (copy).
    :param mode: the restore mode.
    :param correction: factor learnt from real restores (see :func:`correction_factor`).
    """
    if not math.isfinite(correction) or correction <= 0:
        raise InvalidInput(detail=f"restore-time correction {correction!r} is not positive")
    mode = RestoreMode(mode)
    parts: list[PieceTime] = []
    if full is not None and mode is RestoreMode.COPY:
        sequential = RestorePiece(full.label, full.nbytes, full.source, scattered=False)
        parts.append(piece_time(sequential, target))
    parts.extend(piece_time(piece, target) for piece in deltas)
    return RestoreEstimate(mode, tuple(parts), correction)


def speed_of(speeds: Mapping[str, DeviceSpeed], device_id: str) -> DeviceSpeed:
    try:
        return speeds[device_id]
    except KeyError:
        raise NotFound(what="performance entry of device", name=device_id) from None


def write_rate_of(target: DeviceSpeed | None) -> float:
    return math.inf if target is None else target.write(True)


def restore_target(
    chain: Chain,
    speeds: Mapping[str, DeviceSpeed],
    mode: RestoreMode,
    copy_target: DeviceSpeed | None,
) -> DeviceSpeed:
    """The device a restore of ``chain`` writes to.

    :param chain: the chain restored.
    :param speeds: speeds of the pool devices by identity.
    :param mode: swap-in writes onto the snapshot of the full, on the full's device; copy
        writes to ``copy_target``.
    :param copy_target: the new device of a copy restore (the protected volume's own entry
        is a fair stand-in for its replacement).
    :raises InvalidInput: in copy mode without ``copy_target``.
    """
    if RestoreMode(mode) is RestoreMode.SWAP_IN:
        return speed_of(speeds, chain.full_device_id)
    if copy_target is None:
        raise InvalidInput(detail="a copy-mode restore estimate needs the target device's speed")
    return copy_target


def terms_for(terms: TermBook | None, device_id: str, mode: RestoreMode) -> PathTerms | None:
    """The fitted terms of ``device_id`` in ``mode``, or None (uncalibrated)."""
    if not terms:
        return None
    return terms.get((device_id, RestoreMode(mode).value))


def copy_write_cost(fitted: PathTerms, target: DeviceSpeed | None, mode: RestoreMode) -> float:
    """Seconds per byte a copy's target writes add to the fitted restore path.

    The copy path reads (readers, checksums) and writes (the calling thread) at once, but
    measured on loop disks, in the host and in the guest, a copy took about its read side
    plus its target's writes, not the larger of the two (the bench of issue 14: copies
    1.8x a max(read, write) estimate at every chain length): the two share CPU and the
    write waits for the window it writes. So the target's writes are added, unless the
    samples themselves wrote to a real device (a drill into scratch space): then only a
    target slower than that device adds its extra time, and a faster one is not counted
    as faster than measured.

    :param fitted: the restore path's terms (``write_rate`` says what they wrote to).
    :param target: the copy target's speed; None: not known (nothing added).
    :param mode: only copy restores write to a target of their own.
    """
    if RestoreMode(mode) is not RestoreMode.COPY or target is None:
        return 0.0
    cost = 1.0 / target.write(False)
    if fitted.write_rate > 0:
        return max(0.0, cost - 1.0 / fitted.write_rate)
    return cost


def estimate_chain(
    chain: Chain,
    speeds: Mapping[str, DeviceSpeed],
    mode: RestoreMode,
    copy_target: DeviceSpeed | None = None,
    correction: float = 1.0,
    terms: TermBook | None = None,
) -> RestoreEstimate:
    """Estimate restoring the newest generation of ``chain``.

    :param chain: the generations since the last full.
    :param speeds: speeds of the pool devices by identity.
    :param mode: the restore mode.
    :param copy_target: the restore target's speed in copy mode.
    :param correction: factor learnt from real restores (probe-only model only).
    :param terms: fitted terms by (pool device, mode); those of the full's device are
        used when present.
    :raises NotFound: if a device of the chain has no speed.
    """
    mode = RestoreMode(mode)
    fitted = terms_for(terms, chain.full_device_id, mode)
    if fitted is not None:
        probe = estimate_chain(chain, speeds, mode, copy_target)
        shape = chain.shape()
        per_byte = fitted.per_byte + copy_write_cost(fitted, copy_target, mode)
        terms = fitted.breakdown(shape, per_byte)
        # The spread was measured on the restore path, not on a slower copy target: only
        # the fitted path's own time is widened by it.
        path = fitted.seconds(shape)
        upper = terms.total + (fitted.upper_factor - 1.0) * path
        factor = upper / terms.total if terms.total > 0 else fitted.upper_factor
        return RestoreEstimate(
            mode, probe.parts, 1.0, terms, max(1.0, factor), chain.full_device_id
        )
    target = restore_target(chain, speeds, mode, copy_target)
    full = RestorePiece(
        f"full on {chain.full_device_id}",
        chain.full_bytes,
        speed_of(speeds, chain.full_device_id),
        scattered=False,
    )
    deltas = [
        RestorePiece(
            f"{d.method.value} {i} on {d.device_id}",
            d.nbytes,
            speed_of(speeds, d.device_id),
            d.scattered,
        )
        for i, d in enumerate(chain.restore_deltas(), start=1)
    ]
    estimate = estimate_pieces(full, deltas, target, mode, correction)
    return RestoreEstimate(
        estimate.mode, estimate.parts, estimate.correction, device_id=chain.full_device_id
    )


@dataclass(frozen=True)
class RestoreSample:
    """One real restore: what the model predicted (before correction) and what it took."""

    predicted_seconds: float
    measured_seconds: float


def correction_factor(
    history: Sequence[RestoreSample],
    window: int = CORRECTION_WINDOW,
    low: float = CORRECTION_MIN,
    high: float = CORRECTION_MAX,
) -> float:
    """Median of measured / predicted over the last ``window`` real restores, clamped.

    Samples with a non-positive or non-finite figure are ignored (a restore of nothing says
    nothing about speed). Without usable samples the factor is 1.

    :param history: real restores, oldest first.
    :param window: how many of the most recent samples count.
    :param low: lower clamp.
    :param high: upper clamp.
    """
    usable = [
        s.measured_seconds / s.predicted_seconds
        for s in history
        if math.isfinite(s.predicted_seconds)
        and math.isfinite(s.measured_seconds)
        and s.predicted_seconds > 0
        and s.measured_seconds > 0
    ][-window:]
    if not usable:
        return 1.0
    return min(high, max(low, statistics.median(usable)))
