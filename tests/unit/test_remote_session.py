"""The protected host's session with a target, over the pipes of a local serve command
(what ssh's forced command runs): a generation sent with puts in flight comes back
byte-exact, the target's refusals arrive named and the session goes on, a client the
target does not serve is refused at the hello, a target that dies ends the session with
a named error, and the child is reaped in every case. The link probe's figures are
shaped for the performance table."""

from __future__ import annotations

import fcntl
import os
import sys
import time
from pathlib import Path

import pytest

from blockguard.core.perftable import DeviceSpeed
from blockguard.errors import (
    InvalidInput,
    NotAuthorized,
    NotFound,
    WireClosed,
    WireCorrupt,
)
from blockguard.storage.remote import session as session_module
from blockguard.storage.remote.areaprobe import keep_area_speed
from blockguard.storage.remote.linkprobe import LinkSpeed, measure_link
from blockguard.storage.remote.packstore import PackStore, pack_digest
from blockguard.storage.remote.session import RemoteSession
from blockguard.storage.runner import Runner
from tests.support.remote import local_serve

REPO = Path(__file__).resolve().parents[2]
KiB = 1 << 10


def assert_reaped(pid: int) -> None:
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    assert not Path(f"/proc/{pid}").exists()


serve = local_serve


@pytest.fixture
def area(tmp_path: Path) -> Path:
    PackStore.create(tmp_path, "C1").close()
    return tmp_path


def index_of(packs: dict[int, bytes]) -> dict[str, object]:
    return {
        "packs": [{"pack": n, "size": len(p), "xxh3_128": pack_digest(p)} for n, p in packs.items()]
    }


def test_a_generation_round_trips_with_puts_in_flight(area: Path) -> None:
    packs = {n: os.urandom(300 * KiB + n) for n in range(7)}
    with serve(area, window=3) as session:
        # The pipes to the child are widened (a put then blocks less while ssh drains).
        for pipe in (session.child.stdin, session.child.stdout):
            assert fcntl.fcntl(pipe.fileno(), fcntl.F_GETPIPE_SZ) == session_module.PIPE_BYTES
        assert session.begin("v1@g1", {"kind": "full"}).packs == {}
        assert session.put_packs("v1@g1", list(packs.items())[:5]) == {
            n: len(p) for n, p in list(packs.items())[:5]
        }
        # A resume: status says what is stored, only the rest is sent.
        state = session.status("v1@g1")
        assert not state.committed and set(state.packs) == {0, 1, 2, 3, 4}
        assert session.put("v1@g1", 5, packs[5]) == len(packs[5])
        assert session.put_packs("v1@g1", [(6, packs[6])]) == {6: len(packs[6])}
        done = session.commit("v1@g1", index_of(packs), b"sealed manifest")
        assert done.committed and done.meta == {"kind": "full"}
        pid = session.child.pid
    assert session.child.poll() == 0
    assert_reaped(pid)

    with serve(area) as session:
        [listed] = session.list()
        assert (listed.generation, listed.packs, listed.manifest) == (
            "v1@g1",
            7,
            b"sealed manifest",
        )
        assert {n: session.get("v1@g1", n) for n in packs} == packs
        session.mark_damaged("v1@g1", "checked by a test", chunk=3)
        assert session.list()[0].problem is not None
        space = session.space()
        assert space.total >= space.free > 0 and space.used >= sum(map(len, packs.values()))
        session.remove("v1@g1")
        assert session.list() == []


def test_refusals_arrive_named_and_the_session_goes_on(area: Path) -> None:
    with serve(area, window=2) as session:
        with pytest.raises(NotFound, match=r"target t1: .*generation v9@g9 does not exist"):
            session.get("v9@g9", 0)
        session.begin("v1@g1")
        # A refused pack among puts in flight: the answers in flight are collected,
        # nothing after it is sent, the first refusal is raised.
        with pytest.raises(InvalidInput, match="pack number"):
            session.put_packs("v1@g1", [(0, b"a"), (10**7, b"b"), (1, b"c"), (2, b"d")])
        assert set(session.status("v1@g1").packs) <= {0, 1}
        assert 2 not in session.status("v1@g1").packs
        assert session.probe(down=10, up=b"xyz") != b""


def test_a_client_the_target_does_not_serve_is_refused_at_the_hello(area: Path) -> None:
    runner = Runner()
    with pytest.raises(NotAuthorized, match="client 'C7' is not served"):
        RemoteSession.start(
            [sys.executable, "-m", "blockguard.engine.servecmd", "--client", "C7",
             "--root", str(area)],
            peer="target t1", runner=runner, env={"PYTHONPATH": str(REPO)},
        )  # fmt: skip
    [record] = runner.history()
    assert record.state in ("finished", "killed")
    assert not (area / "clients" / "C7").exists()


def test_a_target_that_dies_ends_the_session_named_and_reaped(area: Path) -> None:
    session = serve(area)
    session.begin("v1@g1")
    os.kill(session.child.pid, 9)
    with pytest.raises(WireClosed, match="target t1"):
        session.put("v1@g1", 0, b"x" * 1000)
    assert session.child.poll() == -9
    assert_reaped(session.child.pid)
    with pytest.raises(WireClosed, match="closed"):
        session.status("v1@g1")
    assert session.close() == -9


def test_a_banner_instead_of_a_hello_is_corrupt_and_the_child_is_killed() -> None:
    runner = Runner()
    # A login banner printed by a shell profile on the target, then nothing: the child
    # would wait for ever, so the session must kill it rather than wait for its end.
    script = "echo 'Welcome to the backup host'; exec sleep 600"
    with pytest.raises(WireCorrupt, match="target t1: corrupt frame: it starts with b'Welcome"):
        RemoteSession.start(
            ["sh", "-c", script], peer="target t1", runner=runner, close_timeout=3600
        )
    [record] = runner.history()
    assert record.state == "killed" and record.pid is not None
    assert_reaped(record.pid)


def test_an_error_in_the_caller_kills_and_reaps_the_child(area: Path) -> None:
    with pytest.raises(RuntimeError), serve(area, close_timeout=3600) as session:
        raise RuntimeError("the caller failed")
    assert session.child.poll() == -9
    assert_reaped(session.child.pid)


def test_the_link_measured_is_shaped_for_the_performance_table(area: Path) -> None:
    with serve(area) as session:
        link = measure_link(session, payload=256 * KiB, rounds=2, pings=3)
    print(link.describe())
    assert link.down > 0 and link.up > 0 and link.round_trip > 0
    assert link.device_speed() == DeviceSpeed(link.down, link.up, link.down, link.up)
    area_speed = DeviceSpeed(100.0, 50.0, 10.0, 5.0)
    assert LinkSpeed(down=20.0, up=30.0, round_trip=0.01).limit(area_speed) == DeviceSpeed(
        20.0, 30.0, 10.0, 5.0
    )


def test_a_goodbye_that_fails_still_reaps_the_child(
    area: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = serve(area, close_timeout=3600)

    def broken_bye() -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(session.channel, "bye", broken_bye)
    with pytest.raises(OSError, match="Input/output"):
        session.close()
    assert session.child.poll() == -9
    assert_reaped(session.child.pid)


def test_areas_are_reported_with_the_figures_the_target_keeps(area: Path) -> None:
    keep_area_speed(area, DeviceSpeed(300e6, 200e6, 30e6, 20e6), time.time())
    with serve(area) as session:
        assert session.channel.version == 2
        [found] = session.areas() or []
    assert found.name == area.resolve().name and found.layout == "dir"
    assert found.speed == DeviceSpeed(300e6, 200e6, 30e6, 20e6)
    assert found.total > 0 and 0 < found.free <= found.total


def test_a_target_speaking_version_1_is_not_asked_for_areas(
    area: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The client offers only version 1, as a target that predates areas would agree on.
    monkeypatch.setattr(session_module, "PROTOCOL_VERSIONS", (1,))
    with serve(area) as session:
        assert session.channel.version == 1
        assert session.areas() is None
        # Asked anyway, the target refuses by name and the conversation goes on.
        with pytest.raises(InvalidInput, match="areas needs protocol version 2"):
            session._call("areas")
        # So is ``link`` (synthesized fulls): not asked, and refused by name if asked.
        assert session.link("v1@g2", "v1@g1", [(0, 0)]) is None
        with pytest.raises(InvalidInput, match="link needs protocol version 2"):
            session._call("link", {"generation": "v1@g2", "source": "v1@g1", "packs": [[0, 0]]})
        assert session.space().total > 0
