"""The target's pack store: what commit stores is what get returns, a cut before the commit
point lists nothing, an open generation survives a restart and resumes, and a bad name or
another client's id reaches nothing (and changes nothing)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from blockguard.errors import (
    AlreadyExists,
    Busy,
    DataError,
    InvalidInput,
    NotFound,
    PoolSpaceLow,
)
from blockguard.storage.remote.packstore import PackStore, pack_digest
from tests.timeouts import scaled

REPO = Path(__file__).resolve().parents[2]


def packs_of(n: int, size: int = 5000) -> list[bytes]:
    return [os.urandom(size + i) for i in range(n)]


def index_of(packs: list[bytes]) -> dict[str, object]:
    return {
        "packs": [
            {"pack": i, "size": len(p), "xxh3_128": pack_digest(p)} for i, p in enumerate(packs)
        ]
    }


def tree(path: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and directory under ``path``."""
    return {
        str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(path.rglob("*"))
    }


@pytest.fixture
def area(tmp_path: Path) -> Path:
    (tmp_path / "area").mkdir()
    PackStore.create(tmp_path / "area", "C1").close()
    return tmp_path / "area"


def store_and_commit(area: Path, gen: str, packs: list[bytes], manifest: bytes) -> None:
    with PackStore.open(area, "C1") as store:
        store.begin(gen, {"volume": "v1"})
        for i, data in enumerate(packs):
            store.put(gen, i, data)
        store.commit(gen, index_of(packs), manifest)


def test_what_commit_stores_get_returns_byte_exact(area: Path) -> None:
    packs = packs_of(3)
    store_and_commit(area, "g1", packs, b"sealed manifest")
    with PackStore.open(area, "C1") as store:
        [listed] = store.list()
        assert (listed.generation, listed.meta, listed.packs) == ("g1", {"volume": "v1"}, 3)
        assert listed.size == sum(map(len, packs))
        assert listed.manifest == b"sealed manifest" and listed.problem is None
        assert [store.get("g1", i) for i in range(3)] == packs
        state = store.status("g1")
        assert state.committed and state.packs == {i: len(p) for i, p in enumerate(packs)}
        with pytest.raises(NotFound, match="pack 3 of generation g1"):
            store.get("g1", 3)
        # A retried commit (its answer was cut) is no error; another index is.
        assert store.commit("g1", index_of(packs), b"sealed manifest").committed
        with pytest.raises(AlreadyExists):
            store.commit("g1", index_of(packs[:2]), b"sealed manifest")
        with pytest.raises(AlreadyExists):
            store.begin("g1", {"volume": "v1"})


CRASHING_WRITER = """
import sys
from pathlib import Path
from blockguard.storage.remote.packstore import PackStore, pack_digest
area, packs = Path(sys.argv[1]), [bytes([i]) * 3000 for i in range(3)]
store = PackStore.open(area, "C1")
store.begin("g1", {"volume": "v1"})
for i, data in enumerate(packs):
    store.put("g1", i, data)
index = {"packs": [{"pack": i, "size": len(p), "xxh3_128": pack_digest(p)}
                   for i, p in enumerate(packs)]}
store.commit("g1", index, b"manifest")
"""


def test_a_cut_before_the_commit_point_lists_nothing_and_the_commit_resumes(
    area: Path,
) -> None:
    # A writer killed (SIGKILL) just before the index is renamed into place.
    done = subprocess.run(
        [sys.executable, "-c", CRASHING_WRITER, str(area)],
        env={
            **os.environ,
            "PYTHONPATH": str(REPO),
            "BLOCKGUARD_TEST_CRASH_AT": "atomic-index.json",
        },
        capture_output=True,
        timeout=scaled(60),
    )
    assert done.returncode == -9, done.stderr
    packs = [bytes([i]) * 3000 for i in range(3)]
    with PackStore.open(area, "C1") as store:
        assert store.list() == []
        with pytest.raises(NotFound):
            store.get("g1", 0)
        state = store.status("g1")
        assert not state.committed and state.packs == {0: 3000, 1: 3000, 2: 3000}
        # The next connection resumes: begin again, nothing re-sent, commit.
        assert store.begin("g1", {"volume": "v1"}).packs == state.packs
        store.commit("g1", index_of(packs), b"manifest")
        assert [g.generation for g in store.list()] == ["g1"]
        assert [store.get("g1", i) for i in range(3)] == packs


def test_an_open_generation_survives_a_restart_and_resumes(area: Path) -> None:
    packs = packs_of(4)
    with PackStore.open(area, "C1") as store:
        store.begin("g2", {"volume": "v1"}, needed=sum(map(len, packs)))
        store.put("g2", 0, packs[0])
        store.put("g2", 1, packs[1])
    # A new process (a new connection) after the first ended.
    with PackStore.open(area, "C1") as store:
        assert store.status("g2").packs == {0: len(packs[0]), 1: len(packs[1])}
        with pytest.raises(InvalidInput, match="not begun"):
            store.put("g2", 2, packs[2])
        with pytest.raises(InvalidInput, match="another meta"):
            store.begin("g2", {"volume": "v2"})
        state = store.begin("g2", {"volume": "v1"})
        assert sorted(state.packs) == [0, 1] and state.meta == {"volume": "v1"}
        for i in (2, 3):
            store.put("g2", i, packs[i])
        store.commit("g2", index_of(packs), b"m")
        assert [store.get("g2", i) for i in range(4)] == packs


def test_a_generation_is_written_by_one_connection_at_a_time(area: Path) -> None:
    with PackStore.open(area, "C1") as one, PackStore.open(area, "C1") as two:
        one.begin("g3", {})
        with pytest.raises(Busy):
            two.begin("g3", {})
        with pytest.raises(Busy):
            two.remove("g3")
        one.close()
        two.begin("g3", {})


@pytest.mark.parametrize(
    "gen", ["../C2", "a/b", ".hidden", "", "..", "g1.deleted", "x" * 129, "g\n1"]
)
def test_a_bad_generation_name_is_refused_and_nothing_is_created(area: Path, gen: str) -> None:
    before = tree(area)
    with PackStore.open(area, "C1") as store:
        for call in (
            lambda: store.begin(gen, {}),
            lambda: store.put(gen, 0, b"x"),
            lambda: store.status(gen),
            lambda: store.commit(gen, {"packs": []}, b""),
            lambda: store.get(gen, 0),
            lambda: store.remove(gen),
        ):
            with pytest.raises(InvalidInput, match="generation"):
                call()
    assert tree(area) == before


@pytest.mark.parametrize("client", ["../C1", "C1/..", ".C1", "", "a/b", "-x"])
def test_a_bad_client_id_is_refused_and_nothing_is_created(tmp_path: Path, client: str) -> None:
    area = tmp_path / "area"
    area.mkdir()
    with pytest.raises(InvalidInput, match="client"):
        PackStore.create(area, client)
    with pytest.raises(InvalidInput, match="client"):
        PackStore.open(area, client)
    assert list(area.iterdir()) == []


def test_another_client_reaches_nothing_of_c1(area: Path) -> None:
    packs = packs_of(2)
    store_and_commit(area, "g1", packs, b"m")
    before = tree(area)
    with pytest.raises(NotFound, match="client C3"):
        PackStore.open(area, "C3")
    with PackStore.create(area, "C2") as other:
        assert other.list() == []
        for call in (
            lambda: other.get("g1", 0),
            lambda: other.status("g1"),
            lambda: other.remove("g1"),
            lambda: other.put("g1", 0, b"x"),
        ):
            with pytest.raises(NotFound):
                call()
    assert {k: v for k, v in tree(area).items() if "C2" not in k} == before


def test_commit_checks_every_pack_and_changes_nothing_when_one_is_wrong(area: Path) -> None:
    packs = packs_of(3)
    with PackStore.open(area, "C1") as store:
        store.begin("g4", {})
        for i, data in enumerate(packs):
            store.put("g4", i, data)
        wrong = index_of(packs)
        wrong["packs"][1]["xxh3_128"] = pack_digest(b"other")  # type: ignore[index]
        before = tree(area)
        with pytest.raises(DataError, match="pack 1"):
            store.commit("g4", wrong, b"m")
        with pytest.raises(InvalidInput, match=r"packs \[2\] are stored but not in its index"):
            store.commit("g4", index_of(packs[:2]), b"m")
        with pytest.raises(InvalidInput, match="pack 3, which is not stored"):
            store.commit("g4", index_of([*packs, b"x"]), b"m")
        with pytest.raises(InvalidInput, match="malformed"):
            store.commit("g4", {"packs": [{"pack": 0}]}, b"m")
        assert tree(area) == before and store.list() == []


def test_space_is_checked_before_anything_is_written(area: Path) -> None:
    before = tree(area)
    with PackStore.open(area, "C1") as store:
        free = store.space().free
        with pytest.raises(PoolSpaceLow, match="area of client C1"):
            store.begin("g5", {}, needed=free + (1 << 40))
        assert tree(area) == before
        space = store.space()
        assert space.total >= space.free > 0 and space.used == 0


def test_remove_and_an_interrupted_removal_finishes_at_open(area: Path) -> None:
    store_and_commit(area, "g1", packs_of(1), b"m")
    store_and_commit(area, "g2", packs_of(1), b"m")
    with PackStore.open(area, "C1") as store:
        store.remove("g1")
        assert [g.generation for g in store.list()] == ["g2"]
        with pytest.raises(NotFound):
            store.remove("g1")
    gens = area / "clients" / "C1" / "generations"
    # A cut after the rename (the removal's commit point) and before the delete.
    (gens / "g2").rename(gens / "g2.deleted")
    with PackStore.open(area, "C1") as store:
        assert store.list() == []
    assert list(gens.iterdir()) == []


def test_a_pack_changed_on_the_target_is_refused_by_get(area: Path) -> None:
    store_and_commit(area, "g1", [b"a" * 4096], b"m")
    pack = area / "clients" / "C1" / "generations" / "g1" / "packs" / "000000.pack"
    pack.write_bytes(b"b" * 4096)
    with PackStore.open(area, "C1") as store, pytest.raises(DataError, match="pack 0"):
        store.get("g1", 0)


def test_a_damaged_index_is_listed_as_damaged_and_get_refuses_it(area: Path) -> None:
    store_and_commit(area, "g1", [b"a" * 4096], b"m")
    store_and_commit(area, "g2", [b"b" * 4096], b"m")
    gens = area / "clients" / "C1" / "generations"
    (gens / "g1" / "index.json").write_text('{"format": 1, "packs": "nonsense"}')
    (gens / "not a name").mkdir()  # made by hand on the target: not a generation
    with PackStore.open(area, "C1") as store:
        damaged, good = store.list()
        assert (damaged.generation, good.generation) == ("g1", "g2")
        assert damaged.problem and "index is unreadable" in damaged.problem
        assert good.problem is None
        with pytest.raises(DataError, match="generation g1: its index is unreadable"):
            store.get("g1", 0)
        assert store.get("g2", 0) == b"b" * 4096


def test_a_generation_marked_damaged_is_listed_with_the_reason(area: Path) -> None:
    store_and_commit(area, "g1", [b"a" * 4096], b"m")
    with PackStore.open(area, "C1") as store:
        store.begin("g2", {})
        before = tree(area)
        with pytest.raises(NotFound):
            store.mark_damaged("g2", "restore failed")  # open, not committed
        with pytest.raises(InvalidInput, match="damage reason"):
            store.mark_damaged("g1", "x\n" * 10)
        assert tree(area) == before
        store.mark_damaged("g1", "pack 0 failed authentication", 0)
        [listed] = store.list()
        assert listed.problem == "marked damaged: pack 0 failed authentication (chunk 0)"


# --- link: a synthesized full's unchanged packs, made from an earlier generation's ---------


def test_linked_packs_survive_the_removal_of_their_source(area: Path) -> None:
    old = packs_of(3)
    store_and_commit(area, "g1", old, b"m1")
    new2 = os.urandom(4000)
    with PackStore.open(area, "C1") as store:
        store.begin("g2", {"volume": "v1"})
        made = store.link("g2", "g1", [(0, 0), (1, 1)])
        assert made == index_of(old)["packs"][:2]  # type: ignore[index]
        store.put("g2", 2, new2)
        index = {"packs": [*made, {"pack": 2, "size": len(new2), "xxh3_128": pack_digest(new2)}]}
        store.commit("g2", index, b"m2")
        # A linked pack is one file on the disk: counted once in the client's use.
        files = [f for f in (area / "clients/C1").rglob("*") if f.is_file()]
        twice = sum(len(p) for p in old[:2])
        assert store.space().used == sum(f.stat().st_size for f in files) - twice
        store.remove("g1")
        assert [g.generation for g in store.list()] == ["g2"]
        assert [store.get("g2", n) for n in range(3)] == [old[0], old[1], new2]


def test_link_refuses_other_clients_volumes_and_missing_packs_and_creates_nothing(
    area: Path,
) -> None:
    store_and_commit(area, "g1", packs_of(2), b"m1")
    with PackStore.create(area, "C2") as other:
        other.begin("x1", {"volume": "v1"})
        other.put("x1", 0, b"theirs")
        other.commit(
            "x1", {"packs": [{"pack": 0, "size": 6, "xxh3_128": pack_digest(b"theirs")}]}, b"m"
        )
    with PackStore.open(area, "C1") as store:
        store.begin("g2", {"volume": "v1"})
        store.begin("w2", {"volume": "v2"})
        store.begin("g3", {"volume": "v1"})
        before = tree(area)
        # Another client's generation (by its name, or by a path to it) is never reached.
        with pytest.raises(NotFound, match="x1"):
            store.link("g2", "x1", [(0, 0)])
        with pytest.raises(InvalidInput):
            store.link("g2", "../../C2/generations/x1", [(0, 0)])
        # A missing pack, after good ones: nothing is made of the good ones either.
        with pytest.raises(NotFound, match="pack 7 of generation g1"):
            store.link("g2", "g1", [(0, 0), (7, 1)])
        # Another volume of the same client, or a source not committed.
        with pytest.raises(InvalidInput, match="another meta"):
            store.link("w2", "g1", [(0, 0)])
        with pytest.raises(NotFound, match="generation g3"):
            store.link("g2", "g3", [(0, 0)])
        assert tree(area) == before
    # A generation not begun on this connection is not written.
    with PackStore.open(area, "C1") as store, pytest.raises(InvalidInput, match="not begun"):
        store.link("g2", "g1", [(0, 0)])


def test_a_pack_linked_twice_then_sent_never_rewrites_the_committed_source(area: Path) -> None:
    """A resumed synthesized full links its packs again, and a later attempt may send a
    linked pack whole: the committed generation it came from keeps its bytes, and no
    second name of a committed pack is left behind to be written through."""
    old = packs_of(2)
    store_and_commit(area, "g1", old, b"m1")
    with PackStore.open(area, "C1") as store:
        store.begin("g2", {"volume": "v1"})
        store.link("g2", "g1", [(0, 0), (1, 1)])
    with PackStore.open(area, "C1") as store:  # the next attempt, after a cut
        store.begin("g2", {"volume": "v1"})
        store.link("g2", "g1", [(0, 0), (1, 1)])
        packs = area / "clients/C1/generations/g2/packs"
        assert sorted(p.name for p in packs.iterdir()) == ["000000.pack", "000001.pack"]
        store.put("g2", 0, b"sent whole this time")
        assert [store.get("g1", n) for n in range(2)] == old
