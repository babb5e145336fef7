"""A full synthesized on the target through blockguardctl, the real daemon and the
network lab's sshd (issue 11): when the remote plan says full and the target holds a
previous full of the volume, only the packs a change touched cross the link (the job's
bytes sent are a small part of the volume: unchanged data does not cross the link again),
the others are linked there from the previous full; remote retention then removes every
older generation and the synthesized full still restores bit-exact, also the next one,
synthesized from a synthesized full. A synthesized full leaves the link's performance row
as the plain first transfer measured it (only a transfer that sent every pack it made
refines the link)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from blockguard.storage.remote.packstore import PackStore
from tests.host.test_remote_targets import CLIENT, authorize, host_fingerprint, in_prot_env
from tests.host.test_remote_transfer import as_json, link_row, ok, restore_from, transfer
from tests.support.daemon import Daemon, EngineHarness
from tests.support.devices import MiB, sha256_of, write_random
from tests.support.netlab import TARGET_ADDR, NetLab, require_netlab

pytestmark = pytest.mark.root

#: Sixteen 8 MiB packs: a change inside one pack is a sixteenth of the volume.
SIZE = 128 * MiB
POOL_SIZE = 400 * MiB


@pytest.fixture(autouse=True)
def _can_run() -> None:
    require_netlab()


def set_up(lab: NetLab, engine: EngineHarness, loopdev: Callable[..., str]) -> tuple[Daemon, str]:
    daemon = engine.start(**in_prot_env(lab))
    area = lab.run_dir / "area"
    PackStore.create(area, CLIENT).close()
    authorize(lab, daemon, area)
    url = f"ssh://root@{TARGET_ADDR}:{lab.port}"
    ok(daemon, "target", "add", "offsite", url, "--pool", "main", "--client", CLIENT,
       "--host-key", host_fingerprint(lab))  # fmt: skip
    ok(daemon, "pool", "create", "p1", loopdev(POOL_SIZE, "pool.img"))
    volume = loopdev(SIZE, "db.img")
    write_random(volume, 0, SIZE, seed=1)
    ok(daemon, "protect", volume, "db", "--rpo", "1h")
    return daemon, volume


def generations_on_target(lab: NetLab) -> dict[str, dict[str, int]]:
    """Committed generation dir -> its pack files' inodes by name."""
    gens = lab.run_dir / "area" / "clients" / CLIENT / "generations"
    return {
        g.name: {p.name: p.stat().st_ino for p in (g / "packs").iterdir()}
        for g in gens.iterdir()
        if (g / "index.json").exists()
    }


def test_a_full_is_synthesized_on_the_target_from_the_changed_packs(
    net_lab: NetLab, engine: EngineHarness, loopdev: Callable[..., str]
) -> None:
    daemon, volume = set_up(net_lab, engine, loopdev)
    ok(daemon, "backup", "db")
    # An RTO no chain meets over the link: every transfer is a full; one is kept there.
    ok(daemon, "objectives", "db", "--target", "offsite", "--remote-rto", "1s",
       "--remote-generations", "1")  # fmt: skip
    first = transfer(daemon)
    assert first["method"] == "full" and first["bytes"] == SIZE
    [before] = generations_on_target(net_lab).values()

    for n, offset in enumerate((40 * MiB + 4096, 97 * MiB), start=2):
        write_random(volume, offset, 64 * 1024, seed=n)
        ok(daemon, "backup", "db")
        want = sha256_of(volume)
        plan = as_json(daemon, "plan", "db")["plan"]["remote"]
        assert plan["method"] == "full", plan
        link = link_row(daemon)
        result = transfer(daemon)
        assert result["method"] == "full"
        # Its time includes reading the previous full's checksums on the target: not the
        # link's, so the link row keeps what the plain first transfer measured.
        assert link_row(daemon) == link
        # One 8 MiB pack of the sixteen crossed the link (with the checksum pack):
        # unchanged data did not.
        assert result["packs_sent"] == 2, result
        assert result["bytes_sent"] < SIZE // 10, result
        assert result["bytes"] < SIZE // 10, result
        assert len(result["freed"]) == 1, result  # the previous full went
        [after] = generations_on_target(net_lab).values()
        assert len(after) == len(before)
        # Fifteen data packs are the previous full's files, linked (the checksum pack
        # and the changed data pack are new).
        assert len(set(after.values()) & set(before.values())) == len(before) - 2
        device = loopdev(SIZE, f"restore{n}.img")
        restore_from(daemon, "", device)
        assert sha256_of(device) == want
        before = after
