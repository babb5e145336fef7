"""Failing backups back off: failures in a row from the catalog, the scheduler's hold."""

from __future__ import annotations

from pathlib import Path

from blockguard.core.catalog import Catalog
from blockguard.engine.health import failures_in_row, retry_hold
from blockguard.engine.scheduling import Scheduler
from blockguard.engine.settings import Settings


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


def backup(catalog: Catalog, volume: str, ok: bool, clock: Clock) -> None:
    job = catalog.create_job("backup", volume=volume)
    clock.t += 10
    if ok:
        catalog.finish_job(job.id, "done")
    else:
        catalog.finish_job(job.id, "failed", error=f"disk gone at {clock.t}")


def test_failures_in_row_count_since_the_last_success(tmp_path: Path) -> None:
    clock = Clock()
    catalog = Catalog(tmp_path / "catalog.db", clock=clock)
    try:
        assert failures_in_row(catalog, "db") == (0, 0.0, "")
        backup(catalog, "db", False, clock)
        backup(catalog, "db", True, clock)
        for _ in range(3):
            backup(catalog, "db", False, clock)
        catalog.create_job("verify", volume="db")  # other kinds do not count
        catalog.create_job("backup", volume="db")  # a queued one neither
        backup(catalog, "web", False, clock)
        count, at, error = failures_in_row(catalog, "db")
        assert (count, at) == (3, clock.t - 10) and error == f"disk gone at {clock.t - 10}"

        settings = Settings(tmp_path, tmp_path / "pools", retry_base=60, retry_cap=200)
        # Three failures: 60 * 2 * 2 = 240, capped at 200, counted from the last failure.
        assert retry_hold(catalog, "db", settings, at + 50) == 150
        assert retry_hold(catalog, "db", settings, at + 200) == 0
        assert retry_hold(catalog, "web", settings, clock.t) == 60
        assert retry_hold(catalog, "none", settings, clock.t) == 0
    finally:
        catalog.close()


def test_scheduler_skips_held_volumes_and_their_groups() -> None:
    held = {"b": 30.0, "g2": 5.0}
    scheduler = Scheduler(None, print, set, 30, held=lambda n: held.get(n, 0.0))  # type: ignore[arg-type]
    chosen = ["a", "b", "g1", "g2", "h1"]
    groups = {"g": ["g1", "g2"], "h": ["h1"]}
    assert scheduler._not_held(chosen, groups) == ["a", "h1"]
    assert Scheduler(None, print, set, 30)._not_held(chosen, groups) == chosen  # type: ignore[arg-type]
