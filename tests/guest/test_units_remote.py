"""A backup target reached from the shipped unit under a real systemd, in the guest (issue 11).

Run like tests/guest/test_units_systemd.py (``scripts/vm run --init systemd``), whose
install and helpers this module uses: ``blockguard.service`` as installed, with all its
hardening done by systemd, spawns ``ssh`` to a target. The target is an sshd of the repo's
``.cache/sshd`` on 127.0.0.1 (a high port) inside the guest, whose authorized_keys line
forces this checkout's serve, as a target's administrator sets it up. Everything the admin
does goes through ``blockguardctl``: ``target add`` pinned by the host key's fingerprint,
protect a loop volume, back it up, remote objectives, ``transfer`` and a restore from the
target, bit-exact. A unit that forbids IP sockets (RestrictAddressFamilies without AF_INET,
IPAddressDeny=any: loopback too) fails at ``target add``.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from blockguard.storage.remote.packstore import PackStore
from tests.guest.test_units_systemd import (
    CONFIG,
    DROPIN,
    REPO,
    UNIT,
    ctl,
    disk,
    installed,
    journal,
    sh,
    show,
)
from tests.support.devices import MiB, sha256_of, write_random
from tests.support.netlab import PRIVSEP_DIR, SSHD, _sshd_config
from tests.timeouts import scaled

pytestmark = pytest.mark.guest

# Fixtures of the systemd module, used here by name (imported, not copied).
__all__ = ["disk", "installed"]

CLIENT = "prot1"
ADDR = "127.0.0.1"
PORT = 22022
SIZE = 16 * MiB


@pytest.fixture(scope="module")
def unit(installed: str) -> Iterator[None]:
    """blockguard.service started as installed; the drop-in only slows nothing down."""
    CONFIG.write_text("probe_seconds = 0\ndrill_auto = false\nscheduler_interval = 0\n")
    DROPIN.parent.mkdir(parents=True, exist_ok=True)
    DROPIN.write_text("[Service]\nTimeoutStartSec=900\nEnvironment=DM_DISABLE_UDEV=1\n")
    sh("systemctl", "daemon-reload")
    sh("systemctl", "start", UNIT, timeout=900)
    yield
    sh("systemctl", "stop", UNIT, check=False, timeout=300)


@pytest.fixture
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An sshd on 127.0.0.1:PORT (a child of this test, stopped by its PID) and an empty
    area; yields the run directory (host key, authorized_keys, area)."""
    run_dir = tmp_path_factory.mktemp("target")
    run_dir.chmod(0o700)
    host_key = run_dir / "host_ed25519_key"
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key))
    (run_dir / "authorized_keys").write_text("")
    PackStore.create(run_dir / "area", CLIENT).close()
    PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    config = run_dir / "sshd_config"
    config.write_text(_sshd_config(run_dir, PORT, {"ListenAddress": ADDR}))
    pid_file = run_dir / "sshd.pid"
    log = run_dir / "sshd.log"
    process = subprocess.Popen(
        [str(SSHD), "-D", "-f", str(config), "-E", str(log)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + scaled(30)
        while not pid_file.exists() or not pid_file.read_text().strip():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"sshd did not start: {log.read_text() if log.exists() else ''}")
            time.sleep(0.1)
        yield run_dir
    finally:
        process.terminate()
        try:
            process.wait(scaled(10))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(scaled(10))


def ok_json(*args: str) -> dict:
    return json.loads(ctl("--json", *args).stdout)


def authorize(run_dir: Path) -> None:
    """What the target's admin does with the line ``target client-key`` shows: the key,
    with the forced command of this checkout's serve on the area."""
    line = ok_json("target", "client-key", "--client", CLIENT)["authorized_keys_line"]
    argv = [sys.executable, "-m", "blockguard.engine.servecmd", "--client", CLIENT]
    serve = shlex.join([*argv, "--root", str(run_dir / "area"), "--probe-seconds", "0.05"])
    command = f"cd {shlex.quote(str(REPO))} && PYTHONPATH=. exec {serve}"
    _, _, public = line.partition('" ')
    with (run_dir / "authorized_keys").open("a") as keys:
        keys.write(f'restrict,command="{command}" {public}\n')


def fingerprint(run_dir: Path) -> str:
    return sh("ssh-keygen", "-lf", str(run_dir / "host_ed25519_key.pub")).stdout.split()[1]


def test_transfer_and_restore_through_a_target_under_the_unit(
    unit: None, target: Path, disk: str, loopdev: Callable[..., str]
) -> None:
    authorize(target)
    url = f"ssh://root@{ADDR}:{PORT}"
    added = sh(
        "blockguardctl", "target", "add", "offsite", url, "--pool", "main", "--client", CLIENT,
        "--host-key", fingerprint(target), check=False, timeout=600,
    )  # fmt: skip
    log = target / "sshd.log"
    assert added.returncode == 0, (
        f"target add -> {added.returncode}\n{added.stderr}\n--- sshd ---\n"
        f"{log.read_text() if log.exists() else ''}\n--- journal ---\n{journal()[-4000:]}"
    )
    assert ok_json("target", "show", "offsite")["target"]["state"] == "ok"

    ctl("pool", "create", "p1", disk)
    volume = loopdev(SIZE, "vol.img")
    write_random(volume, 0, SIZE, seed=11)
    ctl("protect", volume, "db", "--rpo", "1h")
    ctl("backup", "db")
    backed_up = sha256_of(volume)
    ctl("objectives", "db", "--target", "offsite")

    job = ok_json("transfer", "db")["job"]
    assert job["state"] == "done", job
    generation = job["result"]["generation"]
    assert job["result"]["to_target"] == "offsite", job
    assert list((target / "area").glob("clients/*/generations/*")), "nothing on the target"

    # The volume moves on; the restore from the target gives back what was transferred.
    write_random(volume, 0, SIZE, seed=12)
    device = loopdev(SIZE, "restored.img")
    restored = ok_json("restore", generation, "--from", "offsite", "--target", device)["job"]
    assert restored["state"] == "done", restored
    assert sha256_of(device) == backed_up
    assert show("NRestarts")["NRestarts"] == "0"
