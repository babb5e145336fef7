"""Copy a committed generation from one pool into another: a local generation to a
backup target (issue 11, docs/design/remote.md "Source of a remote transfer").

The copy has the generation's id and point in time. What it stores is decided by the
caller: every chunk (a full there), or the chunks changed since the generation the
destination's chain last copied (an incremental or differential there). Each chunk is
read from the newest generation of the source chain that holds it, checked against its
checksum on the way (a damaged local chunk stops the transfer and names it), and
written to the destination's writer, whose commit is the only commit point: a transfer
cut before it leaves nothing committed.
"""

from __future__ import annotations

import array
import contextlib
import time
from collections.abc import Sequence

from pyroaring import BitMap

from blockguard.core.retention import RetentionPolicy
from blockguard.core.vocab import GenerationKind
from blockguard.storage.backup import (
    BackupResult,
    apply_retention_after_commit,
    generation_spec,
)
from blockguard.storage.copyengine import DEFAULT_EXTENT_BYTES, Progress, copy_chunks
from blockguard.storage.manifest import Manifest, new_checksum_array
from blockguard.storage.pool.base import GenerationSpec, PoolBackend
from blockguard.storage.restore import RESTORE_READERS, gathered_items, plan_chunks


def transfer_spec(
    dest: PoolBackend,
    newest: Manifest,
    kind: GenerationKind,
    changed: BitMap | None,
    *,
    base_id: str | None = None,
    parent_id: str | None = None,
    clone_from: str | None = None,
) -> GenerationSpec:
    """What ``dest`` is asked to write for a copy of ``newest`` (checks the references
    there; writes nothing). A full copies every chunk, unless ``clone_from`` names a full
    in ``dest`` that ``changed`` is relative to and ``dest`` can clone it (a remote pool
    synthesizes the full there: only what changed crosses the link)."""
    if kind is GenerationKind.FULL:
        if clone_from is None or changed is None or not dest.can_clone_full:
            changed = clone_from = None
        return generation_spec(
            dest, newest.volume, kind, changed, newest.chunk_size, clone_from, None
        )
    return generation_spec(
        dest, newest.volume, kind, changed, newest.chunk_size, base_id, parent_id
    )


def transfer_generation(
    source: PoolBackend,
    chain: list[Manifest],
    dest: PoolBackend,
    spec: GenerationSpec,
    *,
    progress: Progress | None = None,
    keep: int | RetentionPolicy | None = None,
    extent_bytes: int = DEFAULT_EXTENT_BYTES,
) -> BackupResult:
    """Copy the content of ``chain``'s newest generation that ``spec`` stores into ``dest``.

    :param chain: the source generation's chain in ``source``, its full first.
    :param spec: from :func:`transfer_spec`; a writer ``dest`` resumes (a remote pool
        told the generation id with ``expect_resume``) continues where a cut left it.
    :param keep: the retention to apply in ``dest`` after the commit.
    :raises ChecksumMismatch: a chunk of the source is damaged.
    :raises WireError: the link to a remote ``dest`` broke (nothing committed).
    """
    started = time.monotonic()
    progress = progress or Progress()
    newest = chain[-1]
    full = spec.kind is GenerationKind.FULL
    writer = dest.begin_generation(spec)
    with writer:
        if full and writer.cloned_from is not None:
            # A cloned full: the clone's checksums, then what changed since it (or what
            # the destination asks for: a remote pool's whole packs).
            assert spec.changed is not None
            wanted = writer.clone_reads(spec.changed)
            with dest.open_generation(writer.cloned_from) as clone:
                sums = array.array("Q", clone.checksums())
        else:
            wanted = BitMap(range(newest.chunks)) if full else BitMap(spec.changed or BitMap())
            sums = new_checksum_array(newest.chunks if full else len(wanted))
        parts = [(gen, own & wanted) for gen, own in plan_chunks(chain)]
        parts = [(gen, own) for gen, own in parts if own]
        progress.start(sum(gen.bytes_of(own) for gen, own in parts))
        slots = writer.draft.changed

        def sink(first: int, view: memoryview, digests: Sequence[int]) -> None:
            writer.write_chunks(first, view, digests)
            slot = first if full else slots.rank(first) - 1
            sums[slot : slot + len(digests)] = array.array("Q", digests)

        with contextlib.ExitStack() as stack:
            readers = [stack.enter_context(source.open_generation(g)) for g, _ in parts]
            copied = copy_chunks(
                gathered_items(readers, [own for _, own in parts], extent_bytes),
                sink,
                chunk_size=newest.chunk_size,
                volume_size=newest.volume.size,
                progress=progress,
                extent_bytes=extent_bytes,
                readers=RESTORE_READERS,
            )
        manifest = writer.commit(sums)
    warnings: list[str] = []
    retention = apply_retention_after_commit(dest, newest.volume.name, keep, warnings)
    return BackupResult(
        manifest, copied, time.monotonic() - started, retention, None, tuple(warnings)
    )
