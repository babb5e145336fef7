"""A volume's restore drill: its newest generation restored into scratch space on its pool,
the restored bytes read back against the stored checksums, the scratch space removed.

The restore is the project's own (:mod:`blockguard.storage.restore`), in the mode the
volume's RTO refers to:

- copy: :func:`~blockguard.storage.restore.restore_to_device` onto a clone of the chain's
  full that the pool makes (a loop device on a reflinked file of a dir pool, a thin
  snapshot of an lvm pool: the scratch space pool drills use), judged by the safety gate's
  :meth:`~blockguard.storage.safety.SafetyGate.check_scratch` before it is written;
- swap-in: :func:`~blockguard.storage.restore.swap_in` as a real swap-in runs (its own clone).

The restore checks every chunk it reads from the pool (damage there is the stored
generation's); the read-back then checks every chunk of the restored device against the
checksum stored for it in the generation that provides it, so a restore path that writes
wrong bytes is caught too (:class:`~blockguard.errors.DrillMismatch`). Nothing but the
scratch clone is written, and it is released also on failure.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from blockguard.errors import ChecksumMismatch, DrillMismatch, InvalidInput
from blockguard.storage.blockdev import BlockDevice
from blockguard.storage.copyengine import (
    DEFAULT_EXTENT_BYTES,
    CopyItem,
    DeviceSource,
    Progress,
    copy_chunks,
    discard_sink,
    extents,
)
from blockguard.storage.manifest import Manifest
from blockguard.storage.pool.base import GenerationReader, PoolBackend
from blockguard.storage.restore import RestoreResult, plan_chunks, restore_to_device, swap_in

if TYPE_CHECKING:
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
    gate: SafetyGate | None,
    pool_name: str,
    label: str,
    progress: Progress | None = None,
    read_delay: float = 0.0,
) -> VolumeDrillResult:
    """Restore ``generation_id`` of ``volume`` into scratch space on ``pool``, read it back
    against the stored checksums, and remove the scratch space.

    :param mode: ``copy`` or ``swap-in`` (what the volume's RTO refers to).
    :param gate: the daemon's safety gate; a copy's scratch clone is judged by it before
        it is written.
    :param label: the scratch clone's name (unique per drill; starts with
        :data:`VOLUME_DRILL_LABEL`).
    :param read_delay: a test's fault: seconds every generation read takes more.
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
    chain = pool.chain(volume, generation_id)
    # Writing over a clone allocates (copy on write): a drill must not take the room the
    # next backup needs.
    if mode == "copy":
        writes = chain[0].volume.size
    else:
        writes = sum(len(own) for g, own in plan_chunks(chain) if not g.is_full)
        writes *= chain[0].chunk_size
    pool.require_space(writes + pool.next_backup_estimate(volume), volume)
    if mode == "swap-in":
        result = swap_in(source, volume, generation_id, label=label, progress=progress)
        assert result.swap is not None
        release = result.swap.release
    else:
        scratch = pool.swap_in(chain[0], label)
        release = scratch.release
        try:
            if gate is not None:
                gate.check_scratch(
                    scratch.device, pool=pool_name, purpose="a volume drill's scratch target"
                )
            result = restore_to_device(
                source, volume, generation_id, scratch.device, progress=progress
            )
        except BaseException:
            scratch.release()
            raise
    try:
        started = time.monotonic()
        chunks, nbytes = read_back(pool, volume, chain, result.target, progress)
        verify_seconds = time.monotonic() - started
    finally:
        release()
    return VolumeDrillResult(result, chunks, nbytes, verify_seconds)


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
    max_count = max(1, extent_bytes // full.chunk_size)
    progress.add_total(sum(len(own) for _, own in plan) * full.chunk_size)
    with BlockDevice(device, direct=True) as dev, contextlib.ExitStack() as stack:
        restored = DeviceSource(dev, full.chunk_size)
        readers = [stack.enter_context(pool.open_generation(g)) for g, _ in plan]

        def items(reader: GenerationReader, gen: Manifest, own: Any) -> Iterator[CopyItem]:
            for first, count in extents(own, gen.chunks, max_count):
                expected = reader.expected(first, count)
                yield CopyItem(restored, first, count, expected, gen.generation_id)

        streams = [items(r, g, own) for r, (g, own) in zip(readers, plan, strict=True)]
        try:
            nbytes = copy_chunks(
                heapq.merge(*streams, key=lambda item: item.first),
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
