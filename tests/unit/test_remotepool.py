"""RemotePool, the generation store on a backup target, over the pipes of a local serve
command (what ssh's forced command runs; no ssh here): generations written through the
pool interface come back bit-exact through the restore path, a chain of three too; a
byte changed on the target's disk or a pack of another generation put in its place stops
the restore with a named error; a transfer cut by a killed serve lists nothing and is
resumed by the next writer, which sends only the packs the target lacks; only committed
generations are listed, and a manifest that does not open is reported damaged."""

from __future__ import annotations

import array
import json
import os
import random
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash
from pyroaring import BitMap

from blockguard.core.vocab import GenerationKind
from blockguard.errors import (
    DataError,
    EnvironmentProblem,
    InvalidInput,
    TamperedPack,
    WireError,
)
from blockguard.storage.copyengine import Progress, extents
from blockguard.storage.manifest import Manifest, VolumeIdentity, chunk_count
from blockguard.storage.pool.base import GenerationSpec
from blockguard.storage.pool.remotepool import RemotePool
from blockguard.storage.remote import session as session_module
from blockguard.storage.remote.keys import MasterKey
from blockguard.storage.remote.packstore import PackStore, pack_digest
from blockguard.storage.remote.session import RemoteSession
from blockguard.storage.restore import _copy_chain
from tests.support.remote import local_serve

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20
CHUNK = 64 << 10
SIZE = 20 * MiB + 3 * 4096  # three 8 MiB packs, the last chunk short


class Target:
    """A client's area served by local serve commands; counts the puts and gets sent."""

    def __init__(self, area: Path) -> None:
        self.area = area
        self.sessions: list[RemoteSession] = []
        self.puts = 0
        self.gets = 0
        self.lists = 0
        self.kill_after_puts: int | None = None
        #: Puts after this many go out as a pack number the target refuses.
        self.spoil_after_puts: int | None = None
        #: Puts in flight: 1 makes a cut exact (every put sent before it was answered).
        self.window = 4

    def session(self) -> RemoteSession:
        session = local_serve(self.area, window=self.window)
        request = session.channel.request

        def counted(op: str, args: object = None, payload: bytes = b"") -> int:
            if op == "put":
                self.puts += 1
                if self.kill_after_puts is not None and self.puts > self.kill_after_puts:
                    os.kill(session.child.pid, signal.SIGKILL)
                if self.spoil_after_puts is not None and self.puts > self.spoil_after_puts:
                    args = {**args, "pack": 10**7}  # type: ignore[dict-item]
            elif op == "get":
                self.gets += 1
            elif op == "list":
                self.lists += 1
            return request(op, args, payload)  # type: ignore[arg-type]

        session.channel.request = counted  # type: ignore[method-assign]
        self.sessions.append(session)
        return session

    def generation_dirs(self) -> list[Path]:
        return sorted((self.area / "clients" / "C1" / "generations").iterdir())


@pytest.fixture
def target(tmp_path: Path) -> Target:
    PackStore.create(tmp_path, "C1").close()
    return Target(tmp_path)


@pytest.fixture
def key() -> MasterKey:
    return MasterKey.generate()


@pytest.fixture
def pool(target: Target, key: MasterKey) -> Iterator[RemotePool]:
    p = RemotePool("offsite", target.session, key, target="t1", area="main")
    try:
        yield p
    finally:
        p.close()


VOLUME = VolumeIdentity("db", SIZE, "7:1")


def backup(
    pool: RemotePool,
    data: bytes,
    kind: GenerationKind = GenerationKind.FULL,
    changed: BitMap | None = None,
    *,
    base_id: str | None = None,
    parent_id: str | None = None,
    volume: VolumeIdentity = VOLUME,
) -> Manifest:
    """What ``run_backup`` does with a device, with bytes: chunks in order, in extents,
    into the pool's writer, then the commit with their checksums."""
    spec = GenerationSpec(volume, kind, CHUNK, changed, base_id, parent_id)
    nchunks = chunk_count(SIZE, CHUNK)
    with pool.begin_generation(spec) as writer:
        sums = array.array("Q")
        for first, count in extents(None if kind is GenerationKind.FULL else changed, nchunks, 40):
            view = memoryview(data)[first * CHUNK : min(SIZE, (first + count) * CHUNK)]
            digests = [
                xxhash.xxh3_64_intdigest(view[o : o + CHUNK]) for o in range(0, len(view), CHUNK)
            ]
            writer.write_chunks(first, view, digests)
            sums.extend(digests)
        return writer.commit(sums)


def restore(pool: RemotePool, generation_id: str) -> bytes:
    """The restore path's copy of a generation's chain (checksums checked) into bytes."""
    out = bytearray(SIZE)

    def sink(first: int, view: memoryview, _digests: object) -> None:
        out[first * CHUNK : first * CHUNK + len(view)] = view

    _copy_chain(pool, pool.chain("db", generation_id), sink, Progress(), 8 * MiB)
    return bytes(out)


def write_random(data: bytearray, rng: random.Random, n: int) -> BitMap:
    changed = BitMap()
    for _ in range(n):
        off = rng.randrange(SIZE // 4096) * 4096
        data[off : off + 4096] = rng.randbytes(4096)
        changed.add(off // CHUNK)
    return changed


def test_a_full_and_a_chain_of_three_restore_bit_exact(
    target: Target, pool: RemotePool, key: MasterKey
) -> None:
    rng = random.Random(11)
    data = bytearray(rng.randbytes(SIZE // 2) + bytes(SIZE - SIZE // 2))
    full = backup(pool, bytes(data))
    assert target.puts == 3 + 1  # three data packs, one checksum pack
    images = {full.generation_id: bytes(data)}
    parent = full
    for _ in range(2):
        changed = write_random(data, rng, 40)
        parent = backup(
            pool, bytes(data), GenerationKind.INCREMENTAL, changed, parent_id=parent.generation_id
        )
        images[parent.generation_id] = bytes(data)
    # An incremental with nothing changed stores no pack and restores all the same.
    empty = backup(
        pool, bytes(data), GenerationKind.INCREMENTAL, BitMap(), parent_id=parent.generation_id
    )
    images[empty.generation_id] = bytes(data)
    assert [m.generation_id for m in pool.generations("db")] == list(images)
    assert pool.generations("other") == []
    target.gets = 0
    assert restore(pool, full.generation_id) == images[full.generation_id]
    assert target.gets == 3 + 1, "a sequential read fetches each pack once"
    for gid, image in images.items():
        assert restore(pool, gid) == image
    # The target holds no name: keys are VOLUME_ID@GENERATION_ID.
    for gdir in target.generation_dirs():
        assert gdir.name.split("@")[0] == key.volume_id("db")
        assert b'"name": "db"' not in (gdir / "manifest.sealed").read_bytes()
    assert pool.chain("db", parent.generation_id)[0] == full


def damage(target: Target, gid: str, pack: int, data: bytes, *, fix_index: bool) -> None:
    [gdir] = [d for d in target.generation_dirs() if d.name.endswith("@" + gid)]
    (gdir / "packs" / f"{pack:06d}.pack").write_bytes(data)
    if fix_index:  # so that the target's own check passes and only the seal can tell
        index = json.loads((gdir / "index.json").read_text())
        for entry in index["packs"]:
            if entry["pack"] == pack:
                entry.update(size=len(data), xxh3_128=pack_digest(data))
        (gdir / "index.json").write_text(json.dumps(index))


def pack_bytes(target: Target, gid: str, pack: int) -> bytes:
    [gdir] = [d for d in target.generation_dirs() if d.name.endswith("@" + gid)]
    return (gdir / "packs" / f"{pack:06d}.pack").read_bytes()


def test_a_changed_byte_on_the_target_stops_the_restore(target: Target, pool: RemotePool) -> None:
    rng = random.Random(12)
    data = rng.randbytes(SIZE)
    gid = backup(pool, data).generation_id
    sealed = bytearray(pack_bytes(target, gid, 1))
    sealed[len(sealed) // 2] ^= 0x01
    # The target's own check (bit rot) sees it first...
    damage(target, gid, 1, bytes(sealed), fix_index=False)
    with pytest.raises(DataError, match=f"{gid}: pack 1 changed on the target"):
        restore(pool, gid)
    # ...and a changer who fixed the target's index too is caught by the seal.
    damage(target, gid, 1, bytes(sealed), fix_index=True)
    with pytest.raises(TamperedPack, match=f"pack 1 of generation {gid} failed"):
        restore(pool, gid)


def test_a_pack_of_another_generation_is_refused(target: Target, pool: RemotePool) -> None:
    rng = random.Random(13)
    first = backup(pool, rng.randbytes(SIZE)).generation_id
    second = backup(pool, rng.randbytes(SIZE)).generation_id
    damage(target, second, 0, pack_bytes(target, first, 0), fix_index=True)
    with pytest.raises(TamperedPack, match=f"pack 0 of generation {second}"):
        restore(pool, second)
    # Another place in the same generation is no better.
    damage(target, first, 2, pack_bytes(target, first, 1), fix_index=True)
    with pytest.raises(TamperedPack, match=f"pack 2 of generation {first}"):
        restore(pool, first)


def test_a_cut_transfer_lists_nothing_and_resumes_with_the_missing_packs(
    target: Target, pool: RemotePool
) -> None:
    rng = random.Random(14)
    data = rng.randbytes(SIZE)
    target.kill_after_puts, target.window = 2, 1
    with pytest.raises(WireError):
        backup(pool, data)
    target.kill_after_puts, target.window = None, 4
    assert pool.generations() == []
    [gdir] = target.generation_dirs()
    held = {p.name for p in (gdir / "packs").glob("*.pack")}
    assert held == {"000000.pack", "000001.pack"}
    sent_before = target.puts
    full = backup(pool, data)  # the same spec: the open generation is resumed
    assert gdir.name.endswith("@" + full.generation_id)
    assert target.puts - sent_before == 4 - len(held), "only the missing packs are sent"
    assert [m.generation_id for m in pool.generations("db")] == [full.generation_id]
    assert restore(pool, full.generation_id) == data


def test_a_new_pool_object_resumes_the_generation_it_is_told_of(
    target: Target, pool: RemotePool, key: MasterKey
) -> None:
    # As after a restart of the daemon: only the generation id was kept.
    rng = random.Random(17)
    data = rng.randbytes(SIZE)
    target.kill_after_puts, target.window = 1, 1
    with pytest.raises(WireError):
        backup(pool, data)
    target.kill_after_puts, target.window = None, 4
    [gdir] = target.generation_dirs()
    gid = gdir.name.split("@")[1]  # what the caller kept of its writer (generation_id)
    held = len(list((gdir / "packs").glob("*.pack")))
    assert held == 1
    sent_before = target.puts
    with RemotePool("offsite", target.session, key, target="t1", area="main") as again:
        again.expect_resume(GenerationSpec(VOLUME, GenerationKind.FULL, CHUNK), gid)
        full = backup(again, data)
        assert full.generation_id == gid
        assert target.puts - sent_before == 4 - held
        assert restore(again, gid) == data


def test_a_volume_whose_device_number_changed_resumes(target: Target, pool: RemotePool) -> None:
    # As after a reboot that numbered the volume's device anew: the volume and the
    # generation are the same, so the generation the cut left open is continued.
    rng = random.Random(19)
    data = rng.randbytes(SIZE)
    target.kill_after_puts, target.window = 2, 1
    with pytest.raises(WireError):
        backup(pool, data)
    target.kill_after_puts, target.window = None, 4
    [gdir] = target.generation_dirs()
    sent_before = target.puts
    full = backup(pool, data, volume=VolumeIdentity("db", SIZE, "7:17"))
    assert gdir.name.endswith("@" + full.generation_id)
    assert [d.name for d in target.generation_dirs()] == [gdir.name]
    assert target.puts - sent_before == 2, "only the missing packs are sent"
    assert full.volume.device_id == "7:17"
    assert restore(pool, full.generation_id) == data


def test_a_manifest_that_does_not_open_is_reported_damaged(
    target: Target, pool: RemotePool, key: MasterKey
) -> None:
    rng = random.Random(15)
    good = backup(pool, rng.randbytes(SIZE)).generation_id
    bad = backup(pool, rng.randbytes(SIZE)).generation_id
    [gdir] = [d for d in target.generation_dirs() if d.name.endswith("@" + bad)]
    sealed = bytearray((gdir / "manifest.sealed").read_bytes())
    sealed[-1] ^= 0x80
    (gdir / "manifest.sealed").write_bytes(sealed)
    index = json.loads((gdir / "index.json").read_text())
    index["manifest"] = {"size": len(sealed), "xxh3_128": pack_digest(bytes(sealed))}
    (gdir / "index.json").write_text(json.dumps(index))
    found = pool.scan("db")
    assert [m.generation_id for m in found.manifests] == [good]
    [damaged] = found.damaged
    assert damaged.generation_id == bad and "does not open" in damaged.reason
    # Another key opens nothing: every generation is reported, none used.
    with RemotePool(
        "offsite", target.session, MasterKey.generate(), target="t1", area="main"
    ) as other:
        assert other.scan().manifests == [] and len(other.scan().damaged) == 2
    pool.mark_damaged("db", good, "a test found it", chunk=3)
    assert pool.scan("db").damaged[0].found_on_use


def test_a_manifest_that_does_not_open_is_shown_by_its_volume_name(
    target: Target, pool: RemotePool, key: MasterKey
) -> None:
    rng = random.Random(23)
    backup(pool, rng.randbytes(SIZE))
    bad = backup(pool, rng.randbytes(SIZE)).generation_id
    [gdir] = [d for d in target.generation_dirs() if d.name.endswith("@" + bad)]
    sealed = bytearray((gdir / "manifest.sealed").read_bytes())
    sealed[-1] ^= 0x80
    (gdir / "manifest.sealed").write_bytes(sealed)
    index = json.loads((gdir / "index.json").read_text())
    index["manifest"] = {"size": len(sealed), "xxh3_128": pack_digest(bytes(sealed))}
    (gdir / "index.json").write_text(json.dumps(index))

    def damaged_volumes(p: RemotePool) -> list[str]:
        return [d.volume for d in p.scan().damaged]

    # Named by the volume's other generations, by the caller's names, or said unknown:
    # never by the id the target knows it by, which would read as a volume's name.
    with RemotePool("offsite", target.session, key, target="t1", area="main") as fresh:
        assert damaged_volumes(fresh) == ["db"]
    good = next(d for d in target.generation_dirs() if d != gdir)
    (good / "manifest.sealed").write_bytes(b"not a sealed manifest")
    with RemotePool("offsite", target.session, key, target="t1", area="main") as fresh:
        unknown = f"unknown volume (id {key.volume_id('db')})"
        assert damaged_volumes(fresh) == [unknown, unknown]
    asked: list[str] = []

    def names() -> list[str]:
        asked.append("names")
        return ["web", "db"]

    with RemotePool(
        "offsite", target.session, key, target="t1", area="main", volume_names=names
    ) as fresh:
        assert damaged_volumes(fresh) == ["db", "db"]
        assert len(asked) == 1, "the names are asked once, not per damaged entry"
        assert [d.volume for d in fresh.scan("db").damaged] == ["db", "db"]


def test_removal_retention_space_and_refusals(target: Target, pool: RemotePool) -> None:
    rng = random.Random(16)
    data = bytearray(rng.randbytes(SIZE))
    full = backup(pool, bytes(data))
    inc = backup(
        pool,
        bytes(data),
        GenerationKind.INCREMENTAL,
        write_random(data, rng, 5),
        parent_id=full.generation_id,
    )
    with pytest.raises(Exception, match="depend on it"):
        pool.remove_generation("db", full.generation_id)
    pool.remove_generation("db", inc.generation_id)
    assert [m.generation_id for m in pool.generations()] == [full.generation_id]
    assert len(target.generation_dirs()) == 1
    cap = pool.capacity()
    assert cap.total >= cap.free > 0
    with pytest.raises(EnvironmentProblem, match="restored by copy"):
        pool.swap_in(full, "db-x")
    with pytest.raises(EnvironmentProblem, match="the target allocates"):
        pool.add_device("/dev/loop9")
    [device] = pool.devices()
    assert device.path == "t1:main"


def test_a_refused_put_ends_the_writer_and_leaves_nothing_on_the_target(
    target: Target, pool: RemotePool
) -> None:
    # One put in flight: the refusal of the second is seen before a third could go out.
    target.window = 1
    target.spoil_after_puts = 1
    with pytest.raises(InvalidInput, match="pack number"):
        backup(pool, random.Random(18).randbytes(SIZE))
    target.spoil_after_puts = None
    assert target.puts == 2, "nothing is sent once the refusal is seen"
    assert target.generation_dirs() == [] and pool.generations() == []
    # Not a cut: the next writer begins a new generation.
    full = backup(pool, bytes(SIZE))
    assert [m.generation_id for m in pool.generations()] == [full.generation_id]


def test_a_resume_on_another_copy_commits_nothing_and_the_next_backup_sends_all(
    target: Target, pool: RemotePool
) -> None:
    # Random data stores raw: a pack of another copy seals to the same size, and only
    # the target's check at commit can tell.
    rng = random.Random(19)
    target.kill_after_puts, target.window = 2, 1
    with pytest.raises(WireError):
        backup(pool, rng.randbytes(SIZE))
    target.kill_after_puts, target.window = None, 4
    changed = rng.randbytes(SIZE)
    with pytest.raises(DataError, match="resumed on packs the target held of another copy"):
        backup(pool, changed)
    assert target.generation_dirs() == [] and pool.generations() == []
    full = backup(pool, changed)
    assert restore(pool, full.generation_id) == changed


def test_a_backup_neither_lists_nor_opens_what_the_pool_knows(
    target: Target, pool: RemotePool, key: MasterKey
) -> None:
    # Each backup needs the volume's next sequence number (and a synthesized full its
    # source): the pool keeps what it listed once and what it committed since.
    rng = random.Random(21)
    data = bytearray(rng.randbytes(SIZE))
    full = backup(pool, bytes(data))
    assert target.lists == 1, "a pool that knows nothing of the volume lists once"
    parent, made = full, [full]
    since_full = BitMap()
    for chunk in (1, 2, 3):  # all in pack 0: the synthesized full links packs 1 and 2
        data[chunk * CHUNK : chunk * CHUNK + 100] = rng.randbytes(100)
        changed = BitMap([chunk])
        since_full |= changed
        parent = backup(
            pool, bytes(data), GenerationKind.INCREMENTAL, changed, parent_id=parent.generation_id
        )
        made.append(parent)
    assert target.lists == 1 and target.gets == 0
    synthesized = synthesize(pool, bytes(data), full, since_full)  # reads the full's checksums
    made.append(synthesized)
    assert target.lists == 1
    assert [m.sequence for m in made] == [1, 2, 3, 4, 5]
    # Its removals count too; a fresh pool object (listing) numbers as this one does.
    pool.remove_generation("db", synthesized.generation_id)
    after = backup(
        pool, bytes(data), GenerationKind.INCREMENTAL, BitMap([1]), parent_id=parent.generation_id
    )
    with RemotePool("offsite", target.session, key, target="t1", area="main") as fresh:
        assert fresh.next_sequence("db") == after.sequence + 1 == 6
        assert [m.generation_id for m in fresh.generations("db")] == [
            m.generation_id for m in pool.generations("db")
        ]


# --- fulls synthesized on the target ------------------------------------------------------


def synthesize(
    pool: RemotePool, data: bytes, previous: Manifest, changed: BitMap, *, whole_packs: bool = True
) -> Manifest:
    """A full cloned from ``previous`` as ``run_backup`` makes one: the checksums start
    as the clone's, only what the writer asks for (or only ``changed``) is written."""
    spec = GenerationSpec(
        VOLUME, GenerationKind.FULL, CHUNK, changed, clone_from=previous.generation_id
    )
    nchunks = chunk_count(SIZE, CHUNK)
    with pool.begin_generation(spec) as writer:
        assert writer.cloned_from is not None
        assert writer.cloned_from.generation_id == previous.generation_id
        with pool.open_generation(writer.cloned_from) as prev:
            sums = array.array("Q", prev.checksums())
        todo = writer.clone_reads(changed) if whole_packs else changed
        for first, count in extents(todo, nchunks, 40):
            view = memoryview(data)[first * CHUNK : min(SIZE, (first + count) * CHUNK)]
            digests = [
                xxhash.xxh3_64_intdigest(view[o : o + CHUNK]) for o in range(0, len(view), CHUNK)
            ]
            writer.write_chunks(first, view, digests)
            sums[first : first + len(digests)] = array.array("Q", digests)
        return writer.commit(sums)


def full_from(pool: RemotePool, data: bytes, previous: Manifest, changed: BitMap) -> Manifest:
    """A full cloned from ``previous`` as ``run_backup`` makes one (what the writer asks
    for is written, the rest of the checksums are the clone's); sent whole, every chunk
    written, when ``previous`` is no longer there to synthesize from."""
    spec = GenerationSpec(
        VOLUME, GenerationKind.FULL, CHUNK, changed, clone_from=previous.generation_id
    )
    nchunks = chunk_count(SIZE, CHUNK)
    with pool.begin_generation(spec) as writer:
        sums = array.array("Q", [0] * nchunks)
        todo = writer.clone_reads(changed) if writer.cloned_from is not None else None
        for first, count in extents(todo, nchunks, 40):
            view = memoryview(data)[first * CHUNK : min(SIZE, (first + count) * CHUNK)]
            digests = [
                xxhash.xxh3_64_intdigest(view[o : o + CHUNK]) for o in range(0, len(view), CHUNK)
            ]
            writer.write_chunks(first, view, digests)
            sums[first : first + len(digests)] = array.array("Q", digests)
        if writer.cloned_from is not None:
            with pool.open_generation(writer.cloned_from) as prev:
                old = prev.checksums()
            for chunk in range(nchunks):
                if todo is not None and chunk not in todo:
                    sums[chunk] = old[chunk]
        return writer.commit(sums)


def test_a_synthesized_full_sends_the_changed_packs_and_outlives_its_sources(
    target: Target, pool: RemotePool
) -> None:
    rng = random.Random(12)
    data = bytearray(rng.randbytes(SIZE))
    per = 8 * MiB // CHUNK
    first = backup(pool, bytes(data))
    data[5 * CHUNK : 5 * CHUNK + 100] = rng.randbytes(100)
    inc = backup(
        pool, bytes(data), GenerationKind.INCREMENTAL, BitMap([5]), parent_id=first.generation_id
    )
    data[9 * CHUNK : 9 * CHUNK + 100] = rng.randbytes(100)
    assert pool.can_clone_full
    target.puts = 0
    # Changed since the first full: chunks 5 (the incremental) and 9, both in pack 0.
    second = synthesize(pool, bytes(data), first, BitMap([5, 9]))
    assert target.puts == 1 + 1, "one data pack and the checksum pack cross the link"
    assert second.is_full and second.bytes_stored == per * CHUNK
    assert second.storage["origins"] == {"1": first.generation_id, "2": first.generation_id}
    assert restore(pool, second.generation_id) == bytes(data)
    # The next one takes pack 0 from the second full and pack 1 from the first, still.
    data[2 * per * CHUNK + 7] ^= 0xFF
    target.puts = 0
    third = synthesize(pool, bytes(data), second, BitMap([2 * per]))
    assert target.puts == 1 + 1
    assert third.storage["origins"] == {"0": second.generation_id, "1": first.generation_id}
    # Remote retention removes every older generation: the third full needs none of them.
    for gen in (inc, second, first):
        pool.remove_generation("db", gen.generation_id)
    assert [m.generation_id for m in pool.generations("db")] == [third.generation_id]
    assert restore(pool, third.generation_id) == bytes(data)


def test_unwritten_unchanged_chunks_of_a_sent_pack_come_from_the_previous_full(
    target: Target, pool: RemotePool
) -> None:
    rng = random.Random(13)
    data = bytearray(rng.randbytes(SIZE))
    first = backup(pool, bytes(data))
    data[CHUNK * 200 : CHUNK * 200 + 10] = b"0123456789"
    second = synthesize(pool, bytes(data), first, BitMap([200]), whole_packs=False)
    assert restore(pool, second.generation_id) == bytes(data)


def test_a_changed_chunk_not_written_commits_nothing(target: Target, pool: RemotePool) -> None:
    data = random.Random(14).randbytes(SIZE)
    first = backup(pool, data)
    spec = GenerationSpec(
        VOLUME, GenerationKind.FULL, CHUNK, BitMap([3]), clone_from=first.generation_id
    )
    with (
        pytest.raises(InvalidInput, match="changed chunks of pack 0 were not written"),
        pool.begin_generation(spec) as writer,
    ):
        writer.commit(array.array("Q", [0] * chunk_count(SIZE, CHUNK)))
    assert [m.generation_id for m in pool.generations("db")] == [first.generation_id]
    assert len(target.generation_dirs()) == 1


def test_a_target_without_link_gets_the_full_whole(
    target: Target, pool: RemotePool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A target that predates ``link`` agrees on protocol version 1 at the hello.
    monkeypatch.setattr(session_module, "PROTOCOL_VERSIONS", (1,))
    rng = random.Random(15)
    data = bytearray(rng.randbytes(SIZE))
    first = backup(pool, bytes(data))
    data[0] ^= 1
    spec = GenerationSpec(
        VOLUME, GenerationKind.FULL, CHUNK, BitMap([0]), clone_from=first.generation_id
    )
    with pool.begin_generation(spec) as writer:
        assert writer.cloned_from is None and not pool.can_clone_full
    second = backup(pool, bytes(data))
    assert "origins" not in second.storage
    assert restore(pool, second.generation_id) == bytes(data)


def test_a_cut_synthesized_full_resumes_with_the_missing_packs(
    target: Target, pool: RemotePool
) -> None:
    rng = random.Random(16)
    data = bytearray(rng.randbytes(SIZE))
    first = backup(pool, bytes(data))
    per = 8 * MiB // CHUNK
    changed = BitMap([3, 2 * per + 1])
    for chunk in changed:
        data[chunk * CHUNK] ^= 0x5A
    target.puts = 0
    target.kill_after_puts, target.window = 1, 1
    pool.close()  # the next session puts with the window of 1
    with pytest.raises(WireError):
        synthesize(pool, bytes(data), first, changed)
    target.kill_after_puts, target.window = None, 4
    assert [m.generation_id for m in pool.generations("db")] == [first.generation_id]
    target.puts = 0
    second = synthesize(pool, bytes(data), first, changed)
    # Pack 0 was stored before the cut: pack 2 and the checksum pack are what is left.
    assert target.puts == 2
    assert second.storage["origins"] == {"1": first.generation_id}
    pool.remove_generation("db", first.generation_id)
    assert restore(pool, second.generation_id) == bytes(data)


def test_a_new_pool_object_resumes_a_synthesized_full_whose_source_is_gone(
    target: Target, pool: RemotePool, key: MasterKey
) -> None:
    """As after a restart of the daemon, which kept only the generation id: which packs
    the cut writer linked is not known, so every stored data pack this writer does not
    link is sent again rather than taken by its size (a linked one would fail the commit)."""
    rng = random.Random(18)
    data = bytearray(rng.randbytes(SIZE))
    first = backup(pool, bytes(data))
    per = 8 * MiB // CHUNK
    changed = BitMap([3, 2 * per + 1])
    for chunk in changed:
        data[chunk * CHUNK] ^= 0x5A
    target.puts = 0
    target.kill_after_puts, target.window = 1, 1
    pool.close()
    with pytest.raises(WireError):
        synthesize(pool, bytes(data), first, changed)
    target.kill_after_puts, target.window = None, 4
    pool.remove_generation("db", first.generation_id)
    [gdir] = target.generation_dirs()
    gid = gdir.name.split("@")[1]
    spec = GenerationSpec(
        VOLUME, GenerationKind.FULL, CHUNK, changed, clone_from=first.generation_id
    )
    with RemotePool("offsite", target.session, key, target="t1", area="main") as again:
        again.expect_resume(spec, gid)
        target.puts = 0
        full = full_from(again, bytes(data), first, changed)
        assert full.generation_id == gid
        assert target.puts == 3 + 1  # every data pack, then the checksum pack
        assert restore(again, gid) == bytes(data)
