"""A volume's restore drill: its newest generation restored as the volume's RTO says, every
restored chunk checked against its stored checksum, nothing left behind.

The restore is the project's own (:mod:`blockguard.storage.restore`), in the mode the
volume's RTO refers to, timed as pool drills time it (:mod:`blockguard.storage.drill`):

- swap-in: :func:`~blockguard.storage.restore.swap_in` as a real swap-in runs (a clone of
  the full on the pool, the deltas applied), then every chunk of the clone read back
  against the checksum stored for it in the generation that provides it, so a restore
  path that writes wrong bytes is caught (:class:`~blockguard.errors.DrillMismatch`); the
  clone is released, also on failure;
- copy, given scratch space on the pool (``copy_scratch``: a plain device the pool made for
  drills, never a clone of the full, whose copy-on-write allocation a copy into it would
  time instead): a real :func:`~blockguard.storage.restore.restore_to_device` into it,
  judged by the safety gate first, its write rate probed, then every chunk read back
  against its stored checksum as for swap-in;
- copy without scratch space: :func:`~blockguard.storage.restore.rehearse`, the copy's
  read side alone (the same readers, windows and checksum checks, the data dropped), to
  which the model adds the target's writes.

Either way a chunk damaged on the pool stops the drill with
:class:`~blockguard.errors.ChecksumMismatch`, naming it and its generation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

from blockguard.errors import ChecksumMismatch, DrillMismatch, InvalidInput
from blockguard.storage.blockdev import BlockDevice
from blockguard.storage.copyengine import (
    DEFAULT_EXTENT_BYTES,
    DeviceSource,
    Progress,
    copy_chunks,
    discard_sink,
)
from blockguard.storage.drill import SCRATCH_PURPOSE, scratch_write_rate
from blockguard.storage.manifest import Manifest
from blockguard.storage.pool.base import PoolBackend
from blockguard.storage.restore import (
    RestoreResult,
    gathered_items,
    plan_chunks,
    rehearse,
    restore_to_device,
    swap_in,
)
from blockguard.storage.safety import SafetyGate

log = logging.getLogger(__name__)

#: Prefix of a volume drill's scratch clone (a swap-in label; names no volume can take).
VOLUME_DRILL_LABEL = "@vdrill-"
MODES = ("copy", "swap-in")


@dataclass(frozen=True)
class VolumeDrillResult:
    """A drill's restore (its shape and measured duration) and what the read-back checked."""

    restore: RestoreResult
    verified_chunks: int
    verified_bytes: int
    verify_seconds: float
    #: a copy into scratch space: the scratch's probed write rate, bytes/s (else 0)
    write_rate: float = 0.0


class DelayedReads:
    """A pool whose generations each take ``delay`` seconds more to open: a fault that
    makes a drill's restore slow the way a slow or busy pool disk does (tests only)."""

    def __init__(self, pool: PoolBackend, delay: float, progress: Progress) -> None:
        self._pool = pool
        self._delay = delay
        self._progress = progress

    def open_generation(self, manifest: Manifest) -> Any:
        until = time.monotonic() + self._delay
        # In steps: a stopped drill (see Progress.cancel) stops waiting too.
        while not self._progress.cancelled and time.monotonic() < until:
            time.sleep(min(0.05, max(0.0, until - time.monotonic())))
        return self._pool.open_generation(manifest)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


def drill_volume(
    pool: PoolBackend,
    volume: str,
    generation_id: str,
    mode: str,
    *,
    label: str,
    progress: Progress | None = None,
    read_delay: float = 0.0,
    copy_scratch: str | None = None,
    gate: SafetyGate | None = None,
) -> VolumeDrillResult:
    """Restore ``generation_id`` of ``volume`` as a drill (see the module docstring): every
    restored chunk checked against its stored checksum, nothing left on ``pool``.

    :param mode: ``copy`` or ``swap-in`` (what the volume's RTO refers to).
    :param label: a swap-in drill's clone's name (unique per drill; starts with
        :data:`VOLUME_DRILL_LABEL`).
    :param read_delay: a test's fault: seconds every generation read takes more.
    :param copy_scratch: copy mode: the pool's drill scratch device (overwritten), at
        least the volume's size; None: copy mode rehearses the reads.
    :param gate: judges ``copy_scratch`` as the pool's scratch before it is written.
    :raises ChecksumMismatch: a stored chunk is damaged (names chunk and generation).
    :raises DrillMismatch: the restored device does not hold what the chain stores.
    :raises PoolSpaceLow: the scratch writes and the next backup would not both fit.
    """
    if mode not in MODES:
        raise InvalidInput(detail=f"drill mode {mode!r} is not one of {', '.join(MODES)}")
    if not label.startswith(VOLUME_DRILL_LABEL):
        raise InvalidInput(detail=f"drill label {label!r} must start with {VOLUME_DRILL_LABEL}")
    progress = progress or Progress()
    source: PoolBackend = pool if read_delay <= 0 else DelayedReads(pool, read_delay, progress)  # type: ignore[assignment]
    if mode == "copy" and not copy_scratch:
        result = rehearse(source, volume, generation_id, progress=progress)
        return VolumeDrillResult(result, result.chunks, result.bytes_read, 0.0)
    if mode == "copy":
        assert copy_scratch is not None
        return _copy_into_scratch(pool, source, volume, generation_id, copy_scratch, gate, progress)
    chain = pool.chain(volume, generation_id)
    # The deltas written over the clone allocate (copy on write): a drill must not take the
    # room the next backup needs.
    writes = sum(len(own) for g, own in plan_chunks(chain) if not g.is_full)
    writes *= chain[0].chunk_size
    pool.require_space(writes + pool.next_backup_estimate(volume), volume)
    result = swap_in(source, volume, generation_id, label=label, progress=progress)
    assert result.swap is not None
    try:
        started = time.monotonic()
        chunks, nbytes = read_back(pool, volume, chain, result.target, progress)
        verify_seconds = time.monotonic() - started
    finally:
        result.swap.release()
    return VolumeDrillResult(result, chunks, nbytes, verify_seconds)


def _copy_into_scratch(
    pool: PoolBackend,
    source: PoolBackend,
    volume: str,
    generation_id: str,
    scratch: str,
    gate: SafetyGate | None,
    progress: Progress,
) -> VolumeDrillResult:
    """A real copy restore into the pool's scratch device, then every chunk read back."""
    chain = pool.chain(volume, generation_id)
    if gate is not None:
        gate.check_scratch(scratch, pool=pool.name, purpose=SCRATCH_PURPOSE)
    rate = scratch_write_rate(scratch, chain[0].volume.size)
    if gate is not None:
        gate.check_scratch(scratch, pool=pool.name, purpose=SCRATCH_PURPOSE)
    result = restore_to_device(source, volume, generation_id, scratch, progress=progress)
    started = time.monotonic()
    chunks, nbytes = read_back(pool, volume, chain, scratch, progress)
    return VolumeDrillResult(result, chunks, nbytes, time.monotonic() - started, rate)


def read_back(
    pool: PoolBackend,
    volume: str,
    chain: list[Manifest],
    device: str,
    progress: Progress,
    extent_bytes: int = DEFAULT_EXTENT_BYTES,
) -> tuple[int, int]:
    """Read every chunk of a restored ``device`` and check it against the checksum stored
    for it in the generation of ``chain`` that provides it; returns (chunks, bytes).

    :raises DrillMismatch: naming the first chunk that differs and its generation.
    """
    plan = plan_chunks(chain)
    full = chain[0]
    progress.add_total(sum(len(own) for _, own in plan) * full.chunk_size)
    with BlockDevice(device, direct=True) as dev, contextlib.ExitStack() as stack:
        restored = DeviceSource(dev, full.chunk_size)
        readers = [stack.enter_context(pool.open_generation(g)) for g, _ in plan]
        # The restore's own windows (each chunk's checksum from the generation that
        # provides it), read from the device: one read per window, not one per run of
        # each generation (a full's runs cut around every delta chunk).
        windows = gathered_items(readers, [own for _, own in plan], extent_bytes)
        try:
            nbytes = copy_chunks(
                (dataclasses.replace(item, source=restored) for item in windows),
                discard_sink,
                chunk_size=full.chunk_size,
                volume_size=full.volume.size,
                progress=progress,
                extent_bytes=extent_bytes,
            )
        except ChecksumMismatch as exc:
            raise DrillMismatch(
                volume=volume,
                generation=exc.fields.get("generation", "?"),
                chunk=exc.fields.get("chunk", "?"),
                device=device,
            ) from exc
    return sum(len(own) for _, own in plan), nbytes
