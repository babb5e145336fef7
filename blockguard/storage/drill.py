"""A restore drill: measure the real restore path of a pool on chains of known shape.

The drill writes a synthetic volume (:data:`DRILL_VOLUME`, a name no protected volume can
take) into the pool through the pool's own generation writer — the same code and the same
disks as a backup — as a full and chains of ~1 % scattered 64 KiB incrementals, and a
differential with incrementals on it. It then restores a few of those generations with the
project's own restore code (:mod:`blockguard.storage.restore`), timing each:

- swap-in mode: :func:`~blockguard.storage.restore.swap_in` as a real swap-in runs (a clone
  of the full, deltas applied, the rest of the clone read back and verified);
- copy mode, given scratch space (``copy_scratch``, a spare block device): a real
  :func:`~blockguard.storage.restore.restore_to_device` into it, so that the samples hold
  the copy path's reads and writes as it overlaps them (the model adds only what a slower
  target would cost more, see :func:`blockguard.core.restore_model.copy_write_cost`);
  the scratch's own sequential write rate is probed first (``copy_write_rate``), and the
  safety gate, when given, judges the scratch before every write to it;
- copy mode without scratch space: :func:`~blockguard.storage.restore.rehearse`, the copy
  restore's read side (the same gathered windows, readers and checksum checks, the data
  then dropped), to which the model adds the target's writes. An earlier drill wrote into
  a clone of the full on the pool and so measured the pool's copy-on-write allocation,
  4-9x a real restore to another disk in the guest: scratch space must be a plain device.

Each restore is one sample of (mode, pool device, generations, chunks, extents, bytes,
seconds); the engine stores them and fits the model's terms. Everything the drill wrote is
removed before it returns, also on failure. It writes nothing but its own generations and
its own swap-in clones (and the scratch device it is given for copy mode).
"""

from __future__ import annotations

import array
import contextlib
import logging
import mmap
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash
from pyroaring import BitMap

from blockguard.core.perftable import SpeedKind
from blockguard.core.vocab import GenerationKind, RestoreMode
from blockguard.errors import Busy, InvalidInput
from blockguard.storage.blockdev import BlockDevice
from blockguard.storage.copyengine import Progress, extents
from blockguard.storage.manifest import (
    Manifest,
    VolumeIdentity,
    check_chunk_size,
    chunk_count,
    new_checksum_array,
)
from blockguard.storage.pool.base import GenerationSpec, PoolBackend
from blockguard.storage.probe import SEQ_BLOCK, WritableRegion, probe_device
from blockguard.storage.restore import RestoreResult, rehearse, restore_to_device, swap_in
from blockguard.storage.safety import SafetyGate

log = logging.getLogger(__name__)

#: The drill's volume name: valid on every backend, refused for a protected volume.
DRILL_VOLUME = "@drill"
#: Prefix of the drill's scratch clones (swap-in labels).
DRILL_LABEL = "@drill-"
DEFAULT_DRILL_BYTES = 64 * 1024 * 1024
DRILL_CHUNK_SIZE = 64 * 1024
#: Share of the chunks an incremental changes (scattered, one chunk each).
INCREMENTAL_SHARE = 0.01
#: Share of the chunks the differential holds: larger than an incremental's, so that the
#: drill also sees restores dominated by scattered extents (the fit needs their cost).
#: Random chunks at share p make about n p (1 - p) extents: 0.30 gives ~215 in a 64 MiB
#: drill, a swap-in's worth of synchronous copy-on-write writes (0.4-0.8 ms each on the
#: host's fast loop disk, timed alone) that stands out of a busy host's noise. At 0.10
#: (~92 extents, ~50 ms of 0.1-0.2 s restores) the fit could not tell them from the noise:
#: it gave the fast disk's swap-in 0 ms per extent in one host run and 0.94 ms in the
#: next, and restores of 400-700 extents missed by 24-44 %.
DIFFERENTIAL_SHARE = 0.30
#: Each shape is restored this many times in each mode: single restores of a few tens of
#: MiB are noisy on a busy host.
DEFAULT_REPEATS = 2
#: The modes a drill restores in, in the order it runs them.
MODES = (RestoreMode.COPY.value, RestoreMode.SWAP_IN.value)
#: Bytes written per call of the generation writer for a full.
_FULL_STEP = 1024 * 1024
#: Seconds the sequential write probe of a copy scratch device runs.
SCRATCH_PROBE_SECONDS = 0.5
#: What the gate is told a drill's scratch is for (its messages name it).
SCRATCH_PURPOSE = "a restore drill's scratch space"


@dataclass(frozen=True)
class DrillShape:
    """A chain to restore: ``incrementals`` on a full (or on a differential of it).

    :param name: for the report, e.g. ``full+4``.
    :param size_share: size of its volume, as a share of the drill size (two sizes let the
        fit tell a fixed cost from a per-byte one).
    """

    name: str
    size_share: float
    differential: bool
    incrementals: int


DEFAULT_SHAPES: tuple[DrillShape, ...] = (
    DrillShape("half full", 0.5, False, 0),
    DrillShape("full", 1.0, False, 0),
    DrillShape("full+1", 1.0, False, 1),
    DrillShape("full+4", 1.0, False, 4),
    DrillShape("full+8", 1.0, False, 8),
    DrillShape("full+diff+2", 1.0, True, 2),
    DrillShape("half full+4", 0.5, False, 4),
)


@dataclass(frozen=True)
class DrillSample:
    """One timed drill restore.

    :param full: the manifest of the chain's full (the engine maps it to a pool device).
    """

    shape: str
    mode: str
    full: Manifest
    generations: int
    chunks: int
    extents: int
    nbytes: int
    seconds: float


@dataclass(frozen=True)
class DrillResult:
    samples: tuple[DrillSample, ...]
    duration: float
    #: generation ids the drill wrote (all removed again)
    written: tuple[str, ...] = ()
    #: the device copy mode restored into ("" : copy mode only rehearsed, wrote nothing)
    copy_scratch: str = ""
    #: its probed sequential write rate, bytes/s (0: no scratch)
    copy_write_rate: float = 0.0


class _ChainBuilder:
    """Writes the drill's generations of one size through the pool's writer."""

    def __init__(self, pool: PoolBackend, size: int, chunk_size: int, rnd: random.Random) -> None:
        self.pool = pool
        self.volume = VolumeIdentity(DRILL_VOLUME, size, "drill")
        self.chunk_size = chunk_size
        self.nchunks = chunk_count(size, chunk_size)
        self.rnd = rnd
        self.written: list[Manifest] = []
        # Page-aligned, as the pool's O_DIRECT writes need.
        self._buf = mmap.mmap(-1, max(_FULL_STEP, chunk_size))

    def _random(self, nbytes: int) -> memoryview:
        view = memoryview(self._buf)[:nbytes]
        view[:] = os.urandom(nbytes)
        return view

    def _write(
        self,
        kind: GenerationKind,
        changed: BitMap | None,
        base: Manifest | None,
        parent: Manifest | None,
    ) -> Manifest:
        spec = GenerationSpec(
            self.volume,
            kind,
            self.chunk_size,
            changed,
            base_id=None if base is None else base.generation_id,
            parent_id=None if parent is None else parent.generation_id,
        )
        writer = self.pool.begin_generation(spec)
        cs = self.chunk_size
        with writer:
            if changed is None:
                sums = new_checksum_array(self.nchunks)
                step = max(1, _FULL_STEP // cs)
                for first in range(0, self.nchunks, step):
                    count = min(step, self.nchunks - first)
                    nbytes = min(count * cs, self.volume.size - first * cs)
                    data = self._random(nbytes)
                    digests = [
                        xxhash.xxh3_64_intdigest(data[i : i + cs]) for i in range(0, nbytes, cs)
                    ]
                    writer.write_chunks(first, data, digests)
                    sums[first : first + count] = array.array("Q", digests)
            else:
                sums = new_checksum_array(len(changed))
                for slot, (first, count) in enumerate(extents(changed, self.nchunks, 1)):
                    nbytes = min(count * cs, self.volume.size - first * cs)
                    data = self._random(nbytes)
                    digest = xxhash.xxh3_64_intdigest(data)
                    writer.write_chunks(first, data, [digest])
                    sums[slot] = digest
            manifest = writer.commit(sums)
        self.written.append(manifest)
        return manifest

    def full(self) -> Manifest:
        return self._write(GenerationKind.FULL, None, None, None)

    def scattered(self, share: float) -> BitMap:
        count = max(1, round(self.nchunks * share))
        return BitMap(self.rnd.sample(range(self.nchunks), min(count, self.nchunks)))

    def delta(
        self, kind: GenerationKind, share: float, full: Manifest, parent: Manifest
    ) -> Manifest:
        return self._write(kind, self.scattered(share), full, parent)


def _build(
    pool: PoolBackend, size: int, chunk_size: int, shapes: Sequence[DrillShape], rnd: random.Random
) -> tuple[_ChainBuilder, dict[str, Manifest]]:
    """Write the chains of ``shapes`` (all of one size): one full, a run of incrementals on
    it, and a differential with incrementals on that. Returns the generation to restore
    for each shape name."""
    builder = _ChainBuilder(pool, size, chunk_size, rnd)
    full = builder.full()
    targets: dict[str, Manifest] = {}
    longest = max((s.incrementals for s in shapes if not s.differential), default=0)
    chain = [full]
    for _ in range(longest):
        chain.append(builder.delta(GenerationKind.INCREMENTAL, INCREMENTAL_SHARE, full, chain[-1]))
    for shape in shapes:
        if not shape.differential:
            targets[shape.name] = chain[shape.incrementals]
    diff_shapes = [s for s in shapes if s.differential]
    if diff_shapes:
        diff = builder.delta(GenerationKind.DIFFERENTIAL, DIFFERENTIAL_SHARE, full, full)
        on_diff = [diff]
        for _ in range(max(s.incrementals for s in diff_shapes)):
            on_diff.append(
                builder.delta(GenerationKind.INCREMENTAL, INCREMENTAL_SHARE, full, on_diff[-1])
            )
        for shape in diff_shapes:
            targets[shape.name] = on_diff[shape.incrementals]
    return builder, targets


def _judge(gate: SafetyGate | None, pool: PoolBackend, scratch: str) -> None:
    """The gate's word on writing ``scratch`` now (it may have been mounted or stacked on
    since the last write)."""
    if gate is not None:
        gate.check_scratch(scratch, pool=pool.name, purpose=SCRATCH_PURPOSE)


def scratch_write_rate(path: str, nbytes: int, duration: float = SCRATCH_PROBE_SECONDS) -> float:
    """The sequential write rate (bytes/s) of a scratch device, probed as a copy restore
    writes it: one stream of 1 MiB requests, over its first ``nbytes`` (overwritten!)."""
    with BlockDevice(path) as dev:
        length = min(nbytes, dev.size) // SEQ_BLOCK * SEQ_BLOCK
        rdev = dev.rdev
    if length < SEQ_BLOCK:
        raise InvalidInput(detail=f"scratch device {path} is smaller than {SEQ_BLOCK} bytes")
    result = probe_device(
        path,
        writable=WritableRegion(0, length),
        kinds=[SpeedKind.SEQ_WRITE],
        duration=duration,
        depths=(1,),
        expect_rdev=rdev,
    )
    return result.rate(SpeedKind.SEQ_WRITE)


def _timed_restore(
    pool: PoolBackend,
    generation: Manifest,
    mode: str,
    serial: int,
    copy_scratch: str | None,
    gate: SafetyGate | None,
) -> RestoreResult:
    if mode == RestoreMode.SWAP_IN:
        result = swap_in(
            pool, DRILL_VOLUME, generation.generation_id, label=f"{DRILL_LABEL}{serial}"
        )
        assert result.swap is not None
        result.swap.release()
        return result
    if copy_scratch:
        _judge(gate, pool, copy_scratch)
        return restore_to_device(pool, DRILL_VOLUME, generation.generation_id, copy_scratch)
    return rehearse(pool, DRILL_VOLUME, generation.generation_id)


def run_drill(
    pool: PoolBackend,
    *,
    volume_bytes: int = DEFAULT_DRILL_BYTES,
    chunk_size: int = DRILL_CHUNK_SIZE,
    shapes: Sequence[DrillShape] = DEFAULT_SHAPES,
    modes: Sequence[str] = MODES,
    progress: Progress | None = None,
    seed: int | None = None,
    repeats: int = DEFAULT_REPEATS,
    copy_scratch: str | None = None,
    gate: SafetyGate | None = None,
) -> DrillResult:
    """Write the drill's chains on ``pool``, restore each shape in each mode, time it,
    and remove everything written.

    :param volume_bytes: size of the drill volume (shapes of ``size_share`` 0.5 use half).
    :param seed: for the scattered chunk positions (random when None).
    :param repeats: restores of each shape in each mode.
    :param copy_scratch: a spare block device of at least ``volume_bytes`` (overwritten!)
        that copy mode restores into; None: copy mode rehearses (reads only).
    :param gate: judges ``copy_scratch`` as ``pool``'s scratch space
        (:meth:`~blockguard.storage.safety.SafetyGate.check_scratch`) before each write.
    :raises InvalidInput: a size too small for a chunk, or an unknown mode.
    :raises DeviceInUse: the gate refuses the scratch device (names why).
    """
    check_chunk_size(chunk_size)
    if volume_bytes < 2 * chunk_size or volume_bytes % (2 * chunk_size):
        raise InvalidInput(
            detail=f"drill size {volume_bytes} is not a multiple of twice the chunk size "
            f"{chunk_size}"
        )
    for mode in modes:
        if mode not in MODES:
            raise InvalidInput(detail=f"drill mode {mode!r} is not one of {', '.join(MODES)}")
    started = time.monotonic()
    progress = progress or Progress()
    rnd = random.Random(seed)
    # An interrupted drill (a crash) left its own generations: remove them first.
    _remove(pool, pool.generations(DRILL_VOLUME))
    sizes = sorted({s.size_share for s in shapes})
    if repeats < 1:
        raise InvalidInput(detail=f"drill repeats {repeats!r} must be at least 1")
    todo = len(shapes) * len(modes) * repeats
    progress.start(todo)
    samples: list[DrillSample] = []
    written: list[Manifest] = []
    serial = 0
    write_rate = 0.0
    if copy_scratch and RestoreMode.COPY.value in modes:
        _judge(gate, pool, copy_scratch)
        write_rate = scratch_write_rate(copy_scratch, volume_bytes)
    try:
        for share in sizes:
            size = max(2 * chunk_size, int(volume_bytes * share) // chunk_size * chunk_size)
            group = [s for s in shapes if s.size_share == share]
            builder, targets = _build(pool, size, chunk_size, group, rnd)
            written.extend(builder.written)
            full = builder.written[0]
            for shape in [s for s in group for _ in range(repeats)]:
                for mode in modes:
                    serial += 1
                    result = _timed_restore(
                        pool, targets[shape.name], mode, serial, copy_scratch, gate
                    )
                    samples.append(
                        DrillSample(
                            shape.name,
                            mode,
                            full,
                            len(result.chain),
                            result.chunks,
                            result.extents,
                            result.bytes_read,
                            result.duration,
                        )
                    )
                    progress.advance(1)
            # Remove a size's chains before writing the next: the drill needs little room.
            _remove(pool, builder.written)
    finally:
        with contextlib.suppress(Exception):
            _remove(pool, pool.generations(DRILL_VOLUME))
        pool.remove_volume_dirs(DRILL_VOLUME)
    return DrillResult(
        tuple(samples),
        time.monotonic() - started,
        tuple(m.generation_id for m in written),
        copy_scratch or "",
        write_rate,
    )


def _remove(pool: PoolBackend, manifests: Sequence[Manifest]) -> None:
    """Remove drill generations, dependents before what they depend on."""
    present = {m.generation_id for m in pool.generations(DRILL_VOLUME)}
    left = [m for m in manifests if m.generation_id in present]
    left.sort(key=lambda m: (m.created, m.generation_id), reverse=True)
    while left:
        stuck = []
        for m in left:
            try:
                pool.remove_generation(DRILL_VOLUME, m.generation_id)
            except Busy:  # a generation written later still depends on it
                stuck.append(m)
        if len(stuck) == len(left):
            raise Busy(
                what=f"drill generations on pool {pool.name}", reason="they depend on others"
            )
        left = stuck
