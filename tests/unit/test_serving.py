"""The target's serve command over pipes, as ssh runs it: a generation sent with requests
in flight comes back byte-exact, errors arrive named and the conversation goes on, an
unknown client is refused at the hello, and a replayed or forged request ends the
conversation without being carried out."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockguard.errors import (
    AlreadyExists,
    ExitCode,
    InvalidInput,
    NotAuthorized,
    NotFound,
    WireClosed,
)
from blockguard.storage.remote.channel import PROTOCOL_VERSIONS, Channel
from blockguard.storage.remote.packstore import PackStore, pack_digest
from blockguard.storage.remote.wire import Frame, FrameKind, encode_frame
from tests.timeouts import scaled

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def serve_argv(area: Path, client: str) -> list[str]:
    module = "blockguard.engine.servecmd"
    return [sys.executable, "-m", module, "--client", client, "--root", str(area)]


@contextlib.contextmanager
def served(area: Path, client: str = "C1") -> Iterator[tuple[Channel, subprocess.Popen[bytes]]]:
    """A serve process on pipes and the client's channel to it (after the hello)."""
    proc = subprocess.Popen(
        serve_argv(area, client),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdin and proc.stdout
    try:
        yield Channel(proc.stdout, proc.stdin, peer="target t1"), proc
    finally:
        with contextlib.suppress(OSError):
            proc.stdin.close()
        try:
            proc.wait(scaled(30))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            if proc.stderr:
                proc.stderr.close()


@pytest.fixture
def area(tmp_path: Path) -> Path:
    (tmp_path / "area").mkdir()
    PackStore.create(tmp_path / "area", "C1").close()
    return tmp_path / "area"


def test_a_generation_sent_with_requests_in_flight_comes_back_byte_exact(area: Path) -> None:
    packs = [os.urandom(MiB + i) for i in range(12)]
    index = {
        "packs": [
            {"pack": i, "size": len(p), "xxh3_128": pack_digest(p)} for i, p in enumerate(packs)
        ]
    }
    with served(area) as (channel, proc):
        assert channel.greet() == max(PROTOCOL_VERSIONS)
        state = channel.call("begin", {"generation": "v1@g1", "meta": {"kind": "full"}}).meta
        assert state["committed"] is False and state["packs"] == []
        assert (state["generation"], state["meta"]) == ("v1@g1", {"kind": "full"})
        sent: list[int] = []
        for i, data in enumerate(packs):
            if len(sent) == channel.max_outstanding:
                channel.response(sent.pop(0))
            sent.append(channel.request("put", {"generation": "v1@g1", "pack": i}, data))
        for request_id in sent:
            assert channel.response(request_id).meta["size"] > MiB
        status = channel.call("status", {"generation": "v1@g1"}).meta
        assert status["packs"] == [[i, len(p)] for i, p in enumerate(packs)]
        done = channel.call("commit", {"generation": "v1@g1", "index": index}, b"sealed")
        assert done.meta["committed"] is True

        listed = channel.call("list")
        [entry] = listed.meta["generations"]
        assert (entry["generation"], entry["packs"], entry["manifest_size"]) == ("v1@g1", 12, 6)
        assert listed.payload == b"sealed"
        for i, data in enumerate(packs):
            got = channel.call("get", {"generation": "v1@g1", "pack": i})
            assert got.payload == data
        space = channel.call("space").meta
        assert space["used"] >= sum(map(len, packs)) and space["free"] > 0
        probe = channel.call("probe", {"down": 100_000}, b"u" * 5000)
        assert probe.meta == {"received": 5000} and len(probe.payload) == 100_000
        channel.bye()
        assert proc.wait(scaled(30)) == 0
    with PackStore.open(area, "C1") as store:
        assert [store.get("v1@g1", i) for i in range(12)] == packs


def test_errors_arrive_named_and_the_conversation_goes_on(area: Path) -> None:
    with served(area) as (channel, proc):
        channel.greet()
        with pytest.raises(NotFound, match=r"^target t1: generation g9 does not exist"):
            channel.call("get", {"generation": "g9", "pack": 0})
        with pytest.raises(InvalidInput, match="unknown operation 'format'"):
            channel.call("format")
        with pytest.raises(InvalidInput, match="argument 'pack' must be int"):
            channel.call("put", {"generation": "g1", "pack": True})
        with pytest.raises(InvalidInput, match=r"unknown arguments \['client'\]"):
            channel.call("list", {"client": "C2"})
        with pytest.raises(InvalidInput, match=r"generation '\.\./C2'"):
            channel.call("begin", {"generation": "../C2"})
        channel.call("begin", {"generation": "g1"})
        channel.call("put", {"generation": "g1", "pack": 0}, b"x")
        channel.call("commit", {"generation": "g1", "index": {"packs": [
            {"pack": 0, "size": 1, "xxh3_128": pack_digest(b"x")}]}})  # fmt: skip
        with pytest.raises(AlreadyExists):
            channel.call("begin", {"generation": "g1"})
        with pytest.raises(InvalidInput, match="argument 'chunk' must be int"):
            channel.call("mark-damaged", {"generation": "g1", "reason": "r", "chunk": "7"})
        channel.call("mark-damaged", {"generation": "g1", "reason": "restore failed"})
        [entry] = channel.call("list").meta["generations"]
        assert entry["problem"] == "marked damaged: restore failed"
        channel.call("remove", {"generation": "g1"})
        assert channel.call("list").meta == {"generations": []}
        channel.bye()
        assert proc.wait(scaled(30)) == 0
    assert list((area / "clients").iterdir()) == [area / "clients" / "C1"]


def test_a_client_without_a_root_is_refused_at_the_hello(area: Path) -> None:
    with served(area, "C2") as (channel, proc):
        with pytest.raises(NotAuthorized, match="client 'C2' is not served by this target"):
            channel.greet()
        assert proc.wait(scaled(30)) == ExitCode.PERMISSION
    assert not (area / "clients" / "C2").exists()


def raw_request(request_id: int, op: str, args: dict[str, object], payload: bytes = b"") -> bytes:
    return encode_frame(Frame(FrameKind.REQUEST, request_id, {"op": op, "args": args}, payload))


def test_a_replayed_put_is_refused_and_does_not_overwrite(area: Path) -> None:
    with served(area) as (channel, proc):
        channel.greet()
        assert proc.stdin
        proc.stdin.write(raw_request(1, "begin", {"generation": "g1"}))
        proc.stdin.write(raw_request(2, "put", {"generation": "g1", "pack": 0}, b"old"))
        proc.stdin.write(raw_request(3, "put", {"generation": "g1", "pack": 0}, b"new"))
        # Request 2 again, as an attacker on the stream (or a bug) would resend it.
        proc.stdin.write(raw_request(2, "put", {"generation": "g1", "pack": 0}, b"old"))
        proc.stdin.flush()
        for request_id in (1, 2, 3):
            assert channel.receive().request_id == request_id
        with pytest.raises(WireClosed):
            channel.receive()
        assert proc.wait(scaled(30)) == ExitCode.ENVIRONMENT
        assert proc.stderr and b"request 2 does not follow request 3" in proc.stderr.read()
    with PackStore.open(area, "C1") as store:
        assert store.status("g1").packs == {0: 3}
    pack = area / "clients" / "C1" / "generations" / "g1" / "packs" / "000000.pack"
    assert pack.read_bytes() == b"new"


def test_a_forged_request_is_refused_unread_and_nothing_is_stored(area: Path) -> None:
    with served(area) as (channel, proc):
        channel.greet()
        assert proc.stdin
        forged = bytearray(raw_request(1, "begin", {"generation": "g1"}))
        forged[-3] ^= 0x01  # one bit of the body: its checksum no longer matches
        proc.stdin.write(bytes(forged))
        proc.stdin.flush()
        with pytest.raises(WireClosed):
            channel.receive()
        assert proc.wait(scaled(30)) == ExitCode.ENVIRONMENT
    assert list((area / "clients" / "C1" / "generations").iterdir()) == []


def test_a_cut_inside_a_put_stores_nothing_of_it_and_the_next_connection_resumes(
    area: Path,
) -> None:
    with served(area) as (channel, proc):
        channel.greet()
        channel.call("begin", {"generation": "g1"})
        channel.call("put", {"generation": "g1", "pack": 0}, b"a" * 5000)
        assert proc.stdin
        whole = raw_request(3, "put", {"generation": "g1", "pack": 1}, b"b" * 5000)
        proc.stdin.write(whole[: len(whole) // 2])  # the link is cut half way
        proc.stdin.close()
        assert proc.wait(scaled(30)) == ExitCode.ENVIRONMENT
        assert proc.stderr and b"ended in the middle of a frame" in proc.stderr.read()
    with served(area) as (channel, proc):
        channel.greet()
        state = channel.call("begin", {"generation": "g1"}).meta
        assert state["packs"] == [[0, 5000]]
        channel.call("put", {"generation": "g1", "pack": 1}, b"b" * 5000)
        index = {"packs": [{"pack": i, "size": 5000, "xxh3_128": pack_digest(d * 5000)}
                           for i, d in enumerate((b"a", b"b"))]}  # fmt: skip
        assert channel.call("commit", {"generation": "g1", "index": index}).meta["committed"]
        channel.bye()
        assert proc.wait(scaled(30)) == 0


def test_create_makes_a_client_root_that_serve_then_serves(area: Path) -> None:
    made = subprocess.run(
        [*serve_argv(area, "C5"), "--create"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        timeout=scaled(60),
    )
    assert made.returncode == 0, made.stderr
    with served(area, "C5") as (channel, proc):
        channel.greet()
        assert channel.call("list").meta == {"generations": []}
        channel.bye()
        assert proc.wait(scaled(30)) == 0
    bad = subprocess.run(
        [*serve_argv(area, "../C1"), "--create"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        timeout=scaled(60),
    )
    assert bad.returncode == ExitCode.USAGE and b"client name '../C1'" in bad.stderr
    assert sorted(p.name for p in (area / "clients").iterdir()) == ["C1", "C5"]


def test_link_makes_packs_from_an_earlier_generation_and_refuses_another_clients(
    area: Path,
) -> None:
    with PackStore.create(area, "C2") as other:
        other.begin("v1@x1", {"volume": "v1"})
        other.put("v1@x1", 0, b"theirs")
        other.commit(
            "v1@x1", {"packs": [{"pack": 0, "size": 6, "xxh3_128": pack_digest(b"theirs")}]}, b"m"
        )
    with served(area) as (channel, proc):
        channel.greet()
        channel.call("begin", {"generation": "v1@g1", "meta": {"volume": "v1"}})
        channel.call("put", {"generation": "v1@g1", "pack": 0}, b"old")
        entry = {"pack": 0, "size": 3, "xxh3_128": pack_digest(b"old")}
        channel.call("commit", {"generation": "v1@g1", "index": {"packs": [entry]}}, b"m1")
        channel.call("begin", {"generation": "v1@g2", "meta": {"volume": "v1"}})
        before = {p: p.read_bytes() for p in area.rglob("*") if p.is_file()}
        with pytest.raises(NotFound, match="v1@x1"):
            channel.call("link", {"generation": "v1@g2", "source": "v1@x1", "packs": [[0, 0]]})
        with pytest.raises(InvalidInput, match="pair"):
            channel.call("link", {"generation": "v1@g2", "source": "v1@g1", "packs": [[0, -1]]})
        with pytest.raises(InvalidInput, match="made twice"):
            channel.call(
                "link", {"generation": "v1@g2", "source": "v1@g1", "packs": [[0, 0], [0, 0]]}
            )
        assert {p: p.read_bytes() for p in area.rglob("*") if p.is_file()} == before
        made = channel.call("link", {"generation": "v1@g2", "source": "v1@g1", "packs": [[0, 0]]})
        assert made.meta == {"packs": [entry]}
        channel.call("commit", {"generation": "v1@g2", "index": {"packs": [entry]}}, b"m2")
        channel.call("remove", {"generation": "v1@g1"})
        assert channel.call("get", {"generation": "v1@g2", "pack": 0}).payload == b"old"
        channel.bye()
        assert proc.wait(scaled(30)) == 0
    with PackStore.open(area, "C2") as other:
        assert other.get("v1@x1", 0) == b"theirs"
