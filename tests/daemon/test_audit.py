"""The audit trail: every call that may change something leaves one entry naming the
method, the caller's uid and the outcome; read-only calls leave none.

The first tests need neither root nor a bus; the last runs the real daemon (real engine,
a dir pool on loop devices) on a private dbus-daemon and reads its log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import subprocess
from typing import Any

import pytest
from dbus_fast.errors import DBusError

from blockguard.daemon import audit
from blockguard.daemon.audit import AUDIT_MESSAGE_ID, MUTATING_METHODS
from blockguard.daemon.bus import ManagerInterface
from blockguard.daemon.dbusutil import Caller, handler
from blockguard.daemon.logsetup import FieldsFormatter
from blockguard.daemon.objects import JobObject, PoolObject, VolumeObject
from blockguard.errors import NotAuthorized, NotFound
from tests.support.daemon import EngineHarness, run_job
from tests.support.devices import LoopFactory, MiB

INTERFACES = (ManagerInterface, VolumeObject, PoolObject, JobObject)


def _dbus_methods(cls: type) -> dict[str, Any]:
    """D-Bus name -> the class member, for every method dbus-fast would export."""
    found = {}
    for attr in dir(cls):
        member = getattr(cls, attr)
        method = getattr(member, "__dict__", {}).get("__DBUS_METHOD")
        if method is not None:
            found[method.name] = member
    return found


def test_every_method_is_either_read_only_or_listed_as_mutating() -> None:
    """A new D-Bus method must say which it is: marked read-only on its handler, or
    listed in audit.MUTATING_METHODS (then it is authorised and audited)."""
    seen: set[str] = set()
    for cls in INTERFACES:
        for name, member in _dbus_methods(cls).items():
            seen.add(name)
            assert hasattr(member, "read_only"), f"{cls.__name__}.{name} has no @handler"
            if member.read_only:
                assert name not in MUTATING_METHODS, f"{name} is read-only and listed mutating"
            else:
                assert name in MUTATING_METHODS, (
                    f"{cls.__name__}.{name} changes things (not read_only) but is not in "
                    "blockguard.daemon.audit.MUTATING_METHODS"
                )
    assert not MUTATING_METHODS - seen, MUTATING_METHODS - seen
    assert {"CreatePool", "Protect", "Unprotect", "SetObjectives", "Restore"} <= seen
    assert {"BackupNow", "CancelJob", "ReleaseSwapIn", "Drill", "DrillVolume"} <= seen


class _Who:
    """An authorizer that knows the caller without a bus; refuses uids other than 0."""

    def __init__(self, uid: int) -> None:
        self.uid = uid

    async def identify(self, action: str) -> Caller:
        return Caller(sender=":1.7", uid=self.uid, pid=4242)

    def check(self, caller: Caller, action: str) -> None:
        if caller.uid != 0:
            raise NotAuthorized(detail=f"{action} needs root (the caller has uid {caller.uid})")


class _Manager:
    def __init__(self, uid: int) -> None:
        self.authorizer = _Who(uid)
        self.ran: list[str] = []

    @handler()
    async def BackupNow(self, volume: str) -> str:
        self.ran.append(volume)
        return "/org/blockguard1/job/17"

    @handler()
    async def Unprotect(self, name: str, delete_generations: bool) -> None:
        raise NotFound(what="volume", name=name)

    @handler(read_only=True)
    async def Plan(self, volume: str) -> dict[str, Any]:
        return {}


def _audit_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "MESSAGE_ID", "") == AUDIT_MESSAGE_ID]


def test_handler_audits_accepted_and_refused_calls_but_not_reads(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="blockguard.daemon.audit")
    root = _Manager(0)
    assert asyncio.run(root.BackupNow("db")) == "/org/blockguard1/job/17"
    with pytest.raises(DBusError):
        asyncio.run(root.Unprotect("gone", False))
    asyncio.run(root.Plan("db"))
    other = _Manager(1000)
    with pytest.raises(DBusError) as refused:
        asyncio.run(other.BackupNow("db"))
    assert refused.value.type == "org.blockguard1.Error.NotAuthorized"
    assert other.ran == []
    entries = [
        (r.AUDIT_METHOD, r.AUDIT_UID, r.AUDIT_PID, r.AUDIT_OUTCOME, getattr(r, "AUDIT_ERROR", ""))
        for r in _audit_records(caplog)
    ]
    assert entries == [
        ("BackupNow", "0", "4242", "accepted", ""),
        ("Unprotect", "0", "4242", "refused", "org.blockguard1.Error.NotFound"),
        ("BackupNow", "1000", "4242", "refused", "org.blockguard1.Error.NotAuthorized"),
    ]
    first, second, third = _audit_records(caplog)
    assert first.JOB == 17 and first.AUDIT_ARGS == "volume=db"
    assert second.AUDIT_ARGS == "name=gone delete_generations=false"
    assert third.levelno == logging.WARNING and not hasattr(third, "JOB")
    assert "uid 1000 (pid 4242): refused" in third.getMessage()


def test_a_caller_the_bus_cannot_name_is_audited_as_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Unknown:
        async def identify(self, action: str) -> Caller:
            raise NotAuthorized(detail=f"{action}: the caller could not be identified")

    class Obj:
        authorizer = Unknown()

        @handler()
        async def Restore(self, volume: str) -> None:
            raise AssertionError("must not run")

    caplog.set_level(logging.INFO, logger="blockguard.daemon.audit")
    with pytest.raises(DBusError):
        asyncio.run(Obj().Restore("db"))
    (entry,) = _audit_records(caplog)
    assert (entry.AUDIT_METHOD, entry.AUDIT_UID, entry.AUDIT_OUTCOME) == (
        "Restore",
        "",
        "refused",
    )
    assert "an unidentified caller" in entry.getMessage()


def test_argument_summaries_withhold_secrets_and_stay_short() -> None:
    summary = audit.summarise_arguments(
        ["devices", "options", "api_token", "objectives"],
        [
            [f"/dev/loop{i}" for i in range(20)],
            {"url": "s3://admin:hunter2@127.0.0.1:8333/bucket", "secret_key": "hunter2"},
            "hunter2",
            {"rpo": "1h", "rto": 300.0},
        ],
    )
    assert "hunter2" not in summary
    assert "api_token=<withheld>" in summary and "secret_key=<withheld>" in summary
    assert "s3://admin:<withheld>@127.0.0.1:8333/bucket" in summary
    assert "/dev/loop0" in summary and "/dev/loop19" not in summary and "+12" in summary
    assert "objectives={rpo=1h,rto=300.0}" in summary
    assert len(audit.summarise("x" * 1000)) <= 120


def test_audit_fields_reach_the_journal_and_the_stderr_line() -> None:
    """Under systemd JournalHandler sends the upper-case record attributes as fields; on
    stderr the fields follow the message, the argument summary quoted."""
    record = logging.LogRecord("blockguard.daemon.audit", logging.INFO, __file__, 1, "x", (), None)
    for key, value in {
        "MESSAGE_ID": AUDIT_MESSAGE_ID,
        "AUDIT_METHOD": "CreatePool",
        "AUDIT_UID": "0",
        "AUDIT_OUTCOME": "accepted",
        "AUDIT_ARGS": "name=p1 devices=[/dev/loop1]",
    }.items():
        setattr(record, key, value)
    line = FieldsFormatter("%(message)s").format(record)
    fields = _fields(line)
    assert fields["AUDIT_ARGS"] == "name=p1 devices=[/dev/loop1]"
    assert fields["AUDIT_METHOD"] == "CreatePool" and fields["MESSAGE_ID"] == AUDIT_MESSAGE_ID
    from blockguard.daemon.logsetup import _journal_handler

    journal = _journal_handler()
    if journal is None:
        return
    sent: list[dict[str, Any]] = []
    journal.send = lambda MESSAGE, **kw: sent.append(kw)  # journal.send's own signature
    journal.emit(record)
    assert sent[0]["MESSAGE_ID"] == AUDIT_MESSAGE_ID and sent[0]["AUDIT_UID"] == "0"


# --- the real daemon --------------------------------------------------------------------

_FIELD = re.compile(r'\b(JOB|MESSAGE_ID|AUDIT_[A-Z]+)=("(?:[^"\\]|\\.)*"|[^\s\]]+)')


def _fields(line: str) -> dict[str, str]:
    return {
        key: json.loads(value) if value.startswith('"') else value
        for key, value in _FIELD.findall(line)
    }


def _audit_entries(log: str) -> list[dict[str, str]]:
    return [_fields(line) for line in log.splitlines() if f"MESSAGE_ID={AUDIT_MESSAGE_ID}" in line]


def _busctl(address: str, user: list[str], member: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            *user,
            "busctl",
            f"--address={address}",
            "call",
            "org.blockguard1",
            "/org/blockguard1",
            "org.blockguard1.Manager",
            member,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


ROOT: list[str] = []
#: uid 65534 in nogroup, which the daemon below takes as its admin group
MEMBER = ["setpriv", "--reuid=65534", "--regid=65534", "--groups=65534"]
#: uid 1 (daemon), not in nogroup: never an admin here
STRANGER = ["setpriv", "--reuid=1", "--regid=1", "--clear-groups"]


@pytest.mark.skipif(
    shutil.which("busctl") is None or shutil.which("setpriv") is None,
    reason="needs busctl and setpriv",
)
def test_daemon_audits_mutating_calls_of_root_members_and_strangers(
    engine: EngineHarness, loopdev: LoopFactory
) -> None:
    daemon = engine.start("--admin-group", "nogroup")
    address = daemon.address
    pool_disk = loopdev(400 * MiB, "pool.img")
    volume_disk = loopdev(16 * MiB, "db.img")
    steps = [
        (ROOT, "CreatePool", "ssasb", "p1", "dir", "1", pool_disk, "false"),
        (ROOT, "Protect", "sstssa{sv}", volume_disk, "db", "0", "", "", "0"),
        (ROOT, "ListVolumes", ""),
        (ROOT, "Plan", "s", "db"),
        (MEMBER, "BackupNow", "s", "db"),
        (STRANGER, "Unprotect", "sb", "db", "true"),
        (STRANGER, "GetStatus", ""),
        (ROOT, "BackupNow", "s", "nosuch"),
    ]
    results = []
    for user, member, signature, *args in steps:
        result = _busctl(address, user, member, *([signature, *args] if signature else []))
        results.append(result)
    codes = [r.returncode == 0 for r in results]
    assert codes == [True, True, True, True, True, False, True, False], [
        (r.args[-3:], r.stderr) for r in results
    ]
    assert "NotAuthorized" in results[5].stderr or "needs root" in results[5].stderr
    job_path = results[4].stdout.split('"')[1]
    from blockguard.cli.client import Client

    with Client(address) as root:
        assert run_job(root, job_path)["State"] == "done"
        assert root.call("ListVolumes") == ["/org/blockguard1/volume/db"]  # not unprotected
    daemon.stop()
    entries = _audit_entries(daemon.log())
    got = [
        (e["AUDIT_METHOD"], e["AUDIT_UID"], e["AUDIT_OUTCOME"], e.get("AUDIT_ERROR", ""))
        for e in entries
    ]
    assert got == [
        ("CreatePool", "0", "accepted", ""),
        ("Protect", "0", "accepted", ""),
        ("BackupNow", "65534", "accepted", ""),
        ("Unprotect", "1", "refused", "org.blockguard1.Error.NotAuthorized"),
        ("BackupNow", "0", "refused", "org.blockguard1.Error.NotFound"),
    ]
    create, _protect, backup, refused, _missing = entries
    assert f"devices=[{pool_disk}]" in create["AUDIT_ARGS"] and "name=p1" in create["AUDIT_ARGS"]
    assert backup["JOB"] == job_path.rsplit("/", 1)[1]
    assert refused["AUDIT_ARGS"] == "name=db delete_generations=true"
    assert all(e["AUDIT_PID"].isdigit() for e in entries)
