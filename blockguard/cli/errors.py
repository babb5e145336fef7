"""Explaining failures to the user: plain English from the cause chain, and an exit code.

Errors of the daemon arrive as named D-Bus errors (``org.blockguard1.Error.NotFound``);
their names map back to the classes of :mod:`blockguard.errors` and so to their
:class:`~blockguard.errors.ExitCode`. Errors of the bus itself (access denied, daemon not
running) and of the connection are explained here.
"""

from __future__ import annotations

from collections.abc import Iterator

from blockguard.cli.client import RemoteError
from blockguard.errors import BlockguardError, ExitCode, all_error_classes

_BY_DBUS_NAME = {cls.dbus_name: cls for cls in all_error_classes()}

#: Errors of the bus, not of blockguardd.
_BUS_ERRORS: dict[str, tuple[str, ExitCode]] = {
    "org.freedesktop.DBus.Error.AccessDenied": (
        "not authorized: only root or members of group blockguard may change anything "
        "(the bus refused the call)",
        ExitCode.PERMISSION,
    ),
    "org.freedesktop.DBus.Error.ServiceUnknown": (
        "blockguardd is not running (nobody owns org.blockguard1 on this bus)",
        ExitCode.ENVIRONMENT,
    ),
    "org.freedesktop.DBus.Error.NameHasNoOwner": (
        "blockguardd is not running (nobody owns org.blockguard1 on this bus)",
        ExitCode.ENVIRONMENT,
    ),
    "org.freedesktop.DBus.Error.UnknownObject": (
        "no such object: it does not exist (any more)",
        ExitCode.NOT_FOUND,
    ),
    "org.freedesktop.DBus.Error.NoReply": (
        "blockguardd did not answer in time",
        ExitCode.ENVIRONMENT,
    ),
}


class CliError(Exception):
    """A failure found by the CLI itself (bad combination of options, job timeout...)."""

    def __init__(self, message: str, exit_code: ExitCode = ExitCode.ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def explain(exc: BaseException) -> tuple[str, ExitCode]:
    """The sentence to show the user and the exit code, for any exception.

    The first link of the cause chain that is understood wins; an exception nobody
    understands is an internal error (with its type, never a traceback).
    """
    for link in _chain(exc):
        if isinstance(link, CliError):
            return link.message, link.exit_code
        if isinstance(link, RemoteError):
            cls = _BY_DBUS_NAME.get(link.name)
            if cls is not None:
                return link.message, cls.exit_code
            if link.name in _BUS_ERRORS:
                text, code = _BUS_ERRORS[link.name]
                return text, code
            return f"{link.message} ({link.name})", ExitCode.ERROR
        if isinstance(link, BlockguardError):
            return link.message, link.exit_code
        if isinstance(link, FileNotFoundError | ConnectionRefusedError):
            return (
                f"cannot reach the D-Bus bus ({link}); is dbus running, and is "
                "DBUS_SYSTEM_BUS_ADDRESS or --bus right?",
                ExitCode.ENVIRONMENT,
            )
        if isinstance(link, PermissionError):
            return f"permission denied: {link}", ExitCode.PERMISSION
        if isinstance(link, TimeoutError):
            return f"timed out: {link}", ExitCode.ENVIRONMENT
        if isinstance(link, KeyboardInterrupt):
            return "interrupted", ExitCode.INTERRUPTED
    return f"internal error in blockguardctl ({type(exc).__name__}: {exc})", ExitCode.INTERNAL


#: The next step to suggest after an error, by the last part of its D-Bus name.
_NEXT_STEPS: dict[str, str] = {
    "AccessDenied": "run it as root, or as a member of group blockguard",
    "NotAuthorized": "run it as root, or as a member of group blockguard",
    "ServiceUnknown": "start the daemon: systemctl start blockguard",
    "NameHasNoOwner": "start the daemon: systemctl start blockguard",
    "Busy": "blockguardctl jobs shows what runs, blockguardctl jobs wait ID waits for it",
    "PoolSpaceLow": "add a disk with blockguardctl pool extend POOL DEVICE, or keep fewer "
    "generations with blockguardctl objectives VOLUME --generations N",
    "InvalidObjectives": "blockguardctl objectives --help shows the forms (15m, every 4h, "
    "daily 02:30, changed 10GiB)",
    "VolumeDetached": "protect its device again with blockguardctl protect DEVICE NAME, or "
    "restore it onto another device with --target",
    "ChecksumMismatch": "restore an older generation (blockguardctl generations VOLUME "
    "lists them); the next backup of the volume is a full",
    "CorruptMetadata": "restore an older generation (blockguardctl generations VOLUME "
    "lists them); the next backup of the volume is a full",
    "Internal": "the daemon's log has the details: journalctl -u blockguard",
    "HostKeyUnconfirmed": "confirm the fingerprint on the target (ssh-keygen -lf on its host "
    "key), then run target add again with --host-key",
    "HostKeyMismatch": "another host answers at the target's address, or it was reinstalled: "
    "check the fingerprint on the target before trusting a new one (target add --host-key)",
    "TargetUnreachable": "check the target's address and that its sshd runs; blockguardctl "
    "target list shows the targets",
    "KeyTextInvalid": "compare the key with the exported copy character by character",
}

#: NotAuthorized from a target (its authorized_keys), not from the bus's policy.
_TARGET_REFUSED = "add the line above to the target's authorized_keys, then run target add again"


def next_step(exc: BaseException) -> str | None:
    """What to do next after ``exc``, when there is something better than reading the
    message again (a missing volume: list them; a busy one: wait for its job)."""
    for link in _chain(exc):
        if isinstance(link, RemoteError):
            short = link.name.rsplit(".", 1)[-1]
            if short == "NotAuthorized" and "authorized_keys" in link.message:
                return _TARGET_REFUSED
            if short == "NotAuthorized" and "master key" in link.message:
                return "run it as root"
            if short == "NotFound":
                if link.message.startswith("key file "):
                    return "the first blockguardctl target add makes the key"
                for what, listing in (
                    ("volume", "volume list"),
                    ("pool", "pool list"),
                    ("target", "target list"),
                ):
                    if link.message.startswith(f"{what} "):
                        return f"blockguardctl {listing} shows them"
                return None
            return _NEXT_STEPS.get(short)
        if isinstance(link, BlockguardError):
            return _NEXT_STEPS.get(link.dbus_name.rsplit(".", 1)[-1])
    return None
