"""The one error tree of blockguard.

Every error a user can see is a :class:`BlockguardError` subclass. Each class carries
its user-facing message (``template``, formatted with the keyword fields given at raise
time), the CLI exit code and the D-Bus error name. The D-Bus layer and the CLI translate
these mechanically; anything that is not a ``BlockguardError`` is an internal error and
is reported as :class:`InternalError`, never as a traceback.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any, ClassVar

DBUS_PREFIX = "org.blockguard1.Error"


class ExitCode(enum.IntEnum):
    """Exit codes of ``blockguardctl`` and ``blockguardd`` (documented in the README)."""

    OK = 0
    ERROR = 1
    USAGE = 2
    NOT_FOUND = 3
    BUSY = 4
    PERMISSION = 5
    DATA = 6
    ENVIRONMENT = 7
    INTERNAL = 70
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT): the CLI stopped waiting; the job goes on


class BlockguardError(Exception):
    """Base of all errors blockguard reports to a user."""

    template: ClassVar[str] = "{detail}"
    exit_code: ClassVar[ExitCode] = ExitCode.ERROR
    dbus_name: ClassVar[str] = f"{DBUS_PREFIX}.Failed"

    def __init__(self, **fields: Any) -> None:
        self.fields = fields
        try:
            message = self.template.format(**fields)
        except (KeyError, IndexError) as missing:
            # A programming error in a raise site must not hide the original problem.
            message = f"{self.template} (fields: {fields!r}; missing {missing})"
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:
        return self.message


# --- bad input ------------------------------------------------------------------


class InvalidInput(BlockguardError):
    """Something the caller gave is not acceptable."""

    template = "invalid input: {detail}"
    exit_code = ExitCode.USAGE
    dbus_name = f"{DBUS_PREFIX}.InvalidInput"


class InvalidConfig(InvalidInput):
    """The daemon's configuration file (or an environment variable over it) is unusable."""

    template = "configuration {source}: {detail}"
    dbus_name = f"{DBUS_PREFIX}.InvalidConfig"


class InvalidObjectives(InvalidInput):
    template = "invalid recovery objectives: {detail}"
    dbus_name = f"{DBUS_PREFIX}.InvalidObjectives"


class InvalidChunkSize(InvalidInput):
    template = (
        "chunk size {chunk_size} is not allowed: it must be a power of two between 4 KiB and 16 MiB"
    )
    dbus_name = f"{DBUS_PREFIX}.InvalidChunkSize"


class NotABlockDevice(InvalidInput):
    template = "{path} is not a block device{why}"
    dbus_name = f"{DBUS_PREFIX}.NotABlockDevice"

    def __init__(self, path: str, why: str = "") -> None:
        super().__init__(path=path, why=f" ({why})" if why else "")


class DeviceInUse(InvalidInput):
    template = "{path} is in use: {reason}"
    exit_code = ExitCode.BUSY
    dbus_name = f"{DBUS_PREFIX}.DeviceInUse"


class ProtectedDevice(DeviceInUse):
    """A device whose family (partitions, disk, stack, loops) holds a protected volume."""

    template = (
        "{path} cannot be used as {purpose}: it {relation} {device}, "
        "the device of protected volume {volume}"
    )
    dbus_name = f"{DBUS_PREFIX}.ProtectedDevice"


class PoolDiskRefused(DeviceInUse):
    """A device whose family holds a disk of a pool in the catalog."""

    template = "{path} cannot be used as {purpose}: it {relation} {device}, a disk of pool {pool}"
    dbus_name = f"{DBUS_PREFIX}.PoolDisk"


class ForeignPool(DeviceInUse):
    """A device whose family holds a blockguard pool label this catalog does not know."""

    template = (
        "{path} cannot be used as {purpose}: it {relation} {device}, which holds the "
        "blockguard pool {pool}; to use that pool here, run 'blockguardctl pool import {device}'"
    )
    dbus_name = f"{DBUS_PREFIX}.PoolLabel"


class DeviceTooSmall(InvalidInput):
    template = "{path} is too small: {size} bytes, at least {needed} bytes needed"
    dbus_name = f"{DBUS_PREFIX}.DeviceTooSmall"


class DeviceReadOnly(InvalidInput):
    template = "{path} is read-only"
    dbus_name = f"{DBUS_PREFIX}.DeviceReadOnly"


class NotAPool(InvalidInput):
    """The disks given to ``pool import`` do not hold (one whole) blockguard pool."""

    template = "{path} does not hold a blockguard pool: {detail}"
    dbus_name = f"{DBUS_PREFIX}.NotAPool"


class AlreadyExists(InvalidInput):
    template = "{what} {name} already exists"
    dbus_name = f"{DBUS_PREFIX}.AlreadyExists"


# --- lookups ----------------------------------------------------------------------


class NotFound(BlockguardError):
    """:param hint: what there is instead, or how to find it (optional)."""

    template = "{what} {name} does not exist{hint}"
    exit_code = ExitCode.NOT_FOUND
    dbus_name = f"{DBUS_PREFIX}.NotFound"

    def __init__(self, **fields: Any) -> None:
        hint = fields.pop("hint", "")
        super().__init__(**fields, hint=f" ({hint})" if hint else "")


class AmbiguousGeneration(InvalidInput):
    template = (
        "generation {name} is ambiguous: it could be {candidates}; give more of the id, "
        "or its number"
    )
    dbus_name = f"{DBUS_PREFIX}.AmbiguousGeneration"


# --- state and permission ---------------------------------------------------------


class JobCancelled(BlockguardError):
    template = "job {job} was cancelled on request{consequence}"
    dbus_name = f"{DBUS_PREFIX}.Cancelled"


class Busy(BlockguardError):
    template = "{what} is busy: {reason}"
    exit_code = ExitCode.BUSY
    dbus_name = f"{DBUS_PREFIX}.Busy"


class MetadataSnapshotBusy(Busy):
    """Another process holds a thin pool's one metadata snapshot (thin_ls, thin_check, a
    second backup tool): blockguard waited for it and gave up. Change tracking is intact;
    the backup is postponed, and the next one is incremental as planned."""

    template = (
        "the metadata snapshot of thin pool {pool} is held by another process"
        "{waited}; change tracking is intact, try again later"
    )
    dbus_name = f"{DBUS_PREFIX}.MetadataSnapshotBusy"


class VolumeDetached(BlockguardError):
    """The volume has no device or tracker (its generations are kept and restorable)."""

    template = "volume {volume} is detached: {detail}"
    exit_code = ExitCode.BUSY
    dbus_name = f"{DBUS_PREFIX}.VolumeDetached"


class NotAuthorized(BlockguardError):
    template = "not authorized: {detail}"
    exit_code = ExitCode.PERMISSION
    dbus_name = f"{DBUS_PREFIX}.NotAuthorized"


class TrackingLost(BlockguardError):
    template = "change tracking of {volume} is not exact: {reason}"
    exit_code = ExitCode.DATA
    dbus_name = f"{DBUS_PREFIX}.TrackingLost"


class PoolSpaceLow(BlockguardError):
    """The pool cannot hold what is asked of it.

    Raised before a write when the shortfall is known (``needed`` given), and by the I/O
    edge when the file system of the pool said ENOSPC/EDQUOT in the middle of a write
    (``needed`` unknown: then ``path``, the file being written, is named instead).
    """

    template = "pool {pool} has {free} bytes free, {needed} bytes needed"
    exit_code = ExitCode.ENVIRONMENT
    dbus_name = f"{DBUS_PREFIX}.PoolSpaceLow"

    def __init__(self, **fields: Any) -> None:
        if fields.get("needed") is None:
            # Shadows the class template for this instance only: a full file system
            # does not say how much more it would have needed.
            self.template = "pool {pool} ran out of space writing {path} ({free} bytes free)"
            fields.setdefault("path", "its data")
        elif fields.get("resource"):
            # The thin pool's data or metadata lacks, whatever the pool's total free.
            self.template = (
                "pool {pool}: its thin pool's {resource} has {free} bytes free, "
                "{needed} bytes needed"
            )
        super().__init__(**fields)


class SnapshotOverflow(BlockguardError):
    template = "point-in-time snapshot of {volume} filled up; the backup was aborted"
    exit_code = ExitCode.ENVIRONMENT
    dbus_name = f"{DBUS_PREFIX}.SnapshotOverflow"


# --- data integrity ---------------------------------------------------------------


class DataError(BlockguardError):
    template = "data error: {detail}"
    exit_code = ExitCode.DATA
    dbus_name = f"{DBUS_PREFIX}.DataError"


class ChecksumMismatch(DataError):
    template = "checksum mismatch in generation {generation} at chunk {chunk}"
    dbus_name = f"{DBUS_PREFIX}.ChecksumMismatch"


class GenerationUnreadable(DataError):
    """A generation served to a client (``restore-files``) failed a read: its image
    answers EIO for a chunk that does not match its stored checksum (or that its pool
    could not read); the daemon's log names the chunk. Nothing garbled is written."""

    template = (
        "generation {generation} could not be read at byte {offset} of the volume "
        "(for {path}): {reason}; a stored chunk is damaged or its pool disk failed "
        "(the daemon's log names the chunk)"
    )
    dbus_name = f"{DBUS_PREFIX}.GenerationUnreadable"


class DrillMismatch(DataError):
    """A restore drill read back bytes that differ from what the generation stores (the
    stored chunk was read and checked whole: the restore path wrote it wrong)."""

    template = (
        "the restore drill of {volume} restored chunk {chunk} of generation {generation} "
        "wrong: the bytes read back from {device} do not match its stored checksum"
    )
    dbus_name = f"{DBUS_PREFIX}.DrillMismatch"


class CorruptMetadata(DataError):
    template = "{what} is corrupt: {detail}"
    dbus_name = f"{DBUS_PREFIX}.CorruptMetadata"


class TamperedData(DataError):
    """Sealed data (a manifest or a record a target stores) failed its authentication
    check: it was changed where it is stored, or sealed with another key. Nothing of it
    is used."""

    template = "sealed {what} failed its authentication check: {reason}"
    dbus_name = f"{DBUS_PREFIX}.TamperedData"


class TamperedPack(TamperedData):
    """A sealed pack failed its authentication check (a flipped byte, a pack moved to
    another number, generation or volume, a replayed one, another key): nothing of it is
    used, and the generation is to be marked damaged."""

    template = (
        "pack {pack} of generation {generation} failed its authentication check: {reason}; "
        "it was changed, moved or replaced where it is stored, or sealed with another key"
    )
    dbus_name = f"{DBUS_PREFIX}.TamperedPack"


class UnknownSealFormat(DataError):
    """Sealed data in a format this blockguard does not read (not sealed data at all, or
    written by a newer version with a new format, cipher or compression)."""

    template = "{what} is not in a sealed format this blockguard reads: {reason}"
    dbus_name = f"{DBUS_PREFIX}.UnknownSealFormat"


# --- environment: commands and devices --------------------------------------------


class EnvironmentProblem(BlockguardError):
    template = "{detail}"
    exit_code = ExitCode.ENVIRONMENT
    dbus_name = f"{DBUS_PREFIX}.Environment"


class CommandNotFound(EnvironmentProblem):
    template = "required program {program} was not found (looked for {path})"
    dbus_name = f"{DBUS_PREFIX}.CommandNotFound"


class CommandFailed(EnvironmentProblem):
    """An external command exited non-zero."""

    template = "{program} failed with exit code {returncode}: {stderr_tail}"
    dbus_name = f"{DBUS_PREFIX}.CommandFailed"

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        tail = stderr_tail(stderr) or "(no error output)"
        super().__init__(program=argv[0], returncode=returncode, stderr_tail=tail)


def stderr_tail(stderr: str, lines: int = 3) -> str:
    """The last lines of a command's error output that say something, joined by " | ".

    Usage hints ("Run `vgcreate --help' for more information.") are dropped: lvm prints one
    after the line that names the real problem, which a last-line tail would lose.
    """
    kept = [
        line.strip()
        for line in stderr.splitlines()
        if line.strip() and not (line.strip().startswith("Run `") and "--help" in line)
    ]
    return " | ".join(kept[-lines:])


class DeviceIOError(EnvironmentProblem):
    """The kernel reported an I/O error (EIO and the like) on a device or a pool file.

    Exit code ENVIRONMENT, not DATA: the device (or its transport) failed; nothing says
    that data blockguard stored is wrong (checksums, which catch that, are DATA errors).
    The admin's next step is the device's health, not a verify.
    """

    template = "I/O error on {path} at offset {offset} while {op}: {reason}"
    dbus_name = f"{DBUS_PREFIX}.DeviceIO"


class DeviceVanished(EnvironmentProblem):
    """The device went away (ENODEV/ENXIO) while blockguard was using it."""

    template = "{path} disappeared while {op} at offset {offset}: {reason}"
    dbus_name = f"{DBUS_PREFIX}.DeviceVanished"


class CommandTimeout(EnvironmentProblem):
    template = "{program} did not finish within {timeout} s and was killed"
    dbus_name = f"{DBUS_PREFIX}.CommandTimeout"

    def __init__(self, argv: Sequence[str], timeout: float, stderr: str = "") -> None:
        self.argv = list(argv)
        self.timeout = timeout
        self.stderr = stderr
        super().__init__(program=argv[0], timeout=timeout)


class CatalogLost(EnvironmentProblem):
    """The catalog is empty although the state directory was used before."""

    template = (
        "the catalog {path} is empty but {evidence}: the backups are still on the pool "
        "disks. Start the daemon once with --allow-empty-catalog (or "
        "BLOCKGUARD_ALLOW_EMPTY_CATALOG=1), then import each pool: {hint}"
    )
    dbus_name = f"{DBUS_PREFIX}.CatalogLost"


class KeyFileRefused(EnvironmentProblem):
    """The remote master key file is unusable as it is (its size, its permissions, its
    owner, its kind): refused before any of it is used, and never replaced."""

    template = "key file {path} refused: {reason}"
    dbus_name = f"{DBUS_PREFIX}.KeyFileRefused"


class KeyTextInvalid(InvalidInput):
    """An exported key typed or pasted back (``target add --key``) does not parse; the
    reason names what is wrong (prefix, length, a character, the checksum)."""

    template = "the key text is not a valid blockguard key: {reason}"
    dbus_name = f"{DBUS_PREFIX}.KeyTextInvalid"


# --- the remote protocol (a backup target over SSH) ---------------------------------


class WireError(EnvironmentProblem):
    """The connection to a backup target (on the target: to its client) failed.

    Environment, not data: the link or the peer failed, nothing stored is wrong. A transfer
    that meets one commits nothing half, and the next run resumes it.
    """

    template = "connection to {peer}: {detail}"
    dbus_name = f"{DBUS_PREFIX}.Wire"


class WireVersionMismatch(WireError):
    """The two sides share no protocol version (each names the other's in its error)."""

    template = (
        "{peer} speaks blockguard protocol version {theirs}, this side speaks {ours}: "
        "install the same blockguard version on both hosts"
    )
    dbus_name = f"{DBUS_PREFIX}.WireVersionMismatch"


class WireCorrupt(WireError):
    """A frame failed its checksum or is malformed: bytes on the channel that are not a
    frame of ours (a login banner, a stray print on the target), or a bug."""

    template = "connection to {peer}: corrupt frame: {detail}"
    dbus_name = f"{DBUS_PREFIX}.WireCorrupt"


class WireFrameTooLarge(WireError):
    """A frame announced more bytes than the channel takes; refused before reading them."""

    template = "connection to {peer}: refused a frame of {length} bytes (at most {limit})"
    dbus_name = f"{DBUS_PREFIX}.WireFrameTooLarge"


class WireClosed(WireError):
    """The peer went away (ssh ended, the link was cut, the target daemon was killed)."""

    template = "connection to {peer} ended {where}"
    dbus_name = f"{DBUS_PREFIX}.WireClosed"


class WireTruncated(WireClosed):
    """The stream ended inside a frame: the half frame is dropped, never used."""

    template = (
        "connection to {peer} ended in the middle of a frame "
        "({got} of the {wanted} bytes of its {part})"
    )
    dbus_name = f"{DBUS_PREFIX}.WireTruncated"


class TargetUnreachable(WireError):
    """ssh could not reach the target's sshd, or a connection to an object store's
    endpoint failed (refused, timed out, no route, no such name): the link or the target
    host is down; nothing was committed, a later run retries."""

    template = "cannot reach target {target} at {address}: {reason}"
    dbus_name = f"{DBUS_PREFIX}.TargetUnreachable"


class StoreFailed(WireError):
    """An object store answered, but with a server fault (a 5xx, a volume server down, a
    bucket it made read-only): nothing is committed by the failed request, a later run
    retries it."""

    template = "object store {target} failed while {op} {key}: {detail}"
    dbus_name = f"{DBUS_PREFIX}.StoreFailed"


class LeaseLost(EnvironmentProblem):
    """A writer into an object store went longer than its lease timeout without renewing
    its lease (the store unreachable, the process paused): a garbage collection may have
    taken the chunks it reused, so it commits nothing; the next run stores them again."""

    template = (
        "object store {target}: the writer's lease {lease} was not renewed for {gap:.0f}s "
        "(its timeout is {timeout:.0f}s); nothing was committed, the next run retries"
    )
    dbus_name = f"{DBUS_PREFIX}.LeaseLost"


class CredentialsFileRefused(KeyFileRefused):
    """An object store's credentials file that others could read, or that is not one."""

    template = "credentials file {path} refused: {reason}"
    dbus_name = f"{DBUS_PREFIX}.CredentialsFileRefused"


class HostKeyMismatch(BlockguardError):
    """The target's host key is not the one pinned for it: another host answers at its
    address (or it was reinstalled). Nothing is sent until an administrator confirms the
    new key's fingerprint; never retried by itself."""

    template = (
        "the host key of target {target} does not match the key pinned in {known_hosts}: {detail}"
    )
    exit_code = ExitCode.PERMISSION
    dbus_name = f"{DBUS_PREFIX}.HostKeyMismatch"


class HostKeyUnconfirmed(InvalidInput):
    """A target is added without a confirmed host key: its sshd was asked which keys it
    has, and the administrator must compare a fingerprint with the target's own
    (``ssh-keygen -lf``) and give it back: never trusted on first use."""

    template = (
        "the host key of target {target} at {address} is not confirmed: it offers {offered}; "
        "compare with `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` on the target, then "
        "add it again with --host-key {fingerprint}"
    )
    dbus_name = f"{DBUS_PREFIX}.HostKeyUnconfirmed"


# --- everything else ---------------------------------------------------------------


class InternalError(BlockguardError):
    template = "internal error ({detail}); see the daemon log for details"
    exit_code = ExitCode.INTERNAL
    dbus_name = f"{DBUS_PREFIX}.Internal"


def all_error_classes() -> list[type[BlockguardError]]:
    """Every class of the tree, the base included (for tests and the D-Bus contract)."""
    seen: list[type[BlockguardError]] = []
    todo: list[type[BlockguardError]] = [BlockguardError]
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo.extend(cls.__subclasses__())
    return seen
