"""The I/O edge: every errno of device or pool I/O becomes a named error, never an OSError."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from blockguard.errors import (
    BlockguardError,
    DeviceInUse,
    DeviceIOError,
    DeviceReadOnly,
    DeviceVanished,
    ExitCode,
    PoolSpaceLow,
)
from blockguard.storage.ioedge import io_edge, map_oserror
from blockguard.storage.pool.dirgen import PoolFile


def oserror(code: int) -> OSError:
    return OSError(code, os.strerror(code))


@pytest.mark.parametrize(
    ("code", "pool", "error", "exit_code"),
    [
        (errno.EIO, None, DeviceIOError, ExitCode.ENVIRONMENT),
        (errno.EIO, "p", DeviceIOError, ExitCode.ENVIRONMENT),
        (errno.EREMOTEIO, None, DeviceIOError, ExitCode.ENVIRONMENT),
        (errno.ENOSPC, "p", PoolSpaceLow, ExitCode.ENVIRONMENT),
        (errno.EDQUOT, "p", PoolSpaceLow, ExitCode.ENVIRONMENT),
        # A write past the end of a block device also says ENOSPC: no pool, no PoolSpaceLow.
        (errno.ENOSPC, None, DeviceIOError, ExitCode.ENVIRONMENT),
        (errno.EROFS, None, DeviceReadOnly, ExitCode.USAGE),
        (errno.EBUSY, None, DeviceInUse, ExitCode.BUSY),
        (errno.ENODEV, None, DeviceVanished, ExitCode.ENVIRONMENT),
        (errno.ENXIO, "p", DeviceVanished, ExitCode.ENVIRONMENT),
    ],
)
def test_errno_maps_to_named_error(
    code: int, pool: str | None, error: type[BlockguardError], exit_code: ExitCode
) -> None:
    got = map_oserror(oserror(code), path="/dev/sdz", op="writing", offset=4096, pool=pool)
    assert type(got) is error
    assert got.exit_code == exit_code
    assert "/dev/sdz" in str(got)


def test_device_io_error_names_device_offset_and_dbus_name() -> None:
    got = map_oserror(oserror(errno.EIO), path="/dev/sdz", op="reading", offset=1 << 30)
    assert str(got) == (
        "I/O error on /dev/sdz at offset 1073741824 while reading: Input/output error (errno 5)"
    )
    assert got.dbus_name == "org.blockguard1.Error.DeviceIO"


def test_pool_space_low_from_enospc_names_pool_and_file(tmp_path: Path) -> None:
    got = map_oserror(
        oserror(errno.ENOSPC), path=tmp_path / "gen" / "image", op="writing", pool="p1"
    )
    assert isinstance(got, PoolSpaceLow)
    assert str(got).startswith(f"pool p1 ran out of space writing {tmp_path}/gen/image (")
    # The free space of the file system is looked up from the nearest existing directory.
    assert "? bytes" not in str(got)
    # The template that names the shortfall is still the one used when it is known.
    assert (
        str(PoolSpaceLow(pool="p1", free=1, needed=2)) == "pool p1 has 1 bytes free, 2 bytes needed"
    )


def test_io_edge_raises_named_error_and_keeps_the_cause() -> None:
    edge = io_edge("/dev/x", "flushing", offset=7)
    with pytest.raises(DeviceIOError, match="offset 7 while flushing") as err, edge:
        raise oserror(errno.EIO)
    assert isinstance(err.value.__cause__, OSError)
    # Not an OSError itself: nothing upstream may treat it as an unexpected one.
    assert not isinstance(err.value, OSError)


def test_io_edge_lets_other_errors_through() -> None:
    with pytest.raises(ValueError, match="not I/O"), io_edge("/dev/x", "reading"):
        raise ValueError("not I/O")


def test_pool_file_io_goes_through_the_edge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "image"
    path.write_bytes(bytes(8192))
    f = PoolFile(path, write=True, pool="p2")
    try:

        def failing(*_: object) -> int:
            raise oserror(errno.EIO)

        monkeypatch.setattr(os, "preadv", failing)
        monkeypatch.setattr(os, "pwritev", failing)
        buf = memoryview(bytearray(4096))
        with pytest.raises(DeviceIOError, match=f"{path} at offset 4096 while reading"):
            f.pread_into(buf, 4096)
        with pytest.raises(DeviceIOError, match=f"{path} at offset 0 while writing"):
            f.pwrite_all(buf, 0)
        monkeypatch.setattr(
            os, "posix_fallocate", lambda *_: (_ for _ in ()).throw(oserror(errno.ENOSPC))
        )
        with pytest.raises(PoolSpaceLow, match="pool p2 ran out of space"):
            f.allocate(1 << 20)
    finally:
        f.close()


def test_pool_file_open_failure_is_named(tmp_path: Path) -> None:
    with pytest.raises(DeviceIOError, match="while opening"):
        PoolFile(tmp_path / "missing", pool="p3")
