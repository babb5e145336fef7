"""The remote terms learn from use (issue 11): a transfer's rate is blended into the
up figures of its link's row; restores from a target, kept as samples of ``target:ID``,
replace the link-only estimate by the terms fitted to them."""

from __future__ import annotations

from pathlib import Path

from blockguard.core.catalog import Catalog, PerfEntry, RemoteGenerationRow, link_perf_key
from blockguard.core.vocab import RestoreTarget
from blockguard.engine.calibration import record_restore_sample
from blockguard.engine.events import EventHub
from blockguard.engine.pools import PoolRegistry
from blockguard.engine.remoteplan import link_speed, target_device
from blockguard.engine.remoterestores import RemoteRestoreRequest, remote_estimate
from blockguard.engine.settings import Settings
from blockguard.engine.transfers import MIN_OBSERVED_BYTES, observe_link
from blockguard.storage.restore import RestoreResult
from blockguard.storage.runner import Runner

MiB = 1 << 20
DOWN, UP = 20e6, 10e6
#: The copy target's write speed (the volume is not protected here: the default).
COPY = 100e6


def _catalog(tmp_path: Path) -> Catalog:
    c = Catalog(tmp_path / "catalog.db", clock=lambda: 42.0)
    link = PerfEntry(
        link_perf_key("offsite"), "pool", 5.0, "probe",
        seq_read=DOWN, seq_write=UP, rand_read=DOWN, rand_write=UP, chunk_size=65536,
    )  # fmt: skip
    c.add_target(
        "offsite",
        url="ssh://bg@192.0.2.2:2222",
        client_id="host1",
        pool="main",
        host_key="SHA256:" + "b" * 43,
        link=link,
        round_trip=0.004,
        space=(100, 200, 3),
    )
    return c


def test_a_transfer_blends_its_rate_into_the_links_up_figures(tmp_path: Path) -> None:
    with _catalog(tmp_path) as c:
        rate = 32 * MiB
        entry = observe_link(c, "offsite", 64 * MiB, 2.0, default=1e6)
        assert entry is not None and entry.source == "live"
        assert entry.seq_write is not None and UP < entry.seq_write < rate
        assert entry.rand_write == entry.seq_write
        # The down direction is not what a transfer measures: kept as registered.
        assert (entry.seq_read, entry.rand_read) == (DOWN, DOWN)
        for _ in range(30):
            observe_link(c, "offsite", 64 * MiB, 2.0, default=1e6)
        speed, measured = link_speed(c, "offsite", 1e6)
        assert measured
        assert abs(speed.seq_write - rate) / rate < 0.01
        assert speed.seq_read == DOWN


def test_a_transfer_too_small_to_measure_leaves_the_link_row(tmp_path: Path) -> None:
    with _catalog(tmp_path) as c:
        before = c.get_perf(link_perf_key("offsite"), "pool")
        assert observe_link(c, "offsite", MIN_OBSERVED_BYTES - 1, 0.001, default=1e6) is None
        assert observe_link(c, "offsite", 64 * MiB, 0.0, default=1e6) is None
        assert c.get_perf(link_perf_key("offsite"), "pool") == before


def _row(generation: str, kind: str, nbytes: int, parent: str | None) -> RemoteGenerationRow:
    return RemoteGenerationRow(
        "offsite", "db", generation, kind, None, parent, 1.0, 64 * MiB, nbytes, 4, 1.0, 1.0
    )


def _restored(generations: int, nbytes: int, seconds: float) -> RestoreResult:
    chain = tuple(f"g{n}" for n in range(generations))
    return RestoreResult(
        "db", chain[-1], None, "/dev/x", chain, nbytes, nbytes, seconds,
        chunks=nbytes // 65536, extents=4 * (generations - 1),
    )  # fmt: skip


def test_restores_from_a_target_calibrate_its_estimate(tmp_path: Path) -> None:
    """The link row says 20 MB/s down; the restores recorded of ``target:offsite`` ran at
    80 MB/s past a fixed 0.1 s, their writes included: once there are enough of them,
    the estimate is theirs, with no copy writes added on top (they overlap the link)."""
    with _catalog(tmp_path) as c:
        pools = PoolRegistry(c, Settings(tmp_path, tmp_path / "mnt"), EventHub(), Runner())
        request = RemoteRestoreRequest(
            "db",
            "offsite",
            "/dev/x",
            (_row("g0", "full", 64 * MiB, None), _row("g1", "incremental", 8 * MiB, "g0")),
        )
        before = remote_estimate(c, pools, request, COPY)
        assert not before.calibrated
        # Link-only: 72 MiB at 20 MB/s down.
        assert before.seconds >= 72 * MiB / DOWN

        def path(generations: int, nbytes: int) -> float:
            return 0.1 + 0.02 * generations + nbytes / 80e6

        shapes = [(1, 16), (1, 64), (2, 40), (3, 72), (2, 24), (1, 32), (4, 96), (2, 80)]
        for generations, mib in shapes:
            nbytes = mib * MiB
            # As run_remote_restore records it: no copy target, the whole time.
            record_restore_sample(
                c,
                "db",
                target_device("offsite"),
                RestoreTarget.NEW_DEVICE,
                _restored(generations, nbytes, path(generations, nbytes)),
                None,
            )
        assert len(c.path_samples(target_device("offsite"), "copy")) == len(shapes)
        after = remote_estimate(c, pools, request, COPY)
        assert after.calibrated
        expected = path(2, 72 * MiB)
        assert abs(after.seconds - expected) / expected < 0.15, (after.seconds, expected)
        assert after.seconds < before.seconds
