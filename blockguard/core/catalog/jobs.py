"""Jobs with their history of state changes, and the measured restores.

(One thing at ~440 lines: the catalog's history: jobs, their states, restores, path samples.)
"""

from __future__ import annotations

import sqlite3
from typing import Any

from blockguard.core.catalog._db import CatalogBase
from blockguard.core.catalog.rows import (
    JOB_FINAL_STATES,
    JOB_KINDS,
    JOB_STATES,
    PATH_SAMPLE_SOURCES,
    Job,
    JobEvent,
    PathSampleRecord,
    RestoreRecord,
    check_count,
    check_number,
    check_text,
    check_uuid,
    decode_json,
    encode_json,
    new_id,
)
from blockguard.core.vocab import GENERATION_KINDS, check_choice
from blockguard.errors import AlreadyExists, InvalidInput, NotFound


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        kind=row["kind"],
        volume=row["volume"],
        pool=row["pool"],
        generation=row["generation"],
        state=row["state"],
        progress=row["progress"],
        bytes_done=row["bytes_done"],
        bytes_total=row["bytes_total"],
        created=row["created"],
        started=row["started"],
        finished=row["finished"],
        error=row["error"],
        result=decode_json(f"result of job {row['id']}", row["result"]),
    )


def _restore(row: sqlite3.Row) -> RestoreRecord:
    return RestoreRecord(
        seq=row["seq"],
        volume=row["volume"],
        generation=row["generation"],
        method=row["method"],
        mode=row["mode"],
        bytes_restored=row["bytes_restored"],
        predicted_seconds=row["predicted_seconds"],
        measured_seconds=row["measured_seconds"],
        at=row["at"],
        job=row["job"],
    )


def _sample(row: sqlite3.Row) -> PathSampleRecord:
    return PathSampleRecord(
        seq=row["seq"],
        volume=row["volume"],
        pool_device=row["pool_device"],
        mode=row["mode"],
        source=row["source"],
        generations=row["generations"],
        chunks=row["chunks"],
        extents=row["extents"],
        bytes=row["bytes"],
        predicted_seconds=row["predicted_seconds"],
        measured_seconds=row["measured_seconds"],
        at=row["at"],
        write_rate=row["write_rate"],
    )


class JobStore(CatalogBase):
    """Jobs, job history and measured restores (mixed into the Catalog)."""

    # --- jobs ------------------------------------------------------------------------

    def create_job(
        self,
        kind: str,
        *,
        volume: str | None = None,
        pool: str | None = None,
        generation: str | None = None,
        id: str | None = None,
        bytes_total: int | None = None,
    ) -> Job:
        """Record a queued job.

        Volumes and pools are not checked against their tables: job history must outlive
        them, and a probe job may run before its pool is recorded.

        :raises AlreadyExists: a job with that id exists
        """
        check_choice("job kind", kind, JOB_KINDS)
        jid = new_id() if id is None else check_uuid("job", id)
        for what, name in (("volume", volume), ("pool", pool)):
            if name is not None:
                check_text(f"{what} name", name)
        if generation is not None:
            generation = check_uuid("generation", generation)
        check_count(f"total bytes of job {jid}", bytes_total, optional=True)
        if kind in ("backup", "restore", "verify") and volume is None:
            raise InvalidInput(detail=f"a {kind} job needs a volume")
        with self.transaction() as conn:
            if conn.execute("SELECT 1 FROM jobs WHERE id = ?", (jid,)).fetchone():
                raise AlreadyExists(what="job", name=jid)
            now = self.now()
            conn.execute(
                """INSERT INTO jobs (id, kind, volume, pool, generation, state, bytes_total,
                       created) VALUES (?, ?, ?, ?, ?, 'queued', ?, ?)""",
                (jid, kind, volume, pool, generation, bytes_total, now),
            )
            self._event(conn, jid, "queued", "", now)
            return self._get_job(conn, jid)

    def get_job(self, id: str) -> Job:
        """:raises NotFound: no such job"""
        with self._reading() as conn:
            return self._get_job(conn, id)

    def list_jobs(
        self,
        *,
        volume: str | None = None,
        states: tuple[str, ...] | None = None,
        limit: int | None = None,
        kind: str | None = None,
    ) -> list[Job]:
        """Jobs, newest first, optionally of one volume, in some states, of one kind, at
        most ``limit``."""
        query, args = "SELECT * FROM jobs WHERE 1", []
        if volume is not None:
            query += " AND volume = ?"
            args.append(volume)
        if kind is not None:
            check_choice("job kind", kind, JOB_KINDS)
            query += " AND kind = ?"
            args.append(kind)
        if states is not None:
            for state in states:
                check_choice("job state", state, JOB_STATES)
            query += f" AND state IN ({', '.join('?' for _ in states)})"
            args.extend(states)
        query += " ORDER BY created DESC, rowid DESC"
        if limit is not None:
            check_count("job limit", limit)
            query += " LIMIT ?"
            args.append(limit)
        with self._reading() as conn:
            return [_job(r) for r in conn.execute(query, args)]

    def update_job(
        self,
        id: str,
        *,
        state: str | None = None,
        progress: float | None = None,
        bytes_done: int | None = None,
        bytes_total: int | None = None,
        generation: str | None = None,
        message: str = "",
    ) -> Job:
        """Start a job (``state="running"``) or report its progress.

        Ending a job is :meth:`finish_job`'s. A state change is kept in the job's history
        with ``message``; progress is not (it changes too often to be history).

        :raises NotFound: no such job
        :raises InvalidInput: the job has finished, or the change is not allowed
        """
        if state is not None and state not in ("queued", "running"):
            check_choice("job state", state, JOB_STATES)
            raise InvalidInput(detail=f"job state {state!r} is set by finish_job, not update_job")
        if progress is not None:
            check_number(f"progress of job {id}", progress)
            if progress > 1:
                raise InvalidInput(detail=f"progress of job {id} {progress!r} is above 1")
        check_count(f"bytes done of job {id}", bytes_done, optional=True)
        check_count(f"total bytes of job {id}", bytes_total, optional=True)
        if generation is not None:
            generation = check_uuid("generation", generation)
        with self.transaction() as conn:
            job = self._get_job(conn, id)
            if job.finished_state:
                raise InvalidInput(detail=f"job {id} has already ended ({job.state})")
            now = self.now()
            if state is not None and state != job.state:
                if state == "queued":
                    raise InvalidInput(detail=f"job {id} is running and cannot be queued again")
                conn.execute(
                    "UPDATE jobs SET state = 'running', started = ? WHERE id = ?", (now, job.id)
                )
                self._event(conn, job.id, state, message, now)
            conn.execute(
                """UPDATE jobs SET progress = coalesce(?, progress),
                       bytes_done = coalesce(?, bytes_done),
                       bytes_total = coalesce(?, bytes_total),
                       generation = coalesce(?, generation) WHERE id = ?""",
                (progress, bytes_done, bytes_total, generation, job.id),
            )
            return self._get_job(conn, job.id)

    def finish_job(
        self,
        id: str,
        state: str = "done",
        *,
        error: str | None = None,
        result: dict[str, Any] | None = None,
    ) -> Job:
        """End a job as done, failed (``error`` says why) or cancelled.

        :param result: what the job produced, e.g. the generation and what retention freed
        :raises NotFound: no such job
        :raises InvalidInput: it has ended already, or a failure has no error text
        """
        check_choice("final job state", state, JOB_FINAL_STATES)
        if state == "failed" and not (isinstance(error, str) and error.strip()):
            raise InvalidInput(detail=f"failed job {id} needs an error text")
        if error is not None and not isinstance(error, str):
            raise InvalidInput(detail=f"error of job {id} must be text, not {error!r}")
        result_json = encode_json(f"result of job {id}", result, optional=True)
        with self.transaction() as conn:
            job = self._get_job(conn, id)
            if job.finished_state:
                raise InvalidInput(detail=f"job {id} has already ended ({job.state})")
            now = self.now()
            progress = ", progress = 1" if state == "done" else ""
            conn.execute(
                f"""UPDATE jobs SET state = ?, finished = ?, error = ?, result = ?{progress}
                    WHERE id = ?""",
                (state, now, error, result_json, job.id),
            )
            self._event(conn, job.id, state, error or "", now)
            return self._get_job(conn, job.id)

    def job_history(self, id: str) -> list[JobEvent]:
        """A job's state changes, oldest first.

        :raises NotFound: no such job
        """
        with self._reading() as conn:
            self._get_job(conn, id)
            rows = conn.execute(
                "SELECT * FROM job_events WHERE job = ? ORDER BY seq", (id,)
            ).fetchall()
        return [JobEvent(r["seq"], r["job"], r["at"], r["state"], r["message"]) for r in rows]

    def mark_running_jobs_failed(self, reason: str) -> list[Job]:
        """At daemon start: fail every job a previous daemon left queued or running.

        Queued jobs are included because the queue lived in the dead daemon's memory.

        :returns: the jobs now failed
        """
        if not isinstance(reason, str) or not reason.strip():
            raise InvalidInput(detail="a reason is needed to fail the interrupted jobs")
        with self.transaction() as conn:
            ids = [
                r[0]
                for r in conn.execute(
                    "SELECT id FROM jobs WHERE state IN ('queued', 'running') ORDER BY created"
                )
            ]
            for jid in ids:
                self.finish_job(jid, "failed", error=reason)
            return [self._get_job(conn, jid) for jid in ids]

    def prune_jobs(self, keep: int) -> int:
        """Forget all but the ``keep`` newest ended jobs (and their history).

        :returns: how many were forgotten
        """
        check_count("number of jobs to keep", keep)
        with self.transaction() as conn:
            cur = conn.execute(
                """DELETE FROM jobs WHERE id IN (
                       SELECT id FROM jobs WHERE state IN ('done', 'failed', 'cancelled')
                       ORDER BY created DESC, rowid DESC LIMIT -1 OFFSET ?)""",
                (keep,),
            )
            return cur.rowcount

    # --- measured restores -----------------------------------------------------------

    def record_restore(
        self,
        volume: str,
        generation: str,
        *,
        method: str,
        mode: str,
        bytes_restored: int,
        measured_seconds: float,
        predicted_seconds: float | None = None,
        job: str | None = None,
        at: float | None = None,
    ) -> RestoreRecord:
        """Keep a real restore's measurements for the restore-time model.

        :param method: the kind of the restored generation (full, differential,
            incremental), i.e. which chain was read
        :param mode: the restore mode (swap-in, copy to a new device, in place)
        """
        check_text("volume name", volume)
        generation = check_uuid("generation", generation)
        check_choice("restore method", method, GENERATION_KINDS)
        check_text("restore mode", mode)
        check_count("bytes restored", bytes_restored)
        check_number("measured restore seconds", measured_seconds)
        check_number("predicted restore seconds", predicted_seconds, optional=True)
        if job is not None:
            job = check_uuid("job", job)
        at = self.now() if at is None else check_number("restore time", at)
        with self.transaction() as conn:
            cur = conn.execute(
                """INSERT INTO restores (volume, generation, method, mode, bytes_restored,
                       predicted_seconds, measured_seconds, at, job)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    volume,
                    generation,
                    method,
                    mode,
                    bytes_restored,
                    predicted_seconds,
                    measured_seconds,
                    at,
                    job,
                ),
            )
            row = conn.execute("SELECT * FROM restores WHERE seq = ?", (cur.lastrowid,)).fetchone()
            return _restore(row)

    def recent_restores(self, volume: str | None = None, n: int = 10) -> list[RestoreRecord]:
        """The ``n`` newest measured restores, of one volume or of all; newest first."""
        check_count("number of restores", n)
        query, args = "SELECT * FROM restores", []
        if volume is not None:
            query += " WHERE volume = ?"
            args.append(volume)
        with self._reading() as conn:
            rows = conn.execute(query + " ORDER BY at DESC, seq DESC LIMIT ?", [*args, n])
            return [_restore(r) for r in rows]

    # --- restore path samples ------------------------------------------------------------

    def record_path_sample(
        self,
        *,
        volume: str,
        pool_device: str,
        mode: str,
        source: str,
        generations: int,
        chunks: int,
        extents: int,
        nbytes: int,
        measured_seconds: float,
        predicted_seconds: float | None = None,
        at: float | None = None,
        write_rate: float = 0.0,
    ) -> PathSampleRecord:
        """Keep one measured restore (or drill restore) with its shape.

        :param volume: the volume restored, ``""`` for a pool-level drill.
        :param pool_device: the pool device holding the chain's full.
        :param mode: the restore mode the sample measures (``copy``, ``swap-in``).
        :param source: ``restore`` or ``drill``.
        :param write_rate: see :class:`~.rows.PathSampleRecord`.
        """
        if volume != "":
            check_text("volume name", volume)
        check_text("pool device", pool_device)
        check_text("restore mode", mode)
        check_choice("sample source", source, PATH_SAMPLE_SOURCES)
        check_count("generations read", generations)
        check_count("chunks written", chunks)
        check_count("extents written", extents)
        check_count("bytes restored", nbytes)
        check_number("measured restore seconds", measured_seconds)
        check_number("predicted restore seconds", predicted_seconds, optional=True)
        check_number("target write rate", write_rate)
        at = self.now() if at is None else check_number("sample time", at)
        with self.transaction() as conn:
            cur = conn.execute(
                """INSERT INTO path_samples (volume, pool_device, mode, source, generations,
                       chunks, extents, bytes, predicted_seconds, measured_seconds, at,
                       write_rate)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    volume,
                    pool_device,
                    mode,
                    source,
                    generations,
                    chunks,
                    extents,
                    nbytes,
                    predicted_seconds,
                    measured_seconds,
                    at,
                    write_rate,
                ),
            )
            row = conn.execute(
                "SELECT * FROM path_samples WHERE seq = ?", (cur.lastrowid,)
            ).fetchone()
            return _sample(row)

    def path_samples(
        self, pool_device: str | None = None, mode: str | None = None, n: int = 40
    ) -> list[PathSampleRecord]:
        """The ``n`` newest samples (of one pool device and/or mode); newest first."""
        check_count("number of samples", n)
        query, where, args = "SELECT * FROM path_samples", [], []
        if pool_device is not None:
            where.append("pool_device = ?")
            args.append(pool_device)
        if mode is not None:
            where.append("mode = ?")
            args.append(mode)
        if where:
            query += " WHERE " + " AND ".join(where)
        with self._reading() as conn:
            rows = conn.execute(query + " ORDER BY at DESC, seq DESC LIMIT ?", [*args, n])
            return [_sample(r) for r in rows]

    # --- helpers ---------------------------------------------------------------------

    @staticmethod
    def _get_job(conn: sqlite3.Connection, jid: str) -> Job:
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (jid,)).fetchone()
        if row is None:
            raise NotFound(what="job", name=jid)
        return _job(row)

    @staticmethod
    def _event(conn: sqlite3.Connection, jid: str, state: str, message: str, at: float) -> None:
        conn.execute(
            "INSERT INTO job_events (job, at, state, message) VALUES (?, ?, ?, ?)",
            (jid, at, state, message),
        )
