"""The catalog's API on real SQLite files: round trips, bad input, atomicity, threads."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockguard.core.catalog import (
    Catalog,
    DeviceIdentity,
    PerfEntry,
    default_catalog_path,
)
from blockguard.errors import (
    AlreadyExists,
    Busy,
    CorruptMetadata,
    DeviceInUse,
    InvalidChunkSize,
    InvalidInput,
    NotFound,
)

MiB = 1024 * 1024
DISK = DeviceIdentity(major=8, minor=16, size=10 * 1024 * MiB, serial="WD-123")
ORIGIN = DeviceIdentity(major=253, minor=3, size=1024 * MiB)


class Clock:
    """A settable clock, so times in the catalog are exact and ordered."""

    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "catalog.db"


@pytest.fixture
def cat(path: Path) -> Iterator[Catalog]:
    with Catalog(path, clock=Clock()) as c:
        yield c


def _setup(c: Catalog) -> None:
    c.add_pool("fast", "dir", "/srv/pool-fast")
    c.add_pool_device("fast", "/dev/sdb", DISK, capacity=9 * 1024 * MiB)
    c.add_group("db", {"rto_seconds": 600})
    c.add_volume(
        "pg",
        "/dev/vg0/pg",
        ORIGIN,
        chunk_size=64 * 1024,
        tracker_backend="era",
        objectives={"rpo_seconds": 3600, "generations": 7},
        group="db",
        pool="fast",
    )


# --- opening ------------------------------------------------------------------------


def test_default_path_honours_state_dir(tmp_path: Path) -> None:
    # conftest points BLOCKGUARD_STATE_DIR at tmp_path/state, which does not exist yet.
    with Catalog() as c:
        assert c.path == tmp_path / "state" / "catalog.db"
    assert stat.S_IMODE(os.stat(tmp_path / "state").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(c.path).st_mode) == 0o600


def test_default_path_without_state_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BLOCKGUARD_STATE_DIR")
    assert default_catalog_path() == Path("/var/lib/blockguard/catalog.db")


def test_connection_settings(cat: Catalog, path: Path) -> None:
    with cat.transaction() as conn:
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    other = sqlite3.connect(path)
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    other.close()


def test_use_after_close_is_an_error(path: Path) -> None:
    c = Catalog(path)
    c.close()
    with pytest.raises(Exception, match="used after it was closed"):
        c.list_volumes()


# --- everything survives a reopen -----------------------------------------------------


def test_everything_survives_reopen(path: Path) -> None:
    with Catalog(path, clock=Clock()) as c:
        _setup(c)
        c.add_pool("slow", "lvm", "bg_slow")
        c.set_pool_state("slow", "degraded", "disk /dev/sdc vanished")
        c.set_tracker_state("pg", "exact")
        c.upsert_perf(
            PerfEntry(
                DISK.key,
                "pool",
                1.0,
                "probe",
                "/dev/sdb",
                DISK.size,
                False,
                "nvme",
                "linear",
                2e9,
                1.5e9,
                4e8,
                3e8,
                65536,
            )
        )
        full = c.add_generation("pg", "full", bytes_stored=1024 * MiB, location={"lv": "g1"})
        c.commit_generation(full.id, manifest_checksum="sha256:aa")
        inc = c.add_generation("pg", "incremental", base=full.id, parent=full.id, chunks=10)
        job = c.create_job("backup", volume="pg", pool="fast")
        c.update_job(job.id, state="running", progress=0.5, bytes_done=123)
        c.finish_job(job.id, result={"generation": full.id, "freed": []})
        c.record_restore(
            "pg",
            full.id,
            method="full",
            mode="swap-in",
            bytes_restored=5 * MiB,
            measured_seconds=12.5,
            predicted_seconds=10.0,
            job=job.id,
        )
        before = (
            c.list_pools(),
            c.list_pool_devices(),
            c.list_groups(),
            c.list_volumes(),
            c.list_perf(),
            c.list_generations("pg"),
            c.list_jobs(),
            c.job_history(job.id),
            c.recent_restores("pg"),
        )
    with Catalog(path) as c:
        after = (
            c.list_pools(),
            c.list_pool_devices(),
            c.list_groups(),
            c.list_volumes(),
            c.list_perf(),
            c.list_generations("pg"),
            c.list_jobs(),
            c.job_history(job.id),
            c.recent_restores("pg"),
        )
        assert c.integrity_problems() == []
    assert after == before
    pools, devices, groups, volumes, perf, gens, jobs, history, restores = after
    assert [p.name for p in pools] == ["fast", "slow"]
    assert pools[1].state == "degraded" and "sdc" in pools[1].state_reason
    assert devices[0].identity == DISK and devices[0].pool == "fast"
    assert groups[0].objectives == {"rto_seconds": 600}
    assert volumes[0].objectives == {"rpo_seconds": 3600, "generations": 7}
    assert volumes[0].tracker_state == "exact" and volumes[0].group == "db"
    assert perf[0].rotational is False and perf[0].rand_write == 3e8
    assert [g.id for g in gens] == [full.id, inc.id]
    assert gens[0].committed and gens[0].location == {"lv": "g1"}
    assert not gens[1].committed and gens[1].chunks == 10
    assert jobs[0].state == "done" and jobs[0].result == {"generation": full.id, "freed": []}
    assert [e.state for e in history] == ["queued", "running", "done"]
    assert restores[0].measured_seconds == 12.5 and restores[0].job == job.id


# --- volumes and groups -------------------------------------------------------------


def test_duplicate_and_unknown_names_are_named(cat: Catalog) -> None:
    _setup(cat)
    with pytest.raises(AlreadyExists, match="volume pg already exists"):
        cat.add_volume("pg", "/dev/vg0/other", ORIGIN, chunk_size=65536, tracker_backend="scan")
    with pytest.raises(AlreadyExists, match="/dev/vg0/pg"):
        cat.add_volume("pg2", "/dev/vg0/pg", ORIGIN, chunk_size=65536, tracker_backend="scan")
    with pytest.raises(AlreadyExists, match="pool fast already exists"):
        cat.add_pool("fast", "dir", "/srv/x")
    with pytest.raises(AlreadyExists, match="group db already exists"):
        cat.add_group("db")
    with pytest.raises(NotFound, match="volume nosuch does not exist"):
        cat.get_volume("nosuch")
    with pytest.raises(NotFound, match="group nogroup does not exist"):
        cat.add_volume(
            "x", "/dev/x", ORIGIN, chunk_size=65536, tracker_backend="scan", group="nogroup"
        )
    with pytest.raises(NotFound, match="pool nopool does not exist"):
        cat.update_volume("pg", pool="nopool")
    with pytest.raises(NotFound, match="group g does not exist"):
        cat.set_group_objectives("g", {})
    assert [v.name for v in cat.list_volumes()] == ["pg"]


def test_bad_volume_input_is_refused_and_named(cat: Catalog) -> None:
    _setup(cat)
    with pytest.raises(InvalidChunkSize, match="chunk size 5000"):
        cat.add_volume("a", "/dev/a", ORIGIN, chunk_size=5000, tracker_backend="scan")
    with pytest.raises(InvalidInput, match="volume name ''"):
        cat.add_volume("", "/dev/a", ORIGIN, chunk_size=65536, tracker_backend="scan")
    with pytest.raises(InvalidInput, match="'dev/a' must be an absolute path"):
        cat.add_volume("a", "dev/a", ORIGIN, chunk_size=65536, tracker_backend="scan")
    with pytest.raises(InvalidInput, match="objectives of volume a must be a dict"):
        cat.add_volume(
            "a", "/dev/a", ORIGIN, chunk_size=65536, tracker_backend="scan", objectives=[1]
        )
    with pytest.raises(InvalidInput, match="objectives of volume a cannot be stored as JSON"):
        cat.add_volume(
            "a",
            "/dev/a",
            ORIGIN,
            chunk_size=65536,
            tracker_backend="scan",
            objectives={"x": object()},
        )
    with pytest.raises(DeviceInUse, match="/dev/sdb is in use: it is a device of pool fast"):
        cat.add_volume("a", "/dev/sdb", DISK, chunk_size=65536, tracker_backend="scan")
    with pytest.raises(DeviceInUse, match="it is protected volume pg"):
        cat.add_pool_device("fast", "/dev/vg0/pg", ORIGIN, capacity=1)
    with pytest.raises(InvalidInput, match="'unknown' needs a reason"):
        cat.set_tracker_state("pg", "unknown", "")
    with pytest.raises(InvalidInput, match="tracker state 'maybe'"):
        cat.set_tracker_state("pg", "maybe", "x")
    assert [v.name for v in cat.list_volumes()] == ["pg"]
    assert len(cat.list_pool_devices("fast")) == 1


def test_update_volume(cat: Catalog) -> None:
    _setup(cat)
    moved = DeviceIdentity(253, 9, ORIGIN.size, "dm-uuid")
    v = cat.update_volume("pg", group=None, identity=moved, objectives={"rpo_seconds": 60})
    assert v.group is None and v.identity == moved and v.objectives == {"rpo_seconds": 60}
    assert cat.list_volumes(group="db") == []
    assert [x.name for x in cat.list_volumes(pool="fast")] == ["pg"]
    assert cat.volume_by_device("/dev/vg0/pg") == v
    with pytest.raises(NotFound, match="volume zz does not exist"):
        cat.update_volume("zz", chunk_size=4096)


def test_groups(cat: Catalog) -> None:
    _setup(cat)
    g = cat.set_group_objectives("db", {"rto_seconds": 60, "mode": "swap-in"})
    assert cat.get_group("db") == g and g.objectives["mode"] == "swap-in"
    with pytest.raises(Busy, match="volumes pg belong to it"):
        cat.remove_group("db")
    cat.update_volume("pg", group=None)
    cat.remove_group("db")
    assert cat.list_groups() == []


def test_remove_volume_keeps_history_and_guards_generations(cat: Catalog) -> None:
    _setup(cat)
    g = cat.add_generation("pg", "full")
    job = cat.create_job("backup", volume="pg")
    with pytest.raises(Busy, match=f"jobs {job.id} are active"):
        cat.remove_volume("pg", drop_generations=True)
    cat.finish_job(job.id, "cancelled")
    with pytest.raises(Busy, match="it has 1 generations"):
        cat.remove_volume("pg")
    assert cat.get_generation(g.id).volume == "pg"
    cat.remove_volume("pg", drop_generations=True)
    with pytest.raises(NotFound, match=f"generation {g.id}"):
        cat.get_generation(g.id)
    assert cat.get_job(job.id).volume == "pg"  # history outlives the volume
    with pytest.raises(NotFound, match="volume pg does not exist"):
        cat.remove_volume("pg")


# --- pools and performance ------------------------------------------------------------


def test_pools_and_devices(cat: Catalog) -> None:
    _setup(cat)
    with pytest.raises(InvalidInput, match="pool backend 'zfs'"):
        cat.add_pool("z", "zfs", "/x")
    with pytest.raises(InvalidInput, match="directory of pool d 'rel' must be an absolute"):
        cat.add_pool("d", "dir", "rel")
    with pytest.raises(AlreadyExists, match=r"pool device /dev/sdb \(pool fast\)"):
        cat.add_pool_device("fast", "/dev/sdb", DISK, capacity=1)
    with pytest.raises(NotFound, match="pool nope does not exist"):
        cat.add_pool_device("nope", "/dev/sdz", DISK, capacity=1)
    with pytest.raises(InvalidInput, match="needs a reason"):
        cat.set_pool_state("fast", "degraded")
    assert cat.set_pool_device_state("/dev/sdb", "missing").state == "missing"
    with pytest.raises(Busy, match="volumes pg use it"):
        cat.remove_pool("fast")
    cat.update_volume("pg", pool=None)
    cat.remove_pool("fast")
    assert cat.list_pools() == [] and cat.list_pool_devices() == []


def test_perf_upsert_keeps_figures_not_given(cat: Catalog) -> None:
    probe = PerfEntry(
        "serial:A",
        "pool",
        100.0,
        "probe",
        "/dev/sdb",
        1000,
        True,
        "sata",
        "linear",
        seq_read=200e6,
        seq_write=180e6,
        rand_read=2e6,
        rand_write=1.5e6,
        chunk_size=65536,
    )
    cat.upsert_perf(probe)
    live = cat.upsert_perf(PerfEntry("serial:A", "pool", 200.0, "live", seq_read=150e6))
    assert live.seq_read == 150e6 and live.seq_write == 180e6 and live.rand_read == 2e6
    assert live.source == "live" and live.measured_at == 200.0 and live.rotational is True
    assert cat.get_perf("serial:A", "volume") is None
    assert cat.list_perf("pool") == [live]
    with pytest.raises(InvalidInput, match="seq_write -1"):
        cat.upsert_perf(PerfEntry("serial:A", "pool", 300.0, "live", seq_write=-1))
    assert cat.get_perf("serial:A", "pool") == live
    with pytest.raises(NotFound, match="serial:B"):
        cat.remove_perf("serial:B", "pool")


# --- generations ----------------------------------------------------------------------


def test_generation_chain_rules(cat: Catalog) -> None:
    _setup(cat)
    cat.add_volume("other", "/dev/o", ORIGIN, chunk_size=4096, tracker_backend="scan", pool="fast")
    full = cat.add_generation("pg", "full")
    foreign = cat.add_generation("other", "full")
    with pytest.raises(InvalidInput, match="needs a base full"):
        cat.add_generation("pg", "incremental")
    with pytest.raises(InvalidInput, match="needs a parent"):
        cat.add_generation("pg", "incremental", base=full.id)
    with pytest.raises(InvalidInput, match="belongs to volume other"):
        cat.add_generation("pg", "differential", base=foreign.id)
    missing = str(uuid.uuid4())
    with pytest.raises(NotFound, match=f"generation {missing} does not exist"):
        cat.add_generation("pg", "differential", base=missing)
    with pytest.raises(InvalidInput, match="id 'g1' is not a UUID"):
        cat.add_generation("pg", "full", id="g1")
    with pytest.raises(AlreadyExists, match=f"generation {full.id} already exists"):
        cat.add_generation("pg", "full", id=full.id)
    diff = cat.add_generation("pg", "differential", base=full.id)
    assert diff.parent == full.id
    with pytest.raises(InvalidInput, match=f"base generation {diff.id} of .* is differential"):
        cat.add_generation("pg", "incremental", base=diff.id, parent=diff.id)
    with pytest.raises(InvalidInput, match=f"cannot commit before its base {full.id}"):
        cat.commit_generation(diff.id)
    cat.commit_generation(full.id)
    with pytest.raises(InvalidInput, match="already committed"):
        cat.commit_generation(full.id)
    i1 = cat.add_generation("pg", "incremental", base=full.id, parent=full.id)
    i2 = cat.add_generation("pg", "incremental", base=full.id, parent=i1.id)
    assert [g.id for g in cat.restore_chain(i2.id)] == [full.id, i1.id, i2.id]
    assert [g.id for g in cat.restore_chain(diff.id)] == [full.id, diff.id]
    assert cat.dependents(full.id) == [diff.id, i1.id, i2.id]
    with pytest.raises(Busy, match=f"generations {i2.id} depend on it"):
        cat.remove_generation(i1.id)
    assert sorted(cat.remove_pending_generations("pg")) == sorted([diff.id, i1.id, i2.id])
    assert [g.id for g in cat.list_generations("pg")] == [full.id]
    assert [g.id for g in cat.list_generations("pg", committed_only=True)] == [full.id]
    cat.remove_generation(full.id)
    assert cat.list_generations("pg") == []
    with pytest.raises(NotFound, match="volume nov does not exist"):
        cat.list_generations("nov")


def _manifests(n_incr: int = 3) -> list[dict]:
    full = str(uuid.uuid4())
    out = [
        {
            "id": full,
            "kind": "full",
            "created": 10.0,
            "bytes": 100,
            "chunks": [1, 2, 3],
            "location": {"lv": "f"},
            "checksum": "sha256:f",
            "format_version": 1,
        }
    ]
    parent = full
    for i in range(n_incr):
        gid = str(uuid.uuid4())
        out.append(
            {
                "id": gid,
                "kind": "incremental",
                "base": full,
                "parent": parent,
                "created": 11.0 + i,
                "bytes_stored": 7,
                "chunks": 2,
                "volume": "pg",
            }
        )
        parent = gid
    return out


def test_rebuild_generations_from_manifests(cat: Catalog) -> None:
    _setup(cat)
    stale = cat.add_generation("pg", "full")
    manifests = _manifests()
    rebuilt = cat.rebuild_generations("pg", list(reversed(manifests)))
    assert [g.id for g in rebuilt] == [m["id"] for m in manifests]
    assert all(g.committed and g.pool == "fast" for g in rebuilt)
    assert rebuilt[0].chunks == 3 and rebuilt[0].bytes_stored == 100
    assert rebuilt[0].manifest_checksum == "sha256:f" and rebuilt[0].location == {"lv": "f"}
    with pytest.raises(NotFound):
        cat.get_generation(stale.id)
    # Rebuilding twice from the same manifests gives the same rows.
    assert cat.rebuild_generations("pg", manifests) == rebuilt


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda ms: ms[1].pop("kind"), "has no 'kind'"),
        (lambda ms: ms[2].update(parent=str(uuid.uuid4())), "parent generation .* does not exist"),
        (lambda ms: ms[1].update(volume="other"), "belongs to volume other, not pg"),
        (lambda ms: ms[3].update(id=ms[2]["id"]), "the id appears twice"),
        (lambda ms: ms[0].update(kind="differential"), "needs a base full"),
        (lambda ms: ms[0].update(committed=False), "is not committed"),
        (lambda ms: ms[1].update(bytes_stored=-5), "bytes stored -5"),
        (lambda ms: ms[1].update(id="not-a-uuid"), "'not-a-uuid' is not a UUID"),
    ],
)
def test_bad_manifest_changes_nothing(cat: Catalog, damage, message: str) -> None:
    _setup(cat)
    good = cat.rebuild_generations("pg", _manifests())
    bad = _manifests()
    damage(bad)
    with pytest.raises(CorruptMetadata, match=message):
        cat.rebuild_generations("pg", bad)
    assert cat.list_generations("pg") == good


# --- jobs and restores ----------------------------------------------------------------


def test_job_life_cycle_and_history(cat: Catalog) -> None:
    job = cat.create_job("verify", volume="pg", generation=str(uuid.uuid4()), bytes_total=10)
    assert job.state == "queued" and job.progress == 0
    job = cat.update_job(job.id, state="running", message="started by scheduler")
    job = cat.update_job(job.id, progress=0.25, bytes_done=3)
    assert (job.state, job.progress, job.bytes_done) == ("running", 0.25, 3)
    with pytest.raises(InvalidInput, match="is running and cannot be queued"):
        cat.update_job(job.id, state="queued")
    with pytest.raises(InvalidInput, match="set by finish_job"):
        cat.update_job(job.id, state="done")
    with pytest.raises(InvalidInput, match=r"progress of job .* 1\.5 is above 1"):
        cat.update_job(job.id, progress=1.5)
    with pytest.raises(InvalidInput, match=f"failed job {job.id} needs an error text"):
        cat.finish_job(job.id, "failed")
    job = cat.finish_job(job.id, "failed", error="checksum mismatch at chunk 7")
    assert job.state == "failed" and job.finished is not None
    with pytest.raises(InvalidInput, match="has already ended \\(failed\\)"):
        cat.finish_job(job.id)
    with pytest.raises(InvalidInput, match="has already ended"):
        cat.update_job(job.id, progress=0.5)
    history = cat.job_history(job.id)
    assert [(e.state, e.message) for e in history] == [
        ("queued", ""),
        ("running", "started by scheduler"),
        ("failed", "checksum mismatch at chunk 7"),
    ]
    with pytest.raises(NotFound, match="job nope does not exist"):
        cat.get_job("nope")
    with pytest.raises(InvalidInput, match="job kind 'copy'"):
        cat.create_job("copy", volume="pg")
    with pytest.raises(InvalidInput, match="a backup job needs a volume"):
        cat.create_job("backup")
    assert cat.create_job("probe", pool="fast").kind == "probe"


def test_mark_running_jobs_failed_and_prune(cat: Catalog) -> None:
    queued = cat.create_job("backup", volume="a")
    running = cat.update_job(cat.create_job("restore", volume="b").id, state="running")
    done = cat.finish_job(cat.create_job("backup", volume="a").id)
    failed = cat.mark_running_jobs_failed("the daemon was restarted")
    assert {j.id for j in failed} == {queued.id, running.id}
    assert all(j.state == "failed" and j.error == "the daemon was restarted" for j in failed)
    assert cat.get_job(done.id).state == "done"
    assert cat.mark_running_jobs_failed("again") == []
    assert [j.id for j in cat.list_jobs(volume="a")] == [done.id, queued.id]
    assert [j.id for j in cat.list_jobs(states=("done",))] == [done.id]
    assert len(cat.list_jobs(limit=2)) == 2
    assert cat.prune_jobs(keep=1) == 2
    assert [j.id for j in cat.list_jobs()] == [done.id]
    with pytest.raises(NotFound):
        cat.job_history(queued.id)


def test_restores_newest_first(cat: Catalog) -> None:
    gid = str(uuid.uuid4())
    for i in range(5):
        cat.record_restore(
            "pg" if i % 2 == 0 else "other",
            gid,
            method="incremental",
            mode="copy",
            bytes_restored=i * MiB,
            measured_seconds=float(i),
            predicted_seconds=i * 0.9,
        )
    recent = cat.recent_restores("pg", n=2)
    assert [r.bytes_restored for r in recent] == [4 * MiB, 2 * MiB]
    assert len(cat.recent_restores(n=10)) == 5
    with pytest.raises(InvalidInput, match="restore method 'swap'"):
        cat.record_restore(
            "pg", gid, method="swap", mode="copy", bytes_restored=1, measured_seconds=1.0
        )
    with pytest.raises(InvalidInput, match="measured restore seconds nan"):
        cat.record_restore(
            "pg", gid, method="full", mode="copy", bytes_restored=1, measured_seconds=float("nan")
        )
    assert len(cat.recent_restores(n=10)) == 5


# --- atomicity and concurrency --------------------------------------------------------


def test_transaction_is_all_or_nothing(cat: Catalog) -> None:
    _setup(cat)
    g = cat.add_generation("pg", "full")
    job = cat.update_job(cat.create_job("backup", volume="pg").id, state="running")
    with pytest.raises(RuntimeError), cat.transaction():
        cat.commit_generation(g.id)
        cat.finish_job(job.id, result={"generation": g.id})
        raise RuntimeError("crash between commit and the pool's rename")
    assert not cat.get_generation(g.id).committed
    assert cat.get_job(job.id).state == "running"
    assert [e.state for e in cat.job_history(job.id)] == ["queued", "running"]


def test_failed_call_inside_a_transaction_undoes_only_itself(cat: Catalog) -> None:
    _setup(cat)
    with cat.transaction():
        cat.add_group("web")
        with pytest.raises(CorruptMetadata, match="has no 'created'"):
            cat.rebuild_generations("pg", [{"id": str(uuid.uuid4()), "kind": "full"}])
        with pytest.raises(RuntimeError), cat.transaction():
            cat.add_group("tmp")
            raise RuntimeError("inner block fails after writing")
        cat.add_group("mail")
    assert [g.name for g in cat.list_groups()] == ["db", "mail", "web"]


def test_threads_share_one_catalog(cat: Catalog) -> None:
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(25):
                j = cat.create_job("backup", volume="v")
                cat.update_job(j.id, state="running")
                cat.finish_job(j.id)
        except BaseException as e:  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    jobs = cat.list_jobs()
    assert len(jobs) == 150 and all(j.state == "done" for j in jobs)


def test_two_catalogs_on_one_file_see_each_other(path: Path) -> None:
    with Catalog(path) as a, Catalog(path) as b:
        a.add_group("one")
        b.add_group("two")
        assert [g.name for g in a.list_groups()] == ["one", "two"]
        with pytest.raises(AlreadyExists, match="group one"):
            b.add_group("one")
