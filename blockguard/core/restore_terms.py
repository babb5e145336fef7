"""The restore path's own terms, fitted from measured restores and drills.

A restore of a given shape takes

    time = fixed + per_generation x generations read + per_extent x scattered extents
           written + bytes x per_byte

where ``per_byte`` is the measured path's seconds per byte (reads, checksums and, when the
samples wrote to a device, the writes as the path overlapped them; a copy's target writes
the samples did not make are added by the model, see ``PathTerms.write_rate``). A
multiplicative correction of a bytes/bandwidth model cannot fit a fixed cost or a cost that
grows with the chain (issue 14: restores took 1.5-6.7x the promise, worse with chain
length), so the four terms are fitted together, per pool device and restore mode, by a
robust non-negative least squares over recent samples (restore drills and real restores).
The fit minimises relative errors, since the promise is relative to an RTO, and down-weights
outliers (Huber weights, re-weighted a few times). ``per_byte`` is held to at least 1 / the
pool device's probed sequential read rate when that was measured: every byte a restore moves
is read from that device, and short drill restores can otherwise trade the bytes' cost for a
fixed one (a bursty or noisy disk), which a larger restore then pays.

Everything here is arithmetic: no devices, no catalog.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from blockguard.errors import InvalidInput

#: Fewer samples than this for a pool device and mode: the probe-only model is used.
MIN_SAMPLES = 4
#: How many recent samples of a pool device and mode the fit looks at.
FIT_WINDOW = 40
#: The upper estimate is the point estimate times this quantile of measured / predicted.
UPPER_QUANTILE = 0.9
#: Huber's constant (95 % efficiency for normal errors), in units of the robust scale.
HUBER_K = 1.345
#: Re-weighting rounds of the robust fit.
IRLS_ROUNDS = 12
#: Re-weighting rounds of each leave-one-shape-out fit (for the upper factor only).
LOO_ROUNDS = 4
#: A relative error below this is noise, not a reason to down-weight (the scale's floor).
MIN_SCALE = 0.02

SAMPLE_SOURCES = ("restore", "drill")


def _count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(detail=f"{name} {value!r} is not a count >= 0")
    return value


@dataclass(frozen=True)
class RestoreShape:
    """What a restore does, as far as its time goes.

    :param generations: generations read (the full and the deltas applied).
    :param chunks: chunks written to the target.
    :param extents: scattered extents written (runs of adjacent delta chunks).
    :param nbytes: bytes moved (read from the pool; the target's size for a copy).
    """

    generations: int
    chunks: int
    extents: int
    nbytes: int

    def __post_init__(self) -> None:
        _count("generations read", self.generations)
        _count("chunks written", self.chunks)
        _count("extents written", self.extents)
        _count("bytes restored", self.nbytes)

    def row(self) -> tuple[float, float, float, float]:
        """The shape as the fit's regressors (constant, generations, extents, bytes)."""
        return (1.0, float(self.generations), float(self.extents), float(self.nbytes))


@dataclass(frozen=True)
class TermBreakdown:
    """Seconds of an estimate, by term."""

    fixed: float = 0.0
    generations: float = 0.0
    extents: float = 0.0
    transfer: float = 0.0

    @property
    def total(self) -> float:
        return self.fixed + self.generations + self.extents + self.transfer

    def as_dict(self) -> dict[str, float]:
        """``{"fixed": s, "generations": s, "extents": s, "transfer": s}``."""
        return {
            "fixed": self.fixed,
            "generations": self.generations,
            "extents": self.extents,
            "transfer": self.transfer,
        }


@dataclass(frozen=True)
class PathTerms:
    """The fitted terms of one pool device and restore mode.

    :param fixed: seconds every restore costs (activation, snapshot, opening files).
    :param per_generation: seconds per generation read.
    :param per_extent: seconds per scattered extent written.
    :param per_byte: seconds per byte moved (1 / bandwidth of the restore path).
    :param samples: how many samples the fit used.
    :param upper_factor: the :data:`UPPER_QUANTILE` of measured / predicted over those
        samples, at least 1: the upper estimate is the point estimate times this.
    :param write_rate: copy mode: the probed sequential write speed (bytes/s) of the device
        the samples wrote to, so that ``per_byte`` already holds the writes of a target of
        that speed as the copy path overlapped them; 0 when the samples wrote nothing
        (rehearsals: the read side alone, the target's writes to be added).
    """

    fixed: float = 0.0
    per_generation: float = 0.0
    per_extent: float = 0.0
    per_byte: float = 0.0
    samples: int = 0
    upper_factor: float = 1.0
    write_rate: float = 0.0

    def __post_init__(self) -> None:
        for name in ("fixed", "per_generation", "per_extent", "per_byte", "write_rate"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise InvalidInput(detail=f"restore term {name} {value!r} is not >= 0")
        if not math.isfinite(self.upper_factor) or self.upper_factor < 1.0:
            raise InvalidInput(detail=f"upper factor {self.upper_factor!r} is not >= 1")

    @property
    def bandwidth(self) -> float:
        """Bytes per second of the restore path (infinite when the fit found no cost)."""
        return math.inf if self.per_byte == 0 else 1.0 / self.per_byte

    def breakdown(self, shape: RestoreShape, per_byte: float | None = None) -> TermBreakdown:
        """Seconds of a restore of ``shape``, by term.

        :param per_byte: seconds per byte to use instead of the fitted one (the caller's
            min(bandwidth, target write)).
        """
        rate = self.per_byte if per_byte is None else per_byte
        return TermBreakdown(
            self.fixed,
            self.per_generation * shape.generations,
            self.per_extent * shape.extents,
            rate * shape.nbytes,
        )

    def seconds(self, shape: RestoreShape) -> float:
        """Point estimate of a restore of ``shape``."""
        return self.breakdown(shape).total

    def as_dict(self) -> dict[str, float]:
        """For ``plan`` and the D-Bus API (bandwidth in bytes/s, 0 for unlimited)."""
        return {
            "fixed_seconds": self.fixed,
            "seconds_per_generation": self.per_generation,
            "seconds_per_extent": self.per_extent,
            "bandwidth": 0.0 if self.per_byte == 0 else self.bandwidth,
            "samples": float(self.samples),
            "upper_factor": self.upper_factor,
        }


@dataclass(frozen=True)
class PathSample:
    """One measured restore (or drill): its shape and how long it took."""

    shape: RestoreShape
    measured_seconds: float


def _solve(matrix: list[list[float]], rhs: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None when (nearly) singular."""
    n = len(rhs)
    a = [[*row, b] for row, b in zip(matrix, rhs, strict=True)]
    scale = max((abs(v) for row in matrix for v in row), default=0.0)
    if scale == 0.0:
        return None
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) <= 1e-10 * scale:
            return None
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(col + 1, n):
            f = a[r][col] / a[col][col]
            for c in range(col, n + 1):
                a[r][c] -= f * a[col][c]
    x = [0.0] * n
    for r in reversed(range(n)):
        x[r] = (a[r][n] - sum(a[r][c] * x[c] for c in range(r + 1, n))) / a[r][r]
    return x


def nnls(rows: Sequence[Sequence[float]], y: Sequence[float], w: Sequence[float]) -> list[float]:
    """Weighted non-negative least squares: argmin sum w (row . x - y)^2 with x >= 0.

    With four unknowns the exact answer is cheapest found by solving the unconstrained
    problem on every subset of free variables and keeping the best feasible one (the NNLS
    optimum is the least-squares solution on its own free set).

    :param rows: the regressors of each sample.
    :param y: the measured values.
    :param w: a weight per sample (>= 0).
    """
    k = len(rows[0])
    best: tuple[float, list[float]] = (math.inf, [0.0] * k)
    for size in range(1, k + 1):
        for free in itertools.combinations(range(k), size):
            ata = [[sum(wi * r[i] * r[j] for r, wi in zip(rows, w, strict=True)) for j in free]
                   for i in free]  # fmt: skip
            aty = [sum(wi * r[i] * yi for r, yi, wi in zip(rows, y, w, strict=True)) for i in free]
            sol = _solve(ata, aty)
            if sol is None or any(v < 0 for v in sol):
                continue
            x = [0.0] * k
            for i, v in zip(free, sol, strict=True):
                x[i] = v
            sse = sum(
                wi * (sum(xi * ri for xi, ri in zip(x, r, strict=True)) - yi) ** 2
                for r, yi, wi in zip(rows, y, w, strict=True)
            )
            if sse < best[0]:
                best = (sse, x)
    return best[1]


def quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile (no interpolation: a small sample's 0.9 is its largest)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def upper_factor(ratios: Sequence[float], q: float = UPPER_QUANTILE) -> float:
    """The ``q`` quantile of measured / predicted, at least 1 (1 without ratios)."""
    usable = [r for r in ratios if math.isfinite(r) and r > 0]
    if not usable:
        return 1.0
    return max(1.0, quantile(usable, q))


def _usable(samples: Sequence[PathSample]) -> list[PathSample]:
    return [s for s in samples if math.isfinite(s.measured_seconds) and s.measured_seconds > 0]


def fit_terms(
    samples: Sequence[PathSample],
    *,
    min_samples: int = MIN_SAMPLES,
    rounds: int = IRLS_ROUNDS,
    loo: bool = True,
    min_per_byte: float = 0.0,
) -> PathTerms | None:
    """Fit the four terms to measured samples of one pool device and mode.

    Relative errors are minimised (weights 1 / measured^2), with Huber weights on the
    relative residuals re-computed each round (scale: 1.4826 x their median absolute
    deviation). Columns are scaled to their largest value first, so that a byte count and
    a constant meet on equal terms.

    The upper factor is the :data:`UPPER_QUANTILE` of measured / predicted where each
    sample is predicted by a fit of the samples of other shapes (leave-one-shape-out), so
    that it says how far off the model is for a restore of a shape it has not seen.

    :param samples: recent samples, any order.
    :param loo: compute the upper factor leave-one-shape-out (else from the fit's own
        residuals).
    :param min_per_byte: the fitted ``per_byte`` is at least this: 1 / the best probed
        sequential read rate of the pool device, since every byte a restore moves is read
        from it (see below). 0: no floor.
    :returns: the terms, or None with fewer than ``min_samples`` usable samples.
    """
    if not math.isfinite(min_per_byte) or min_per_byte < 0:
        raise InvalidInput(detail=f"least seconds per byte {min_per_byte!r} is not >= 0")
    usable = _usable(samples)
    if len(usable) < max(1, min_samples):
        return None
    raw = [s.shape.row() for s in usable]
    y = [s.measured_seconds for s in usable]
    # The floor is fitted as a known part of every sample: the terms fit what is left
    # (per_byte above the floor), the errors stay relative to what was measured. Without
    # it, drills of 32 and 64 MiB on a noisy or bursty disk could put the bytes' cost into
    # the fixed term: on the host's 100 MB/s disk (a blkio throttle, which lets short
    # restores run ahead of its rate) one fitted 0.24 s + 5.8 ns/B, 172 MB/s, and every
    # 128 MiB swap-in then took 13-40 % longer than its estimate.
    rest = [yi - min_per_byte * r[3] for yi, r in zip(y, raw, strict=True)]
    scale = [max(abs(r[i]) for r in raw) or 1.0 for i in range(4)]
    rows = [[r[i] / scale[i] for i in range(4)] for r in raw]
    robust = [1.0] * len(rows)
    x = [0.0] * 4
    for _ in range(max(1, rounds)):
        weights = [h / (yi * yi) for h, yi in zip(robust, y, strict=True)]
        x = nnls(rows, rest, weights)
        predicted = [sum(a * b for a, b in zip(x, r, strict=True)) for r in rows]
        residuals = [(p - ri) / yi for p, ri, yi in zip(predicted, rest, y, strict=True)]
        centre = statistics.median(residuals)
        mad = statistics.median(abs(r - centre) for r in residuals)
        s = max(MIN_SCALE, 1.4826 * mad)
        robust = [1.0 if abs(r) <= HUBER_K * s else HUBER_K * s / abs(r) for r in residuals]
    coef = [x[i] / scale[i] for i in range(4)]
    coef[3] += min_per_byte
    terms = PathTerms(coef[0], coef[1], coef[2], coef[3], samples=len(usable))
    if not loo or len(usable) <= max(1, min_samples):
        ratios = [s.measured_seconds / p for s in usable if (p := terms.seconds(s.shape)) > 0]
    else:
        # Leave-one-shape-out: each sample measured against a fit that saw no restore of
        # its shape. In-sample residuals of four terms fitted to a handful of drill
        # restores are too kind, and so is leaving out one sample alone: a drill restores
        # each shape twice, and the twin left in vouched for it (on the host, swap-ins of
        # a 508-chunk differential took 3.3-3.7x the full, where the drill said 1.6-2.6x).
        ratios = []
        for shape in dict.fromkeys(s.shape for s in usable):
            others = fit_terms(
                [s for s in usable if s.shape != shape],
                min_samples=min_samples,
                rounds=LOO_ROUNDS,
                loo=False,
                min_per_byte=min_per_byte,
            )
            model = terms if others is None else others
            if (p := model.seconds(shape)) > 0:
                ratios.extend(s.measured_seconds / p for s in usable if s.shape == shape)
    return PathTerms(*coef, samples=len(usable), upper_factor=upper_factor(ratios))
