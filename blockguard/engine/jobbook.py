"""Jobs of the real service: one at a time per volume, each mirrored in the catalog.

The :class:`~blockguard.engine.jobs.JobRunner` runs the work and keeps the jobs of this
daemon's life; the catalog keeps every job's history across restarts. Jobs a previous
daemon left running are failed at start ("daemon restarted") and listed again with ids
from :data:`HISTORY_IDS`. This life's jobs are numbered on from the last id of the one
before (kept in a small file of the state directory, :meth:`JobBook.keep_ids_in`).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from blockguard.core.catalog import Catalog
from blockguard.engine import service as svc
from blockguard.engine.events import EventHub
from blockguard.engine.jobs import (
    Job,
    JobKind,
    JobRunner,
    JobState,
    ProgressReporter,
    attach_failure_report,
)
from blockguard.errors import BlockguardError, Busy
from blockguard.storage.copyengine import Progress
from blockguard.storage.runner import Runner

log = logging.getLogger(__name__)

#: Jobs of earlier daemon lives get ids from here on (far above this life's numbers).
HISTORY_IDS = 1 << 31
#: Seconds between two progress writes of one job to the catalog.
PROGRESS_INTERVAL = 2.0
RESTART_REASON = "daemon restarted while the job was running"
#: How many of the flight recorder's newest calls a failed job reports.
FAILURE_REPORT_CALLS = 20


class JobBook:
    """See the module docstring.

    :param catalog: the job history.
    :param runner: runs the work.
    :param events: where JobAdded goes.
    :param recorder: the command runner whose flight recorder a failed job reports.
    """

    def __init__(
        self,
        catalog: Catalog,
        runner: JobRunner,
        events: EventHub,
        recorder: Runner | None = None,
    ) -> None:
        self.catalog = catalog
        self.runner = runner
        self.events = events
        self.recorder = recorder
        self._lock = threading.Lock()
        self._busy: dict[str, int] = {}
        self.history: list[Job] = []

    def keep_ids_in(self, path: Path) -> None:
        """Number jobs on from the last id recorded in ``path``, and record each new one."""
        try:
            last = int(path.read_text().strip() or 0)
        except FileNotFoundError:
            last = 0
        except (OSError, ValueError) as exc:
            log.error("cannot read the last job id from %s (%s): numbering from 1", path, exc)
            last = 0
        self.runner.continue_after(last)
        lock = threading.Lock()

        def record(job: Job) -> None:
            if job.id >= HISTORY_IDS:
                return
            with lock:
                tmp = path.with_name(path.name + ".tmp")
                try:
                    tmp.write_text(f"{job.id}\n")
                    os.replace(tmp, path)
                except OSError as exc:
                    log.error("cannot record job id %d in %s: %s", job.id, path, exc)

        self.runner.on_new_job(record)

    def fail_interrupted(self) -> list[Job]:
        """At start: fail what the previous daemon left running; keep them for listing."""
        failed = self.catalog.mark_running_jobs_failed(RESTART_REASON)
        for n, rec in enumerate(failed):
            if rec.kind not in {k.value for k in JobKind}:
                continue
            job = Job(HISTORY_IDS + n, JobKind(rec.kind), rec.volume or "")
            job.update(
                state=JobState.FAILED,
                error=("org.blockguard1.Error.Failed", f"{RESTART_REASON} (job {rec.id})"),
                started=rec.started or rec.created,
                finished=rec.finished or time.time(),
                bytes_done=rec.bytes_done,
                bytes_total=rec.bytes_total or 0,
                progress=rec.progress,
                result={"catalog_job": rec.id},
            )
            self.history.append(job)
            log.warning(
                "job %s (%s of %s) failed: %s", rec.id, rec.kind, rec.volume, RESTART_REASON
            )
        return self.history

    def busy_volumes(self) -> set[str]:
        with self._lock:
            return set(self._busy)

    def reserve(self, volume: str) -> None:
        """:raises Busy: a job of ``volume`` is queued or running."""
        with self._lock:
            if volume in self._busy:
                raise Busy(what=f"volume {volume}", reason=f"job {self._busy[volume]} is running")
            self._busy[volume] = 0

    def release(self, volume: str) -> None:
        with self._lock:
            self._busy.pop(volume, None)

    def submit(
        self,
        kind: JobKind,
        volume: str,
        target: str,
        work: Callable[[ProgressReporter, str], dict[str, Any]],
        on_finish: Callable[[Job], None] | None = None,
        *,
        pool: str | None = None,
        generation: str | None = None,
        reserved: bool = False,
    ) -> Job:
        """Run ``work(progress, catalog_job_id)`` as a job of ``volume``.

        :param reserved: the caller already holds the volume (:meth:`reserve`).
        :raises Busy: another job of the volume is queued or running.
        """
        if not reserved:
            self.reserve(volume)
        try:
            record = self.catalog.create_job(
                kind.value, volume=volume, pool=pool, generation=generation
            )
        except BaseException:
            self.release(volume)
            raise
        run = functools.partial(self._run_recorded, record.id, work)
        settle = functools.partial(self._settle, record.id, volume)
        job = self.runner.submit(kind, target, run, on_finish=on_finish, settle=settle)
        with self._lock:
            if volume in self._busy:
                self._busy[volume] = job.id
        self.events.emit(svc.JobAdded(job))
        return job

    def _run_recorded(
        self,
        record_id: str,
        work: Callable[[ProgressReporter, str], dict[str, Any]],
        progress: ProgressReporter,
    ) -> dict[str, Any]:
        """Run a job's work with its catalog record following its state and progress."""
        self.catalog.update_job(record_id, state="running")
        job = progress.job
        last = 0.0

        def follow(_job: Job, changed: dict[str, Any]) -> None:
            nonlocal last
            now = time.monotonic()
            if "bytes_done" in changed and now - last >= PROGRESS_INTERVAL:
                last = now
                snap = job.snapshot()
                try:
                    self.catalog.update_job(
                        record_id,
                        progress=min(snap.progress, 1.0),
                        bytes_done=snap.bytes_done,
                        bytes_total=snap.bytes_total,
                    )
                except BlockguardError as exc:
                    log.debug("progress of job %s not recorded: %s", record_id, exc)

        job.subscribe(follow)
        try:
            return work(progress, record_id)
        except Exception as exc:
            self._report_failure(job, exc)
            raise

    def _settle(self, record_id: str, volume: str, _job: Job, final: dict[str, Any]) -> None:
        """Before clients see the job finished: its record, then its volume released."""
        try:
            if final["state"] is JobState.DONE:
                self.catalog.finish_job(record_id, "done", result=_jsonable(final["result"]))
            else:
                self.catalog.finish_job(
                    record_id,
                    "failed",
                    error=final["error"][1] or "failed",
                    result=_jsonable(final.get("result")) or None,
                )
        except BlockguardError as exc:
            log.error("job %s not recorded as finished: %s", record_id, exc)
        finally:
            self.release(volume)

    def _report_failure(self, job: Job, exc: BaseException) -> None:
        """Attach the flight recorder's last calls to a failing job's error, and log them.

        The :class:`~blockguard.engine.jobs.JobRunner` puts the report in the job's
        ``Result`` (and so in the catalog); the journal gets it here, with the job's id.
        """
        if self.recorder is None:
            return
        report = self.recorder.failure_report(last=FAILURE_REPORT_CALLS)
        attach_failure_report(exc, report)
        log.warning("job %s failed: %s\n%s", job.id, exc, report, extra={"JOB": job.id})

    def list(self) -> list[Job]:
        return [*self.history, *self.runner.list()]

    def get(self, job_id: int) -> Job | None:
        for job in self.history:
            if job.id == job_id:
                return job
        return self.runner.get(job_id)


class JobProgress(Progress):
    """The copy engine's progress, forwarded to the job."""

    def __init__(self, report: ProgressReporter) -> None:
        super().__init__()
        self._report = report

    def start(self, total: int | None = None) -> None:
        super().start(total)
        self._report(self.bytes_done, self.total)

    def advance(self, nbytes: int) -> None:
        super().advance(nbytes)
        self._report(self.bytes_done, self.total)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)
