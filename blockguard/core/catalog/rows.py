"""The catalog's row types and the checks every value passes before it is stored."""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass
from typing import Any

from blockguard.errors import CorruptMetadata, InvalidChunkSize, InvalidInput

TRACKER_STATES = ("exact", "unknown")
POOL_STATES = ("ok", "degraded", "missing")
POOL_DEVICE_STATES = ("ok", "missing", "failed")
PERF_KINDS = ("pool", "volume")
PERF_SOURCES = ("probe", "live")
JOB_KINDS = ("backup", "restore", "verify", "probe", "drill", "target", "transfer")
TARGET_STATES = ("ok", "unreachable", "refused")
PATH_SAMPLE_SOURCES = ("restore", "drill")
JOB_STATES = ("queued", "running", "done", "failed", "cancelled")
JOB_FINAL_STATES = ("done", "failed", "cancelled")

MIN_CHUNK_SIZE = 4096
MAX_CHUNK_SIZE = 16 * 1024 * 1024
MAX_NAME_LENGTH = 255


@dataclass(frozen=True)
class DeviceIdentity:
    """What a block device is, as opposed to where it currently appears.

    :param serial: a stable identifier when one is known: the disk serial or WWN, or a
        dm UUID for device-mapper volumes; for a protected volume, the key of
        ``storage.devidentity`` (a loop device's backing file, inode and offset)
    """

    major: int | None
    minor: int | None
    size: int
    serial: str | None = None

    @property
    def key(self) -> str:
        """A stable key for the performance table: the serial, else devno and size."""
        if self.serial:
            return f"serial:{self.serial}"
        return f"devno:{self.major}:{self.minor}:{self.size}"


@dataclass(frozen=True)
class Group:
    name: str
    objectives: dict[str, Any]
    created: float


@dataclass(frozen=True)
class Volume:
    name: str
    device_path: str
    identity: DeviceIdentity
    chunk_size: int
    tracker_backend: str
    tracker_state: str
    tracker_reason: str
    objectives: dict[str, Any]
    group: str | None
    pool: str | None
    created: float


@dataclass(frozen=True)
class Pool:
    name: str
    backend: str
    #: The volume group (lvm) or the directory (dir) that holds the data.
    location: str
    state: str
    state_reason: str
    created: float


@dataclass(frozen=True)
class PoolDevice:
    pool: str
    device_path: str
    identity: DeviceIdentity
    #: Bytes usable for backup data (the device size less the backend's metadata).
    capacity: int
    state: str
    added: float


@dataclass(frozen=True)
class PerfEntry:
    """One line of the performance table; throughputs in bytes per second.

    ``rand_*`` are measured at ``chunk_size``; ``None`` means not measured.
    """

    device_key: str
    kind: str
    measured_at: float
    source: str
    device_path: str | None = None
    capacity: int | None = None
    rotational: bool | None = None
    transport: str | None = None
    layout: str | None = None
    seq_read: float | None = None
    seq_write: float | None = None
    rand_read: float | None = None
    rand_write: float | None = None
    chunk_size: int | None = None


@dataclass(frozen=True)
class Target:
    """A registered backup target: another host's blockguard reached over ssh, or a
    bucket of an S3-compatible object store (``kind``).

    :param client_id: the id this host has on the target (its forced command's ``--client``)
    :param pool: the pool (area) on the target this host stores into
    :param host_key: the pinned host key's fingerprint, ``SHA256:...``
    :param round_trip: the link's measured round trip in seconds (its throughputs are in
        the performance table under :func:`link_perf_key`)
    :param space_free: the target's last reported free bytes (``space_*`` and
        ``checked_at`` are ``None`` until it was asked)
    """

    id: str
    url: str
    client_id: str
    pool: str
    host_key: str
    state: str
    state_reason: str
    round_trip: float | None
    space_free: int | None
    space_total: int | None
    space_used: int | None
    checked_at: float | None
    added: float
    #: ``ssh`` (issue 11) or ``s3`` (issue 12: ``url`` is ``s3://BUCKET/PREFIX``, no pool
    #: or host key; ``credentials`` the credentials file's path, "" for the environment)
    kind: str = "ssh"
    endpoint: str = ""
    credentials: str = ""


#: The kinds of backup target.
TARGET_KINDS = ("ssh", "s3")


def link_perf_key(target: str) -> str:
    """The performance table key of the link to ``target`` (a pool-kind row: reads are
    what comes down from the target, writes what goes up)."""
    return f"target:{target}:link"


def area_perf_key(target: str, area: str) -> str:
    """The performance table key of an area of ``target`` as seen from this host (a
    pool-kind row: each figure the slower of the area's own and the link's)."""
    return f"target:{target}:area:{area}"


def area_of_perf_key(target: str, device_key: str) -> str | None:
    """The area named by an :func:`area_perf_key` of ``target``, else ``None``."""
    prefix = area_perf_key(target, "")
    return device_key[len(prefix) :] if device_key.startswith(prefix) else None


@dataclass(frozen=True)
class Generation:
    id: str
    volume: str
    pool: str
    kind: str
    #: The full this generation builds on (``None`` for a full).
    base: str | None
    #: The generation immediately before in the restore chain.
    parent: str | None
    created: float
    bytes_stored: int
    chunks: int
    state: str
    committed_at: float | None
    #: Where the data is on the pool, in the pool backend's own terms.
    location: dict[str, Any]
    manifest_checksum: str | None

    @property
    def committed(self) -> bool:
        return self.state == "committed"


@dataclass(frozen=True)
class RemoteGenerationRow:
    """A generation committed on a backup target: a copy of the local generation of the
    same id (:attr:`generation`), sent as :attr:`kind` there."""

    target: str
    volume: str
    generation: str
    kind: str
    base: str | None
    parent: str | None
    created: float
    volume_size: int
    bytes_stored: int
    extents: int | None
    sent_at: float
    seconds: float | None


@dataclass(frozen=True)
class Job:
    id: str
    kind: str
    volume: str | None
    pool: str | None
    generation: str | None
    state: str
    progress: float
    bytes_done: int
    bytes_total: int | None
    created: float
    started: float | None
    finished: float | None
    error: str | None
    result: dict[str, Any] | None

    @property
    def finished_state(self) -> bool:
        return self.state in JOB_FINAL_STATES


@dataclass(frozen=True)
class JobEvent:
    seq: int
    job: str
    at: float
    state: str
    message: str


@dataclass(frozen=True)
class RestoreRecord:
    """A real restore, measured: what the restore-time model learns from."""

    seq: int
    volume: str
    generation: str
    method: str
    mode: str
    bytes_restored: int
    predicted_seconds: float | None
    measured_seconds: float
    at: float
    job: str | None


@dataclass(frozen=True)
class PathSampleRecord:
    """One measured restore path sample: a real restore or a drill restore.

    :param volume: the restored volume, ``""`` for a pool-level drill.
    :param pool_device: the pool device holding the chain's full.
    :param mode: the restore mode (``copy`` or ``swap-in``).
    :param source: ``restore`` or ``drill``.
    :param write_rate: a real copy restore: the target write speed (bytes/s) the restore
        model adds for a copy (:func:`~blockguard.core.restore_model.copy_write_cost`), so
        that the fit can take those writes out again; 0 for samples without such writes.
    """

    seq: int
    volume: str
    pool_device: str
    mode: str
    source: str
    generations: int
    chunks: int
    extents: int
    bytes: int
    predicted_seconds: float | None
    measured_seconds: float
    at: float
    write_rate: float = 0.0


# --- checks -------------------------------------------------------------------------


def check_text(what: str, value: object) -> str:
    """Text the catalog can store and show: non-empty, printable, at most 255 characters.

    Not the rule for names: new volumes, pools and groups pass :func:`vocab.check_name`
    when they are added; rows that only refer to a name (jobs, restore records, a rebuild
    from a pool) take this wider check, so history written before a rule stays readable.
    """
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(detail=f"{what} {value!r} must be a non-empty string")
    if len(value) > MAX_NAME_LENGTH or any(ord(c) < 32 or c == "\x7f" for c in value):
        raise InvalidInput(
            detail=f"{what} {value!r} must be at most {MAX_NAME_LENGTH} printable characters"
        )
    return value


def check_count(what: str, value: object, *, optional: bool = False) -> int | None:
    """A non-negative integer (bools are refused: ``True`` bytes is a bug, not 1)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(detail=f"{what} {value!r} must be a non-negative integer")
    return value


def check_number(what: str, value: object, *, optional: bool = False) -> float | None:
    """A finite non-negative number."""
    if value is None and optional:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise InvalidInput(detail=f"{what} {value!r} must be a finite non-negative number")
    return float(value)


def check_path(what: str, value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/") or "\x00" in value:
        raise InvalidInput(detail=f"{what} {value!r} must be an absolute path")
    return value


def check_chunk_size(value: object) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not MIN_CHUNK_SIZE <= value <= MAX_CHUNK_SIZE
        or value & (value - 1)
    ):
        raise InvalidChunkSize(chunk_size=value)
    return value


def check_identity(what: str, value: object) -> DeviceIdentity:
    if not isinstance(value, DeviceIdentity):
        raise InvalidInput(detail=f"{what} identity {value!r} must be a DeviceIdentity")
    for field, number in (("major", value.major), ("minor", value.minor)):
        check_count(f"{what} {field} number", number, optional=True)
    check_count(f"{what} size", value.size)
    if value.serial is not None and not isinstance(value.serial, str):
        raise InvalidInput(detail=f"{what} serial {value.serial!r} must be text")
    return value


def check_uuid(what: str, value: object) -> str:
    """A generation or job id: a UUID, stored in its canonical form."""
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise InvalidInput(detail=f"{what} id {value!r} is not a UUID") from None


def new_id() -> str:
    return str(uuid.uuid4())


def encode_json(what: str, value: object, *, optional: bool = False) -> str | None:
    """A dict as canonical JSON text; anything else is refused."""
    if value is None and optional:
        return None
    if not isinstance(value, dict):
        raise InvalidInput(detail=f"{what} must be a dict, not {type(value).__name__}")
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise InvalidInput(detail=f"{what} cannot be stored as JSON: {e}") from None


def decode_json(what: str, text: str | None) -> Any:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise CorruptMetadata(what=what, detail=f"stored JSON does not parse: {e}") from None
    if not isinstance(value, dict):
        raise CorruptMetadata(what=what, detail=f"stored JSON is not an object: {text[:80]!r}")
    return value
