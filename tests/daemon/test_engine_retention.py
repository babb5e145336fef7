"""Time-tiered retention through the real engine: three weeks of daily backups made on
chosen days (the ``BLOCKGUARD_TEST_GENERATION_CLOCK`` hook stamps them), pruned after
each backup by ``generations 1, keep_daily 2, keep_weekly 3`` in UTC, leave exactly the
generations the policy and their chains need, and every survivor restores bit-exact.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from blockguard.cli.client import Client, plain, variant
from tests.support.bus import REPO
from tests.support.daemon import EngineHarness, run_job
from tests.support.devices import MiB, sha256_of, write_random

SIZE = 8 * MiB
POOL_SIZE = 400 * MiB
CLI = [sys.executable, "-m", "blockguard.cli.main"]
#: Thursday Jan 1 .. Wednesday Jan 21, 2026: ISO weeks W01 (to Sun Jan 4) .. W04.
DAYS = [date(2026, 1, 1) + timedelta(days=i) for i in range(21)]
#: A full on Thursdays and Mondays, incrementals on the other days.
FULL_DAYS = {d for d in DAYS if d.isoweekday() in (1, 4)}
#: daily 2: Jan 21, 20; weekly 3: Jan 21 (W04), Sun Jan 18 (W03), Sun Jan 11 (W02);
#: and their chains: 19 (full) <- 20 <- 21, 15 (full) <- 16 <- 17 <- 18, 8 (full) <- ... 11.
SURVIVORS = {date(2026, 1, d) for d in (8, 9, 10, 11, 15, 16, 17, 18, 19, 20, 21)}


def backup_on(client: Client, clock: Path, day: date, full: bool) -> dict[str, object]:
    """A backup stamped at noon UTC of ``day`` (the backup takes far less than 12 hours)."""
    noon = datetime(day.year, day.month, day.day, 12, tzinfo=UTC).timestamp()
    clock.write_text(str(noon - time.time()))
    options = {"full": variant(True)} if full else {}
    props = run_job(client, client.call("BackupNowWithOptions", "sa{sv}", "db", options))
    assert props["State"] == "done", props["Error"]
    result = props["Result"]
    assert result["method"] == ("full" if full else "incremental"), result["reasons"]
    assert not result.get("warnings"), result["warnings"]
    return result  # type: ignore[no-any-return]


def day_of(created: float) -> date:
    return datetime.fromtimestamp(created, UTC).date()


def test_tiered_retention_prunes_by_policy_and_survivors_restore(
    engine: EngineHarness, loopdev: Callable[..., str], tmp_path: Path
) -> None:
    pool_disk = loopdev(POOL_SIZE, "pool.img")
    volume = loopdev(SIZE, "db.img")
    target = loopdev(SIZE, "target.img")
    clock = tmp_path / "generation-clock"
    clock.write_text("0")
    daemon = engine.start(BLOCKGUARD_TEST_GENERATION_CLOCK=str(clock))
    with Client(daemon.address) as client:
        client.call("CreatePool", "ssasb", "p1", "dir", [pool_disk], False)
        client.call("Protect", "sstssa{sv}", volume, "db", 0, "", "", {})
        client.call(
            "SetObjectives",
            "sa{sv}",
            "db",
            {
                "rpo": variant("1h"),
                "generations": variant(1),
                "keep_daily": variant(2),
                "keep_weekly": variant(3),
                "tz": variant("UTC"),
            },
        )
        sums: dict[date, str] = {}
        freed: list[str] = []
        write_random(volume, 0, SIZE, seed=1)
        for n, day in enumerate(DAYS):
            write_random(volume, (n % 16) * MiB // 2, MiB // 2, seed=100 + n)
            result = backup_on(client, clock, day, full=n == 0 or day in FULL_DAYS)
            freed += result["freed"]  # type: ignore[operator]
            sums[day] = sha256_of(volume)

        gens = plain(client.call("ListGenerations", "s", "db"))
        kept = {day_of(g[3]): g[0] for g in gens}
        assert len(kept) == len(gens)  # one generation a day
        assert set(kept) == SURVIVORS
        assert len(freed) == len(DAYS) - len(SURVIVORS)  # freed by the backups' retention

        # The plan shows the policy and why each survivor is kept; nothing more would go.
        retention = plain(client.call("Plan", "s", "db"))["retention"]
        assert retention["policy"] == "last 1, daily 2, weekly 3 (UTC)"
        assert (retention["keep_last"], retention["keep_daily"]) == (1, 2)
        assert (retention["keep_weekly"], retention["keep_monthly"]) == (3, 0)
        assert retention.get("would_delete", []) == []
        why = {k["generation"]: k["reasons"] for k in retention["kept"]}
        assert why[kept[date(2026, 1, 11)]] == ["weekly 2026-W02"]
        assert why[kept[date(2026, 1, 18)]] == ["weekly 2026-W03"]
        assert why[kept[date(2026, 1, 21)]] == [
            "last 1",
            "daily 2026-01-21",
            "weekly 2026-W04",
        ]
        numbers = {g[0]: g[6] for g in gens}
        assert why[kept[date(2026, 1, 8)]] == [f"needed by db@{numbers[kept[date(2026, 1, 11)]]}"]

        for day in sorted(SURVIVORS):
            job = client.call("Restore", "ssssb", "db", kept[day], "copy", target, False)
            props = run_job(client, job, timeout=120)
            assert props["State"] == "done", props["Error"]
            assert sha256_of(target) == sums[day], f"generation of {day} restored wrong bytes"

    # The CLI shows the policy in `plan` (schema-1 JSON) and the keys in `volume show`.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [*CLI, "--bus", daemon.address, "plan", "db", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["schema"] == 1
    assert doc["plan"]["retention"]["keep_weekly"] == 3
    assert len(doc["plan"]["retention"]["kept"]) == len(SURVIVORS)
    out = subprocess.run(
        [*CLI, "--bus", daemon.address, "volume", "show", "db", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    objectives = json.loads(out.stdout)["volume"]["objectives"]
    assert (objectives["keep_daily"], objectives["keep_weekly"]) == (2, 3)
    text = subprocess.run(
        [*CLI, "--bus", daemon.address, "plan", "db"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "COLUMNS": "200"},
    )
    assert text.returncode == 0, text.stderr
    assert "Retention: last 1, daily 2, weekly 3 (UTC): keeps 11 generation(s)" in text.stdout
    assert "weekly 2026-W02" in text.stdout
    shown = subprocess.run(
        [*CLI, "--bus", daemon.address, "volume", "show", "db"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "COLUMNS": "200"},
    )
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"^retention +last 1, daily 2, weekly 3 \(UTC\)$", shown.stdout, re.M)
