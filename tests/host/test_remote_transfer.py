"""A volume's copy on a backup target through blockguardctl, the real daemon on a private
bus and the network lab's sshd (issue 11): remote objectives, the remote plan, transfers
whose method is the one the plan showed, a transfer cut by a killed serve (a named error,
nothing recorded) that the next transfer resumes without re-sending what the target
stored, restores from the target bit-exact, and a "new host" (another state directory,
the exported key) that imports the target's listing and restores from it bit-exact."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from blockguard.storage.remote.packstore import PackStore
from tests.host.test_remote_targets import CLIENT, authorize, ctl, host_fingerprint, in_prot_env
from tests.support.bus import NotifyListener
from tests.support.daemon import Daemon, EngineHarness
from tests.support.devices import MiB, sha256_of, write_random
from tests.support.netlab import TARGET_ADDR, NetLab, netlab, require_netlab
from tests.timeouts import scaled

pytestmark = pytest.mark.root

SIZE = 32 * MiB
POOL_SIZE = 400 * MiB


@pytest.fixture(autouse=True)
def _can_run() -> None:
    require_netlab()


def ok(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    out = ctl(daemon, *args)
    assert out.returncode == 0, f"{args}: {out.stderr}\n{daemon.log()[-4000:]}"
    return out


def as_json(daemon: Daemon, *args: str) -> Any:
    return json.loads(ok(daemon, "--json", *args).stdout)


def remote_plan(daemon: Daemon) -> dict[str, Any]:
    return as_json(daemon, "plan", "db")["plan"]["remote"]  # type: ignore[no-any-return]


def transfer(daemon: Daemon) -> dict[str, Any]:
    job = as_json(daemon, "transfer", "db")["job"]
    assert job["state"] == "done", job
    return job["result"]  # type: ignore[no-any-return]


def restore_from(daemon: Daemon, generation: str, device: str) -> dict[str, Any]:
    args = ["restore", generation or "db", "--from", "offsite", "--target", device]
    job = as_json(daemon, *args)["job"]
    assert job["state"] == "done", job
    return job["result"]  # type: ignore[no-any-return]


def set_up(
    lab: NetLab, engine: EngineHarness, loopdev: Callable[..., str], **env: str
) -> tuple[Daemon, str]:
    """A daemon in the protected namespace with target ``offsite`` registered, pool p1
    and volume db protected; returns the daemon and the volume's device."""
    daemon = engine.start(**in_prot_env(lab), **env)
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


def link_row(daemon: Daemon) -> tuple[float, float, float]:
    """The link of ``offsite`` as ``target show`` has it: (down, up, measured at)."""
    shown = as_json(daemon, "target", "show", "offsite")["target"]
    return shown["link_down"], shown["link_up"], shown["link_measured_at"]


def target_samples(daemon: Daemon) -> list[tuple[str, int, float, float]]:
    """The restore samples the catalog keeps of target ``offsite``: (volume, bytes,
    predicted, measured)."""
    conn = sqlite3.connect(f"file:{daemon.state_dir / 'catalog.db'}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT volume, bytes, predicted_seconds, measured_seconds FROM path_samples"
            " WHERE pool_device = 'target:offsite' AND mode = 'copy' ORDER BY seq"
        ).fetchall()
    finally:
        conn.close()
    return [tuple(r) for r in rows]


def packs_of(lab: NetLab) -> dict[str, tuple[int, int]]:
    """Every pack file on the target: path -> (inode, mtime_ns)."""
    found = {}
    for path in (lab.run_dir / "area").rglob("*.pack"):
        st = path.stat()
        found[str(path)] = (st.st_ino, st.st_mtime_ns)
    return found


def test_remote_objectives_plan_transfer_and_restore(
    net_lab: NetLab,
    engine: EngineHarness,
    loopdev: Callable[..., str],
    tmp_path: Path,
    notify_socket: NotifyListener,
) -> None:
    daemon, volume = set_up(net_lab, engine, loopdev)
    ok(daemon, "backup", "db")
    sums = {1: sha256_of(volume)}

    # An unregistered target is refused by name, nothing set.
    bad = ctl(daemon, "objectives", "db", "--target", "nowhere")
    assert bad.returncode != 0 and "nowhere" in bad.stderr
    ok(daemon, "objectives", "db", "--target", "offsite", "--remote-rto", "1h",
       "--remote-generations", "2")  # fmt: skip
    plan = remote_plan(daemon)
    assert plan["target"] == "offsite" and plan["method"] == "full", plan
    assert plan["source"].startswith("db@")
    shown = ok(daemon, "plan", "db").stdout
    assert "to target offsite would be full" in shown

    registered = link_row(daemon)
    result = transfer(daemon)
    assert (result["method"], result["to_target"]) == (plan["method"], "offsite")
    assert result["generation"] == plan["source"]
    # Random data does not compress: the sealed packs are the bytes and a little more.
    assert SIZE <= result["bytes_sent"] < SIZE * 1.01, result
    assert (result["packs_sent"], result["packs_resumed"]) == (5, 0), result
    # The transfer measured the link's up direction: the row follows it, down kept.
    down, up, at = link_row(daemon)
    assert at > registered[2] and up != registered[1] and down == registered[0]
    assert remote_plan(daemon)["up_to_date"] is True

    # Two local incrementals, then one transfer: an incremental there (the union).
    for n in (2, 3):
        write_random(volume, n * MiB, 2 * MiB, seed=n)
        ok(daemon, "backup", "db")
        sums[n] = sha256_of(volume)
    plan = remote_plan(daemon)
    assert plan["method"] == "incremental", plan
    # Written: 2..4 MiB, then 3..5 MiB; their union is 3 MiB.
    assert plan["estimated_bytes"] == 3 * MiB
    result = transfer(daemon)
    assert result["method"] == plan["method"] == "incremental"
    assert result["bytes"] == 3 * MiB
    assert result["generation"] == plan["source"]

    # Restore from the target: the incremental's chain, bit-exact; the estimate with it.
    device = loopdev(SIZE, "restore3.img")
    restored = restore_from(daemon, "db@latest", device)
    assert sha256_of(device) == sums[3]
    assert restored["from_target"] == "offsite" and len(restored["chain"]) == 2
    assert restored["predicted_seconds"] > 0 and restored["seconds"] > 0
    # Kept as a sample of the target for the restore model, with what it predicted.
    [(volume_name, nbytes, predicted, measured)] = target_samples(daemon)
    assert (volume_name, predicted, measured) == (
        "db", restored["predicted_seconds"], restored["seconds"]
    )  # fmt: skip
    assert nbytes >= SIZE
    print(
        f"restore from the target: estimated {restored['predicted_seconds']:.2f}s, "
        f"took {restored['seconds']:.2f}s"
    )
    shown = ok(daemon, "restore", "db", "--from", "offsite", "--target", device, "--force")
    assert "from target offsite" in shown.stdout and "estimated" in shown.stdout

    # A remote RTO the link cannot meet with a chain: the plan says full, and so it is.
    write_random(volume, 9 * MiB, MiB, seed=4)
    ok(daemon, "backup", "db")
    sums[4] = sha256_of(volume)
    ok(daemon, "objectives", "db", "--remote-rto", "1s", "--remote-generations", "1")
    plan = remote_plan(daemon)
    assert plan["method"] == "full" and plan["feasible"] is False, plan
    result = transfer(daemon)
    assert result["method"] == "full"
    # remote_generations 1: the older full and its incremental went.
    assert len(result["freed"]) == 2, result
    device = loopdev(SIZE, "restore4.img")
    restore_from(daemon, "", device)
    assert sha256_of(device) == sums[4]

    # A new host: another state directory, only the exported key and the address.
    key = tmp_path / "key.txt"
    ok(daemon, "key", "export", "--output", str(key))
    daemon.stop()
    new_host = EngineHarness(engine.bus, tmp_path / "newhost", notify_socket)
    (tmp_path / "newhost").mkdir()
    try:
        second = new_host.start(**in_prot_env(net_lab))
        authorize(net_lab, second, net_lab.run_dir / "area")
        url = f"ssh://root@{TARGET_ADDR}:{net_lab.port}"
        ok(second, "target", "add", "offsite", url, "--pool", "main", "--client", CLIENT,
           "--host-key", host_fingerprint(net_lab), "--key", str(key))  # fmt: skip
        listed = as_json(second, "target", "import", "offsite")["import"]
        assert [g["volume"] for g in listed["generations"]] == ["db"]
        assert listed["generations"][0]["kind"] == "full"
        shown = ok(second, "target", "import", "offsite").stdout
        assert "db@" in shown
        device = loopdev(SIZE, "newhost.img")
        restored = restore_from(second, listed["generations"][0]["generation"], device)
        assert sha256_of(device) == sums[4]
        assert restored["predicted_seconds"] > 0
    finally:
        new_host.cleanup()


def done_jobs(daemon: Daemon) -> list[str]:
    """The kinds of the jobs done, oldest first, but the target's registration."""
    jobs = sorted(as_json(daemon, "jobs")["jobs"], key=lambda j: j["id"])
    return [j["kind"] for j in jobs if j["state"] == "done" and j["kind"] != "target"]


def kill_serve(lab: NetLab) -> int:
    """Kill the serve command on the target (by its PID, found among the processes of
    the target namespace) and return its PID."""
    pids = subprocess.run(
        ["ip", "netns", "pids", lab.names.target], capture_output=True, text=True, check=True
    ).stdout.split()
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"blockguard.engine.servecmd" in cmdline and b"python" in cmdline.split(b"\0")[0]:
            os.kill(int(pid), signal.SIGKILL)
            return int(pid)
    raise AssertionError(f"no serve running in {lab.names.target}")


def test_a_cut_transfer_records_nothing_and_the_next_one_resumes(
    engine: EngineHarness, loopdev: Callable[..., str]
) -> None:
    # 4 MiB/s: the 32 MiB full (four 8 MiB packs) takes seconds, time to cut it.
    with netlab(rate=4 * MiB) as lab:
        daemon, _volume = set_up(lab, engine, loopdev)
        ok(daemon, "backup", "db")
        ok(daemon, "objectives", "db", "--target", "offsite")
        job = as_json(daemon, "transfer", "db", "--no-wait")["job"]
        deadline = time.monotonic() + scaled(120)
        while not packs_of(lab):
            assert time.monotonic() < deadline, "no pack reached the target"
            time.sleep(0.05)
        kill_serve(lab)
        waited = ctl(daemon, "--json", "jobs", "wait", str(job["id"]))
        assert waited.returncode != 0, waited.stdout
        failed = json.loads(waited.stdout)["job"]
        assert failed["state"] == "failed"
        assert failed["error"]["name"] == "org.blockguard1.Error.WireClosed", failed["error"]
        assert remote_plan(daemon)["method"] == "full"  # nothing recorded
        stored = packs_of(lab)
        # Four data packs of 8 MiB and one of checksums make the generation.
        assert 0 < len(stored) < 5, stored

        before = link_row(daemon)
        result = transfer(daemon)
        assert result["method"] == "full"
        # A resumed transfer sealed packs it did not send: its time is not the link's,
        # so the link row keeps what it had.
        assert link_row(daemon) == before
        after = packs_of(lab)
        assert len(after) == 5
        # The packs stored before the cut were taken as they were, the rest sent.
        assert result["packs_resumed"] == len(stored), (result, stored)
        assert result["packs_sent"] == 5 - len(stored), result
        # What the target stored before the cut was not sent again.
        assert {p: after[p] for p in stored} == stored
        assert remote_plan(daemon)["up_to_date"] is True


def test_a_tampered_pack_fails_the_restore_and_marks_the_generation_on_the_target(
    net_lab: NetLab, engine: EngineHarness, loopdev: Callable[..., str]
) -> None:
    daemon, _volume = set_up(net_lab, engine, loopdev)
    ok(daemon, "backup", "db")
    ok(daemon, "objectives", "db", "--target", "offsite")
    transfer(daemon)
    pack = sorted(packs_of(net_lab))[1]
    with open(pack, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0x01]))
    device = loopdev(SIZE, "restore.img")
    out = ctl(daemon, "--json", "restore", "db", "--from", "offsite", "--target", device)
    assert out.returncode != 0
    failed = json.loads(out.stdout)["job"]
    assert failed["error"]["name"] in (
        "org.blockguard1.Error.TamperedPack",
        "org.blockguard1.Error.DataError",
    ), failed["error"]
    # Marked damaged on the target: every host listing it sees that.
    assert list(Path(pack).parent.parent.glob("damaged.json")), "not marked damaged"


def test_the_remote_rpo_starts_transfers_by_itself(
    net_lab: NetLab, engine: EngineHarness, loopdev: Callable[..., str]
) -> None:
    daemon, _volume = set_up(net_lab, engine, loopdev, BLOCKGUARD_SCHEDULER_INTERVAL="0.2")
    ok(daemon, "objectives", "db", "--target", "offsite", "--remote-rpo", "changed 1MiB")
    deadline = time.monotonic() + scaled(120)
    # The scheduler backs the volume up (its first full is due) and then sends it.
    while "transfer" not in (done := done_jobs(daemon)):
        assert time.monotonic() < deadline, daemon.log()[-4000:]
        time.sleep(0.2)
    assert done == ["backup", "transfer"], done
    assert remote_plan(daemon)["reasons"] == ["the newest generation is there"]


def stop_sshd(lab: NetLab) -> None:
    """Stop the target's sshd (by its PID; the lab reaps it at the end): the target host
    is down, ssh's connection is refused."""
    os.kill(lab.sshd_pid, signal.SIGTERM)
    stat = Path(f"/proc/{lab.sshd_pid}/stat")
    deadline = time.monotonic() + scaled(30)
    while stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z":
        assert time.monotonic() < deadline, "sshd did not stop"
        time.sleep(0.05)


def transfer_jobs(daemon: Daemon) -> list[dict[str, Any]]:
    jobs = sorted(as_json(daemon, "jobs")["jobs"], key=lambda j: j["id"])
    return [j for j in jobs if j["kind"] == "transfer"]


def test_a_down_target_is_retried_after_a_growing_wait_not_at_every_look(
    net_lab: NetLab, engine: EngineHarness, loopdev: Callable[..., str]
) -> None:
    daemon, _volume = set_up(net_lab, engine, loopdev, BLOCKGUARD_SCHEDULER_INTERVAL="0.2")
    deadline = time.monotonic() + scaled(120)
    while "backup" not in done_jobs(daemon):  # the scheduler makes the first full
        assert time.monotonic() < deadline, daemon.log()[-4000:]
        time.sleep(0.2)
    stop_sshd(net_lab)
    ok(daemon, "objectives", "db", "--target", "offsite", "--remote-rpo", "changed 1MiB")
    while not [j for j in transfer_jobs(daemon) if j["state"] == "failed"]:
        assert time.monotonic() < deadline, daemon.log()[-4000:]
        time.sleep(0.2)
    shown = as_json(daemon, "target", "show", "offsite")["target"]
    assert shown["state"] == "unreachable" and shown["failures"] == 1, shown
    assert "cannot reach target offsite" in shown["retry_reason"]
    retry_at = shown["retry_at"]
    # Many scheduler looks later (every 0.2 s), still the one attempt: the transfer is
    # held back until retry_at (a minute after the failure), not tried at each look.
    time.sleep(scaled(3))
    assert time.time() < retry_at
    [failed] = transfer_jobs(daemon)
    assert "cannot reach target offsite" in failed["error"]["message"], failed
    assert "next try at" in ok(daemon, "target", "show", "offsite").stdout
    # By hand it is tried at once (and fails again: the wait grows).
    by_hand = ctl(daemon, "transfer", "db")
    assert by_hand.returncode != 0 and "cannot reach target offsite" in by_hand.stderr
    assert len(transfer_jobs(daemon)) == 2
    again = as_json(daemon, "target", "show", "offsite")["target"]
    assert again["failures"] == 2 and again["retry_at"] - again["last_failure"] == 120
