"""The admin audit trail: one journal entry for every call that may change something.

Which ``org.blockguard1.Manager`` methods change things is said once, here, in
:data:`MUTATING_METHODS`; every other method must be marked ``read_only`` on its
:func:`~blockguard.daemon.dbusutil.handler` (a unit test holds the two together, so a new
method is neither unaudited nor unauthorised by accident). The handler writes the entry
for every call it authorises, accepted or refused, whether or not the method is listed:
the list makes the set visible and testable, the handler makes it impossible to skip.

Each entry carries :data:`AUDIT_MESSAGE_ID` and the fields of :data:`AUDIT_FIELDS`:
``journalctl MESSAGE_ID=1b4b11b10a0b48e7895fcdb47ab48d20`` lists every admin action.
Arguments are summarised (long values cut, secret-looking keys and URL passwords
withheld): the trail says what was asked, never a credential.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)

#: Stable journal MESSAGE_ID of audit entries. Never change it: monitoring matches on it.
AUDIT_MESSAGE_ID = "1b4b11b10a0b48e7895fcdb47ab48d20"

#: Every Manager method that changes something (each is authorised and audited).
MUTATING_METHODS: frozenset[str] = frozenset(
    {
        "CreatePool",
        "ExtendPool",
        "RemovePool",
        "ImportPool",
        "Protect",
        "Unprotect",
        "SetObjectives",
        "BackupNow",
        "BackupNowWithOptions",
        "Restore",
        "CancelJob",
        "ReleaseSwapIn",
        "Verify",
        # Mount and unmount a generation's file system (loop and FUSE devices).
        "Mount",
        "Unmount",
        "Drill",
        "DrillVolume",
        "AddTarget",
        "RemoveTarget",
        "TransferNow",
        "RestoreFromTarget",
        # Records what the target holds in the catalog.
        "ImportTarget",
        # Deletes unreferenced packs from an object store.
        "CollectTarget",
        # Changes nothing, but hands out the master key: root only, and in the trail.
        "ExportKey",
        # Makes this host's ssh key on first use.
        "ClientKey",
        "CreateFileGroup",
        "RemoveFileGroup",
        # Serves a generation (a loop device, its chain held) for the caller to write
        # files into a directory it names; and releases it.
        "RestoreFiles",
        "FinishRestoreFiles",
    }
)

#: The journal fields of an audit entry besides MESSAGE_ID (and JOB when a job started).
AUDIT_FIELDS = (
    "AUDIT_METHOD",
    "AUDIT_UID",
    "AUDIT_PID",
    "AUDIT_OUTCOME",
    "AUDIT_ERROR",
    "AUDIT_ARGS",
)

ACCEPTED = "accepted"
REFUSED = "refused"

_JOB_PATH = re.compile(r"^/org/blockguard1/job/(\d+)$")
# Keys whose values never reach the log (credentials of remote pools and the like).
_SECRET_KEY = re.compile(r"secret|passw|token|credential|private|key$|^key", re.IGNORECASE)
_MAX_VALUE = 120
_MAX_ITEMS = 8
WITHHELD = "<withheld>"


@dataclass(frozen=True)
class CallerId:
    """Who made a call, as the bus says (unknown parts are None)."""

    uid: int | None = None
    pid: int | None = None


def _cut(text: str) -> str:
    return text if len(text) <= _MAX_VALUE else text[: _MAX_VALUE - 1] + "…"


def _plain_url(text: str) -> str:
    """``text`` with the password of a URL (``scheme://user:pw@host``) withheld."""
    if "://" not in text or "@" not in text:
        return text
    try:
        parts = urlsplit(text)
    except ValueError:
        return WITHHELD
    if parts.password is None:
        return text
    netloc = f"{parts.username}:{WITHHELD}@{parts.hostname or ''}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def summarise(value: Any, depth: int = 0) -> str:
    """One short line for an argument value: strings as they are (cut, URL passwords
    withheld), lists and mappings shortened, the values of secret-looking keys withheld."""
    value = getattr(value, "value", value)  # a dbus-fast Variant
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _cut(_plain_url(value))
    if isinstance(value, Mapping):
        if depth > 2:
            return "{…}"
        items = [
            f"{k}={WITHHELD if _SECRET_KEY.search(str(k)) else summarise(v, depth + 1)}"
            for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))
        ]
        return _cut(
            "{" + ",".join(items[:_MAX_ITEMS]) + (",…" if len(items) > _MAX_ITEMS else "") + "}"
        )
    if isinstance(value, Sequence):
        if depth > 2:
            return "[…]"
        items = [summarise(v, depth + 1) for v in value]
        more = f",…+{len(items) - _MAX_ITEMS}" if len(items) > _MAX_ITEMS else ""
        return _cut("[" + ",".join(items[:_MAX_ITEMS]) + more + "]")
    return _cut(str(value))


def summarise_arguments(names: Sequence[str], values: Sequence[Any]) -> str:
    """``name=value`` pairs of a call's arguments, for the ``AUDIT_ARGS`` field."""
    return " ".join(
        f"{name}={WITHHELD if _SECRET_KEY.search(name) else summarise(value)}"
        for name, value in zip(names, values, strict=False)
    )


def job_of(result: Any) -> int | None:
    """The job id when a method's result is a job's object path."""
    if isinstance(result, str) and (match := _JOB_PATH.match(result)):
        return int(match.group(1))
    return None


def record(
    method: str,
    caller: CallerId,
    arguments: str,
    outcome: str,
    error: str = "",
    result: Any = None,
) -> None:
    """Write the audit entry of one call.

    :param method: the D-Bus method name.
    :param caller: who called (uid None: the bus could not say).
    :param arguments: :func:`summarise_arguments` of the call.
    :param outcome: :data:`ACCEPTED` (the method ran and returned) or :data:`REFUSED`.
    :param error: the D-Bus error name of a refused call.
    :param result: what the method returned (a job path names the job it started).
    """
    who = "an unidentified caller" if caller.uid is None else f"uid {caller.uid}"
    if caller.pid is not None:
        who += f" (pid {caller.pid})"
    fields: dict[str, Any] = {
        "MESSAGE_ID": AUDIT_MESSAGE_ID,
        "AUDIT_METHOD": method,
        "AUDIT_UID": "" if caller.uid is None else str(caller.uid),
        "AUDIT_OUTCOME": outcome,
        "AUDIT_ARGS": arguments,
    }
    if caller.pid is not None:
        fields["AUDIT_PID"] = str(caller.pid)
    text = f"audit: {method} by {who}: {outcome}"
    if error:
        fields["AUDIT_ERROR"] = error
        text += f" ({error})"
    job = job_of(result)
    if job is not None:
        fields["JOB"] = job
        text += f", job {job}"
    log.log(logging.INFO if outcome == ACCEPTED else logging.WARNING, "%s", text, extra=fields)
