"""RemotePool through the storage layer's own backup and restore, unchanged: a volume on
a loop device backed up (a full and two incrementals) into a target over the pipes of a
local serve command and then over real ssh in the network lab (host key pinned for the
fingerprint the target's administrator read out), and each generation restored to a new
loop device bit-exact. Over ssh, the bytes an incremental sends per changed byte are
printed (design: <= 1.05 before compression; printed, not judged)."""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from pyroaring import BitMap

from blockguard.core.vocab import GenerationKind
from blockguard.storage.backup import run_backup
from blockguard.storage.manifest import VolumeIdentity
from blockguard.storage.pool.remotepool import RemotePool
from blockguard.storage.remote.keys import MasterKey
from blockguard.storage.remote.packstore import PackStore
from blockguard.storage.remote.session import RemoteSession
from blockguard.storage.restore import restore_to_device
from tests.support.remote import local_serve

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20
CHUNK = 64 << 10
SIZE = 24 * MiB


def sha256_of(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(SIZE)).hexdigest()


class PutCounter:
    """Wraps a session factory: counts the bytes of every put sent."""

    def __init__(self, factory: Callable[[], RemoteSession]) -> None:
        self.factory = factory
        self.bytes = 0

    def __call__(self) -> RemoteSession:
        session = self.factory()
        request = session.channel.request

        def counted(op: str, args: object = None, payload: bytes = b"") -> int:
            if op == "put":
                self.bytes += len(payload)
            return request(op, args, payload)  # type: ignore[arg-type]

        session.channel.request = counted  # type: ignore[method-assign]
        return session


def round_trip(loopdev: Callable[..., str], pool: RemotePool, sent: PutCounter) -> list[float]:
    """A full and two incrementals of a loop device, each restored to a new one bit-exact;
    returns the bytes each incremental sent per changed byte."""
    rng = random.Random(21)
    volume = loopdev(SIZE, "volume.img")
    snap = loopdev(SIZE, "snap.img")
    ident = VolumeIdentity("db", SIZE, "7:0")
    fd = os.open(volume, os.O_RDWR)
    try:
        # Random everywhere: nothing compresses, so the ratio is the packing overhead.
        os.pwrite(fd, rng.randbytes(SIZE), 0)
        history: list[tuple[str, str]] = []
        ratios = []
        parent = None
        changed = BitMap()
        for kind in ("full", "incremental", "incremental"):
            if parent is not None:
                changed = BitMap()
                for _ in range(60):
                    off = rng.randrange(SIZE // 4096) * 4096
                    os.pwrite(fd, rng.randbytes(4096), off)
                    changed.add(off // CHUNK)
            os.fsync(fd)
            with open(snap, "r+b") as f:
                f.write(os.pread(fd, SIZE, 0))
                f.flush()
                os.fsync(f.fileno())
            before = sent.bytes
            result = run_backup(
                pool,
                ident,
                snap,
                GenerationKind(kind),
                changed if parent else None,
                chunk_size=CHUNK,
                parent_id=parent,
            )
            if parent is not None:
                ratios.append((sent.bytes - before) / (len(changed) * CHUNK))
            parent = result.manifest.generation_id
            history.append((parent, sha256_of(snap)))
    finally:
        os.close(fd)
    assert [m.generation_id for m in pool.generations("db")] == [g for g, _ in history]
    for n, (gid, sha) in enumerate(history):
        target = loopdev(SIZE, f"restore{n}.img")
        restore_to_device(pool, "db", gid, target)
        assert sha256_of(target) == sha, f"generation {gid} restored wrong"
    return ratios


def test_backup_and_restore_through_a_local_serve(loopdev, tmp_path: Path) -> None:
    area = tmp_path / "area"
    area.mkdir()
    PackStore.create(area, "C1").close()

    def session() -> RemoteSession:
        return local_serve(area)

    sent = PutCounter(session)
    with RemotePool("offsite", sent, MasterKey.generate(), target="t1", area="main") as pool:
        round_trip(loopdev, pool, sent)


def test_backup_and_restore_over_ssh_with_a_pinned_host_key(
    loopdev, net_lab, tmp_path: Path
) -> None:
    from blockguard.storage.remote.ssh import pin_host_key
    from tests.host.test_remote_ssh_session import Client, host_fingerprint, serve_command

    area = net_lab.run_dir / "area"
    area.mkdir()
    PackStore.create(area, "C1").close()
    client = Client(net_lab, tmp_path / "state")
    client.authorize(serve_command("C1", area))
    pin_host_key(
        client.address, host_fingerprint(net_lab), client.known_hosts,
        target="backup1", runner=client.runner,
    )  # fmt: skip
    sent = PutCounter(client.connect)
    with RemotePool("offsite", sent, MasterKey.generate(), target="backup1", area="main") as pool:
        ratios = round_trip(loopdev, pool, sent)
    print(
        "bytes sent per changed byte of the incrementals (random data, no compression gain):",
        ", ".join(f"{r:.4f}" for r in ratios),
    )
    # Bytes, not time: random data is sent once, plus headers, tags and checksums.
    assert all(0 < r <= 1.05 for r in ratios)
