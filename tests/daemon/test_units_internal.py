"""Unit tests of the daemon's pieces that need no bus: jobs, error mapping, paths, logging."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import pytest
from dbus_fast import Variant
from dbus_fast.errors import DBusError

from blockguard.daemon.dbusutil import (
    Caller,
    as_dbus_error,
    escape_path_element,
    handler,
    to_variant,
    unescape_path_element,
)
from blockguard.daemon.logsetup import FieldsFormatter, setup_logging, under_systemd
from blockguard.daemon.main import make_service
from blockguard.engine.jobs import JobKind, JobRunner, JobState
from blockguard.errors import EnvironmentProblem, InvalidInput, NotAuthorized, NotFound
from tests.timeouts import scaled


def test_job_runs_in_a_thread_and_reports_changes() -> None:
    runner = JobRunner()
    changes: list[dict[str, Any]] = []
    threads: set[str] = set()
    gate = threading.Event()

    def work(progress: Any) -> dict[str, Any]:
        threads.add(threading.current_thread().name)
        gate.wait(scaled(60))
        for done in (25, 50, 100):
            progress(done, 100)
        return {"bytes": 100}

    job = runner.submit(JobKind.BACKUP, "db", work)
    job.subscribe(lambda _j, changed: changes.append(changed))
    gate.set()
    assert job.wait(scaled(60))
    runner.shutdown(wait=True)
    assert job.state is JobState.DONE and job.result == {"bytes": 100}
    assert threads and all(name.startswith("job") for name in threads)
    assert changes[-1]["state"] is JobState.DONE
    assert any(c.get("progress") == 1.0 for c in changes)
    assert job.bytes_done == 100 and job.eta == 0.0


def test_job_errors_are_named_and_plain() -> None:
    runner = JobRunner()

    def missing(_p: Any) -> None:
        raise NotFound(what="volume", name="x")

    def crash(_p: Any) -> None:
        raise KeyError("secret internals")

    a = runner.submit(JobKind.VERIFY, "g", missing)
    b = runner.submit(JobKind.VERIFY, "g", crash)
    assert a.wait(scaled(60)) and b.wait(scaled(60))
    runner.shutdown(wait=True)
    assert a.error == ("org.blockguard1.Error.NotFound", "volume x does not exist")
    assert b.state is JobState.FAILED
    assert b.error[0] == "org.blockguard1.Error.Internal"
    assert "secret internals" not in b.error[1]


def test_runner_forgets_old_finished_jobs() -> None:
    runner = JobRunner(keep=2)
    forgotten: list[int] = []
    runner.on_forget_job(lambda j: forgotten.append(j.id))
    for _ in range(4):
        runner.submit(JobKind.VERIFY, "g", lambda _p: None).wait(scaled(60))
    runner.submit(JobKind.VERIFY, "g", lambda _p: None).wait(scaled(60))
    runner.shutdown(wait=True)
    assert forgotten == [1, 2]
    assert [j.id for j in runner.list()] == [3, 4, 5]


class _Obj:
    authorizer = None

    @handler(read_only=True)
    async def ok(self) -> str:
        return "fine"

    @handler(read_only=True)
    async def not_found(self) -> None:
        raise NotFound(what="volume", name="v")

    @handler(read_only=True)
    async def crash(self) -> None:
        raise ZeroDivisionError("division by zero at /secret/path.py line 3")

    @handler(read_only=True)
    def getter(self) -> None:
        raise RuntimeError("boom")


def test_handler_maps_errors(caplog: pytest.LogCaptureFixture) -> None:
    obj = _Obj()
    assert asyncio.run(obj.ok()) == "fine"
    with pytest.raises(DBusError) as info:
        asyncio.run(obj.not_found())
    assert (info.value.type, info.value.text) == (
        "org.blockguard1.Error.NotFound",
        "volume v does not exist",
    )
    with caplog.at_level(logging.ERROR), pytest.raises(DBusError) as info:
        asyncio.run(obj.crash())
    assert info.value.type == "org.blockguard1.Error.Internal"
    assert "/secret" not in info.value.text and "ZeroDivisionError" in info.value.text
    assert "Traceback" in caplog.text  # the operator gets the traceback, the client not
    with pytest.raises(DBusError) as info:
        obj.getter()
    assert info.value.type == "org.blockguard1.Error.Internal"


def test_mutating_handler_requires_authorisation() -> None:
    class Denier:
        async def identify(self, action: str) -> Caller:
            return Caller(sender=":1.9", uid=1000)

        def check(self, caller: Caller, action: str) -> None:
            raise NotAuthorized(detail=f"{action} refused")

    class Obj:
        authorizer = Denier()

        @handler()
        async def change(self) -> str:
            return "changed"

    with pytest.raises(DBusError) as info:
        asyncio.run(Obj().change())
    assert info.value.type == "org.blockguard1.Error.NotAuthorized"
    with pytest.raises(TypeError):
        handler()(lambda self: None)  # a sync mutating method cannot be authorised
    assert as_dbus_error(DBusError("a.b.C", "x"), "w").type == "a.b.C"


@pytest.mark.parametrize("name", ["db", "my-vol", "a.b+c", "ünï", "", "_x_"])
def test_path_escaping_round_trips(name: str) -> None:
    element = escape_path_element(name)
    assert element.replace("_", "").isalnum() or element == "_"
    assert unescape_path_element(element) == name


def test_to_variant() -> None:
    assert to_variant(3) == Variant("t", 3)
    assert to_variant(-1) == Variant("x", -1)
    assert to_variant({"full": 1.5}) == Variant("a{sd}", {"full": 1.5})
    assert to_variant(["a"]) == Variant("as", ["a"])
    assert to_variant({"n": 1}).signature == "a{sv}"


@pytest.mark.parametrize("kind", ["memory", "engine:", ":make_service", ""])
def test_service_option_takes_module_and_factory_only(kind: str, tmp_path: Any) -> None:
    # There is no built-in fake service: anything but MODULE:FACTORY is refused by name.
    runner = JobRunner()
    try:
        with pytest.raises(InvalidInput) as info:
            make_service(kind, tmp_path, runner)
        assert repr(kind) in str(info.value)
        with pytest.raises(EnvironmentProblem) as missing:
            make_service("blockguard.daemon.memory:MemoryService", tmp_path, runner)
        assert "blockguard.daemon.memory" in str(missing.value)
    finally:
        runner.shutdown(wait=False)


def test_logging_target_and_fields() -> None:
    assert under_systemd({"INVOCATION_ID": "abc"})
    assert under_systemd({"JOURNAL_STREAM": "8:123"})
    assert not under_systemd({})
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        assert setup_logging("debug", {}) == "stderr"
        assert setup_logging("info", {"INVOCATION_ID": "x"}) == "journal"
        assert type(root.handlers[0]).__name__ == "JournalHandler"
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    record = logging.LogRecord("n", logging.INFO, __file__, 1, "backup done", (), None)
    record.VOLUME = "db"
    record.JOB = 4
    line = FieldsFormatter("%(message)s").format(record)
    assert line == "backup done [VOLUME=db JOB=4]"


def test_failed_job_carries_the_flight_recorder(tmp_path: Any, caplog: Any) -> None:
    """A job that fails reports the last commands run: in its Result, the catalog, the log."""
    from blockguard.core.catalog import Catalog
    from blockguard.engine.events import EventHub
    from blockguard.engine.jobbook import JobBook
    from blockguard.errors import DeviceIOError
    from blockguard.storage.runner import Runner

    catalog = Catalog(tmp_path / "catalog.db")
    recorder = Runner()
    runner = JobRunner()
    book = JobBook(catalog, runner, EventHub(), recorder=recorder)

    def work(_progress: Any, _catalog_job: str) -> dict[str, Any]:
        recorder.run(["sh", "-c", "echo pool disk gone >&2; exit 3"], timeout=30, check=False)
        raise DeviceIOError(path="/dev/vdz", op="writing", offset=8192, reason="EIO")

    with caplog.at_level(logging.WARNING, logger="blockguard.engine.jobbook"):
        job = book.submit(JobKind.BACKUP, "db", "db", work)
        assert job.wait(scaled(60))
        runner.shutdown(wait=True)
    assert job.state is JobState.FAILED
    assert job.error == (
        "org.blockguard1.Error.DeviceIO",
        "I/O error on /dev/vdz at offset 8192 while writing: EIO",
    )
    report = job.result["failure_report"]
    assert report.startswith("last commands run:\n") and "rc=3" in report
    assert "pool disk gone" in report and "echo pool disk gone" in report
    [record] = catalog.list_jobs(volume="db")
    assert record.state == "failed" and record.result["failure_report"] == report
    assert any("pool disk gone" in r.getMessage() for r in caplog.records)


def test_a_volume_whose_job_clients_see_done_is_free_for_the_next_request(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job's record and its volume's release are settled before clients can see it
    finished: a client that waited for done and asks at once (a restore of the generation
    it just made) is never refused Busy, and finds the job recorded. A job still running
    keeps its volume Busy."""
    import threading

    from blockguard.core.catalog import Catalog
    from blockguard.engine.events import EventHub
    from blockguard.engine.jobbook import JobBook
    from blockguard.errors import Busy

    catalog = Catalog(tmp_path / "catalog.db")
    runner = JobRunner()
    book = JobBook(catalog, runner, EventHub())
    in_write, leave_write, go_on = threading.Event(), threading.Event(), threading.Event()
    real_finish = catalog.finish_job

    def slow_finish(*args: Any, **kwargs: Any) -> None:  # a catalog write on a loaded machine
        in_write.set()
        leave_write.wait(scaled(60))
        real_finish(*args, **kwargs)

    running = book.submit(JobKind.BACKUP, "web", "web", lambda *_: go_on.wait(scaled(60)) and {})
    with pytest.raises(Busy):  # running: refused at once
        book.reserve("web")
    monkeypatch.setattr(catalog, "finish_job", slow_finish)
    job = book.submit(JobKind.BACKUP, "db", "db", lambda *_: {"generation": "db@1"})
    assert in_write.wait(scaled(60))
    # While the record is being written the job is not finished to clients, and its
    # volume is still held.
    assert job.state is JobState.RUNNING
    with pytest.raises(Busy):
        book.reserve("db")
    leave_write.set()
    assert job.wait(scaled(60))
    assert job.state is JobState.DONE and job.result == {"generation": "db@1"}
    book.reserve("db")  # at once: done means released
    assert catalog.list_jobs(volume="db")[0].state == "done"
    book.release("db")
    go_on.set()
    assert running.wait(scaled(60))
    runner.shutdown(wait=True)
