"""Which device an import takes for a volume's own: the rules, with the device facts faked.

(The real loop devices are in tests/daemon/test_engine_import_identity.py and
tests/host/test_devidentity.py.)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import TracebackType

import pytest

from blockguard.engine import importing
from blockguard.errors import NotABlockDevice
from blockguard.storage.blockdev import DeviceIdentity
from blockguard.storage.devidentity import DeviceKey
from blockguard.storage.pool.records import VolumeRecord

SIZE = 64 << 20
LOOP_KEY = "loop:/srv/db.img#1234:1796229171.806269243@0"
OTHER_KEY = "loop:/srv/other.img#99:1796229172.118269257@0"


@dataclass
class Present:
    """A device node as the fakes show it."""

    major: int
    minor: int
    size: int
    key: DeviceKey


def record(**changes: object) -> VolumeRecord:
    base = VolumeRecord(
        name="db",
        device_path="/dev/x",
        major=7,
        minor=3,
        size=SIZE,
        serial=LOOP_KEY,
        chunk_size=65536,
        tracker_backend="scan",
    )
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
def devices(monkeypatch: pytest.MonkeyPatch) -> dict[str, Present]:
    """The device nodes there are, by path (empty: none)."""
    present: dict[str, Present] = {}

    class FakeBlockDevice:
        def __init__(self, path: str) -> None:
            if path not in present:
                raise NotABlockDevice(path, "it does not exist")
            p = present[path]
            self.identity = DeviceIdentity(p.major, p.minor, p.size)

        def __enter__(self) -> FakeBlockDevice:
            return self

        def __exit__(
            self, *exc: type[BaseException] | BaseException | TracebackType | None
        ) -> None:
            return None

    def key(path: str) -> DeviceKey:
        return present[path].key

    def find(stable: str) -> str | None:
        return next((p for p, d in present.items() if d.key.stable == stable), None)

    monkeypatch.setattr(importing, "BlockDevice", FakeBlockDevice)
    monkeypatch.setattr(importing, "device_key", key)
    monkeypatch.setattr(importing, "find_device", find)
    return present


def loop(stable: str | None, backing: str = "/srv/db.img") -> DeviceKey:
    return DeviceKey(stable, False, f"/dev/x, backed by {backing}")


def test_a_loop_device_is_its_backing_file_not_its_number(devices: dict[str, Present]) -> None:
    devices["/dev/x"] = Present(7, 3, SIZE, loop(OTHER_KEY, "/srv/other.img"))
    _, refusal = importing._own_device(record())
    assert refusal is not None and "/srv/other.img" in refusal and LOOP_KEY in refusal
    devices["/dev/x"] = Present(7, 3, SIZE, loop(LOOP_KEY))
    assert importing._own_device(record()) == (record(), None)


def test_the_backing_file_is_found_under_another_number(devices: dict[str, Present]) -> None:
    devices["/dev/x"] = Present(7, 3, SIZE, loop(OTHER_KEY))
    devices["/dev/y"] = Present(7, 9, SIZE, loop(LOOP_KEY))
    moved, refusal = importing._own_device(record())
    assert refusal is None and moved.device_path == "/dev/y"
    # Gone altogether: refused, naming the device that was looked at.
    del devices["/dev/y"], devices["/dev/x"]
    moved, refusal = importing._own_device(record())
    assert moved == record() and refusal is not None and "/dev/x" in refusal


def test_same_key_of_another_size_is_refused(devices: dict[str, Present]) -> None:
    devices["/dev/x"] = Present(7, 3, SIZE * 2, loop(LOOP_KEY))
    assert importing._device_refusal(record()) is not None


def test_an_old_record_matches_no_loop_dm_or_keyed_disk(devices: dict[str, Present]) -> None:
    old = record(serial=None)
    # The same number and size is all an old record can say: not enough for a loop device
    # (nor dm/md), nor for a disk that has a WWID/serial the record cannot be checked against.
    for key in (
        loop(LOOP_KEY),
        loop(None),
        DeviceKey(None, False, "/dev/x"),
        DeviceKey("wwid:naa.5000", True, "/dev/x"),
    ):
        devices["/dev/x"] = Present(7, 3, SIZE, key)
        refusal = importing._device_refusal(old)
        assert refusal is not None and "/dev/x" in refusal, key


def test_a_disk_with_no_identity_at_all_goes_by_its_number(devices: dict[str, Present]) -> None:
    plain_disk = DeviceKey(None, True, "/dev/x")
    devices["/dev/x"] = Present(7, 3, SIZE, plain_disk)
    assert importing._device_refusal(record(serial=None)) is None
    devices["/dev/x"] = Present(7, 4, SIZE, plain_disk)
    assert importing._device_refusal(record(serial=None)) is not None


def test_a_recorded_key_is_never_matched_by_number(devices: dict[str, Present]) -> None:
    # A dm device that got the number of the recorded one, with another UUID (or none).
    dm = record(serial="dm-uuid:LVM-aaaa")
    for key in (DeviceKey("dm-uuid:LVM-bbbb", False, "/dev/x"), DeviceKey(None, False, "/dev/x")):
        devices["/dev/x"] = Present(7, 3, SIZE, key)
        assert importing._device_refusal(dm) is not None, key
    devices["/dev/x"] = Present(7, 3, SIZE, DeviceKey("dm-uuid:LVM-aaaa", False, "/dev/x"))
    assert importing._device_refusal(dm) is None
