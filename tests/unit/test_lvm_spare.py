"""The spare delta area's rules (issue 16: no ``lvcreate`` in a delta backup): when a
spare takes a delta, that taking it runs no command, that making one keeps a spare
that fits and replaces one that does not, and which LVs the next open keeps.

The fake ``lvm`` of :mod:`tests.unit.test_lvm_vg_space` records every command; the
real thing runs in ``tests/guest/test_lvm_spare.py`` and the guest crash test.
"""

from __future__ import annotations

import threading

from blockguard.storage.pool.lvmspare import AREA_PREFIX, SpareArea, fits, spare_size_for
from blockguard.storage.pool.lvmvg import EXTENT, LvFacts
from tests.unit.test_lvm_vg_space import FakeLvm, pool_vg


def area(name: str, size: int, attr: str = "-wi-a-----") -> LvFacts:
    return LvFacts(name, size, attr, ("/dev/vda",), None, None)


def test_a_spare_takes_a_delta_it_holds_without_wasting_more_than_the_delta() -> None:
    assert fits(EXTENT, EXTENT)
    assert fits(3 * EXTENT, 4 * EXTENT)
    assert not fits(5 * EXTENT, 4 * EXTENT)  # too small
    assert not fits(4 * EXTENT, 11 * EXTENT)  # would keep 7 extents idle for good
    assert not fits(0, EXTENT)  # an empty delta has no LV at all
    assert spare_size_for(0) == EXTENT
    assert spare_size_for(8 * EXTENT) == 10 * EXTENT
    assert fits(8 * EXTENT, spare_size_for(8 * EXTENT))


def test_making_keeps_a_spare_that_fits_and_taking_it_runs_nothing() -> None:
    fake = FakeLvm()
    spare = SpareArea(pool_vg(fake), lambda: None)
    assert spare.claim(EXTENT) is None and spare.size == 0
    first = spare.make(2 * EXTENT)
    assert first is not None and first.startswith(AREA_PREFIX) and first in fake.lvs
    assert spare.make(2 * EXTENT) == first and fake.count("lvcreate") == 1
    # A much larger need replaces it: the old one goes, one new LV is made.
    second = spare.make(40 * EXTENT)
    assert second != first and set(fake.lvs) == {second}
    calls = len(fake.calls)
    assert spare.claim(2 * EXTENT) is None  # would waste 38 extents: not taken
    assert spare.claim(30 * EXTENT) == second
    assert len(fake.calls) == calls and spare.size == 0
    assert spare.claim(30 * EXTENT) is None  # taken once only


def test_a_spare_gives_way_and_none_is_made_in_a_nearly_full_vg() -> None:
    fake = FakeLvm()
    spare = SpareArea(pool_vg(fake), lambda: None)
    name = spare.make(4 * EXTENT)
    assert spare.give_way() == 4 * EXTENT and name not in fake.lvs
    assert spare.give_way() == 0
    _, free = spare.vg.vg_space()
    assert spare.make(free - EXTENT) is None and fake.lvs == {}


def test_the_next_open_keeps_the_largest_unnamed_closed_area_only() -> None:
    fake = FakeLvm()
    vg = pool_vg(fake)
    for name, size in (("delta-a", EXTENT), ("delta-b", 3 * EXTENT), ("delta-c", 2 * EXTENT)):
        vg.create_linear(name, size, ["/dev/vda"], wipe=False)
    spare = SpareArea(vg, lambda: None)
    lvs = [
        area("delta-a", EXTENT),
        area("delta-b", 3 * EXTENT),  # a generation's: named by its manifest
        area("delta-c", 2 * EXTENT),
        area("delta-d", 9 * EXTENT, "-wi-ao----"),  # open: a writer elsewhere holds it
    ]
    removed = spare.sort_out(lvs, {"delta-b"})
    assert spare.name == "delta-c" and spare.size == 2 * EXTENT
    assert removed == [f"{vg.name}/delta-a"] and set(fake.lvs) == {"delta-b", "delta-c"}


def test_a_job_that_comes_stops_the_making_before_its_next_command() -> None:
    fake = FakeLvm()
    spare = SpareArea(pool_vg(fake), lambda: None)
    assert spare.make(2 * EXTENT, go_on=lambda: False) is None
    assert fake.count("lvcreate") == 0 and spare.size == 0
    first = spare.make(2 * EXTENT)
    # Replacing it: stopped before the lvremove, the old spare stays the spare.
    assert spare.make(40 * EXTENT, go_on=lambda: False) is None
    assert spare.name == first and set(fake.lvs) == {first}


def test_nothing_waits_for_a_spare_being_made_but_a_removal_for_space() -> None:
    fake = FakeLvm()
    spare = SpareArea(pool_vg(fake), lambda: None)
    seen: dict[str, object] = {}
    remover: list[threading.Thread] = []

    def go_on() -> bool:  # called with the making under way, just before its lvcreate
        seen["claim"] = spare.claim(EXTENT)  # a delta now makes its own LV: no wait
        seen["again"] = spare.make(EXTENT)  # a second making does not start
        t = threading.Thread(target=lambda: seen.setdefault("freed", spare.give_way()))
        t.start()
        remover.append(t)
        return True

    made = spare.make(2 * EXTENT, go_on=go_on)
    remover[0].join(timeout=600)
    assert seen["claim"] is None and seen["again"] is None
    # The removal waited for the lvcreate, then removed what it made.
    assert made is not None and seen["freed"] == 2 * EXTENT
    assert made not in fake.lvs and spare.size == 0
