#!/usr/bin/env python3
"""The blockguard demo, end to end, where device-mapper exists (``scripts/demo`` gets here,
booting the guest kernel first when the host has no device-mapper).

It makes an original volume (an LVM logical volume with an ext4 file system and files
written into it) and two pool disks of different speeds (one slowed down by dm-delay),
starts a private system bus and blockguardd, registers the pool, protects the volume with an
RTO and an RPO, and runs rounds of file writes and backups. The daemon chooses every
method itself; the RTO is set so that its choices move from incremental to differential
to full as the changes pile up. Then it restores the newest and an older generation to
new devices and proves them bit-exact, prints a summary, and cleans up everything it made.

Only blockguardctl is used to talk to the daemon (D-Bus underneath).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".venv" / "bin"
MiB = 1 << 20
VG = "bgdemo"
VOLUME = "data"
POOL = "demo"

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="root"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_type="method_return"/>
    <allow send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="signal"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
  </policy>
</busconfig>
"""


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def sh(*argv: str, check: bool = True) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout


class Demo:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.undo: list[tuple[str, object]] = []
        self.env = {**os.environ}
        self.rows: list[dict] = []
        self.content: dict[str, str] = {}  # generation -> sha256 of the volume at its backup

    # --- helpers ----------------------------------------------------------------------

    def ctl(self, *args: str) -> dict:
        """``blockguardctl --json ARGS``: its document (docs/cli-json.md, schema 1)."""
        out = subprocess.run(
            [str(VENV / "blockguardctl"), "--json", *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=600,
        )
        if out.returncode != 0:
            raise RuntimeError(f"blockguardctl {' '.join(args)}: {out.stderr.strip()}")
        return json.loads(out.stdout) if out.stdout.strip() else {}

    def jobs(self) -> list[dict]:
        """Every job the daemon knows (``blockguardctl --json jobs``, schema 1)."""
        return self.ctl("jobs")["jobs"]  # type: ignore[index]

    def loop(self, name: str, size: int) -> str:
        path = self.work / f"{name}.img"
        with open(path, "wb") as f:
            f.truncate(size)
        dev = sh("losetup", "--find", "--show", str(path)).strip()
        self.undo.append(("loop", dev))
        return dev

    def sha256(self, dev: str) -> str:
        return hashlib.sha256(b"".join(self.chunk_hashes(dev))).hexdigest()

    def chunk_hashes(self, dev: str) -> list[bytes]:
        """sha256 of every 64 KiB (read with O_DIRECT: what the device holds, not a cache)."""
        import mmap

        out = []
        buf = mmap.mmap(-1, 4 * MiB)
        fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
        try:
            while n := os.readv(fd, [buf]):
                view = memoryview(buf)[:n]
                out += [hashlib.sha256(view[i : i + 65536]).digest() for i in range(0, n, 65536)]
                view.release()
        finally:
            os.close(fd)
            buf.close()
        return out

    # --- the steps --------------------------------------------------------------------

    def make_devices(self) -> None:
        say("devices: an LVM volume with ext4 and two pool disks (one slowed by dm-delay)")
        pv = self.loop("volume", 160 * MiB)
        sh("lvm", "pvcreate", "-qq", pv)
        sh("lvm", "vgcreate", "-qq", VG, pv)
        self.undo.append(("vg", (VG, pv)))
        sh("lvm", "lvcreate", "-qq", "-L", "128M", "-n", VOLUME, VG)
        self.volume = f"/dev/{VG}/{VOLUME}"
        sh("mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", self.volume)
        self.mnt = self.work / "mnt"
        self.mnt.mkdir()
        sh("mount", self.volume, str(self.mnt))
        self.undo.append(("mount", str(self.mnt)))
        disks = os.environ.get("BLOCKGUARD_VM_DISKS", "").split()
        if len(disks) >= 2:
            fast, slow_base = disks[0], disks[1]
            for d in (fast, slow_base):
                sh("wipefs", "-a", "-q", d, check=False)
        else:
            fast, slow_base = self.loop("pool-fast", 1024 * MiB), self.loop("pool-slow", 1024 * MiB)
        sectors = int(sh("blockdev", "--getsz", slow_base))
        sh("dmsetup", "create", "bgdemo-slow", "--table", f"0 {sectors} delay {slow_base} 0 25")
        self.undo.append(("dm", "bgdemo-slow"))
        sh("dmsetup", "mknodes", "bgdemo-slow")
        self.pool_disks = [fast, "/dev/mapper/bgdemo-slow"]
        print(
            f"volume {self.volume} (ext4, mounted at {self.mnt}); pool disks: "
            f"{fast} (fast), /dev/mapper/bgdemo-slow (25 ms per I/O)"
        )

    def start_daemon(self) -> None:
        say("a private system bus and blockguardd")
        socket = self.work / "bus.sock"
        conf = self.work / "bus.conf"
        conf.write_text(BUS_CONFIG.format(socket=socket))
        out = sh("dbus-daemon", f"--config-file={conf}", "--fork", "--print-pid=1")
        self.undo.append(("pid", int(out.split()[0])))
        self.env["DBUS_SYSTEM_BUS_ADDRESS"] = f"unix:path={socket}"
        self.env["BLOCKGUARD_PROBE_SECONDS"] = os.environ.get("BLOCKGUARD_PROBE_SECONDS", "0.5")
        log = open(self.work / "blockguardd.log", "w")  # noqa: SIM115 - lives with the daemon
        daemon = subprocess.Popen(
            [str(VENV / "blockguardd"), "--state-dir", str(self.work / "state")],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.undo.append(("daemon", daemon))
        for _ in range(600):
            with contextlib.suppress(RuntimeError):
                self.ctl("status")
                break
            if daemon.poll() is not None:
                raise RuntimeError(f"blockguardd exited; see {self.work / 'blockguardd.log'}")
            time.sleep(0.1)
        print(f"blockguardd pid {daemon.pid} on {self.env['DBUS_SYSTEM_BUS_ADDRESS']}")

    def register(self) -> None:
        say(f"pool {POOL} on {' '.join(self.pool_disks)} (each disk is measured first)")
        self.ctl("pool", "create", POOL, *self.pool_disks, "--backend", "lvm", "--force")
        self.undo.append(("pool", POOL))
        for pool in self.ctl("pool", "list")["pools"]:  # type: ignore[index]
            for perf in pool.get("devices", []):
                path = perf["path"]
                print(
                    f"  {path}: read {perf.get('seq_read_bps', 0) / MiB:.0f} MiB/s seq, "
                    f"{perf.get('rand_read_bps', 0) / MiB:.0f} MiB/s random; write "
                    f"{perf.get('seq_write_bps', 0) / MiB:.0f} / "
                    f"{perf.get('rand_write_bps', 0) / MiB:.0f} MiB/s"
                )

    def round0(self) -> None:
        say("round 0: files written; the volume is protected and its first (full) backup taken")
        self.write_files("base.bin", 24 * MiB)
        print(f"protect {self.volume} (mounted, in use) as {VOLUME!r}")
        # Estimates for a swap-in restore (the demo's RTO refers to one; the default is copy).
        self.ctl(
            "protect",
            self.volume,
            VOLUME,
            "--rpo",
            "every 1h",
            "--restore-mode",
            "swap-in",
            "--generations",
            "8",
        )
        self.undo.append(("unprotect", VOLUME))  # undone first: era metadata is on the pool
        vol = self.ctl("volume", "show", VOLUME)["volume"]  # type: ignore[index]
        print(
            f"tracking: {vol.get('backend', '?')} ({vol.get('tracker_state', '?')}); "
            f"still mounted at {self.mnt}, same device path"
        )
        # The daemon's scheduler takes the first full by itself, at once: wait for it.
        first = self.wait_for_backups()
        print(f"the scheduler took the first backup by itself: {first['result']['method']}")
        self.backup("round 0")

    def mount(self) -> None:
        if not os.path.ismount(self.mnt):
            sh("mount", self.volume, str(self.mnt))

    def unmount(self) -> None:
        if os.path.ismount(self.mnt):
            sh("umount", str(self.mnt))

    def write_files(self, name: str, size: int) -> None:
        self.mount()
        with open(self.mnt / name, "wb") as f:
            for _ in range(size // MiB):
                f.write(os.urandom(MiB))
            f.flush()
            os.fsync(f.fileno())

    def backup(self, label: str) -> dict:
        """Back up and prove what the backup point held, block for block: the file system is
        unmounted for the backup (a mounted ext4 rewrites its superblock when the snapshot
        freezes and thaws it), and the volume's sha256 before and after must be equal — then
        the point-in-time copy held exactly that content. The guest tests cover backups of
        a volume that is being written."""
        self.unmount()
        chunks = self.chunk_hashes(self.volume)
        plan = self.ctl("plan", VOLUME)["plan"]  # type: ignore[index]
        job = self.backup_job()
        after = self.chunk_hashes(self.volume)
        if after != chunks:
            moved = [i for i, (a, b) in enumerate(zip(chunks, after, strict=True)) if a != b]
            raise RuntimeError(f"the volume changed during the backup, 64 KiB chunks {moved[:20]}")
        content = hashlib.sha256(b"".join(chunks)).hexdigest()
        result = job["result"]
        self.content[result["generation"]] = content
        est = plan.get("estimated_restore_seconds", {})  # type: ignore[union-attr]
        upper = plan.get("upper_restore_seconds", {})  # type: ignore[union-attr]
        row = {
            "round": label,
            "generation": result["generation"],
            "method": result["method"],
            "reason": (result.get("reasons") or [""])[0],
            "bytes": result["bytes"],
            "backup_s": result["seconds"],
            "predicted_s": est.get(result["method"], plan.get("estimated_seconds", 0.0)),  # type: ignore[union-attr]
            "upper_s": upper.get(result["method"], plan.get("estimated_upper_seconds", 0.0)),  # type: ignore[union-attr]
            # The estimates above are for the objectives' restore mode.
            "mode": plan.get("restore_mode", "swap-in"),  # type: ignore[union-attr]
            "measured_s": None,
        }
        self.rows.append(row)
        print(
            f"{label}: {row['method']:<12} {row['bytes'] / MiB:7.1f} MiB in "
            f"{row['backup_s']:.2f} s — {row['reason']}"
        )
        return row

    def wait_for_backups(self) -> dict:
        """Wait until no backup job runs; return the newest one."""
        while True:
            jobs = [j for j in self.jobs() if j.get("kind") == "backup"]
            if jobs and not any(j.get("state") in ("queued", "running") for j in jobs):
                job = max(jobs, key=lambda j: int(j["id"]))
                if job["state"] != "done":
                    raise RuntimeError(f"backup job failed: {job.get('error')}")
                return job
            time.sleep(0.5)

    def backup_job(self) -> dict:
        """``backup`` now — or, when the daemon's own scheduler already started one (it
        takes the first full as soon as a volume is protected), wait for that job."""
        try:
            return self.ctl("backup", VOLUME)["job"]  # type: ignore[index]
        except RuntimeError as exc:
            if "busy" not in str(exc).lower():
                raise
        while True:
            jobs = self.jobs()
            running = [
                j
                for j in jobs
                if j.get("kind") == "backup" and j.get("state") in ("queued", "running")
            ]
            if not running:
                done = [j for j in jobs if j.get("kind") == "backup"]
                job = max(done, key=lambda j: int(j["id"]))
                if job["state"] != "done":
                    raise RuntimeError(f"backup job failed: {job.get('error')}")
                return job
            time.sleep(0.5)

    def rounds(self) -> None:
        self.round0()
        self.write_files("hot.bin", 8 * MiB)
        plan = self.ctl("plan", VOLUME)["plan"]  # type: ignore[index]
        one = plan["estimated_restore_seconds"]["incremental"]
        rto = max(1.0, round(one * 2.5, 1))
        say(
            f"objectives: RTO {rto} s (swap-in), RPO every 1h — room for about 2.5 rounds of "
            f"8 MiB changes (one restores in an estimated {one:.2f} s)"
        )
        # No scheduled restore drill: one at a scheduler tick would hold the volume while a
        # round asks for its backup, and add a sample to the calibration in mid-run.
        # The RTO refers to a swap-in (named: the default is copy), as the numbers above do.
        self.ctl(
            "objectives",
            VOLUME,
            "--rto",
            f"{rto}s",
            "--restore-mode",
            "swap-in",
            "--rpo",
            "every 1h",
            "--drill",
            "off",
        )
        self.backup("round 1 (8 MiB hot file)")
        for r in (2, 3):
            self.write_files("hot.bin", 8 * MiB)
            self.backup(f"round {r} (hot file rewritten)")
        self.write_files("new.bin", 24 * MiB)
        self.backup("round 4 (24 MiB new file)")
        self.write_files("hot.bin", 8 * MiB)
        self.backup("round 5 (hot file rewritten)")

    def restores(self) -> None:
        newest = self.rows[-1]
        older = next(r for r in reversed(self.rows[:-1]) if r["method"] != "full")
        for row in (newest, older):
            target = self.loop(f"restore-{len(self.undo)}", 128 * MiB)
            say(f"restore {row['generation']} ({row['method']}) to {target}")
            job = self.ctl(
                "restore",
                VOLUME,
                "--generation",
                row["generation"],
                "--mode",
                "copy",
                "--target",
                target,
            )
            res = job["job"]["result"]  # type: ignore[index]
            row["measured_s"] = res["seconds"]
            # Compare like with like: the restore's own estimate, for the mode it ran in
            # (copy), not the plan's estimate for the objectives' mode (swap-in).
            row["predicted_s"] = res.get("predicted_seconds", row["predicted_s"])
            row["upper_s"] = res.get("upper_seconds", row["predicted_s"])
            row["mode"] = "copy"
            calibrated = "calibrated" if res.get("calibrated") else "uncalibrated"
            print(
                f"copy-mode restore estimate {row['predicted_s']:.2f} s (upper "
                f"{row['upper_s']:.2f} s, {calibrated}), measured {res['seconds']:.2f} s"
            )
            same = self.sha256(target) == self.content[row["generation"]]
            print(
                f"sha256 of {target} {'EQUALS' if same else 'DIFFERS FROM'} the volume at "
                f"its backup point; {res['bytes'] / MiB:.1f} MiB in {res['seconds']:.2f} s"
            )
            if not same:
                raise RuntimeError(f"restore of {row['generation']} is not bit-exact")
            self.ctl("verify", row["generation"])
            print(f"verify {row['generation']}: every stored chunk's checksum is right")

    def summary(self) -> None:
        say("summary")
        head = (
            f"{'generation':<34} {'method':<12} {'MiB':>6} {'backup':>7} {'mode':>7} "
            f"{'restore est.':>12} {'upper':>7} {'measured':>9}  reason"
        )
        print(head)
        for r in self.rows:
            meas = "-" if r["measured_s"] is None else f"{r['measured_s']:.2f} s"
            print(
                f"{r['generation']:<34} {r['method']:<12} {r['bytes'] / MiB:>6.1f} "
                f"{r['backup_s']:>6.2f}s {r['mode']:>7} {r['predicted_s']:>11.2f}s "
                f"{r['upper_s']:>6.2f}s {meas:>9}  {r['reason'][:90]}"
            )
        methods = [r["method"] for r in self.rows]
        print(
            "\nmethods chosen: "
            + ", ".join(f"{m} x{methods.count(m)}" for m in ("full", "incremental", "differential"))
        )

    def cleanup(self) -> None:
        for kind, what in reversed(self.undo):
            with contextlib.suppress(Exception):
                if kind == "unprotect":
                    self.ctl("unprotect", str(what), "--delete-generations")
                elif kind == "pool":
                    self.ctl("pool", "remove", str(what), "--force", "--delete-generations")
                elif kind == "daemon":
                    what.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
                    what.wait(30)  # type: ignore[attr-defined]
                elif kind == "pid":
                    os.kill(int(what), signal.SIGTERM)  # type: ignore[arg-type]
                elif kind == "mount":
                    if os.path.ismount(str(what)):
                        sh("umount", str(what))
                elif kind == "vg":
                    vg, pv = what  # type: ignore[misc]
                    sh("lvm", "vgremove", "-ff", "-y", vg, check=False)
                    sh("lvm", "pvremove", "-ff", "-y", pv, check=False)
                elif kind == "dm":
                    sh("dmsetup", "remove", "--retry", str(what), check=False)
                elif kind == "loop":
                    sh("losetup", "-d", str(what), check=False)


def main() -> int:
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="blockguard-demo-", dir="/var/tmp") as d:
        demo = Demo(Path(d))
        try:
            demo.make_devices()
            demo.start_daemon()
            demo.register()
            demo.rounds()
            demo.restores()
            demo.summary()
        except Exception as exc:
            print(f"\ndemo failed: {exc}", file=sys.stderr)
            log = Path(d) / "blockguardd.log"
            if log.exists():
                print(
                    "last daemon log lines:\n" + "\n".join(log.read_text().splitlines()[-20:]),
                    file=sys.stderr,
                )
            return 1
        finally:
            demo.cleanup()
    print(f"\ndemo finished in {time.monotonic() - t0:.0f} s; everything it made is removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
