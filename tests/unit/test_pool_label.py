"""Reading the pool label from blkid and lvm output (no devices: a scripted runner)."""

from __future__ import annotations

from collections.abc import Sequence

from blockguard.errors import ForeignPool, PoolDiskRefused, ProtectedDevice
from blockguard.storage.pool.label import dir_label, pool_label
from blockguard.storage.runner import CommandResult


class Scripted:
    """A runner answering by program name; records every argv."""

    def __init__(self, answers: dict[str, tuple[int, str]]) -> None:
        self.answers = answers
        self.calls: list[list[str]] = []

    def run(self, argv: Sequence[str], *, timeout: float, check: bool = True) -> CommandResult:
        self.calls.append(list(argv))
        code, out = self.answers.get(argv[0], (2, ""))
        return CommandResult(tuple(argv), code, out, "", 0.0)


def test_dir_label_fits_xfs() -> None:
    assert dir_label("p1") == "bgpool.p1"
    assert len(dir_label("a-very-long-pool-name")) == 12


def test_xfs_label_is_a_dir_pool() -> None:
    runner = Scripted({"blkid": (0, "LABEL=bgpool.back\nTYPE=xfs\n")})
    label = pool_label("/dev/x", runner)  # type: ignore[arg-type]
    assert label is not None and (label.backend, label.pool) == ("dir", "back")


def test_other_file_systems_are_no_pool() -> None:
    for out in ("LABEL=bgpool.x\nTYPE=ext4\n", "LABEL=data\nTYPE=xfs\n", "PTTYPE=dos\n", ""):
        assert pool_label("/dev/x", Scripted({"blkid": (0, out)})) is None  # type: ignore[arg-type]
    assert pool_label("/dev/x", Scripted({"blkid": (2, "")})) is None  # type: ignore[arg-type]


def test_lvm_pv_of_a_tagged_or_bg_vg_is_an_lvm_pool() -> None:
    blkid = (0, "TYPE=LVM2_member\n")
    for pvs, pool in (("  bg_away|blockguard_pool\n", "away"), ("  bg_old|\n", "old")):
        runner = Scripted({"blkid": blkid, "lvm": (0, pvs)})
        label = pool_label("/dev/x", runner)  # type: ignore[arg-type]
        assert label is not None and (label.backend, label.pool) == ("lvm", pool)
        lvm = next(c for c in runner.calls if c[0] == "lvm")
        # Confined to the one device, like every lvm call of blockguard.
        assert any('"a|^/dev/x$|"' in arg for arg in lvm)
    for pvs in ("  vg0|\n", "  |\n"):
        runner = Scripted({"blkid": blkid, "lvm": (0, pvs)})
        assert pool_label("/dev/x", runner) is None  # type: ignore[arg-type]


def test_gate_errors_name_what_they_refuse() -> None:
    err = ProtectedDevice(
        path="/dev/a", purpose="a restore target", relation="has the partition",
        device="/dev/a1", volume="db",
    )  # fmt: skip
    assert str(err) == (
        "/dev/a cannot be used as a restore target: it has the partition /dev/a1, "
        "the device of protected volume db"
    )
    assert err.dbus_name.endswith(".ProtectedDevice") and err.exit_code == 4
    pool = PoolDiskRefused(path="/dev/b", purpose="x", relation="is", device="/dev/b", pool="p1")
    assert "/dev/b, a disk of pool p1" in str(pool) and pool.dbus_name.endswith(".PoolDisk")
    foreign = ForeignPool(path="/dev/c", purpose="x", relation="is", device="/dev/c", pool="away")
    assert "blockguardctl pool import /dev/c" in str(foreign)
    assert foreign.dbus_name.endswith(".PoolLabel")
