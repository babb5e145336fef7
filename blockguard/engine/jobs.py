"""Long operations as Job objects (the lvmdbusd pattern).

A backup, restore or verify returns at once with a :class:`Job`; the work runs in a thread
of a :class:`JobRunner` so the daemon's asyncio loop is never blocked. The work function
reports progress through a :class:`ProgressReporter`; every change of a job is pushed to
its subscribers (the D-Bus layer turns these into ``PropertiesChanged`` signals).
Subscribers are called in the worker thread: they must hand the change over to their own
thread themselves (``loop.call_soon_threadsafe``).
"""

from __future__ import annotations

import enum
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from blockguard.errors import BlockguardError, InternalError, InvalidInput, JobCancelled

log = logging.getLogger(__name__)


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class JobKind(enum.StrEnum):
    BACKUP = "backup"
    RESTORE = "restore"
    VERIFY = "verify"
    DRILL = "drill"
    TARGET = "target"
    TRANSFER = "transfer"


#: What a job cancelled midway leaves behind, by kind (the end of its error message).
_CANCEL_CONSEQUENCE = {
    JobKind.BACKUP: ": nothing was committed, the next backup starts over",
    JobKind.RESTORE: ": the target holds a partial restore, do not use it",
    JobKind.VERIFY: ": the generation was not verified",
    JobKind.DRILL: ": the drill left no samples",
    JobKind.TARGET: ": the target was not registered",
    JobKind.TRANSFER: ": nothing was committed on the target, the next transfer resumes",
}


#: The attributes of a job that subscribers are told about (names as in :meth:`Job.snapshot`).
JOB_FIELDS = (
    "state",
    "progress",
    "bytes_done",
    "bytes_total",
    "rate",
    "eta",
    "error",
    "result",
    "started",
    "finished",
)


@dataclass(frozen=True)
class JobSnapshot:
    """A consistent copy of a job's state at one moment."""

    id: int
    kind: JobKind
    target: str
    state: JobState
    progress: float
    bytes_done: int
    bytes_total: int
    rate: float
    eta: float
    error: tuple[str, str]
    result: dict[str, Any]
    created: float
    started: float
    finished: float


JobListener = Callable[["Job", dict[str, Any]], None]


class Job:
    """One long operation.

    :param job_id: the daemon-wide number of the job (its D-Bus path ends with it).
    :param kind: what the job does.
    :param target: what it works on (a volume name or a generation id).

    ``rate`` is bytes per second (0 while unknown); ``eta`` is the estimated number of
    seconds left (-1 while unknown); ``error`` is ``(dbus_error_name, message)`` or
    ``("", "")``; ``result`` is a small JSON-like mapping set when the job is done.
    """

    def __init__(self, job_id: int, kind: JobKind, target: str) -> None:
        self.id = job_id
        self.kind = JobKind(kind)
        self.target = target
        self._lock = threading.Lock()
        self._listeners: list[JobListener] = []
        self._done = threading.Event()
        self.state = JobState.QUEUED
        self.progress = 0.0
        self.bytes_done = 0
        self.bytes_total = 0
        self.rate = 0.0
        self.eta = -1.0
        self.error: tuple[str, str] = ("", "")
        self.result: dict[str, Any] = {}
        self.created = time.time()
        self.started = 0.0
        self.finished = 0.0
        #: Set by :meth:`cancel`; the work stops at its next progress report.
        self.cancel_requested = threading.Event()

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.kind.value} {self.target} {self.state.value}>"

    def subscribe(self, listener: JobListener) -> None:
        """Call ``listener(job, changed)`` after every change; ``changed`` maps field -> value."""
        with self._lock:
            self._listeners.append(listener)

    def snapshot(self) -> JobSnapshot:
        with self._lock:
            return JobSnapshot(
                id=self.id,
                kind=self.kind,
                target=self.target,
                state=self.state,
                progress=self.progress,
                bytes_done=self.bytes_done,
                bytes_total=self.bytes_total,
                rate=self.rate,
                eta=self.eta,
                error=self.error,
                result=dict(self.result),
                created=self.created,
                started=self.started,
                finished=self.finished,
            )

    @property
    def is_finished(self) -> bool:
        return self.state in (JobState.DONE, JobState.FAILED)

    def cancel(self) -> None:
        """Ask the work to stop: it fails with :class:`JobCancelled` at its next progress
        report (a queued job does not start).

        :raises InvalidInput: the job already ended.
        """
        if self.is_finished:
            raise InvalidInput(detail=f"job {self.id} already ended ({self.state.value})")
        self.cancel_requested.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job has finished; True if it has (for tests and the service)."""
        return self._done.wait(timeout)

    def update(self, **changes: Any) -> None:
        """Set fields and tell the subscribers what really changed."""
        unknown = set(changes) - set(JOB_FIELDS)
        if unknown:
            raise AttributeError(f"jobs have no fields {sorted(unknown)}")
        with self._lock:
            changed = {k: v for k, v in changes.items() if getattr(self, k) != v}
            for key, value in changed.items():
                setattr(self, key, value)
            listeners = list(self._listeners)
            if self.state in (JobState.DONE, JobState.FAILED):
                self._done.set()
        if not changed:
            return
        for listener in listeners:
            try:
                listener(self, changed)
            except Exception:
                log.exception("job listener failed for job %s", self.id, extra={"JOB": self.id})


class ProgressReporter:
    """What a work function uses to report progress; computes rate and ETA.

    :param job: the job to update.
    :param min_interval: at most one update per this many seconds (the last one always goes
        through), so a tight copy loop does not flood the bus with signals.
    """

    def __init__(self, job: Job, min_interval: float = 0.1) -> None:
        self.job = job
        self.min_interval = min_interval
        self._last = 0.0

    def __call__(self, bytes_done: int, bytes_total: int | None = None) -> None:
        """Report ``bytes_done`` of ``bytes_total`` (or of the total given earlier).

        :raises JobCancelled: the job was cancelled (the work unwinds from here).
        """
        if self.job.cancel_requested.is_set():
            raise JobCancelled(job=self.job.id, consequence=_CANCEL_CONSEQUENCE[self.job.kind])
        now = time.monotonic()
        total = bytes_total if bytes_total is not None else self.job.bytes_total
        final = total > 0 and bytes_done >= total
        if not final and now - self._last < self.min_interval:
            return
        self._last = now
        elapsed = max(time.time() - self.job.started, 1e-6)
        rate = bytes_done / elapsed if bytes_done else 0.0
        progress = min(bytes_done / total, 1.0) if total > 0 else 0.0
        eta = (total - bytes_done) / rate if rate > 0 and total > 0 else -1.0
        self.job.update(
            bytes_done=int(bytes_done),
            bytes_total=int(total),
            progress=progress,
            rate=rate,
            eta=max(eta, 0.0) if eta >= 0 else -1.0,
        )


#: A work function: gets a progress reporter, returns the job's result mapping.
WorkFunction = Callable[[ProgressReporter], dict[str, Any] | None]


#: The attribute of an exception that carries a failure report (see attach_failure_report).
_REPORT_ATTR = "blockguard_failure_report"


def attach_failure_report(exc: BaseException, report: str) -> None:
    """Let ``exc`` carry ``report`` (the flight recorder's last calls) to the failed job.

    The job's ``Result`` then has it as ``failure_report``, next to the error.
    """
    setattr(exc, _REPORT_ATTR, report)


def _failure_result(exc: BaseException) -> dict[str, Any]:
    report = getattr(exc, _REPORT_ATTR, None)
    return {"failure_report": report} if isinstance(report, str) and report else {}


class JobRunner:
    """Runs jobs in a small thread pool and keeps the recent ones for listing.

    :param workers: how many jobs may run at once.
    :param keep: how many finished jobs are remembered (older ones are forgotten).
    """

    def __init__(self, workers: int = 2, keep: int = 100) -> None:
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="job")
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._jobs: dict[int, Job] = {}
        self.keep = keep
        self._on_new: list[Callable[[Job], None]] = []
        self._on_forget: list[Callable[[Job], None]] = []

    def continue_after(self, last_id: int) -> None:
        """Number the next job ``last_id + 1`` (a restarted daemon goes on counting, so a
        job id seen before a restart never names another job after it)."""
        with self._lock:
            self._ids = itertools.count(max(last_id, max(self._jobs, default=0)) + 1)

    def on_new_job(self, callback: Callable[[Job], None]) -> None:
        """Call ``callback(job)`` (in the submitting thread) for every new job."""
        self._on_new.append(callback)

    def on_forget_job(self, callback: Callable[[Job], None]) -> None:
        """Call ``callback(job)`` when a finished job is dropped from the list."""
        self._on_forget.append(callback)

    def submit(
        self,
        kind: JobKind,
        target: str,
        work: WorkFunction,
        on_finish: Callable[[Job], None] | None = None,
        *,
        settle: Callable[[Job, dict[str, Any]], None] | None = None,
    ) -> Job:
        """Create a job for ``work`` and queue it.

        :param kind: what the job does.
        :param target: the volume or generation it works on.
        :param work: the function that does it, called in a worker thread.
        :param on_finish: called in the worker thread once the job is done or failed.
        :param settle: called in the worker thread with the job's final fields (state,
            result, error, finished) *before* clients can see them.
        """
        job = Job(next(self._ids), kind, target)
        with self._lock:
            self._jobs[job.id] = job
        for callback in self._on_new:
            callback(job)
        self._executor.submit(self._run, job, work, on_finish, settle)
        self._forget_old()
        return job

    def _run(
        self,
        job: Job,
        work: WorkFunction,
        on_finish: Callable[[Job], None] | None,
        settle: Callable[[Job, dict[str, Any]], None] | None = None,
    ) -> None:
        job.update(state=JobState.RUNNING, started=time.time())
        extra = {"JOB": job.id}
        log.info("job %s started: %s %s", job.id, job.kind.value, job.target, extra=extra)
        final: dict[str, Any]
        try:
            if job.cancel_requested.is_set():
                raise JobCancelled(job=job.id, consequence=" before it started")
            result = work(ProgressReporter(job)) or {}
        except BlockguardError as exc:
            log.warning("job %s failed: %s", job.id, exc, extra=extra)
            final = {
                "error": (exc.dbus_name, exc.message),
                "result": _failure_result(exc),
                "state": JobState.FAILED,
            }
        except Exception as exc:
            # The traceback goes to the log only; clients see a plain internal error.
            log.exception("job %s failed unexpectedly", job.id, extra=extra)
            internal = InternalError(detail=f"{type(exc).__name__} in job {job.id}")
            final = {
                "error": (internal.dbus_name, internal.message),
                "result": _failure_result(exc),
                "state": JobState.FAILED,
            }
        else:
            final = {"result": dict(result), "progress": 1.0, "eta": 0.0, "state": JobState.DONE}
        final["finished"] = time.time()
        # What must hold once clients see the job finished (its record, its volume
        # released) is settled before the state is published: a client that waited for
        # "done" and asks at once finds the volume free.
        if settle is not None:
            try:
                settle(job, final)
            except Exception:
                log.exception("settling job %s failed", job.id, extra=extra)
        job.update(**final)
        if final["state"] is JobState.DONE:
            log.info("job %s done", job.id, extra=extra)
        if on_finish is not None:
            try:
                on_finish(job)
            except Exception:
                log.exception("finish hook of job %s failed", job.id, extra=extra)

    def _forget_old(self) -> None:
        with self._lock:
            finished = [j for j in self._jobs.values() if j.is_finished]
            drop = finished[: max(0, len(finished) - self.keep)]
            for job in drop:
                del self._jobs[job.id]
        for job in drop:
            for callback in self._on_forget:
                callback(job)

    def get(self, job_id: int) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def list(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def shutdown(self, wait: bool = False) -> None:
        """Stop taking jobs; running ones finish (or die with the process if not waited for)."""
        self._executor.shutdown(wait=wait, cancel_futures=True)
