"""The error tree: every class has a message, an exit code and a distinct D-Bus name."""

from __future__ import annotations

import re

from blockguard.errors import (
    BlockguardError,
    ChecksumMismatch,
    CommandFailed,
    ExitCode,
    InvalidChunkSize,
    NotABlockDevice,
    all_error_classes,
)

DBUS_NAME = re.compile(r"^org\.blockguard1\.Error\.[A-Z][A-Za-z]+$")


def test_every_class_has_unique_valid_dbus_name_and_exit_code() -> None:
    classes = all_error_classes()
    assert len(classes) > 15
    names = [c.dbus_name for c in classes]
    assert len(names) == len(set(names)), "two error classes share a D-Bus name"
    for cls in classes:
        assert DBUS_NAME.match(cls.dbus_name), cls
        assert isinstance(cls.exit_code, ExitCode)


def test_messages_name_the_bad_input() -> None:
    assert "12345" in str(InvalidChunkSize(chunk_size=12345))
    assert str(NotABlockDevice("/tmp/x", "it is a regular file")) == (
        "/tmp/x is not a block device (it is a regular file)"
    )
    assert str(ChecksumMismatch(generation="g7", chunk=42)) == (
        "checksum mismatch in generation g7 at chunk 42"
    )


def test_command_failed_uses_the_last_stderr_lines() -> None:
    err = CommandFailed(["dmsetup", "create", "x"], 1, "a\nwarning\ndevice-mapper: create failed\n")
    assert str(err) == (
        "dmsetup failed with exit code 1: a | warning | device-mapper: create failed"
    )
    assert err.exit_code == ExitCode.ENVIRONMENT


def test_missing_field_does_not_hide_the_error() -> None:
    class Odd(BlockguardError):
        template = "needs {thing}"
        dbus_name = "org.blockguard1.Error.OddForTest"

    assert "needs {thing}" in str(Odd())


def test_command_failed_keeps_the_line_that_names_the_problem_not_the_usage_hint() -> None:
    from blockguard.errors import CommandFailed

    stderr = (
        "  WARNING: something minor\n"
        "  Device /dev/vda excluded: device is rejected by filter config.\n"
        "  Run `vgcreate --help' for more information.\n"
    )
    err = CommandFailed(["/usr/sbin/lvm", "vgcreate", "vg", "/dev/vda"], 3, stderr)
    assert "Device /dev/vda excluded" in str(err)
    assert "--help" not in str(err)
    assert "(no error output)" in str(CommandFailed(["x"], 1, "\n  \n"))
