"""The target's serve command behind sshd, as a client reaches it (issue 11): a key whose
forced command serves client C1 stores a generation and reads it back byte-exact over
ssh from the protected namespace, and a second key forced to C2 can neither list, read
nor remove C1's generation, whatever command it asks for, and changes nothing."""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockguard.errors import NotFound
from blockguard.storage.remote.channel import Channel
from blockguard.storage.remote.packstore import PackStore, pack_digest
from tests.support.netlab import ClientKey, NetLab, require_netlab
from tests.timeouts import scaled

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20


@pytest.fixture(autouse=True)
def _can_run() -> None:
    require_netlab()


def serve_argv(client: str, area: Path) -> list[str]:
    module = "blockguard.engine.servecmd"
    return [sys.executable, "-m", module, "--client", client, "--root", str(area)]


def serve_command(client: str, area: Path) -> str:
    """The forced command of a client's key: this checkout's serve for ``client``."""
    return (
        f"cd {shlex.quote(str(REPO))} && PYTHONPATH=. exec {shlex.join(serve_argv(client, area))}"
    )


@contextlib.contextmanager
def connected(lab: NetLab, key: ClientKey, asked: str = "serve") -> Iterator[Channel]:
    """A channel over ``ssh -T`` from the protected namespace with ``key`` (after the hello);
    ``asked`` is the command the client asks for (the forced one runs instead)."""
    proc = subprocess.Popen(
        lab.in_prot([*lab.ssh_argv(key), "--", asked]),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin and proc.stdout and proc.stderr
    channel = Channel(proc.stdout, proc.stdin, peer="target")
    try:
        channel.greet()
        yield channel
        channel.bye()
        proc.stdin.close()
        assert proc.wait(scaled(60)) == 0, proc.stderr.read().decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            with contextlib.suppress(OSError):
                stream.close()


@pytest.fixture
def area(net_lab: NetLab) -> Path:
    area = net_lab.run_dir / "area"
    area.mkdir()
    for client in ("C1", "C2"):
        PackStore.create(area, client).close()
    return area


def tree(path: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(path.rglob("*"))
    }


def test_a_generation_round_trips_over_ssh_and_another_key_reaches_none_of_it(
    net_lab: NetLab, area: Path
) -> None:
    c1 = net_lab.add_client("c1", command=serve_command("C1", area), restrict=True)
    c2 = net_lab.add_client("c2", command=serve_command("C2", area), restrict=True)
    packs = [os.urandom(2 * MiB + i) for i in range(5)]
    index = {
        "packs": [
            {"pack": i, "size": len(p), "xxh3_128": pack_digest(p)} for i, p in enumerate(packs)
        ]
    }
    with connected(net_lab, c1) as channel:
        channel.call("begin", {"generation": "v1@g1", "meta": {"kind": "full"}})
        sent = [
            channel.request("put", {"generation": "v1@g1", "pack": i}, data)
            for i, data in enumerate(packs)
        ]
        for request_id in sent:
            channel.response(request_id)
        channel.call("commit", {"generation": "v1@g1", "index": index}, b"sealed manifest")
    with connected(net_lab, c1) as channel:
        listed = channel.call("list")
        assert [g["generation"] for g in listed.meta["generations"]] == ["v1@g1"]
        assert listed.payload == b"sealed manifest"
        got = [channel.call("get", {"generation": "v1@g1", "pack": i}).payload for i in range(5)]
        assert got == packs

    before = tree(area / "clients" / "C1")
    # C2's key, asking to be served as C1: the forced command serves C2 all the same.
    with connected(net_lab, c2, shlex.join(serve_argv("C1", area))) as channel:
        assert channel.call("list").meta == {"generations": []}
        for op, args in (
            ("get", {"generation": "v1@g1", "pack": 0}),
            ("status", {"generation": "v1@g1"}),
            ("remove", {"generation": "v1@g1"}),
        ):
            with pytest.raises(NotFound, match="generation v1@g1 does not exist"):
                channel.call(op, args)
    assert tree(area / "clients" / "C1") == before
    assert list((area / "clients" / "C2" / "generations").iterdir()) == []
