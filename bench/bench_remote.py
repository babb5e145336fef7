#!/usr/bin/env python3
"""Transfers to a backup target and restores from it over a shaped link (issue 11).

    .venv/bin/python bench/bench_remote.py [--rate-mib 20] [--size-mib 256] [--writes 400]

Run as root on the host, after scripts/bootstrap (sshd). The lab of
``tests/support/netlab.py`` (two namespaces, a veth shaped by ``tbf`` both ways, sshd in
the target namespace with the serve command as the forced command), blockguardd in the
protected namespace on a private bus, a dir pool and the volume on loop devices, all
through ``blockguardctl`` as ``tests/host/test_remote_transfer.py`` does. The link is
shown as set (tbf) and as the registration's linkprobe measured it in the same run.
Then:

(a) a full transfer of the volume (random data: nothing compresses): bytes over the
    job's send time (``send_seconds``: the copy, without the ssh handshake; the job's
    whole ``seconds`` is printed too), as a ratio to the tbf rate;
(b) ``--writes`` random 64 KiB writes (chunk-aligned, so the changed bytes are the
    distinct chunks written), a local backup, the transfer: plaintext bytes sent /
    changed bytes (before compression; the sealed bytes are shown apart);
(c) a transfer of half the volume rewritten, cut by killing the serve process on the
    target once a pack of it is stored; then the next transfer. The bytes that crossed
    the link (the target veth's received bytes, less the protocol's overhead measured
    on the full of (a)) over both runs, less the generation's sealed size, in packs:
    what was sent twice; with the packs the resume took as stored;
(d) restores from the target of every generation sent (chains of 1 to N generations),
    twice over: the estimate shown before (``predicted_seconds``) against the measured
    ``seconds``, a table and the median |error| / measured, overall and of the restores
    the model had already learnt from (four samples of the target or more).

Prints the acceptance rows with their target and met/missed; asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blockguard.core.units import MiB, format_rate, format_size
from blockguard.engine.settings import Settings
from blockguard.storage.remote.packstore import PackStore
from tests.host.test_remote_targets import CLIENT, authorize, ctl, host_fingerprint, in_prot_env
from tests.host.test_remote_transfer import as_json, kill_serve, ok, packs_of
from tests.support.bus import PERMISSIVE, NotifyListener, start_bus
from tests.support.daemon import Daemon, EngineHarness
from tests.support.devices import LoopFactory, write_random
from tests.support.netlab import TARGET_ADDR, NetLab, netlab
from tests.timeouts import scaled

CHUNK = 64 * 1024
#: Packs hold 8 MiB of plaintext (storage/remote/remotegen.py).
PACK = 8 * MiB
#: The restore model fits its terms from this many samples (core/restore_terms.py).
MIN_SAMPLES = 4


@contextlib.contextmanager
def lab_daemon(rate: int, directory: Path) -> Iterator[tuple[NetLab, Daemon, LoopFactory]]:
    """The lab, a daemon in its protected namespace with target ``offsite``."""
    loops = LoopFactory(directory)
    try:
        with netlab(rate=rate) as lab, start_bus(directory, PERMISSIVE) as bus:
            notify = NotifyListener(str(directory / "notify"), str(directory / "notify"))
            harness = EngineHarness(bus, directory, notify)
            try:
                # The product's default copy-target speed, not the test harness's 8 MiB/s.
                default = str(int(Settings.default_speed))
                daemon = harness.start(**in_prot_env(lab), BLOCKGUARD_DEFAULT_SPEED=default)
                area = lab.run_dir / "area"
                PackStore.create(area, CLIENT).close()
                authorize(lab, daemon, area)
                url = f"ssh://root@{TARGET_ADDR}:{lab.port}"
                ok(daemon, "target", "add", "offsite", url, "--pool", "main",
                   "--client", CLIENT, "--host-key", host_fingerprint(lab))  # fmt: skip
                yield lab, daemon, loops
            finally:
                harness.cleanup()
                notify.close()
    finally:
        loops.cleanup()


def fill(volume: str, offset: int, nbytes: int, seed: int) -> None:
    """Random data in 64 MiB pieces (``write_random`` makes its bytes in one piece)."""
    step = 64 * MiB
    for n, at in enumerate(range(offset, offset + nbytes, step)):
        write_random(volume, at, min(step, offset + nbytes - at), seed=seed * 1000 + n)


#: The generations the transfers sent, oldest first (what (d) restores).
SENT: list[str] = []


def transfer(daemon: Daemon) -> dict[str, Any]:
    job = as_json(daemon, "transfer", "db")["job"]
    if job["state"] != "done":
        raise SystemExit(f"transfer failed: {job}")
    SENT.append(job["result"]["generation"])
    return job["result"]  # type: ignore[no-any-return]


def backup(daemon: Daemon) -> None:
    ok(daemon, "backup", "db")


def rx_bytes(lab: NetLab) -> int:
    """Bytes the target's end of the veth received (what crossed the link up)."""
    out = subprocess.run(
        ["ip", "-n", lab.names.target, "-s", "-j", "link", "show", lab.names.veth_target],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return int(json.loads(out.stdout)[0]["stats64"]["rx"]["bytes"])


def full_transfer(lab: NetLab, daemon: Daemon, rate: int) -> tuple[float, float]:
    """(a): returns (send rate / tbf rate, wire bytes per sealed byte)."""
    before = rx_bytes(lab)
    result = transfer(daemon)
    wire = rx_bytes(lab) - before
    send = result["bytes_sent"] / result["send_seconds"]
    whole = result["bytes_sent"] / result["seconds"]
    print(
        f"(a) full: {format_size(result['bytes'])} plaintext, {format_size(result['bytes_sent'])}"
        f" sealed in {result['packs_sent']} packs; send {result['send_seconds']:.2f} s"
        f" = {format_rate(send)}, job {result['seconds']:.2f} s = {format_rate(whole)}"
    )
    print(f"    sealed / tbf {send / rate:.3f} (job's seconds: {whole / rate:.3f})")
    return send / rate, wire / result["bytes_sent"]


def incremental(daemon: Daemon, volume: str, size: int, writes: int) -> float:
    """(b): returns plaintext bytes sent / changed bytes."""
    rng = random.Random(11)
    offsets = sorted({rng.randrange(size // CHUNK) * CHUNK for _ in range(writes)})
    for n, offset in enumerate(offsets):
        write_random(volume, offset, CHUNK, seed=1000 + n)
    changed = len(offsets) * CHUNK
    backup(daemon)
    result = transfer(daemon)
    ratio = result["bytes"] / changed
    print(
        f"(b) {result['method']} after {len(offsets)} random 64 KiB writes: changed"
        f" {format_size(changed)}, sent {format_size(result['bytes'])} plaintext"
        f" ({format_size(result['bytes_sent'])} sealed): sent/changed {ratio:.3f}"
        f" (sealed/changed {result['bytes_sent'] / changed:.3f})"
    )
    return ratio


def cut_and_resume(lab: NetLab, daemon: Daemon, volume: str, size: int, overhead: float) -> float:
    """(c): returns the packs' worth of bytes sent twice."""
    fill(volume, 0, size // 2, seed=77)
    backup(daemon)
    before_packs = set(packs_of(lab))
    before = rx_bytes(lab)
    job = as_json(daemon, "transfer", "db", "--no-wait")["job"]
    deadline = time.monotonic() + scaled(120)
    while not set(packs_of(lab)) - before_packs:
        if time.monotonic() > deadline:
            raise SystemExit("no pack of the transfer reached the target")
        time.sleep(0.02)
    kill_serve(lab)
    waited = ctl(daemon, "--json", "jobs", "wait", str(job["id"]))
    failed = json.loads(waited.stdout)["job"]
    if failed["state"] != "failed":
        raise SystemExit(f"the transfer was not cut: {failed['state']}")
    stored = {p: v for p, v in packs_of(lab).items() if p not in before_packs}
    result = transfer(daemon)
    wire = (rx_bytes(lab) - before) / overhead
    after = {p: v for p, v in packs_of(lab).items() if p not in before_packs}
    sealed = sum(Path(p).stat().st_size for p in after)
    replaced = sum(1 for p, v in stored.items() if after.get(p) != v)
    twice = (wire - sealed) / (sealed / len(after))
    print(
        f"(c) {result['method']} of {format_size(size // 2)} cut after {len(stored)} of"
        f" {len(after)} packs stored ({failed['error']['name'].rsplit('.', 1)[-1]}); the next"
        f" transfer took {result['packs_resumed']} as stored, sent {result['packs_sent']}"
        f" ({replaced} stored ones replaced)"
    )
    print(
        f"    crossed the link {format_size(int(wire))} (overhead {overhead:.3f} taken out)"
        f" for {format_size(sealed)} sealed: {twice:.2f} packs sent twice"
    )
    return twice


def restores(
    daemon: Daemon, loops: LoopFactory, generations: list[str], size: int, rounds: int
) -> tuple[float, float | None]:
    """(d): returns the median |error| / measured, overall and once calibrated."""
    rows = []
    device = loops(size, "restore.img")
    print("(d) restore from the target  chain  estimated  measured  error   model")
    for n in range(rounds):
        for generation in generations:
            job = as_json(
                daemon, "restore", generation, "--from", "offsite", "--target", device, "--force"
            )["job"]
            if job["state"] != "done":
                raise SystemExit(f"restore failed: {job}")
            r = job["result"]
            chain = len(r["chain"])
            error = (r["predicted_seconds"] - r["seconds"]) / r["seconds"]
            model = "fitted" if r.get("calibrated") else "link"
            rows.append((error, r.get("calibrated", False)))
            print(
                f"    {generation:<26} {chain:>5}  {r['predicted_seconds']:8.2f} s"
                f" {r['seconds']:7.2f} s  {error:+6.1%}  {model}"
                f"{'' if generation != generations[0] else '  (round ' + str(n + 1) + ')'}"
            )
    overall = statistics.median(abs(e) for e, _ in rows)
    fitted = [abs(e) for e, c in rows if c]
    learnt = statistics.median(fitted) if fitted else None
    print(f"    median |error|/measured: {overall:.1%} of {len(rows)} restores", end="")
    print(f", {learnt:.1%} of the {len(fitted)} fitted" if learnt is not None else "")
    return overall, learnt


def show_samples(daemon: Daemon) -> None:
    """The restore samples the catalog keeps of the target (what the fit sees)."""
    conn = sqlite3.connect(f"file:{daemon.state_dir / 'catalog.db'}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT generations, extents, bytes, measured_seconds, write_rate FROM path_samples"
            " WHERE pool_device = 'target:offsite' AND mode = 'copy' ORDER BY seq"
        ).fetchall()
    finally:
        conn.close()
    print("    samples of target:offsite: generations extents bytes measured write-rate")
    for generations, extents, nbytes, measured, write_rate in rows:
        print(
            f"      {generations:>3} {extents:>6} {format_size(nbytes):>10} {measured:7.2f} s"
            f" {format_rate(write_rate) if write_rate else '-'}"
        )


def row(name: str, value: str, target: str, met: bool) -> None:
    print(f"  {name:<44} {value:>10}  target {target:<8} {'met' if met else 'MISSED'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate-mib", type=float, default=20.0, help="tbf rate, MiB/s")
    parser.add_argument("--size-mib", type=int, default=256, help="volume size")
    parser.add_argument("--writes", type=int, default=400, help="random 64 KiB writes of (b)")
    parser.add_argument("--rounds", type=int, default=2, help="restores of each generation")
    args = parser.parse_args()
    rate = int(args.rate_mib * MiB)
    size = args.size_mib * MiB
    directory = Path(tempfile.mkdtemp(prefix="bg-bench-remote-"))
    directory.chmod(0o755)
    try:
        with lab_daemon(rate, directory) as (lab, daemon, loops):
            shown = as_json(daemon, "target", "show", "offsite")["target"]
            print(
                f"link: tbf {format_rate(rate)} both ways; linkprobe at registration: down"
                f" {format_rate(shown['link_down'])}, up {format_rate(shown['link_up'])},"
                f" round trip {shown['link_round_trip'] * 1000:.1f} ms"
            )
            ok(daemon, "pool", "create", "p1", loops(max(1024 * MiB, 6 * size), "pool.img"))
            volume = loops(size, "db.img")
            fill(volume, 0, size, seed=1)
            ok(daemon, "protect", volume, "db", "--rpo", "1h")
            backup(daemon)
            ok(daemon, "objectives", "db", "--target", "offsite", "--remote-rto", "1h",
               "--remote-generations", "50")  # fmt: skip
            throughput, overhead = full_transfer(lab, daemon, rate)
            sent_ratio = incremental(daemon, volume, size, args.writes)
            twice = cut_and_resume(lab, daemon, volume, size, overhead)
            for n in range(2):
                write_random(volume, (n + 1) * size // 4, 4 * MiB, seed=90 + n)
                backup(daemon)
                transfer(daemon)
            shown = as_json(daemon, "target", "show", "offsite")["target"]
            print(
                f"link row after the transfers: up {format_rate(shown['link_up'])}"
                f" (down {format_rate(shown['link_down'])})"
            )
            copy = as_json(daemon, "plan", "db")["plan"].get("copy_target") or {}
            print(f"copy target the estimates assume: {copy.get('source', '?')}")
            overall, learnt = restores(daemon, loops, SENT, size, args.rounds)
            show_samples(daemon)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print("acceptance (issue 11):")
    row("transfer throughput / shaped link rate", f"{throughput:.3f}", ">= 0.9", throughput >= 0.9)
    ok_sent = sent_ratio <= 1.05
    row("incremental: bytes sent / changed bytes", f"{sent_ratio:.3f}", "<= 1.05", ok_sent)
    row("resumed transfer: packs sent twice", f"{twice:.2f}", "<= 1", twice <= 1.0)
    print(f"  {'remote restore: median |error| / measured':<44} {overall:>9.1%}  (printed)")
    if learnt is not None:
        print(f"  {'  of the restores with fitted terms':<44} {learnt:>9.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
