"""The install step and the units under a real systemd, in the guest kernel.

Run with systemd as PID 1 of the guest (``scripts/vm run --init systemd``; scripts/test does):
the host's systemd 252 boots on the guest's throwaway root and runs pytest as a service of
the boot, so ``blockguard.service`` is started, watched and stopped by a real service
manager, with its hardening (mount namespace, ProtectSystem=strict, the device cgroup,
RestrictAddressFamilies, capability bounds) done by systemd itself. On the clean guest root
the first step is ``scripts/install`` (offline, from the wheelhouse scripts/bootstrap fills);
then, in order: the unit starts and reaches READY (Type=notify), outlives several watchdog
periods, creates an LVM pool through ``blockguardctl`` (LVM's locks and metadata backup under
ProtectSystem=strict), sees a device event of its pool disk, and stops cleanly.

The guest has no udevd: the daemon takes kernel uevents (the same netlink family and, like
udevd's, only in the host's network namespace), and DM_DISABLE_UDEV=1 lets libdevmapper make
its nodes (a drop-in of the test, as the guest's other tests set it).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.timeouts import scaled

pytestmark = pytest.mark.guest

REPO = Path(__file__).resolve().parents[2]
WHEELS = REPO / ".cache" / "wheels"
UNIT = "blockguard.service"
WATCHDOG_SEC = 10
DROPIN = Path("/etc/systemd/system/blockguard.service.d/test.conf")
CONFIG = Path("/etc/blockguard/blockguard.toml")
ISOLATION = {"DBUS_SYSTEM_BUS_ADDRESS", "BLOCKGUARD_CONFIG", "BLOCKGUARD_STATE_DIR"}

if os.environ.get("BLOCKGUARD_VM_INIT") != "systemd":
    pytest.skip(
        "needs systemd as PID 1 of the guest: scripts/vm run --init systemd (scripts/test does)",
        allow_module_level=True,
    )


def sh(*argv: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a command (never through a shell); fail with its output."""
    # The real system bus and the real configuration, not the test isolation's stand-ins.
    env = {k: v for k, v in os.environ.items() if k not in ISOLATION}
    result = subprocess.run(argv, capture_output=True, text=True, timeout=scaled(timeout), env=env)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(argv)} -> {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def show(*props: str) -> dict[str, str]:
    out = sh("systemctl", "show", UNIT, *(f"--property={p}" for p in props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def journal() -> str:
    return sh("journalctl", "--no-pager", "-o", "cat", "-u", UNIT).stdout


def wait_for(what: str, predicate, timeout: float) -> None:
    deadline = time.monotonic() + scaled(timeout)
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n--- journal ---\n{journal()}")
        time.sleep(1)


def ctl(*args: str) -> subprocess.CompletedProcess:
    # The installed one, found on PATH like an admin's shell finds it.
    return sh("blockguardctl", *args, timeout=600)


@pytest.fixture(scope="module")
def disk() -> str:
    disks = os.environ.get("BLOCKGUARD_VM_DISKS", "").split()
    if not disks:
        pytest.fail("the guest has no disk: scripts/vm run --disk SIZE")
    return disks[0]


@pytest.fixture(scope="module")
def installed() -> Iterator[str]:
    """scripts/install on the clean guest root; the output of the install."""
    assert Path("/run/systemd/system").is_dir() and Path("/proc/1/comm").read_text() == "systemd\n"
    assert not Path("/usr/local/lib/blockguard").exists(), "the guest root is not clean"
    if not any(WHEELS.glob("*.whl")):
        pytest.fail(f"no wheelhouse in {WHEELS}: run scripts/bootstrap on the host")
    out = sh(str(REPO / "scripts" / "install"), "--wheelhouse", str(WHEELS), timeout=1200).stdout
    yield out
    sh("systemctl", "stop", UNIT, check=False)


def test_install_on_a_clean_guest(installed: str) -> None:
    assert "group and folders created" in installed, installed
    assert sh("getent", "group", "blockguard").stdout.startswith("blockguard:")
    for folder in ("/run/lock/lvm", "/etc/lvm/backup", "/etc/lvm/archive", "/etc/blockguard"):
        assert Path(folder).is_dir(), folder
    assert sh("blockguardctl", "--version").stdout.strip() == "blockguardctl 0.1.0"
    assert sh("blockguardd", "--version").stdout.strip() == "blockguardd 0.1.0"
    # systemd sees the installed unit where it looks (PREFIX/lib/systemd/system).
    assert (
        show("FragmentPath")["FragmentPath"] == "/usr/local/lib/systemd/system/blockguard.service"
    )
    sh("systemd-analyze", "verify", "--man=no", UNIT)


def test_unit_starts_and_reaches_ready(installed: str) -> None:
    # The configuration file feeds the daemon: no probing, no drills, no scheduler (TCG is slow).
    CONFIG.write_text("probe_seconds = 0\ndrill_auto = false\nscheduler_interval = 0\n")
    DROPIN.parent.mkdir(parents=True, exist_ok=True)
    DROPIN.write_text(
        "[Service]\n"
        f"WatchdogSec={WATCHDOG_SEC}\n"
        # Python under TCG starts slowly; the default 90 s is for real machines.
        "TimeoutStartSec=900\n"
        "Environment=DM_DISABLE_UDEV=1\n"
    )
    sh("systemctl", "daemon-reload")
    # Type=notify: `systemctl start` returns once READY=1 arrived (or fails).
    sh("systemctl", "start", UNIT, timeout=900)
    state = show("ActiveState", "SubState", "StatusText", "WatchdogUSec", "NRestarts")
    assert (state["ActiveState"], state["SubState"]) == ("active", "running"), state
    assert state["WatchdogUSec"] == f"{WATCHDOG_SEC}s" and state["NRestarts"] == "0", state
    status = json.loads(ctl("--json", "status").stdout)
    assert status["schema"] == 1 and "health" in status, status


def test_unit_survives_watchdog_periods(installed: str) -> None:
    before = show("MainPID")["MainPID"]
    time.sleep(3 * WATCHDOG_SEC)  # systemd's clock, not a scaled test wait: three periods
    after = show("MainPID", "NRestarts", "ActiveState", "Result")
    assert after["MainPID"] == before and after["NRestarts"] == "0", after
    assert (after["ActiveState"], after["Result"]) == ("active", "success"), after
    assert "watchdog timeout" not in journal().lower()


def test_lvm_pool_through_blockguardctl_with_hardening_on(installed: str, disk: str) -> None:
    ctl("pool", "create", "sysd", disk, "--backend", "lvm")
    listing = json.loads(ctl("--json", "pool", "list").stdout)
    assert [p["name"] for p in listing["pools"]] == ["sysd"], listing
    assert sh("vgs", "--noheadings", "-o", "vg_name", "bg_sysd").stdout.strip() == "bg_sysd"
    # LVM wrote its metadata backup although /etc is read-only for the unit.
    assert Path("/etc/lvm/backup/bg_sysd").is_file()
    assert show("NRestarts")["NRestarts"] == "0"


def sha256_tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of each regular file, the target of each symlink."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            found[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def test_file_group_under_home_restored_by_the_client(
    installed: str, loopdev: Callable[..., str]
) -> None:
    """A file group on a volume mounted under /home (ProtectHome=read-only: the daemon
    walks it), a backup, restore-files into /srv (read-only for the daemon: the CLI
    writes the files), bytes equal; nothing served is left afterwards. Before the device
    events' test: its synthetic "remove" of the pool disk leaves the pool without a
    working disk."""
    volume = loopdev(32 * 1024 * 1024, "fg.img")
    sh("mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", volume)
    home = Path("/home/bgfg")
    into = Path("/srv/bg-restore")
    home.mkdir(parents=True)
    into.mkdir(parents=True)
    sh("mount", volume, str(home))  # after the unit started: it propagates into its view
    try:
        grp = home / "grp"
        (grp / "sub").mkdir(parents=True)
        (grp / "a.bin").write_bytes(os.urandom(300_000))
        (grp / "sub/b.txt").write_text("kept\n" * 1000)
        (grp / "link").symlink_to("a.bin")
        (home / "other.bin").write_bytes(os.urandom(100_000))
        want = sha256_tree(grp)
        # Tracked by scanning: the file system is mounted on the loop device itself (era
        # would have to be stacked under the mount, which a mounted device refuses).
        ctl("protect", volume, "fgvol", "--pool", "sysd", "--backend", "scan")
        ctl("filegroup", "create", "grp", "--volume", "fgvol", str(grp))
        backup = json.loads(ctl("--json", "backup", "fgvol").stdout)["job"]
        assert backup["state"] == "done" and backup["result"]["warnings"] == [], backup
        done = json.loads(ctl("--json", "restore-files", "grp", "--to", str(into)).stdout)
        assert done["restore"]["generation"] == backup["result"]["generation"], done
        assert os.listdir(into) == ["grp"]
        assert sha256_tree(into / "grp") == want
        # Released: no loop device over the daemon's images, no FUSE mount of them.
        browse = "/var/lib/blockguard/browse"
        assert browse not in Path("/proc/self/mountinfo").read_text()
        for entry in Path("/sys/block").iterdir():
            backing = entry / "loop" / "backing_file"
            assert not (backing.exists() and backing.read_text().startswith(browse)), entry
    finally:
        sh("blockguardctl", "unprotect", "fgvol", "--delete-generations", check=False)
        sh("umount", str(home), check=False)
    assert show("NRestarts")["NRestarts"] == "0"


def test_unit_sees_device_events(installed: str, disk: str) -> None:
    # A synthetic "remove" uevent of the pool disk (the disk stays): the kernel sends it over
    # netlink exactly like a real one; the daemon under the unit must hear it.
    Path(f"/sys/block/{Path(disk).name}/uevent").write_text("remove\n")
    wait_for(
        "the daemon to log the pool disk's event",
        lambda: f"vanished pool disks ['{disk}']" in journal(),
        120,
    )
    Path(f"/sys/block/{Path(disk).name}/uevent").write_text("add\n")


def test_unit_stops_cleanly(installed: str) -> None:
    sh("systemctl", "stop", UNIT, timeout=300)
    state = show("ActiveState", "Result", "ExecMainStatus", "ExecMainCode")
    assert state["ActiveState"] == "inactive", state
    assert state["Result"] == "success" and state["ExecMainStatus"] == "0", state
    assert "shutting down" in journal()


def test_bus_activation_starts_the_unit(installed: str) -> None:
    """The activation file: the first call to org.blockguard1 starts blockguard.service."""
    assert show("ActiveState")["ActiveState"] == "inactive"
    # Under emulation the start may outlast the bus's activation timeout: the call may fail,
    # the unit must start all the same.
    sh("blockguardctl", "status", check=False, timeout=600)
    wait_for("activation", lambda: show("ActiveState")["ActiveState"] == "active", 600)
    assert "Activating via systemd" in sh("journalctl", "--no-pager", "-u", "dbus.service").stdout
    sh("systemctl", "stop", UNIT, timeout=300)
