"""The dm ioctl's requests and answers, against a fake kernel (no device-mapper here).

The fake fills the caller's buffer as drivers/md/dm-ioctl.c does: targets packed from
``data_start``, each ``struct dm_target_spec`` then its parameters, ``next`` counted from
``data_start``; DM_BUFFER_FULL_FLAG when they do not fit; an errno otherwise. The real
kernel answers in the guest tests (every thin backup asks it).
"""

from __future__ import annotations

import errno
import os

import pytest

from blockguard.errors import CommandFailed, MetadataSnapshotBusy, NotFound
from blockguard.storage import dmioctl
from blockguard.storage.dm import DeviceMapper
from blockguard.storage.runner import CommandResult, Runner

POOL = "vg-tp-tpool"
TARGETS = {
    POOL: [(0, 2048, "thin-pool", "0 10/512 3/16 - rw discard_passdown")],
    "two": [(0, 100, "linear", "7:1 0"), (100, 50, "error", "")],
}


class FakeKernel:
    def __init__(self) -> None:
        self.held: bool = False
        self.requests: list[tuple[int, str, int, int]] = []
        self.refuse: int | None = None

    def ioctl(self, fd: int, request: int, buf: bytearray, mutate: bool) -> int:
        header = list(dmioctl._HEADER.unpack_from(buf))
        nr, size = request & 0xFF, (request >> 16) & 0x3FFF
        assert (request >> 8) & 0xFF == 0xFD and size == dmioctl._HEADER.size == 312
        assert header[:3] == [4, 0, 0] and header[3] == len(buf) and header[4] == 312
        name = header[11].split(b"\0", 1)[0].decode()
        self.requests.append((nr, name, header[10], header[7]))
        if self.refuse is not None:
            raise OSError(self.refuse, os.strerror(self.refuse))
        if nr == dmioctl._TARGET_MSG:
            message = bytes(buf[312 + 8 :]).split(b"\0", 1)[0].decode()
            if message == "reserve_metadata_snap":
                if self.held:
                    raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
                self.held = True
            elif message == "release_metadata_snap":
                self.held = False
            return 0
        if name == "" and header[10] == os.makedev(253, 2):
            name = "two"
        if name not in TARGETS:
            raise OSError(errno.ENXIO, os.strerror(errno.ENXIO))
        at, specs = 0, []
        for first, length, kind, params in TARGETS[name]:
            if name == POOL and self.held:
                params = params.replace(" - ", " 77 ")
            body = params.encode() + b"\0"
            nxt = at + dmioctl._SPEC.size + len(body)
            nxt += -nxt % 8
            specs.append(dmioctl._SPEC.pack(first, length, 0, nxt, kind.encode()) + body)
            specs[-1] += bytes(nxt - at - len(specs[-1]))
            at = nxt
        data = b"".join(specs)
        if 312 + len(data) > len(buf):
            header[7] |= dmioctl._BUFFER_FULL_FLAG
        else:
            buf[312 : 312 + len(data)] = data
            header[5] = len(TARGETS[name])
        dmioctl._HEADER.pack_into(buf, 0, *header)
        return 0


class NoDmsetup(Runner):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[str]] = []

    def run(self, argv, *, timeout: float, check: bool = True, **_: object) -> CommandResult:
        self.calls.append(list(argv))
        return CommandResult(list(argv), 0, "0 8 zero \n", "", 0.0)


@pytest.fixture
def kernel(monkeypatch) -> FakeKernel:
    fake = FakeKernel()
    monkeypatch.setattr(dmioctl.fcntl, "ioctl", fake.ioctl)
    monkeypatch.setattr(dmioctl, "_control", dmioctl.Control(-1))
    monkeypatch.setattr(dmioctl, "_tried", True)
    monkeypatch.setattr(dmioctl.os, "close", lambda fd: None)
    return fake


def test_status_table_and_messages_answer_as_dmsetup_would_without_running_it(
    kernel: FakeKernel,
) -> None:
    runner = NoDmsetup()
    dm = DeviceMapper(runner)  # type: ignore[arg-type]
    assert dm.status(POOL) == "0 2048 thin-pool 0 10/512 3/16 - rw discard_passdown"
    assert dm.held_metadata_root(POOL) is None
    dm.reserve_metadata_snap(POOL)
    assert dm.held_metadata_root(POOL) == 77
    with pytest.raises(MetadataSnapshotBusy):
        dm.reserve_metadata_snap(POOL)  # EBUSY, as dmsetup's "Device or resource busy"
    dm.release_metadata_snap(POOL)
    assert dm.held_metadata_root(POOL) is None
    # Two targets, by device number, the second with no parameters.
    assert dm.table_of(os.makedev(253, 2)) == "0 100 linear 7:1 0\n100 50 error"
    assert kernel.requests[-1][3] & dmioctl._STATUS_TABLE_FLAG
    assert runner.calls == []


def test_a_missing_device_is_not_found_and_a_kernel_refusal_names_its_reason(
    kernel: FakeKernel,
) -> None:
    dm = DeviceMapper(NoDmsetup())  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        dm.table("nope")
    assert dm.table_if_exists("nope") is None
    kernel.refuse = errno.EIO
    with pytest.raises(CommandFailed) as caught:
        dm.status(POOL)
    assert "Input/output error" in str(caught.value) and "dm-ioctl" in str(caught.value)


def test_a_large_answer_is_asked_again_with_room(kernel: FakeKernel, monkeypatch) -> None:
    TARGETS["big"] = [(i * 8, 8, "linear", f"7:1 {i} " + "x" * 200) for i in range(100)]
    try:
        lines = DeviceMapper(NoDmsetup()).status("big").splitlines()  # type: ignore[arg-type]
    finally:
        del TARGETS["big"]
    assert len(lines) == 100 and lines[99].startswith("792 8 linear 7:1 99 x")
    assert len(kernel.requests) == 2


def test_an_interface_the_kernel_refuses_leaves_dmsetup_to_answer(kernel: FakeKernel) -> None:
    runner = NoDmsetup()
    kernel.refuse = errno.ENOTTY
    assert DeviceMapper(runner).status("two") == "0 8 zero"  # type: ignore[arg-type]
    assert runner.calls == [["dmsetup", "status", "two"]]
    assert dmioctl.control() is None  # given up for the process


def test_without_the_ioctl_everything_goes_through_dmsetup(kernel: FakeKernel) -> None:
    runner = NoDmsetup()
    DeviceMapper(runner, ioctl=False).status("two")  # type: ignore[arg-type]
    assert runner.calls == [["dmsetup", "status", "two"]] and kernel.requests == []
