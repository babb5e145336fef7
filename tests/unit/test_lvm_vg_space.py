"""What an lvm pool's VG asks LVM for its space and placement, and when it asks again
(issue 16: no ``vgs``/``pvs``/``lvs`` per delta job for figures that did not change).

A fake ``lvm`` (through the runner's interface) keeps two PVs' free space and the VG's
LVs, and records every call; no device is touched.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from blockguard.errors import CommandFailed, PoolSpaceLow
from blockguard.storage.lvm import Lvm
from blockguard.storage.pool.lvmvg import EXTENT, PoolVg
from blockguard.storage.runner import CommandResult

PV_SIZE = 1 << 30
A, B = "/dev/vda", "/dev/vdb"


class FakeLvm:
    """``pvs``, ``lvs``, ``lvcreate`` (linear, ``-L SIZEb``) and ``lvremove`` of VG
    ``bg_p1`` on two PVs.

    :ivar fail: commands that fail (exit 5) without changing anything.
    """

    def __init__(self) -> None:
        self.free = {A: PV_SIZE, B: PV_SIZE // 2}
        self.lvs: dict[str, tuple[str, int]] = {}  # name -> (pv, size)
        self.calls: list[tuple[str, ...]] = []
        self.fail: set[str] = set()
        #: thin LVs of the VG's thin pool (their space is the pool's, not the VG's)
        self.thin: set[str] = set()

    def run(self, argv: Sequence[str], *, timeout: float, check: bool = True, **_: object):
        argv = tuple(argv)
        self.calls.append(argv)
        assert argv[0] == "lvm", argv
        rc, out = 0, ""
        if argv[1] in self.fail:
            rc = 5
        elif argv[1] == "pvs":
            vg_free = sum(self.free.values())
            out = "".join(
                f"  {pv}|bg_p1|{PV_SIZE}|{free}|{2 * PV_SIZE}|{vg_free}\n"
                for pv, free in self.free.items()
            )
        elif argv[1] == "lvs":
            out = "".join(
                f"  {name}|{size}|-wi-a-----|{pv}(0)||\n" for name, (pv, size) in self.lvs.items()
            )
        elif argv[1] == "lvcreate":
            size = int(argv[argv.index("-L") + 1].rstrip("b"))
            name, pv = argv[argv.index("-n") + 1], argv[-1]
            self.free[pv] -= size
            self.lvs[name] = (pv, size)
        elif argv[1] == "lvremove":
            name = argv[-1].split("/")[1]
            if name in self.thin:
                self.thin.discard(name)  # its blocks go back to the thin pool, not the VG
            else:
                pv, size = self.lvs.pop(name)
                self.free[pv] += size
        else:
            raise AssertionError(f"unexpected command {argv}")
        if check and rc:
            raise CommandFailed(argv, rc, "failed")
        return CommandResult(argv, rc, out, "", 0.0)

    def count(self, *names: str) -> int:
        return sum(1 for c in self.calls if c[1] in names)


def pool_vg(fake: FakeLvm) -> PoolVg:
    return PoolVg("p1", Lvm(fake, [A, B]), fake)  # type: ignore[arg-type]


def test_space_is_read_once_and_follows_the_pools_own_linear_lvs() -> None:
    fake = FakeLvm()
    vg = pool_vg(fake)
    assert vg.vg_space() == (2 * PV_SIZE, PV_SIZE + PV_SIZE // 2)
    for i in range(3):
        pvs = vg.place(3 * EXTENT, B)
        assert pvs == [B]
        vg.create_linear(f"g{i}", 3 * EXTENT, pvs, wipe=False)
        # The kept figures are what LVM would say now, without asking it.
        assert vg.pv_free()[B] == (PV_SIZE, fake.free[B])
        assert vg.vg_space()[1] == sum(fake.free.values())
        assert vg.devices_of(f"g{i}") == (B,)
    assert fake.count("pvs", "vgs", "lvs") == 1


def test_a_removal_or_a_failed_command_makes_the_next_question_read_again() -> None:
    fake = FakeLvm()
    vg = pool_vg(fake)
    vg.create_linear("g1", 8 * EXTENT, vg.place(8 * EXTENT, A), wipe=False)
    vg.vg_space()
    reads = fake.count("pvs")
    vg.remove_lv("g1")
    assert vg.vg_space()[1] == sum(fake.free.values()) == PV_SIZE + PV_SIZE // 2
    assert fake.count("pvs") == reads + 1
    fake.fail.add("lvcreate")
    with pytest.raises(CommandFailed):
        vg.create_linear("g2", EXTENT, [A], wipe=False)
    vg.vg_space()
    assert fake.count("pvs") == reads + 2


def test_a_refusal_is_made_on_a_fresh_read_not_on_the_kept_figure() -> None:
    fake = FakeLvm()
    vg = pool_vg(fake)
    vg.vg_space()
    # Space freed behind the pool's back (an admin removed an LV by hand).
    fake.free[B] += PV_SIZE
    big = PV_SIZE + EXTENT
    assert vg.place(big, None) == [B]
    assert vg.vg_free_for(3 * PV_SIZE) == sum(fake.free.values())
    with pytest.raises(PoolSpaceLow) as err:
        vg.place(4 * PV_SIZE, None)
    assert err.value.fields["free"] == sum(fake.free.values())


def test_space_taken_behind_the_pools_back_is_a_refusal_not_a_failed_command() -> None:
    fake = FakeLvm()
    vg = pool_vg(fake)
    pvs = vg.place(8 * EXTENT, A)
    # An admin takes the PV's space after the pool read it.
    fake.free[A] = 0
    fake.free[B] = 0
    fake.fail.add("lvcreate")
    with pytest.raises(PoolSpaceLow) as err:
        vg.create_linear("g1", 8 * EXTENT, pvs, wipe=False)
    assert err.value.fields["free"] == 0
    assert err.value.fields["needed"] == 8 * EXTENT
    assert "g1" not in fake.lvs


def test_removing_a_thin_lv_keeps_the_vgs_space() -> None:
    """Retention of a full (a thin LV) gives blocks back to the thin pool, not to the VG:
    the kept figure stays right, so the next delta job asks LVM nothing."""
    fake = FakeLvm()
    vg = pool_vg(fake)
    fake.thin.add("full1")
    before = vg.vg_space()
    reads = fake.count("pvs")
    vg.remove_lv("full1", thin=True)
    assert vg.vg_space() == before == (2 * PV_SIZE, sum(fake.free.values()))
    assert fake.count("pvs") == reads


def test_a_failed_create_is_reported_even_when_the_re_read_fails_too() -> None:
    fake = FakeLvm()
    vg = pool_vg(fake)
    pvs = vg.place(8 * EXTENT, A)
    fake.fail.update({"lvcreate", "pvs"})
    with pytest.raises(CommandFailed) as err:
        vg.create_linear("g1", 8 * EXTENT, pvs, wipe=False)
    assert err.value.argv[1] == "lvcreate"
