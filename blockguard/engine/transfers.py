"""Transfers of a volume's committed local generations to its backup target (issue 11).

The decision is :func:`~.remoteplan.plan_remote` (the remote RTO chooses full,
differential or incremental, with the link as the target's speed); the copy is
:func:`~blockguard.storage.transfer.transfer_generation` into the target's
:class:`~blockguard.storage.pool.remotepool.RemotePool`. The copy carries the local
generation's id, which is also what makes a cut transfer resumable: the next run names
the same id (``expect_resume``) for the same plan, and the target continues the
generation it kept open, so the id needs no keeping across a restart of this daemon.
A generation is recorded in the catalog only after the target committed it; remote
retention (``remote_generations``, keep-last) runs after the commit, and the rows of
what it removed go with it.

Every transfer that put enough bytes is also a measurement of the link's up direction:
its sealed bytes over its time are blended into the link's performance-table row
(:func:`observe_link`), as live I/O refines a pool device's, so the remote plan's figure
follows the link as it is used, not only as registration measured it once.

An object-store target (issue 12) takes the same path: its pool is an
:class:`~blockguard.storage.pool.s3pool.S3Pool`, whose writer uploads only the chunks
no pack of the bucket holds yet (every host of the key deduplicates against the same
index), so a full costs the new chunks and a manifest; the result says so
(``chunks_reused``, ``bytes_uploaded``). Its PUT rate refines the target's row as a
link's up direction does. After the commit and the keep-last retention (which removes
manifests only), a garbage-collection sweep (:func:`~blockguard.storage.remote.s3gc.sweep`)
marks the packs no generation references and deletes those marked at least
``gc_grace`` ago, when one is due: at most once per ``gc_interval`` for the bucket,
whichever host swept it last (:func:`~blockguard.storage.remote.s3gc.sweep_due`).
:meth:`Transfers.collect` sweeps at once (``target gc``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from blockguard.core.catalog import Catalog, PerfEntry, RemoteGenerationRow, link_perf_key
from blockguard.core.objective_sets import RemoteObjectives, remote_of
from blockguard.core.objectives import IntervalRPO
from blockguard.core.perftable import SpeedKind
from blockguard.core.units import MiB
from blockguard.core.vocab import GenerationKind
from blockguard.engine.backoff import MAX_WAIT, TargetBackoff
from blockguard.engine.calibration import copy_target_of
from blockguard.engine.ids import public_id
from blockguard.engine.jobbook import JobProgress
from blockguard.engine.jobs import ProgressReporter
from blockguard.engine.pools import PoolRegistry
from blockguard.engine.remoteplan import (
    RemotePlan,
    link_speed,
    plan_remote,
    remote_plan_dict,
    sent_generations,
)
from blockguard.engine.targets import TargetRegistry
from blockguard.errors import (
    BlockguardError,
    EnvironmentProblem,
    InvalidInput,
    NotFound,
    PoolSpaceLow,
    WireError,
)
from blockguard.storage.manifest import Manifest
from blockguard.storage.pool.remotepool import RemotePool
from blockguard.storage.pool.s3pool import S3Pool
from blockguard.storage.remote.s3gc import SweepResult, sweep, sweep_due
from blockguard.storage.remote.s3gen import S3GenerationWriter
from blockguard.storage.restore import runs
from blockguard.storage.transfer import transfer_generation, transfer_spec

log = logging.getLogger(__name__)

#: Fewer bytes than this on the wire measure round trips and start-up more than the
#: link's rate: such a transfer does not update the link row (one pack is 8 MiB).
MIN_OBSERVED_BYTES = 8 * MiB


def remote_objectives(given: dict[str, Any], volume: str) -> RemoteObjectives:
    """The volume's remote objectives.

    :raises InvalidInput: its objectives name no target.
    """
    remote = remote_of(given)
    if remote is None:
        raise InvalidInput(
            detail=f"volume {volume} has no backup target: set one with "
            f"`blockguardctl objectives {volume} --target ID`"
        )
    return remote


def observe_link(
    catalog: Catalog, target: str, nbytes: int, seconds: float, default: float
) -> PerfEntry | None:
    """Blend a transfer's rate (``nbytes`` sent in ``seconds``) into the write figures
    of the link to ``target`` (exponential smoothing, :meth:`DeviceSpeed.observed`).

    :returns: the updated row, or ``None`` when the transfer was too small to say.
    """
    if nbytes < MIN_OBSERVED_BYTES or seconds <= 0:
        return None
    rate = nbytes / seconds
    speed, _ = link_speed(catalog, target, default)
    # A link is no slower for scattered chunks: both write figures are the up direction.
    speed = speed.observed(SpeedKind.SEQ_WRITE, rate).observed(SpeedKind.RAND_WRITE, rate)
    # Only the up figures: the down ones (None) keep what was measured of them.
    return catalog.upsert_perf(
        PerfEntry(
            device_key=link_perf_key(target),
            kind="pool",
            measured_at=catalog.now(),
            source="live",
            seq_write=speed.seq_write,
            rand_write=speed.rand_write,
        )
    )


def _row(
    target: str, manifest: Manifest, sent_at: float, seconds: float | None
) -> RemoteGenerationRow:
    return RemoteGenerationRow(
        target=target,
        volume=manifest.volume.name,
        generation=manifest.generation_id,
        kind=manifest.kind.value,
        base=manifest.base_id,
        parent=manifest.parent_id,
        created=manifest.created,
        volume_size=manifest.volume.size,
        bytes_stored=manifest.bytes_stored,
        extents=runs(manifest.changed) if not manifest.is_full else 1,
        sent_at=sent_at,
        seconds=seconds,
    )


def _gc_fields(swept: SweepResult) -> dict[str, Any]:
    """A sweep in a job's result."""
    return {
        "gc_marked": len(swept.marked),
        "gc_deleted": len(swept.deleted),
        "gc_spared": len(swept.spared),
        # Marks a live writer lease older than them holds back (a backup still running).
        "gc_held": len(swept.held),
        "gc_leases": swept.leases,
        "gc_expired_leases": list(swept.expired),
    }


def _retry_cap(plan: RemotePlan) -> float:
    """The longest back-off for the plan's target: its remote RPO interval, if it has
    one (a longer wait would miss the RPO by itself), else :data:`MAX_WAIT`."""
    objectives = plan.objectives.objectives
    rpo = None if objectives is None else objectives.rpo
    if isinstance(rpo, IntervalRPO):
        return min(MAX_WAIT, rpo.interval.total_seconds())
    return MAX_WAIT


class Transfers:
    """Plans and runs transfers (the work of a ``transfer`` job).

    :param catalog: where remote generations are recorded.
    :param targets: the registered targets (their stores).
    :param pools: the local pools (the source generations).
    :param default_speed: the link's speed while it is not measured.
    :param backoff: where a target that cannot be reached is held back (and a reached
        one released), for the scheduler.
    :param on_target_full: told when the target refused for want of space (the alert).
    :param gc_grace: seconds an unreferenced pack of an object-store target is kept
        after a sweep marked it.
    :param gc_interval: seconds between two sweeps of an object-store target's bucket
        after transfers (0: after every transfer).
    :param lease_timeout: what a sweep assumes of a writer lease that does not open.
    """

    def __init__(
        self,
        catalog: Catalog,
        targets: TargetRegistry,
        pools: PoolRegistry,
        default_speed: float,
        backoff: TargetBackoff | None = None,
        on_target_full: Callable[[str, PoolSpaceLow], None] | None = None,
        gc_grace: float = 86400.0,
        gc_interval: float = 21600.0,
        lease_timeout: float = 600.0,
    ) -> None:
        self.catalog = catalog
        self.targets = targets
        self.pools = pools
        self.default_speed = default_speed
        self.backoff = backoff
        self.on_target_full = on_target_full
        self.gc_grace = gc_grace
        self.gc_interval = gc_interval
        self.lease_timeout = lease_timeout

    def plan(
        self, volume: str, pool: str, given: dict[str, Any], local: list[Manifest]
    ) -> RemotePlan:
        """The plan of the next transfer of ``volume`` (local generations ``local``)."""
        remote = remote_objectives(given, volume)
        link, measured = link_speed(self.catalog, remote.target, self.default_speed)
        sent = sent_generations(self.catalog, remote.target, volume)
        copy = copy_target_of(self.pools, pool)
        return plan_remote(local, copy.speed, remote, link, sent, link_measured=measured)

    def run(
        self,
        volume: str,
        pool: str,
        plan: RemotePlan,
        progress: ProgressReporter,
    ) -> dict[str, Any]:
        """Send what ``plan`` says; record it once the target committed it.

        :raises WireError: the link broke (nothing recorded; the next run resumes).
        """
        target = plan.objectives.target
        # "to_target": a job result's "target" is the device a restore wrote.
        result: dict[str, Any] = {"to_target": target, "plan": remote_plan_dict(plan)}
        if plan.decision is None or plan.changes is None:
            result.update(method="", up_to_date=True)
            return result
        source = plan.changes.source
        method = plan.decision.method
        local = self.pools.backend(pool)
        chain = local.chain(volume, source.generation_id)
        sent = sent_generations(self.catalog, target, volume)
        started = time.monotonic()
        try:
            with self.targets.remote_pool(target) as remote:
                committed = self._committed_there(remote, volume, source.generation_id)
                if committed is not None:
                    # A cut after the target's commit and before its answer: record it.
                    self.catalog.record_remote_generation(
                        _row(target, committed, self.catalog.now(), None)
                    )
                    result.update(
                        method=committed.kind.value,
                        generation=public_id(volume, committed.generation_id),
                        recovered=True,
                    )
                    self._mark(target, "ok")
                    return result
                base_id = parent_id = clone_from = None
                if method is GenerationKind.FULL and plan.changes.differential is not None:
                    # The target has a full the local chain still lines up with: the new
                    # full is synthesized there from it and what changed since.
                    clone_from = next(
                        g for g in reversed(sent) if g.kind is GenerationKind.FULL
                    ).generation_id
                elif method is GenerationKind.INCREMENTAL:
                    parent_id = sent[-1].generation_id
                elif method is GenerationKind.DIFFERENTIAL:
                    base_id = next(
                        g for g in reversed(sent) if g.kind is GenerationKind.FULL
                    ).generation_id
                if method is GenerationKind.FULL:
                    chunks = plan.changes.differential if clone_from else None
                else:
                    chunks = plan.changes.chunks(method)
                spec = transfer_spec(
                    remote,
                    source,
                    method,
                    chunks,
                    base_id=base_id,
                    parent_id=parent_id,
                    clone_from=clone_from,
                )
                # The copy has the local generation's id: a transfer cut earlier with the
                # same plan is continued, not begun again.
                remote.expect_resume(spec, source.generation_id)
                done = transfer_generation(
                    local,
                    chain,
                    remote,
                    spec,
                    progress=JobProgress(progress),
                    keep=plan.objectives.generations,
                )
                seconds = time.monotonic() - started
                writer = remote.last_writer
                self.catalog.record_remote_generation(
                    _row(target, done.manifest, self.catalog.now(), seconds)
                )
                freed = [] if done.retention is None else done.retention.freed_ids
                for gid in freed:
                    # Retention there may free a generation this catalog never recorded
                    # (committed just before an earlier cut): nothing to forget here.
                    with contextlib.suppress(NotFound):
                        self.catalog.remove_remote_generation(target, volume, gid)
                collected = self._collect(remote)
        except PoolSpaceLow as exc:
            # The target's area is full: nothing is committed there or here (the writer
            # removed its open generation, which could not be resumed without room
            # anyway); the link worked, so no back-off.
            self._mark(target, "ok")
            if self.on_target_full is not None:
                self.on_target_full(target, exc)
            raise
        except WireError as exc:
            self._mark(target, "unreachable", str(exc))
            if self.backoff is not None:
                retry = self.backoff.failed(target, time.time(), str(exc), cap=_retry_cap(plan))
                log.warning(
                    "target %s: %d failure(s) in a row; scheduled transfers wait %.0fs",
                    target,
                    retry.failures,
                    retry.retry_at - retry.last_failure,
                )
            raise
        self._mark(target, "ok")
        sent_bytes = writer.sent_bytes if writer is not None else 0
        # Only a transfer that sent every pack it made says how fast the link is: a
        # resumed one sealed packs it did not send, a synthesized full read the previous
        # full's checksums, and both would count that time as the link's.
        plain = writer is not None and writer.skipped == 0 and writer.cloned_from is None
        try:
            if plain:
                observe_link(self.catalog, target, sent_bytes, done.duration, self.default_speed)
        except EnvironmentProblem as exc:  # the generation is committed and recorded
            log.error("cannot update the link row of target %s: %s", target, exc)
        result.update(
            method=method.value,
            generation=public_id(volume, source.generation_id),
            bytes=done.bytes_copied,
            seconds=seconds,
            # What crossed the link (sealed: compressed and encrypted) and in how many
            # packs; ``packs_resumed``: packs a cut transfer had stored, not sent again.
            bytes_sent=sent_bytes,
            send_seconds=done.duration,
            packs_sent=writer.puts if writer is not None else 0,
            packs_resumed=writer.skipped if writer is not None else 0,
            freed=[public_id(volume, g) for g in freed],
            warnings=list(done.warnings),
        )
        if isinstance(writer, S3GenerationWriter):
            # Dedup made visible: what this host found in the store already, and all it
            # PUT (packs and the manifest; a pack's index object is a few hundred bytes).
            result.update(
                chunks_reused=writer.reused,
                manifest_bytes=writer.manifest_bytes,
                bytes_uploaded=sent_bytes + writer.manifest_bytes,
            )
        if collected is not None:
            result.update(collected)
        return result

    def _collect(self, remote: RemotePool | S3Pool) -> dict[str, Any] | None:
        """A garbage-collection sweep of an object-store target after a commit, when one
        is due (its packs no generation references go after the grace period;
        docs/design/s3.md). A failed sweep fails nothing: the generation is committed
        and recorded, a later transfer sweeps again."""
        if not isinstance(remote, S3Pool):
            return None
        try:
            wait = sweep_due(remote, self.gc_interval)
            if wait > 0:
                return {"gc_due_in": round(wait)}
            swept = self._sweep(remote)
        except BlockguardError as exc:
            log.error("target %s: garbage collection failed: %s", remote.store.target, exc)
            return {"gc_error": str(exc)}
        return _gc_fields(swept)

    def _sweep(self, remote: S3Pool) -> SweepResult:
        return sweep(remote, timedelta(seconds=self.gc_grace), lease_timeout=self.lease_timeout)

    def collect(self, target: str) -> dict[str, Any]:
        """One garbage-collection sweep of object-store target ``target`` now, due or not
        (``target gc``).

        :raises InvalidInput: not an object-store target.
        :raises CorruptMetadata: a manifest does not open (nothing deleted or marked).
        """
        with self.targets.remote_pool(target) as remote:
            if not isinstance(remote, S3Pool):
                raise InvalidInput(
                    detail=f"target {target} is not an object store: its pool collects "
                    "its own garbage"
                )
            return _gc_fields(self._sweep(remote))

    def import_target(self, target: str) -> dict[str, Any]:
        """What ``target`` holds of this host (its master key), recorded in the catalog:
        ``target import`` on a new host, after ``target add --key``. The volume names come
        from the sealed manifests (the target knows only their HMAC ids).

        :returns: ``generations`` (volume, generation, kind, created, bytes) and
            ``damaged`` (volume, generation, reason) as the target lists them.
        """
        with self.targets.remote_pool(target) as remote:
            scan = remote.scan()
        now = self.catalog.now()
        rows = [_row(target, m, now, None) for m in scan.manifests]
        self.catalog.replace_remote_generations(target, rows)
        self._mark(target, "ok")
        return {
            "target": target,
            "generations": [
                {
                    "volume": m.volume.name,
                    "generation": public_id(m.volume.name, m.generation_id),
                    "kind": m.kind.value,
                    "created": m.created,
                    "bytes": m.bytes_stored,
                    "volume_size": m.volume.size,
                }
                for m in scan.manifests
            ],
            "damaged": [
                {"volume": d.volume, "generation": d.generation_id, "reason": d.reason}
                for d in scan.damaged
            ],
        }

    @staticmethod
    def _committed_there(
        remote: RemotePool | S3Pool, volume: str, generation_id: str
    ) -> Manifest | None:
        for manifest in remote.generations(volume):
            if manifest.generation_id == generation_id:
                return manifest
        return None

    def _mark(self, target: str, state: str, reason: str = "") -> None:
        if state == "ok" and self.backoff is not None:
            self.backoff.succeeded(target)
        try:
            if self.catalog.get_target(target).state != state:
                self.catalog.set_target_state(target, state, reason)
        except EnvironmentProblem as exc:  # a catalog problem must not hide the job's own
            log.error("cannot mark target %s %s: %s", target, state, exc)
