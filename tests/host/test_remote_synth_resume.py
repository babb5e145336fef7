"""A synthesized full cut on its way over real ssh (the network lab's sshd), whose source
full is gone from the target by the time it resumes: the packs the cut transfer linked
from that full are sealed under its key, and seal to the same size here, so a resume that
took them by their size had its commit refused. The resume sends them again, commits,
and the full restores bit-exact without the full it was first synthesized from."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import pytest
from pyroaring import BitMap

from blockguard.errors import WireError
from blockguard.storage.pool.remotepool import RemotePool
from blockguard.storage.remote.keys import MasterKey
from blockguard.storage.remote.packstore import PackStore
from blockguard.storage.remote.session import RemoteSession
from blockguard.storage.remote.ssh import pin_host_key
from tests.host.test_remote_ssh_session import Client, host_fingerprint, serve_command
from tests.support.netlab import NetLab
from tests.unit.test_remotepool import CHUNK, SIZE, backup, full_from, restore

pytestmark = pytest.mark.root

PER = 8 * (1 << 20) // CHUNK  # chunks of a data pack


class CutAfter:
    """A session factory that kills the ssh client once ``puts`` packs went out (and
    sends one put at a time, so the cut is exact); counts the puts."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.kill_after: int | None = None
        self.puts = 0

    def __call__(self) -> RemoteSession:
        session = self.client.connect()
        request = session.channel.request

        def counted(op: str, args: object = None, payload: bytes = b"") -> int:
            if op == "put":
                self.puts += 1
                if self.kill_after is not None and self.puts > self.kill_after:
                    os.kill(session.child.pid, signal.SIGKILL)
            return request(op, args, payload)  # type: ignore[arg-type]

        session.channel.request = counted  # type: ignore[method-assign]
        return session


def test_a_cut_synthesized_full_resumes_after_its_source_full_was_removed(
    net_lab: NetLab, tmp_path: Path
) -> None:
    area = net_lab.run_dir / "area"
    area.mkdir()
    PackStore.create(area, "C1").close()
    client = Client(net_lab, tmp_path / "state")
    client.authorize(serve_command("C1", area))
    pin_host_key(
        client.address, host_fingerprint(net_lab), client.known_hosts,
        target="backup1", runner=client.runner,
    )  # fmt: skip
    sessions = CutAfter(client)
    rng = random.Random(17)
    # Random data stores raw: a pack sealed again is the size of the one linked.
    data = bytearray(rng.randbytes(SIZE))
    with RemotePool("offsite", sessions, MasterKey.generate(), target="t1", area="main") as pool:
        first = backup(pool, bytes(data))
        changed = BitMap([3, 2 * PER + 1])  # packs 0 and 2; pack 1 is linked
        for chunk in changed:
            data[chunk * CHUNK] ^= 0x5A
        pool.close()  # the next session is the one cut
        sessions.puts, sessions.kill_after = 0, 1
        with pytest.raises(WireError):
            full_from(pool, bytes(data), first, changed)
        sessions.kill_after = None
        gens = area / "clients" / "C1" / "generations"
        (open_gen,) = [g for g in gens.iterdir() if not (g / "index.json").exists()]
        assert sorted(p.name for p in (open_gen / "packs").iterdir()) == [
            "000000.pack",
            "000001.pack",
        ]  # pack 0 put before the cut, pack 1 linked from the first full
        # The first full goes (retention on the target, by hand): nothing to link now.
        pool.remove_generation("db", first.generation_id)

        sessions.puts = 0
        second = full_from(pool, bytes(data), first, changed)

        # Pack 0 was taken as stored; pack 1 (the stale link), pack 2 and the checksum
        # pack crossed the link.
        assert sessions.puts == 3
        assert "origins" not in second.storage
        assert [m.generation_id for m in pool.generations("db")] == [second.generation_id]
        assert restore(pool, second.generation_id) == bytes(data)
