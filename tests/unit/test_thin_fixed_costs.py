"""What a thin-tracked backup asks LVM, and what it leaves for after it reported (issue 16).

A fake ``lvm`` (through the runner's interface) keeps the VG's LVs in a set and records
every call, so the tests see exactly which commands the tracker runs; no device is touched.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from blockguard.engine import tracking as tracking_mod
from blockguard.engine.tracking import LAST_BACKUP, LAST_FULL, PointInTime, Role, VolumeTracking
from blockguard.errors import CommandFailed
from blockguard.storage.runner import CommandResult
from blockguard.storage.tracking import thin
from blockguard.storage.tracking.thin import ThinTracker, _State

VG, LV = "vg0", "vol"
SIZE = 64 << 20
CHUNK = 64 << 10


class FakeLvm:
    """The ``lvm`` commands the thin tracker runs, on a set of LV names.

    :ivar refuse: LVs whose ``lvremove`` fails (they stay).
    """

    def __init__(self, lvs: set[str]) -> None:
        self.lvs = set(lvs)
        self.calls: list[tuple[str, ...]] = []
        self.refuse: set[str] = set()

    def run(self, argv: Sequence[str], *, timeout: float, check: bool = True, **_: object):
        argv = tuple(argv)
        self.calls.append(argv)
        assert argv[0] == "lvm", argv
        rc, out = 0, ""
        if argv[1] == "lvs":
            out = "".join(f"  {lv}|{SIZE}\n" for lv in sorted(self.lvs))
        elif argv[1] == "lvremove":
            vg, lv = argv[-1].split("/")
            if vg != VG or lv not in self.lvs or lv in self.refuse:
                rc = 5
            else:
                self.lvs.discard(lv)
        else:
            raise AssertionError(f"unexpected command {argv}")
        if check and rc:
            raise CommandFailed(argv, rc, "  Failed to find logical volume")
        return CommandResult(argv, rc, out, "", 0.0)

    def commands(self, name: str) -> list[tuple[str, ...]]:
        return [c for c in self.calls if c[1] == name]


def tracker(tmp_path: Path, lvm: FakeLvm, refs: dict[str, str]) -> ThinTracker:
    state = _State(VG, LV, "pool", CHUNK, SIZE, CHUNK, references=dict(refs), serial=len(refs))
    state.thin_ids = {LV: 1} | {snap: i + 2 for i, snap in enumerate(refs.values())}
    t = ThinTracker(tmp_path / "st", state, lvm)  # type: ignore[arg-type]
    t._save()
    return t


def saved(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "st" / "thin.json").read_text())


def test_a_later_drop_dooms_the_snapshot_by_name_and_removes_it_only_when_asked(
    tmp_path: Path,
) -> None:
    lvm = FakeLvm({LV, "bgref-vol-1", "bgref-vol-2"})
    t = tracker(tmp_path, lvm, {"b1": "bgref-vol-1", "b2": "bgref-vol-2"})
    t.drop_reference("b1", later=True)
    assert lvm.commands("lvremove") == []
    assert t.references() == ["b2"]
    assert saved(tmp_path)["doomed"] == ["bgref-vol-1"]
    t.remove_doomed()
    assert [c[-1] for c in lvm.commands("lvremove")] == [f"{VG}/bgref-vol-1"]
    assert lvm.lvs == {LV, "bgref-vol-2"}
    t.drop_reference("b2")  # now: removed at once, and the list saved empty
    assert [c[-1] for c in lvm.commands("lvremove")] == [f"{VG}/bgref-vol-1", f"{VG}/bgref-vol-2"]
    assert lvm.lvs == {LV} and saved(tmp_path)["doomed"] == []


def test_a_removal_a_crash_cut_short_is_done_at_open_by_exact_name(tmp_path: Path) -> None:
    lvm = FakeLvm({LV, "bgref-vol-1", "bgref-vol-2", "bgref-vol-10", "other"})
    t = tracker(tmp_path, lvm, {"b1": "bgref-vol-1", "b2": "bgref-vol-2"})
    t.drop_reference("b1", later=True)
    del t  # the daemon dies before the job's tidy
    reopened = ThinTracker.open(tmp_path / "st", lvm)  # type: ignore[arg-type]
    assert [c[-1] for c in lvm.commands("lvremove")] == [f"{VG}/bgref-vol-1"]
    assert lvm.lvs == {LV, "bgref-vol-2", "bgref-vol-10", "other"}  # nothing else touched
    assert saved(tmp_path)["doomed"] == [] and reopened.references() == ["b2"]


def test_a_snapshot_already_gone_counts_as_removed_one_that_stays_is_tried_again(
    tmp_path: Path,
) -> None:
    lvm = FakeLvm({LV, "bgref-vol-2", "bgref-vol-3"})  # bgref-vol-1 went before the save
    t = tracker(tmp_path, lvm, {"b1": "bgref-vol-1", "b2": "bgref-vol-2", "b3": "bgref-vol-3"})
    t.drop_reference("b1", later=True)
    t.drop_reference("b2", later=True)
    lvm.refuse = {"bgref-vol-2"}
    t.remove_doomed()
    t._save()
    assert saved(tmp_path)["doomed"] == ["bgref-vol-2"]
    lvm.refuse = set()
    t.remove_doomed()
    t._save()
    assert saved(tmp_path)["doomed"] == [] and lvm.lvs == {LV, "bgref-vol-3"}


def test_a_backup_asks_lvm_once_for_its_plan_and_removes_the_old_snapshot_after(
    tmp_path: Path,
) -> None:
    """The refresh after a committed backup reuses the check its plan made (one lvs per
    backup, not two), and the snapshot of the replaced reference is removed by tidy, not
    by the commit."""
    lvm = FakeLvm({LV, "bgref-vol-1", "bgref-vol-2"})
    t = tracker(tmp_path, lvm, {"b1": "bgref-vol-1", "b2": "bgref-vol-2"})
    (tmp_path / "vol").mkdir()
    tracking = VolumeTracking(tmp_path / "vol", t, lvm)  # type: ignore[arg-type]
    tracking.save_roles({LAST_FULL: Role("b1", "g1"), LAST_BACKUP: Role("b2", "g2")})
    # The backup: its point (the snapshot bgref-vol-3 made by add_reference), its plan.
    t._s.references["b3"] = "bgref-vol-3"
    t._s.thin_ids["bgref-vol-3"] = 9
    lvm.lvs.add("bgref-vol-3")
    trusted, problem = tracking.trusted("g2", "g1")
    assert trusted == {LAST_BACKUP: "b2", LAST_FULL: "b1"} and not problem
    assert len(lvm.commands("lvs")) == 1
    tracking.commit_point(PointInTime("/dev/vg0/bgref-vol-3", "b3"), "g3", False, None)
    assert lvm.commands("lvremove") == []  # b2 is doomed, not removed inside the job
    trusted, _ = tracking.trusted("g3", "g1")  # the refresh that follows the backup
    assert trusted == {LAST_BACKUP: "b3", LAST_FULL: "b1"}
    assert len(lvm.commands("lvs")) == 1
    tracking.tidy()  # after the job reported
    assert [c[-1] for c in lvm.commands("lvremove")] == [f"{VG}/bgref-vol-2"]
    # Any later look asks LVM again: a snapshot removed by hand is noticed.
    lvm.lvs.discard("bgref-vol-1")
    trusted, problem = tracking.trusted("g3", "g1")
    assert len(lvm.commands("lvs")) == 2
    assert trusted == {} and "bgref-vol-1 is missing" in problem


def test_unprotect_removes_every_reference_snapshot_by_exact_name(tmp_path: Path) -> None:
    """Stopping tracking takes the tracker's snapshots with it (the state is their
    only record): each by its saved name, nothing else in the VG touched."""
    lvm = FakeLvm({LV, "bgref-vol-1", "bgref-vol-2", "bgref-vol-20", "other"})
    t = tracker(tmp_path, lvm, {"b1": "bgref-vol-1", "b2": "bgref-vol-2"})
    (tmp_path / "vol").mkdir()
    tracking = VolumeTracking(tmp_path / "vol", t, lvm)  # type: ignore[arg-type]
    tracking.remove()
    assert sorted(c[-1] for c in lvm.commands("lvremove")) == [
        f"{VG}/bgref-vol-1",
        f"{VG}/bgref-vol-2",
    ]
    assert lvm.lvs == {LV, "bgref-vol-20", "other"}
    assert not (tmp_path / "vol").exists()


def test_unprotect_names_a_snapshot_it_could_not_remove(tmp_path: Path, caplog) -> None:
    lvm = FakeLvm({LV, "bgref-vol-1", "bgref-vol-2"})
    t = tracker(tmp_path, lvm, {"b1": "bgref-vol-1", "b2": "bgref-vol-2"})
    (tmp_path / "vol").mkdir()
    tracking = VolumeTracking(tmp_path / "vol", t, lvm)  # type: ignore[arg-type]
    lvm.refuse = {"bgref-vol-2"}
    with caplog.at_level("WARNING"):
        tracking.remove()
    assert lvm.lvs == {LV, "bgref-vol-2"}
    assert f"lvremove {VG}/bgref-vol-2" in caplog.text


def test_active_lvs_with_their_recorded_uuids_need_no_lvs(tmp_path: Path, monkeypatch) -> None:
    """The volume and the reference snapshots active with the dm uuids recorded when they
    were made answer the check from the kernel; anything else asks LVM, which still sees
    a snapshot removed by hand."""
    lvm = FakeLvm({LV, "bgref-vol-1", "bgref-vol-2"})
    t = tracker(tmp_path, lvm, {"b1": "bgref-vol-1", "b2": "bgref-vol-2"})
    t._s.dm_uuids = {LV: "LVM-v", "bgref-vol-1": "LVM-1", "bgref-vol-2": "LVM-2"}
    active = {LV: ("LVM-v", SIZE), "bgref-vol-1": ("LVM-1", SIZE), "bgref-vol-2": ("LVM-2", SIZE)}
    monkeypatch.setattr(thin, "_active_lv", lambda vg, lv: active.get(lv) if vg == VG else None)
    assert t.state().is_exact
    assert lvm.commands("lvs") == []
    # Made again under the same name (another uuid), or inactive: LVM is asked.
    active["bgref-vol-2"] = ("LVM-other", SIZE)
    assert t.state().is_exact
    del active["bgref-vol-1"]
    assert t.state().is_exact
    assert len(lvm.commands("lvs")) == 2
    # The volume resized: LVM is asked and says so.
    active["bgref-vol-1"], active["bgref-vol-2"] = ("LVM-1", SIZE), ("LVM-2", SIZE)
    active[LV] = ("LVM-v", 2 * SIZE)
    t.state()
    assert len(lvm.commands("lvs")) == 3
    # Removed by hand: gone from the kernel and from LVM.
    active[LV] = ("LVM-v", SIZE)
    del active["bgref-vol-2"]
    lvm.lvs.discard("bgref-vol-2")
    state = t.state()
    assert not state.is_exact and "bgref-vol-2 is missing" in state.reason


def test_an_unchanged_point_keeps_the_reference_and_its_snapshot(
    tmp_path: Path, monkeypatch
) -> None:
    """A backup that found nothing changed commits its generation onto the reference of
    the last backup: no snapshot is made or doomed. The question is asked again only
    when the kernel counted no write since (or nothing is known: after a restart)."""
    lvm = FakeLvm({LV, "bgref-vol-1", "bgref-vol-2"})
    t = tracker(tmp_path, lvm, {"b1": "bgref-vol-1", "b2": "bgref-vol-2"})
    (tmp_path / "vol").mkdir()
    tracking = VolumeTracking(tmp_path / "vol", t, lvm)  # type: ignore[arg-type]
    tracking.save_roles({LAST_FULL: Role("b1", "g1"), LAST_BACKUP: Role("b2", "g2")})
    counts = {"n": 40}
    synced: list[str] = []
    monkeypatch.setattr(tracking_mod, "_write_count", lambda device: counts["n"])
    monkeypatch.setattr(tracking_mod, "sync_written", synced.append)
    assert tracking.may_be_unchanged("/dev/vg0/vol")  # nothing known yet: ask
    tracking.begin_unchanged("/dev/vg0/vol")
    assert synced == ["/dev/vg0/vol"]
    point = tracking.unchanged_point("/dev/vg0/vol")
    assert (point.source, point.ref, point.copy) == ("/dev/vg0/vol", "b2", None)
    tracking.commit_point(point, "g3", False, None)
    assert tracking.roles() == {LAST_FULL: Role("b1", "g1"), LAST_BACKUP: Role("b2", "g3")}
    assert t.references() == ["b1", "b2"] and saved(tmp_path)["doomed"] == []
    tracking.tidy()
    assert lvm.commands("lvremove") == []
    assert tracking.may_be_unchanged("/dev/vg0/vol")
    counts["n"] += 1  # a write since: the backup takes its snapshot without asking
    assert not tracking.may_be_unchanged("/dev/vg0/vol")
