"""Hostile and clumsy input, over D-Bus and through blockguardctl: named refusals, no change.

One real daemon serves the whole module (a dir pool, a protected and backed-up volume, a
few spare loop devices of tens of MiB). Every case is one refused call; after it the
catalog (every table), the state directory and the pool's files (names, sizes, times),
and the hash of every small device must be as they were before the first case. The pool
disk and a mounted ext4 are frozen (fsfreeze) meanwhile, so their own housekeeping cannot
change a hash, and hashed once at the start and once at the end.

Error names that part GATE refines (``ProtectedDevice``, ``PoolDisk``, ``PoolLabel``, all
subclasses of ``DeviceInUse``) are accepted as a family for device targets.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Variant

from blockguard.cli.client import Client, RemoteError
from blockguard.errors import ExitCode
from tests.support.bus import PERMISSIVE, REPO, NotifyListener, start_bus
from tests.support.daemon import ENGINE, ENGINE_ENV, run_job, start_daemon
from tests.support.devices import LoopFactory, sha256_of, unmount_under, write_random

MiB = 1 << 20
E = "org.blockguard1.Error."
U64 = (1 << 64) - 1
I64_MIN = -(1 << 63)
#: Refusals of a device that belongs to something: GATE names the relation more exactly.
IN_USE = frozenset({"DeviceInUse", "ProtectedDevice", "PoolDisk", "PoolLabel"})
#: What dbus-fast answers for a call whose signature does not match the method's: it looks
#: methods up by name and signature, so the daemon's code never sees wrong types.
BAD_ARGS = frozenset({"org.freedesktop.DBus.Error.UnknownMethod"})
UNKNOWN_METHOD = frozenset({"org.freedesktop.DBus.Error.UnknownMethod"})


# --- the world every case runs against --------------------------------------------------


@dataclass
class World:
    client: Client
    address: str
    state_dir: Path
    pool_mnt: Path
    pool_disk: str
    volume: str
    free: str
    small: str
    busy: str
    plain_file: str
    directory: str
    tmp: Path
    generation: str
    unprotect_signature: str
    links: dict[str, str] = field(default_factory=dict)

    @property
    def hashed(self) -> list[str]:
        """The devices hashed around every case (all small; the pool disk is frozen)."""
        return [self.volume, self.free, self.small, self.busy]


def catalog_dump(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall() for t in tables}
    finally:
        conn.close()


def tree(root: Path, skip: tuple[str, ...] = ()) -> list[tuple[str, int, int]]:
    """Every file below ``root``: relative path, size, ctime (any write moves it)."""
    found = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            if name.startswith(skip):
                continue
            st = path.lstat()
            found.append((str(path.relative_to(root)), st.st_size, st.st_ctime_ns))
    return sorted(found)


def snapshot(w: World) -> dict[str, Any]:
    return {
        "catalog": catalog_dump(w.state_dir / "catalog.db"),
        "state": tree(w.state_dir, skip=("catalog.db", "pools")),
        "pool": tree(w.pool_mnt),
        "devices": {dev: sha256_of(dev) for dev in w.hashed},
    }


def manager_signature(client: Client, method: str) -> str:
    """The in-signature of a Manager method as the daemon introspects it (parts change
    signatures independently; the cases follow the daemon they run against)."""
    xml = client.call(
        "Introspect", path="/org/blockguard1", interface="org.freedesktop.DBus.Introspectable"
    )
    for iface in ET.fromstring(xml).iter("interface"):
        if iface.get("name") != "org.blockguard1.Manager":
            continue
        for m in iface.iter("method"):
            if m.get("name") == method:
                return "".join(
                    a.get("type", "") for a in m.iter("arg") if a.get("direction") == "in"
                )
    raise AssertionError(f"the daemon has no method {method}")


@contextlib.contextmanager
def frozen(*mount_points: Path) -> Iterator[None]:
    done = []
    try:
        for point in mount_points:
            subprocess.run(["fsfreeze", "-f", str(point)], check=True, timeout=30)
            done.append(point)
        yield
    finally:
        for point in done:
            subprocess.run(["fsfreeze", "-u", str(point)], timeout=30)


@contextlib.contextmanager
def thawed(point: Path) -> Iterator[None]:
    """Let the daemon write the (module-frozen) file system at ``point`` for a while: a
    write to a frozen file system blocks until it is thawed."""
    subprocess.run(["fsfreeze", "-u", str(point)], check=True, timeout=30)
    try:
        yield
    finally:
        subprocess.run(["fsfreeze", "-f", str(point)], check=True, timeout=30)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    if os.geteuid() != 0:
        pytest.skip("the hostile-input suite needs root (loop devices, mkfs, mount)")
    for program in ("mkfs.xfs", "dbus-daemon", "fsfreeze"):
        if not any((Path(d) / program).exists() for d in os.environ["PATH"].split(":")):
            pytest.skip(f"{program} is not installed")
    tmp = tmp_path_factory.mktemp("hostile")
    loops = LoopFactory(tmp)
    shared = Path(tempfile.mkdtemp(prefix="bg-bus-"))
    shared.chmod(0o755)
    busy_mnt = tmp / "busy"
    mounted = False
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: subprocess.run(["rm", "-rf", str(shared)], timeout=30))
        stack.callback(loops.cleanup)
        bus = stack.enter_context(start_bus(shared, PERMISSIVE))
        notify = NotifyListener(str(tmp / "notify"), str(tmp / "notify"))
        stack.callback(notify.close)
        pool_disk = loops(400 * MiB, "pool.img")
        volume = loops(32 * MiB, "db.img")
        free = loops(40 * MiB, "free.img")
        small = loops(8 * MiB, "small.img")
        busy = loops(24 * MiB, "busy.img")
        subprocess.run(
            ["mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", busy],
            check=True,
            timeout=60,
        )
        busy_mnt.mkdir()
        subprocess.run(["mount", busy, str(busy_mnt)], check=True, timeout=60)
        mounted = True

        def umount_busy() -> None:
            if mounted:
                subprocess.run(["umount", str(busy_mnt)], timeout=60)

        stack.callback(umount_busy)
        plain_file = tmp / "file.img"
        plain_file.write_bytes(bytes(MiB))
        directory = tmp / "a-directory"
        directory.mkdir()
        daemon = start_daemon(bus, tmp, notify, "--service", ENGINE, env=dict(ENGINE_ENV))
        stack.callback(lambda: unmount_under(tmp / "state"))
        stack.callback(daemon.stop)
        client = stack.enter_context(Client(daemon.address))
        client.call("CreatePool", "ssasb", "p1", "dir", [pool_disk], False)
        protect_sig = manager_signature(client, "Protect")
        assert protect_sig == "sstssa{sv}", protect_sig
        client.call("Protect", protect_sig, volume, "db", 0, "", "p1", {"rto": Variant("s", "5m")})
        write_random(volume, 0, 32 * MiB, seed=11)
        gen = str(run_job(client, client.call("BackupNow", "s", "db"))["Result"]["generation"])
        links = {}
        for name, target in (
            ("to-volume", volume),
            ("to-pool-disk", pool_disk),
            ("to-null", "/dev/null"),
            ("to-busy", busy),
            ("dangling", "/dev/blockguard-nothing-here"),
        ):
            links[name] = str(tmp / f"link-{name}")
            os.symlink(target, links[name])
        loop_link = tmp / "link-loop"
        os.symlink(loop_link, loop_link)
        links["loop"] = str(loop_link)
        w = World(
            client=client,
            address=daemon.address,
            state_dir=daemon.state_dir,
            pool_mnt=daemon.state_dir / "pools" / "p1" / "area-0",
            pool_disk=pool_disk,
            volume=volume,
            free=free,
            small=small,
            busy=busy,
            plain_file=str(plain_file),
            directory=str(directory),
            tmp=tmp,
            generation=gen,
            unprotect_signature=manager_signature(client, "Unprotect"),
            links=links,
        )
        with frozen(w.pool_mnt, busy_mnt):
            w.pool_hash = sha256_of(pool_disk)  # type: ignore[attr-defined]
            w.baseline = snapshot(w)  # type: ignore[attr-defined]
            yield w
        assert "Traceback" not in daemon.log()


def assert_unchanged(w: World, what: str) -> None:
    now = snapshot(w)
    base = w.baseline  # type: ignore[attr-defined]
    if now != base:
        w.baseline = now  # type: ignore[attr-defined]  # later cases judged on their own
        changed = [k for k in now if now[k] != base[k]]
        raise AssertionError(f"{what}: the refused call changed {changed}")


# --- D-Bus cases -------------------------------------------------------------------------

Call = Callable[[World], object]


def call(method: str, signature: str, *args: Any) -> Call:
    """A raw call; ``args`` may be functions of the world (paths known only at run time)."""

    def resolve(a: Any, w: World) -> Any:
        if callable(a):
            return a(w)
        if isinstance(a, list):
            return [resolve(v, w) for v in a]
        return a

    def run(w: World) -> object:
        return w.client.call(method, signature, *(resolve(a, w) for a in args))

    return run


def protect(device: Any, name: Any = "x", chunk: int = 0, backend: str = "", **obj: Any) -> Call:
    pool = obj.pop("pool", "")
    return call("Protect", "sstssa{sv}", device, name, chunk, backend, pool, obj)


def objectives(target: str = "db", **obj: Any) -> Call:
    return call("SetObjectives", "sa{sv}", target, obj)


def restore(target: Any, generation: Any = "", mode: str = "copy", volume: str = "db") -> Call:
    return call("Restore", "ssssb", volume, generation, mode, target, False)


def unprotect(name: str) -> Call:
    def run(w: World) -> object:
        # LIFE adds "b delete_generations"; false keeps them (it would be refused anyway).
        extra = [False] if w.unprotect_signature == "sb" else []
        return w.client.call("Unprotect", w.unprotect_signature, name, *extra)

    return run


def s(v: str) -> Variant:
    return Variant("s", v)


def t(v: int) -> Variant:
    return Variant("t", v)


def x(v: int) -> Variant:
    return Variant("x", v)


def d(v: float) -> Variant:
    return Variant("d", v)


VOLUME: Callable[[World], str] = lambda w: w.volume  # noqa: E731  (a path known at run time)
FREE: Callable[[World], str] = lambda w: w.free  # noqa: E731
POOL_DISK: Callable[[World], str] = lambda w: w.pool_disk  # noqa: E731
BUSY: Callable[[World], str] = lambda w: w.busy  # noqa: E731
SMALL: Callable[[World], str] = lambda w: w.small  # noqa: E731
FILE: Callable[[World], str] = lambda w: w.plain_file  # noqa: E731
DIRECTORY: Callable[[World], str] = lambda w: w.directory  # noqa: E731
GEN: Callable[[World], str] = lambda w: w.generation  # noqa: E731


def link(name: str) -> Callable[[World], str]:
    return lambda w: w.links[name]


def gen_variant(change: Callable[[str], str]) -> Callable[[World], str]:
    return lambda w: change(w.generation)


HUGE = "x" * 100_000
NOT_BLOCK = "NotABlockDevice"
BAD_NAMES = {
    "empty": "",
    "slash": "a/b",
    "dotdot": "..",
    "dot": ".",
    "at": "a@b",
    "space": "a b",
    "leading-space": " x",
    "newline": "x\n",
    "tab": "x\ty",
    "unicode": "übung",
    "emoji": "db🙂",
    "too-long": "x" * 65,
    "huge": HUGE,
    "leading-dash": "-x",
    "leading-dot": ".x",
    "leading-underscore": "_x",
    "path": "/dev/loop0",
    "star": "x*",
    "quote": "x'y",
    "colon": "a:b",
}

DBUS_CASES: list[tuple[str, frozenset[str] | str, Call]] = [
    # --- wrong types and unknown members -------------------------------------------------
    ("protect old signature ssts", BAD_ARGS, call("Protect", "ssts", FREE, "x", 0, "")),
    ("protect no arguments", BAD_ARGS, call("Protect", "")),
    (
        "protect chunk as string",
        BAD_ARGS,
        call("Protect", "sssssa{sv}", FREE, "x", "0", "", "", {}),
    ),
    ("protect chunk as int32", BAD_ARGS, call("Protect", "ssissa{sv}", FREE, "x", 0, "", "", {})),
    (
        "protect objectives as a{ss}",
        BAD_ARGS,
        call("Protect", "sstssa{ss}", FREE, "x", 0, "", "", {}),
    ),
    (
        "protect one argument too many",
        BAD_ARGS,
        call("Protect", "sstssa{sv}s", FREE, "x", 0, "", "", {}, ""),
    ),
    ("set objectives as a{ss}", BAD_ARGS, call("SetObjectives", "sa{ss}", "db", {"rto": "5m"})),
    ("set objectives without dict", BAD_ARGS, call("SetObjectives", "s", "db")),
    ("set objectives as av", BAD_ARGS, call("SetObjectives", "sav", "db", [s("5m")])),
    ("create pool devices as s", BAD_ARGS, call("CreatePool", "sssb", "p2", "", "/dev/x", False)),
    ("create pool force as s", BAD_ARGS, call("CreatePool", "ssass", "p2", "", [], "false")),
    ("extend pool no force", BAD_ARGS, call("ExtendPool", "sas", "p1", [])),
    ("remove pool force as u", BAD_ARGS, call("RemovePool", "su", "p1", 0)),
    ("backup now as u", BAD_ARGS, call("BackupNow", "u", 1)),
    ("backup now no argument", BAD_ARGS, call("BackupNow", "")),
    ("restore force as s", BAD_ARGS, call("Restore", "sssss", "db", "", "copy", "/dev/x", "no")),
    ("restore too few", BAD_ARGS, call("Restore", "ss", "db", "")),
    ("verify as t", BAD_ARGS, call("Verify", "t", 1)),
    ("plan as i", BAD_ARGS, call("Plan", "i", 1)),
    ("list generations as ay", BAD_ARGS, call("ListGenerations", "ay", b"db")),
    ("unprotect as t", BAD_ARGS, call("Unprotect", "t", 7)),
    ("unknown method", UNKNOWN_METHOD, call("FormatEverything", "")),
    ("unknown method with args", UNKNOWN_METHOD, call("Protect2", "s", "x")),
    (
        "unknown interface",
        frozenset(
            {
                "org.freedesktop.DBus.Error.UnknownMethod",
                "org.freedesktop.DBus.Error.UnknownInterface",
            }
        ),
        lambda w: w.client.call("Protect", "", interface="org.blockguard1.Nope"),
    ),
    (
        "unknown object",
        frozenset(
            {
                "org.freedesktop.DBus.Error.UnknownObject",
                "org.freedesktop.DBus.Error.UnknownMethod",
            }
        ),
        lambda w: w.client.call("BackupNow", "s", "db", path="/org/blockguard1/nope"),
    ),
    # --- protect: device paths -----------------------------------------------------------
    ("protect a missing path", NOT_BLOCK, protect("/dev/blockguard-nothing-here")),
    ("protect a regular file", NOT_BLOCK, protect(FILE)),
    ("protect a directory", NOT_BLOCK, protect(DIRECTORY)),
    ("protect /dev/null", NOT_BLOCK, protect("/dev/null")),
    ("protect /dev/zero", NOT_BLOCK, protect("/dev/zero")),
    ("protect a relative path", frozenset({NOT_BLOCK, "InvalidInput"}), protect("loop0")),
    ("protect an empty path", frozenset({NOT_BLOCK, "InvalidInput"}), protect("")),
    ("protect /", NOT_BLOCK, protect("/")),
    ("protect a huge path", frozenset({NOT_BLOCK, "InvalidInput"}), protect("/" + HUGE)),
    ("protect a unicode path", NOT_BLOCK, protect("/dev/łoop-ü")),
    ("protect /dev/../dev/null", NOT_BLOCK, protect("/dev/../dev/null")),
    ("protect a sysfs directory", NOT_BLOCK, protect("/sys/block")),
    ("protect a proc file", NOT_BLOCK, protect("/proc/self/status")),
    ("protect a symlink to /dev/null", NOT_BLOCK, protect(link("to-null"))),
    ("protect a dangling symlink", NOT_BLOCK, protect(link("dangling"))),
    ("protect a symlink loop", NOT_BLOCK, protect(link("loop"))),
    ("protect a pool disk", IN_USE, protect(POOL_DISK)),
    ("protect a symlink to a pool disk", IN_USE, protect(link("to-pool-disk"))),
    (
        "protect the volume again",
        frozenset({"AlreadyExists"} | IN_USE),
        protect(VOLUME),
    ),
    (
        "protect a symlink to the volume",
        frozenset({"AlreadyExists"} | IN_USE),
        protect(link("to-volume")),
    ),
    ("duplicate volume name", "AlreadyExists", protect(FREE, "db")),
    # --- protect: names, chunk sizes, backends, pools -------------------------------------
    *[(f"protect named {k}", "InvalidInput", protect(FREE, v)) for k, v in BAD_NAMES.items()],
    ("chunk 1", "InvalidChunkSize", protect(FREE, "x", 1)),
    ("chunk 512", "InvalidChunkSize", protect(FREE, "x", 512)),
    ("chunk 12345", "InvalidChunkSize", protect(FREE, "x", 12345)),
    ("chunk 3*4096", "InvalidChunkSize", protect(FREE, "x", 3 * 4096)),
    ("chunk 1 GiB", "InvalidChunkSize", protect(FREE, "x", 1 << 30)),
    ("chunk 2**63", "InvalidChunkSize", protect(FREE, "x", 1 << 63)),
    ("chunk u64 max", "InvalidChunkSize", protect(FREE, "x", U64)),
    ("backend magic", "InvalidInput", protect(FREE, "x", 0, "magic")),
    ("backend upper case", "InvalidInput", protect(FREE, "x", 0, "SCAN")),
    ("backend with space", "InvalidInput", protect(FREE, "x", 0, " scan")),
    ("backend huge", "InvalidInput", protect(FREE, "x", 0, HUGE)),
    ("backend era without device-mapper", "Environment", protect(FREE, "x", 0, "era")),
    ("backend thin on a loop device", "InvalidInput", protect(FREE, "x", 0, "thin")),
    ("unknown pool", "NotFound", protect(FREE, "x", pool="nope")),
    ("pool with a slash", "NotFound", protect(FREE, "x", pool="../p1")),
    ("pool with a trailing space", "NotFound", protect(FREE, "x", pool="p1 ")),
    ("pool huge", "NotFound", protect(FREE, "x", pool=HUGE)),
    # --- protect: objectives are checked before anything is created -----------------------
    ("protect rto 0s", "InvalidObjectives", protect(FREE, "x", rto=s("0s"))),
    ("protect rto u64 max", "InvalidObjectives", protect(FREE, "x", rto=t(U64))),
    ("protect rto 31d", "InvalidObjectives", protect(FREE, "x", rto=s("31d"))),
    ("protect rpo 25:00", "InvalidObjectives", protect(FREE, "x", rpo=s("25:00"))),
    ("protect generations u64 max", "InvalidObjectives", protect(FREE, "x", generations=t(U64))),
    (
        "protect generations 0",
        "InvalidObjectives",
        protect(FREE, "x", rto=s("5m"), generations=t(0)),
    ),
    ("protect unknown objective", "InvalidObjectives", protect(FREE, "x", colour=s("blue"))),
    (
        "protect tz unknown",
        "InvalidObjectives",
        protect(FREE, "x", rpo=s("02:30"), tz=s("Mars/Base")),
    ),
    (
        "protect restore mode",
        "InvalidObjectives",
        protect(FREE, "x", rto=s("5m"), restore_mode=s("x")),
    ),
    ("protect rto as bool", "InvalidObjectives", protect(FREE, "x", rto=Variant("b", True))),
    # --- set objectives: rto --------------------------------------------------------------
    ("rto 0s", "InvalidObjectives", objectives(rto=s("0s"))),
    ("rto -5m", "InvalidObjectives", objectives(rto=s("-5m"))),
    ("rto 0.5s", "InvalidObjectives", objectives(rto=s("0.5s"))),
    ("rto 31d", "InvalidObjectives", objectives(rto=s("31d"))),
    ("rto 400d", "InvalidObjectives", objectives(rto=s("400d"))),
    ("rto 20 digits of days", "InvalidObjectives", objectives(rto=s("99999999999999999999d"))),
    ("rto 1e400m", "InvalidObjectives", objectives(rto=s("1e400m"))),
    ("rto without unit", "InvalidObjectives", objectives(rto=s("5"))),
    ("rto words", "InvalidObjectives", objectives(rto=s("five minutes"))),
    ("rto arabic digits", "InvalidObjectives", objectives(rto=s("٥m"))),
    ("rto huge text", "InvalidObjectives", objectives(rto=s(HUGE))),
    ("rto with newline", "InvalidObjectives", objectives(rto=s("5m\n"))),
    ("rto t 0", "InvalidObjectives", objectives(rto=t(0))),
    ("rto t u64 max", "InvalidObjectives", objectives(rto=t(U64))),
    ("rto t 2**63", "InvalidObjectives", objectives(rto=t(1 << 63))),
    ("rto x -1", "InvalidObjectives", objectives(rto=x(-1))),
    ("rto x i64 min", "InvalidObjectives", objectives(rto=x(I64_MIN))),
    ("rto d 0", "InvalidObjectives", objectives(rto=d(0.0))),
    ("rto d -1", "InvalidObjectives", objectives(rto=d(-1.0))),
    ("rto d nan", "InvalidObjectives", objectives(rto=d(float("nan")))),
    ("rto d inf", "InvalidObjectives", objectives(rto=d(float("inf")))),
    ("rto d 1e308", "InvalidObjectives", objectives(rto=d(1e308))),
    ("rto b", "InvalidObjectives", objectives(rto=Variant("b", True))),
    ("rto as", "InvalidObjectives", objectives(rto=Variant("as", ["5m"]))),
    ("rto a{sv}", "InvalidObjectives", objectives(rto=Variant("a{sv}", {"s": s("5m")}))),
    ("rto y 0", "InvalidObjectives", objectives(rto=Variant("y", 0))),
    # --- set objectives: rpo --------------------------------------------------------------
    ("rpo every 0m", "InvalidObjectives", objectives(rpo=s("every 0m"))),
    ("rpo every 30s", "InvalidObjectives", objectives(rpo=s("every 30s"))),
    ("rpo every -1m", "InvalidObjectives", objectives(rpo=s("every -1m"))),
    ("rpo every 400d", "InvalidObjectives", objectives(rpo=s("every 400d"))),
    ("rpo every 20 digits", "InvalidObjectives", objectives(rpo=s("every 99999999999999999999d"))),
    ("rpo 25:00", "InvalidObjectives", objectives(rpo=s("25:00"))),
    ("rpo 24:00", "InvalidObjectives", objectives(rpo=s("24:00"))),
    ("rpo 12:60", "InvalidObjectives", objectives(rpo=s("12:60"))),
    ("rpo daily without time", "InvalidObjectives", objectives(rpo=s("daily"))),
    ("rpo changed 0", "InvalidObjectives", objectives(rpo=s("changed 0"))),
    ("rpo changed 1B", "InvalidObjectives", objectives(rpo=s("changed 1B"))),
    ("rpo changed 2EiB", "InvalidObjectives", objectives(rpo=s("changed 2EiB"))),
    (
        "rpo changed 20 digits PiB",
        "InvalidObjectives",
        objectives(rpo=s("changed 99999999999999999999P")),
    ),
    ("rpo gibberish", "InvalidObjectives", objectives(rpo=s("whenever"))),
    ("rpo emoji", "InvalidObjectives", objectives(rpo=s("🙂"))),
    ("rpo huge", "InvalidObjectives", objectives(rpo=s(HUGE))),
    ("rpo blank", "InvalidObjectives", objectives(rpo=s("   "))),
    ("rpo t", "InvalidObjectives", objectives(rpo=t(900))),
    ("rpo d", "InvalidObjectives", objectives(rpo=d(900.0))),
    ("rpo b", "InvalidObjectives", objectives(rpo=Variant("b", False))),
    # --- set objectives: generations -------------------------------------------------------
    ("generations t 0", "InvalidObjectives", objectives(generations=t(0))),
    ("generations x -3", "InvalidObjectives", objectives(generations=x(-3))),
    ("generations t 10001", "InvalidObjectives", objectives(generations=t(10001))),
    ("generations t u64 max", "InvalidObjectives", objectives(generations=t(U64))),
    ("generations x i64 min", "InvalidObjectives", objectives(generations=x(I64_MIN))),
    ("generations s abc", "InvalidObjectives", objectives(generations=s("abc"))),
    ("generations s 1e3", "InvalidObjectives", objectives(generations=s("1e3"))),
    ("generations s -1", "InvalidObjectives", objectives(generations=s("-1"))),
    ("generations s arabic", "InvalidObjectives", objectives(generations=s("٣"))),
    ("generations s 20 digits", "InvalidObjectives", objectives(generations=s("9" * 20))),
    ("generations d 7.0", "InvalidObjectives", objectives(generations=d(7.0))),
    ("generations b", "InvalidObjectives", objectives(generations=Variant("b", True))),
    ("generations with rto 0", "InvalidObjectives", objectives(generations=t(9), rto=s("0s"))),
    # --- set objectives: restore mode, tz, keys, targets -----------------------------------
    ("restore mode teleport", "InvalidObjectives", objectives(restore_mode=s("teleport"))),
    ("restore mode upper case", "InvalidObjectives", objectives(restore_mode=s("COPY"))),
    ("restore mode t", "InvalidObjectives", objectives(restore_mode=t(1))),
    ("tz unknown", "InvalidObjectives", objectives(tz=s("Mars/Olympus_Mons"))),
    ("tz path traversal", "InvalidObjectives", objectives(tz=s("../../etc/passwd"))),
    ("tz absolute path", "InvalidObjectives", objectives(tz=s("/etc/localtime"))),
    ("tz huge", "InvalidObjectives", objectives(tz=s(HUGE))),
    ("tz with newline", "InvalidObjectives", objectives(tz=s("UTC\n"))),
    ("tz t", "InvalidObjectives", objectives(tz=t(1))),
    ("no objective at all", "InvalidObjectives", objectives()),
    ("unknown key", "InvalidObjectives", objectives(colour=s("blue"))),
    ("unknown key with a valid one", "InvalidObjectives", objectives(rto=s("5m"), colour=s("x"))),
    ("key in upper case", "InvalidObjectives", objectives(RTO=s("5m"))),
    (
        "key with a space",
        "InvalidObjectives",
        call("SetObjectives", "sa{sv}", "db", {"rto ": s("5m")}),
    ),
    ("empty key", "InvalidObjectives", call("SetObjectives", "sa{sv}", "db", {"": s("5m")})),
    ("objectives of an unknown volume", "NotFound", objectives("nope", rto=s("5m"))),
    (
        "objectives of an empty name",
        frozenset({"NotFound", "InvalidInput"}),
        objectives("", rto=s("5m")),
    ),
    (
        "objectives of ../db",
        frozenset({"NotFound", "InvalidInput"}),
        objectives("../db", rto=s("5m")),
    ),
    (
        "objectives of a huge name",
        frozenset({"NotFound", "InvalidInput"}),
        objectives(HUGE, rto=s("5m")),
    ),
    # --- unprotect, backup, plan, generations: unknown names --------------------------------
    *[
        (f"{what} of {k}", frozenset({"NotFound", "InvalidInput"}), fn(v))
        for what, fn in (
            ("unprotect", unprotect),
            ("backup", lambda n: call("BackupNow", "s", n)),
            ("plan", lambda n: call("Plan", "s", n)),
            ("list generations", lambda n: call("ListGenerations", "s", n)),
        )
        for k, v in (("nope", "nope"), ("empty", ""), ("dotdot", "../db"), ("huge", HUGE))
    ],
    # --- restore: generations --------------------------------------------------------------
    ("restore unknown generation", "NotFound", restore(FREE, "db@20200101T000000.000000Z-0")),
    ("restore generation nonsense", "InvalidInput", restore(FREE, "nonsense")),
    ("restore generation db@", "InvalidInput", restore(FREE, "db@")),
    ("restore generation @", "InvalidInput", restore(FREE, "@")),
    ("restore generation with path", "InvalidInput", restore(FREE, "db@../../etc")),
    (
        "restore generation huge",
        frozenset({"InvalidInput", "NotFound"}),
        restore(FREE, "db@" + HUGE),
    ),
    (
        "restore foreign generation",
        "InvalidInput",
        restore(FREE, gen_variant(lambda g: g.replace("db@", "nothere@"))),
    ),
    (
        "restore generation with space",
        frozenset({"InvalidInput", "NotFound"}),
        restore(FREE, gen_variant(lambda g: g + " ")),
    ),
    (
        "restore generation unicode",
        frozenset({"InvalidInput", "NotFound"}),
        restore(FREE, gen_variant(lambda g: g + "ü")),
    ),
    (
        "restore generation of another name",
        "InvalidInput",
        restore(FREE, gen_variant(lambda g: "ab" + g)),
    ),
    # --- restore: modes and targets --------------------------------------------------------
    ("restore with mode teleport", "InvalidInput", restore(FREE, GEN, "teleport")),
    # (mode "" is the objectives' mode: tests/daemon/test_restore_default.py)
    ("restore with mode COPY", "InvalidInput", restore(FREE, GEN, "COPY")),
    ("swap-in with a target", "InvalidInput", restore(FREE, GEN, "swap-in")),
    ("restore an unknown volume", "NotFound", restore(FREE, "", "copy", "nope")),
    ("restore in place without force", "InvalidInput", restore("")),
    ("restore onto the volume by path", "InvalidInput", restore(VOLUME)),
    ("restore onto a symlink to the volume", "InvalidInput", restore(link("to-volume"))),
    ("restore onto a pool disk", IN_USE, restore(POOL_DISK)),
    ("restore onto a symlink to a pool disk", IN_USE, restore(link("to-pool-disk"))),
    ("restore onto a mounted device", IN_USE, restore(BUSY)),
    ("restore onto a too small device", "DeviceTooSmall", restore(SMALL)),
    ("restore onto a regular file", NOT_BLOCK, restore(FILE)),
    ("restore onto a directory", NOT_BLOCK, restore(DIRECTORY)),
    ("restore onto /dev/null", NOT_BLOCK, restore("/dev/null")),
    ("restore onto a relative path", frozenset({NOT_BLOCK, "InvalidInput"}), restore("loop0")),
    ("restore onto a missing path", NOT_BLOCK, restore("/dev/blockguard-nothing-here")),
    ("restore onto a dangling symlink", NOT_BLOCK, restore(link("dangling"))),
    ("restore onto a huge path", frozenset({NOT_BLOCK, "InvalidInput"}), restore("/" + HUGE)),
    # --- verify ------------------------------------------------------------------------------
    ("verify unknown", "NotFound", call("Verify", "s", "db@20200101T000000.000000Z-0")),
    ("verify malformed", "InvalidInput", call("Verify", "s", "db")),
    ("verify empty", "InvalidInput", call("Verify", "s", "")),
    (
        "verify foreign",
        "NotFound",
        call("Verify", "s", gen_variant(lambda g: g.replace("db@", "nothere@"))),
    ),
    ("verify path", "InvalidInput", call("Verify", "s", "db@../x")),
    ("verify huge", frozenset({"InvalidInput", "NotFound"}), call("Verify", "s", "db@" + HUGE)),
    # --- pools -------------------------------------------------------------------------------
    (
        "pool on a missing path",
        NOT_BLOCK,
        call("CreatePool", "ssasb", "p2", "", ["/dev/nothing"], False),
    ),
    ("pool on a file", NOT_BLOCK, call("CreatePool", "ssasb", "p2", "", [FILE], False)),
    ("pool on a directory", NOT_BLOCK, call("CreatePool", "ssasb", "p2", "", [DIRECTORY], False)),
    ("pool on /dev/null", NOT_BLOCK, call("CreatePool", "ssasb", "p2", "", ["/dev/null"], False)),
    ("pool on a relative path", NOT_BLOCK, call("CreatePool", "ssasb", "p2", "", ["loop0"], False)),
    ("pool on the volume", IN_USE, call("CreatePool", "ssasb", "p2", "", [VOLUME], True)),
    (
        "pool on a symlink to the volume",
        IN_USE,
        call("CreatePool", "ssasb", "p2", "", [link("to-volume")], True),
    ),
    ("pool on the pool disk", IN_USE, call("CreatePool", "ssasb", "p2", "", [POOL_DISK], True)),
    ("pool on a mounted disk", IN_USE, call("CreatePool", "ssasb", "p2", "", [BUSY], True)),
    ("pool without disks", "InvalidInput", call("CreatePool", "ssasb", "p2", "", [], False)),
    (
        "pool with the same disk twice",
        "InvalidInput",
        call("CreatePool", "ssasb", "p2", "", [FREE, FREE], False),
    ),
    ("pool backend zfs", "InvalidInput", call("CreatePool", "ssasb", "p2", "zfs", [FREE], False)),
    (
        "pool backend lvm without device-mapper",
        "Environment",
        call("CreatePool", "ssasb", "p2", "lvm", [FREE], False),
    ),
    (
        "pool name with a slash",
        "InvalidInput",
        call("CreatePool", "ssasb", "a/b", "", [FREE], False),
    ),
    ("pool name ..", "InvalidInput", call("CreatePool", "ssasb", "..", "", [FREE], False)),
    ("pool name empty", "InvalidInput", call("CreatePool", "ssasb", "", "", [FREE], False)),
    ("pool name huge", "InvalidInput", call("CreatePool", "ssasb", HUGE, "", [FREE], False)),
    ("duplicate pool", "AlreadyExists", call("CreatePool", "ssasb", "p1", "", [FREE], False)),
    (
        "pool disk too small",
        "DeviceTooSmall",
        call("CreatePool", "ssasb", "p2", "dir", [SMALL], False),
    ),
    ("extend an unknown pool", "NotFound", call("ExtendPool", "sasb", "nope", [FREE], False)),
    ("extend with the volume", IN_USE, call("ExtendPool", "sasb", "p1", [VOLUME], True)),
    ("extend with its own disk", IN_USE, call("ExtendPool", "sasb", "p1", [POOL_DISK], True)),
    ("extend with a file", NOT_BLOCK, call("ExtendPool", "sasb", "p1", [FILE], False)),
    ("remove an unknown pool", "NotFound", call("RemovePool", "sbb", "nope", False, False)),
    (
        "remove an empty pool name",
        frozenset({"NotFound", "InvalidInput"}),
        call("RemovePool", "sbb", "", False, False),
    ),
    ("remove a pool in use", "Busy", call("RemovePool", "sbb", "p1", False, False)),
]


def _ids() -> list[str]:
    ids = [case[0] for case in DBUS_CASES]
    dupes = {i for i in ids if ids.count(i) > 1}
    assert not dupes, dupes
    return ids


def _full_names(expected: frozenset[str] | str) -> set[str]:
    names = {expected} if isinstance(expected, str) else set(expected)
    return {n if n.startswith("org.freedesktop.") else E + n for n in names}


@pytest.mark.parametrize("case", DBUS_CASES, ids=_ids())
def test_dbus_refusal(world: World, case: tuple[str, frozenset[str] | str, Call]) -> None:
    what, expected, run = case
    with pytest.raises(RemoteError) as info:
        run(world)
    assert info.value.name in _full_names(expected), f"{what}: {info.value}"
    assert "Traceback" not in info.value.message, what
    assert_unchanged(world, what)


# --- D-Bus: what the bus itself refuses --------------------------------------------------


@pytest.mark.parametrize(
    "method,signature,args",
    [
        ("Protect", "sstssa{sv}", ["/dev/loop0\0", "x", 0, "", "", {}]),
        ("SetObjectives", "sa{sv}", ["db", {"rto": Variant("s", "5m\0")}]),
        ("BackupNow", "s", ["db\0"]),
        ("SetObjectives", "sa{sv}", ["db", {"rto": Variant("s", b"\xff\xfe".decode("latin-1"))}]),
    ],
    ids=["nul in a path", "nul in an objective", "nul in a name", "latin-1 bytes in an objective"],
)
def test_bus_level_refusal(world: World, method: str, signature: str, args: list[Any]) -> None:
    """A NUL cannot be carried by a D-Bus string: the call fails before the daemon acts."""
    with Client(world.address) as other, contextlib.suppress(Exception):
        other.call(method, signature, *args)
        # Text that is valid UTF-8 reaches the daemon and must be refused there.
        pytest.fail(f"{method} with {args!r} was accepted")
    assert world.client.call("GetStatus")  # the daemon still answers
    assert_unchanged(world, f"{method} {args!r}")


def test_restore_onto_another_protected_volume(world: World) -> None:
    """Needs part GATE's gate: before it, this restore overwrote the other volume."""
    from blockguard import errors

    if not hasattr(errors, "ProtectedDevice"):
        pytest.skip("the restore-target gate (part GATE) is not merged yet")
    sig = manager_signature(world.client, "Protect")
    # Protect and unprotect write the volume's record on the pool: thawed for them only.
    with thawed(world.pool_mnt):
        world.client.call("Protect", sig, world.free, "other", 0, "", "", {})
    try:
        before = snapshot(world)
        pool_before = sha256_of(world.pool_disk)
        with pytest.raises(RemoteError) as info:
            restore(FREE)(world)
        assert info.value.name in _full_names(IN_USE), info.value
        assert snapshot(world) == before
        assert sha256_of(world.pool_disk) == pool_before
    finally:
        with thawed(world.pool_mnt):
            unprotect("other")(world)
        world.baseline = snapshot(world)  # type: ignore[attr-defined]
        # The record came and went: the pool disk's bytes moved on purpose.
        world.pool_hash = sha256_of(world.pool_disk)  # type: ignore[attr-defined]


# --- the CLI against the same daemon -------------------------------------------------------


def cli(w: World, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "blockguard.cli.main", "--bus", w.address, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


BIG = str(1 << 64)
HUGER = "9" * 40
#: A name or path of bytes that are not UTF-8 (Python keeps them as surrogates): D-Bus
#: cannot carry it; it ended in "internal error" (UnicodeEncodeError, exit 70) once.
NOT_UTF8 = os.fsdecode(b"bad\xff")
NOT_UTF8_SHOWN = "bad\\xff"

#: (id, arguments, exit code, text the message must contain (the bad value)).
CLI_CASES: list[tuple[str, list[Any], int, str]] = [
    ("no command", [], ExitCode.USAGE, "required"),
    ("unknown command", ["explode"], ExitCode.USAGE, "explode"),
    ("unknown pool subcommand", ["pool", "shred"], ExitCode.USAGE, "shred"),
    ("unknown option", ["status", "--colour"], ExitCode.USAGE, "--colour"),
    ("protect without name", ["protect", FREE], ExitCode.USAGE, "name"),
    (
        "protect generations 2**64",
        ["protect", FREE, "x", "--rto", "5m", "--generations", BIG],
        ExitCode.USAGE,
        BIG,
    ),
    (
        "protect generations 40 digits",
        ["protect", FREE, "x", "--generations", HUGER],
        ExitCode.USAGE,
        HUGER,
    ),
    ("protect generations -1", ["protect", FREE, "x", "--generations=-1"], ExitCode.USAGE, "-1"),
    ("protect generations 0", ["protect", FREE, "x", "--generations", "0"], ExitCode.USAGE, "'0'"),
    (
        "protect generations 10001",
        ["protect", FREE, "x", "--generations", "10001"],
        ExitCode.USAGE,
        "10001",
    ),
    (
        "protect generations abc",
        ["protect", FREE, "x", "--generations", "abc"],
        ExitCode.USAGE,
        "abc",
    ),
    (
        "protect generations 1e3",
        ["protect", FREE, "x", "--generations", "1e3"],
        ExitCode.USAGE,
        "1e3",
    ),
    (
        "protect generations arabic",
        ["protect", FREE, "x", "--generations", "٣"],
        ExitCode.USAGE,
        "٣",
    ),
    ("protect chunk 2**64", ["protect", FREE, "x", "--chunk-size", BIG], ExitCode.USAGE, BIG),
    ("protect chunk -1", ["protect", FREE, "x", "--chunk-size=-1"], ExitCode.USAGE, "-1"),
    (
        "protect chunk 64KiB text",
        ["protect", FREE, "x", "--chunk-size", "64k"],
        ExitCode.USAGE,
        "64k",
    ),
    (
        "protect chunk 12345",
        ["protect", FREE, "x", "--chunk-size", "12345"],
        ExitCode.USAGE,
        "12345",
    ),
    ("protect rto 0s", ["protect", FREE, "x", "--rto", "0s"], ExitCode.USAGE, "0s"),
    ("protect rto 400d", ["protect", FREE, "x", "--rto", "400d"], ExitCode.USAGE, "400d"),
    ("protect rpo 25:00", ["protect", FREE, "x", "--rpo", "25:00"], ExitCode.USAGE, "25:00"),
    (
        "protect tz Mars",
        ["protect", FREE, "x", "--rpo", "02:30", "--tz", "Mars/Base"],
        ExitCode.USAGE,
        "Mars/Base",
    ),
    (
        "protect restore mode",
        ["protect", FREE, "x", "--restore-mode", "teleport"],
        ExitCode.USAGE,
        "teleport",
    ),
    ("protect unknown pool", ["protect", FREE, "x", "--pool", "nope"], ExitCode.NOT_FOUND, "nope"),
    ("protect /dev/null", ["protect", "/dev/null", "x"], ExitCode.USAGE, "/dev/null"),
    ("protect a pool disk", ["protect", POOL_DISK, "x"], ExitCode.BUSY, POOL_DISK),
    ("protect a bad name", ["protect", FREE, "a/b"], ExitCode.USAGE, "a/b"),
    ("objectives nothing given", ["objectives", "db"], ExitCode.USAGE, "--rto"),
    (
        "objectives generations 2**64",
        ["objectives", "db", "--generations", BIG],
        ExitCode.USAGE,
        BIG,
    ),
    (
        "objectives generations 40 digits",
        ["objectives", "db", "--generations", HUGER],
        ExitCode.USAGE,
        HUGER,
    ),
    ("objectives rto 0s", ["objectives", "db", "--rto", "0s"], ExitCode.USAGE, "0s"),
    ("objectives rto 31d", ["objectives", "db", "--rto", "31d"], ExitCode.USAGE, "31d"),
    (
        "objectives rpo every 0m",
        ["objectives", "db", "--rpo", "every 0m"],
        ExitCode.USAGE,
        "every 0m",
    ),
    (
        "objectives tz",
        ["objectives", "db", "--tz", "../../etc/passwd"],
        ExitCode.USAGE,
        "../../etc/passwd",
    ),
    (
        "objectives unknown volume",
        ["objectives", "nope", "--rto", "5m"],
        ExitCode.NOT_FOUND,
        "nope",
    ),
    ("objectives restore mode", ["objectives", "db", "--restore-mode", "x"], ExitCode.USAGE, "'x'"),
    ("restore mode", ["restore", "db", "--mode", "teleport"], ExitCode.USAGE, "teleport"),
    (
        "restore onto /dev/null",
        ["restore", "db", "--target", "/dev/null"],
        ExitCode.USAGE,
        "/dev/null",
    ),
    (
        "restore onto a pool disk",
        ["restore", "db", "--target", POOL_DISK],
        ExitCode.BUSY,
        POOL_DISK,
    ),
    (
        "restore bad generation",
        ["restore", "db", "--generation", "nonsense", "--target", FREE],
        ExitCode.USAGE,
        "nonsense",
    ),
    ("verify malformed", ["verify", "nonsense"], ExitCode.USAGE, "nonsense"),
    ("backup unknown", ["backup", "nope"], ExitCode.NOT_FOUND, "nope"),
    ("unprotect unknown", ["unprotect", "nope"], ExitCode.NOT_FOUND, "nope"),
    ("generations unknown", ["generations", "nope"], ExitCode.NOT_FOUND, "nope"),
    ("plan unknown", ["plan", "nope"], ExitCode.NOT_FOUND, "nope"),
    ("volume show unknown", ["volume", "show", "nope"], ExitCode.NOT_FOUND, "nope"),
    ("pool create on a file", ["pool", "create", "p2", FILE], ExitCode.USAGE, FILE),
    (
        "pool create lvm without dm",
        ["pool", "create", "p2", FREE, "--backend", "lvm"],
        ExitCode.ENVIRONMENT,
        "lvm",
    ),
    ("pool remove unknown", ["pool", "remove", "nope"], ExitCode.NOT_FOUND, "nope"),
    ("pool remove in use", ["pool", "remove", "p1"], ExitCode.BUSY, "p1"),
    *(
        (
            "not UTF-8: "
            + " ".join("X" if a == NOT_UTF8 else a for a in args if isinstance(a, str)),
            args,
            ExitCode.USAGE,
            NOT_UTF8_SHOWN,
        )
        for args in (
            ["protect", FREE, NOT_UTF8],
            ["protect", FREE, "x", "--pool", NOT_UTF8],
            ["objectives", NOT_UTF8, "--rto", "5m"],
            ["backup", NOT_UTF8],
            ["unprotect", NOT_UTF8],
            ["restore", "db", "--target", NOT_UTF8],
            ["restore", "db", "--generation", NOT_UTF8, "--target", FREE],
            ["verify", NOT_UTF8],
            ["pool", "extend", "p1", NOT_UTF8],
            ["pool", "remove", NOT_UTF8],
        )
    ),
]


def _cli_ids() -> list[str]:
    ids = [case[0] for case in CLI_CASES]
    assert len(set(ids)) == len(ids)
    return ids


@pytest.mark.parametrize("case", CLI_CASES, ids=_cli_ids())
def test_cli_refusal(world: World, case: tuple[str, list[Any], int, str]) -> None:
    what, args, code, names = case
    argv = [a(world) if callable(a) else a for a in args]
    needle = names(world) if callable(names) else names
    result = cli(world, *argv)
    assert result.returncode == code, f"{what}: {result.returncode} {result.stderr}"
    assert needle in result.stderr, f"{what}: {needle!r} not in {result.stderr!r}"
    assert "Traceback" not in result.stderr, what
    assert_unchanged(world, what)


def test_suite_size() -> None:
    assert len(DBUS_CASES) + len(CLI_CASES) >= 150


def test_pool_disk_unchanged_after_every_case(world: World) -> None:
    """The pool disk is frozen during the module; its hash at the end equals the start."""
    assert sha256_of(world.pool_disk) == world.pool_hash  # type: ignore[attr-defined]
    assert re.fullmatch(r"db@.+", world.generation)
