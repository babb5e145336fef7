"""The one facade between the daemon's adapters (D-Bus, udev, scheduler) and the domain.

The D-Bus layer never talks to the catalog, the planner or storage directly: every operation
goes through a :class:`Service`. This module defines its interface and the plain value types
it exchanges; it imports neither D-Bus nor storage. The implementation is the engine
(:func:`blockguard.engine.engine.make_service`: catalog + planner + storage), which
``blockguardd --service`` loads by default; the D-Bus and CLI tests run on it too.

Threading contract: the adapters call methods from worker threads (``asyncio.to_thread``),
so an implementation must be thread-safe. ``list_*``/``get_*``/``plan``/``status`` must be
quick (they read state that is kept in memory); long work goes into a :class:`Job`.
Events are delivered by calling the subscribers in whatever thread raised them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from blockguard.engine.jobs import Job

# --- values ------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolDeviceInfo:
    """One disk of a pool and its measured performance table.

    :param perf: measured figures, e.g. ``{"seq_read_bps": 1.4e9, "seq_write_bps": 2.2e9,
        "rand_read_iops": 9000.0, "rand_write_iops": 8000.0}``; empty until measured.
    """

    path: str
    size: int
    state: str = "ok"  # ok | missing | failed
    perf: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PoolInfo:
    name: str
    backend: str
    devices: tuple[PoolDeviceInfo, ...]
    capacity: int
    free: int
    state: str = "ok"  # ok | degraded | full
    #: The thin pool's metadata, bytes (0: the pool has no thin pool).
    metadata_capacity: int = 0
    metadata_free: int = 0


@dataclass(frozen=True)
class GenerationInfo:
    """One backup generation. ``id`` is the long id, unique in the daemon
    (``db@20261103T120501.123456Z-1a2b3c4d``); ``number`` its short form's (``db@3``)."""

    id: str
    volume: str
    method: str  # full | differential | incremental
    parent: str  # id of the generation it is based on, "" for a full
    created: int  # unix time of the backup point
    bytes: int  # bytes stored for this generation
    state: str = "ok"  # ok | verifying | corrupt
    number: int = 0  # the volume's running number (db@7); 0 when unknown (unreadable)


@dataclass(frozen=True)
class ProtectRequest:
    """What a client asks :meth:`Service.protect` for: ``device`` protected as ``name``.

    :param chunk_size: tracking granularity in bytes; ``None`` for the default.
    :param backend: tracking backend (e.g. ``"era"``, ``"thin"``); ``None`` to choose.
    :param pool: the pool to back up into; ``None`` to place the volume on the pool
        with the most free space that holds a full backup of it.
    :param objectives: as for :meth:`Service.set_objectives`; ``None`` or empty for none.
    """

    device: str
    name: str
    chunk_size: int | None = None
    backend: str | None = None
    pool: str | None = None
    objectives: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class VolumeInfo:
    """A protected volume as the clients see it.

    :param objectives: the objectives as given (keys ``rpo``, ``rto``, ``restore_mode``,
        ``generations``, ``tz``; only the ones set), plus ``group`` if inherited.
    :param estimated_restore_seconds: restore method -> predicted seconds.
    :param next_backup: unix time of the next scheduled backup, 0 if none is scheduled.
    """

    name: str
    device: str
    pool: str
    backend: str
    chunk_size: int
    group: str
    objectives: Mapping[str, Any]
    tracker_state: str  # exact | lost | initialising | stopped
    changed_bytes_since_backup: int
    changed_bytes_since_full: int
    estimated_restore_seconds: Mapping[str, float]
    next_method: str
    next_method_reasons: tuple[str, ...]
    next_backup: int
    generations: tuple[GenerationInfo, ...]
    #: the estimate of the next method's restore: ``seconds``, ``upper_seconds``,
    #: ``calibrated``, ``calibration`` (why or why not), ``breakdown`` (seconds by term)
    restore_estimate: Mapping[str, Any] = field(default_factory=dict)
    #: the last restore drill (empty if none): ``at``, ``result`` (ok | failed),
    #: ``problem``, ``measured_seconds``, ``predicted_seconds``, ``upper_seconds``,
    #: ``rto_seconds``, ``mode``, ``generation``
    last_drill: Mapping[str, Any] = field(default_factory=dict)
    #: unix time of the next restore drill, 0 if none is scheduled
    next_drill: int = 0


@dataclass(frozen=True)
class WatchTargets:
    """What the udev watcher must look out for: device path -> pool or volume name."""

    pool_devices: Mapping[str, str]
    volume_devices: Mapping[str, str]


# --- events ------------------------------------------------------------------------


@dataclass(frozen=True)
class BackupStarted:
    volume: str
    job_id: int


@dataclass(frozen=True)
class BackupFinished:
    """:ivar space_changed: False when the backup stored nothing (an empty delta) and
    retention freed nothing: no pool's space changed by it."""

    volume: str
    generation: str
    method: str
    bytes: int
    space_changed: bool = True


@dataclass(frozen=True)
class BackupFailed:
    volume: str
    error_name: str
    message: str


@dataclass(frozen=True)
class RestoreFinished:
    volume: str
    generation: str
    target: str


@dataclass(frozen=True)
class PoolSpaceLow:
    pool: str
    free: int
    needed: int


@dataclass(frozen=True)
class ObjectiveInfeasible:
    volume: str
    reason: str


@dataclass(frozen=True)
class TrackingLost:
    volume: str
    reason: str


@dataclass(frozen=True)
class AlertChanged:
    """An alert was raised or resolved (see :mod:`blockguard.engine.alerts`).

    :param state: ``raised`` or ``resolved``.
    :param record: the whole alert as JSON (what the alert hooks get).
    """

    kind: str
    subject: str
    state: str
    severity: str
    message: str
    record: str


@dataclass(frozen=True)
class VolumeChanged:
    """Some property of the volume changed (or it was just protected)."""

    volume: str


@dataclass(frozen=True)
class VolumeRemoved:
    volume: str


@dataclass(frozen=True)
class PoolChanged:
    """Pool ``pool`` changed; ``info`` is its state as the sender just read it (None: the
    receiver asks), so the news of a space change costs one look at the pool, not two."""

    pool: str
    info: PoolInfo | None = None


@dataclass(frozen=True)
class PoolRemoved:
    pool: str


@dataclass(frozen=True)
class JobAdded:
    """A job was started (by a client or by the scheduler): the adapters export it."""

    job: Job


ServiceEvent = (
    BackupStarted
    | BackupFinished
    | BackupFailed
    | RestoreFinished
    | PoolSpaceLow
    | ObjectiveInfeasible
    | TrackingLost
    | AlertChanged
    | VolumeChanged
    | VolumeRemoved
    | PoolChanged
    | PoolRemoved
    | JobAdded
)

EventCallback = Callable[[ServiceEvent], None]


# --- the facade ----------------------------------------------------------------------


@runtime_checkable
class Service(Protocol):
    """Every domain operation the daemon offers. Errors are :class:`BlockguardError` only."""

    # life cycle
    def open(self) -> None:
        """Open the catalog and state; the daemon reports READY=1 only after this returned."""

    def close(self) -> None:
        """Flush and close; running jobs are abandoned (they are failed on the next open)."""

    def subscribe(self, callback: EventCallback) -> None:
        """Call ``callback(event)`` for every :data:`ServiceEvent`."""

    def status(self) -> dict[str, Any]:
        """A summary: ``{"volumes": n, "pools": n, "running_jobs": n, "summary": "one line"}``."""

    def health(self) -> dict[str, Any]:
        """Assess health now (raising and resolving alerts) and return it:
        ``{"level": "ok"|"warning"|"critical", "code": 0|1|2, "volumes": [row],
        "pools": [row], "alerts": [active alert], "summary": str}`` (see
        :mod:`blockguard.core.health` for the rows)."""

    def status_and_health(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(status(), health())`` in one go: the status as it is after the assessment
        (its summary tells the level just assessed)."""

    # pools
    def create_pool(
        self, name: str, backend: str, devices: Sequence[str], force: bool
    ) -> PoolInfo: ...

    def extend_pool(self, name: str, devices: Sequence[str], force: bool) -> PoolInfo: ...

    def remove_pool(self, name: str, force: bool, delete_generations: bool = False) -> None:
        """Forget a pool; ``force`` unprotects its volumes.

        :raises Busy: it holds generations and ``delete_generations`` is not set (naming
            how many), or volumes and ``force`` is not set.
        """

    def import_pool(self, devices: Sequence[str]) -> str:
        """Rebuild the catalog rows of the pool on ``devices`` from the disks alone
        (read-only); returns the pool's name. Volumes whose device is absent are detached.

        :raises NotAPool: a disk does not hold a blockguard pool.
        :raises AlreadyExists: the catalog has a pool or volume of that name.
        """

    def list_pools(self) -> list[PoolInfo]: ...

    def get_pool(self, name: str) -> PoolInfo:
        """:raises NotFound: if there is no such pool."""

    # volumes
    def protect(self, request: ProtectRequest) -> VolumeInfo:
        """Start protecting a device as a volume, with its objectives, in one step.

        Everything is checked before anything is created, so a refusal leaves nothing
        behind (no volume without the objectives the client asked for).

        :raises PoolSpaceLow: no pool (or not the one named) has room for a full backup.
        :raises InvalidObjectives: naming the offending key and value.
        """

    def unprotect(self, volume: str, delete_generations: bool = False) -> None:
        """Stop tracking ``volume``. By default its generations are kept: it becomes
        *detached* (listed, restorable to a target, under retention; ``protect`` of a
        device under its name re-attaches it). ``delete_generations`` deletes them from
        the pool and the catalog."""

    def set_objectives(self, volume_or_group: str, objectives: Mapping[str, Any]) -> list[str]:
        """Set the given objectives of a volume or of a group; the other keys stay as they are.

        :param objectives: keys ``rpo`` (text such as ``"every 15m"``), ``rto`` (``"5m"``),
            ``restore_mode`` (``"copy"``, the default, or ``"swap-in"``), ``generations``
            (int), ``tz``; an empty string as a value removes that key.
            Nothing is stored on refusal.
        :returns: the names of the volumes whose objectives changed.
        :raises InvalidObjectives: naming the offending value.
        """

    def list_volumes(self) -> list[VolumeInfo]: ...

    def get_volume(self, name: str) -> VolumeInfo: ...

    def list_generations(self, volume: str) -> list[GenerationInfo]: ...

    def get_generation(self, generation: str) -> GenerationInfo: ...

    def plan(self, volume: str) -> dict[str, Any]:
        """What the next backup of ``volume`` would be, without doing it.

        :returns: ``{"method": str, "reasons": [str], "estimated_restore_seconds":
            {method: float}, "estimated_bytes": int, "feasible": bool, "next_backup": int}``.
        """

    # long operations
    def list_swap_ins(self) -> list[dict[str, Any]]:
        """Swap-ins restores left: ``{"pool", "name", "device"}`` each."""
        ...

    def release_swap_in(self, which: str) -> dict[str, Any]:
        """Detach and delete a swap-in (by its name or device); returns what it was."""
        ...

    def backup_now(self, volume: str, full: bool = False) -> Job:
        """Back ``volume`` up now (``full``: a full whatever the planner would choose)."""

    def restore_from_target(
        self, volume: str, generation: str, target_id: str, device: str, force: bool
    ) -> Job:
        """Restore ``generation`` (``""``: the newest) of ``volume`` from backup target
        ``target_id`` onto ``device``."""

    def import_target(self, target: str) -> dict[str, Any]:
        """Record and return the volumes and generations ``target`` holds of this host
        (``target import``, e.g. on a new host with the exported key)."""

    def collect_target(self, target: str) -> Job:
        """Sweep object-store target ``target``'s bucket now (``target gc``): mark the
        packs no generation of any host references, delete the ones marked at least the
        grace period ago that no live writer lease holds back."""

    def transfer_now(self, volume: str) -> Job:
        """Send the newest local generation of ``volume`` to its backup target (its
        objectives' ``remote_target``), by the method the remote plan chooses."""

    def restore(self, volume: str, generation: str, mode: str, target: str, force: bool) -> Job:
        """Restore ``generation`` of ``volume``.

        :param generation: a generation id, or ``""`` for the newest.
        :param mode: ``"copy"`` (onto ``target``), ``"swap-in"``, or ``""`` for the mode
            the volume's RTO refers to (its objectives' ``restore_mode``; copy without one).
        :param target: the device to restore onto; ``""`` means the original device.
        """

    def verify(self, generation: str) -> Job: ...

    def mount(self, generation: str, mountpoint: str) -> dict[str, Any]:
        """Make a generation a read-only loop device for the caller to mount at
        ``mountpoint`` (the caller mounts: its mount namespace need not be the daemon's);
        returns the mount's record (mountpoint, loop, fstype, options, chain...)."""
        ...

    def unmount(self, mountpoint: str) -> dict[str, Any]:
        """Tear down the browse mount at ``mountpoint``; returns its record."""
        ...

    def list_mounts(self) -> list[dict[str, Any]]:
        """The browse mounts of this daemon."""
        ...

    def create_file_group(self, name: str, volume: str, paths: list[str]) -> dict[str, Any]:
        """Record file group ``name``: ``paths`` of ``volume``'s mounted file system
        (relative to its mount point); returns the group (name, volume, paths, created)."""
        ...

    def list_file_groups(self) -> list[dict[str, Any]]:
        """Every file group."""
        ...

    def show_file_group(self, name: str) -> dict[str, Any]:
        """One file group, with where its volume is mounted now (``""``: not mounted)."""
        ...

    def remove_file_group(self, name: str) -> None:
        """Forget a file group (its volume's generations are kept)."""
        ...

    def restore_files(self, group: str, paths: list[str], to: str) -> dict[str, Any]:
        """Serve the files of ``group`` (``GROUP`` or ``GROUP@GEN``, GEN as for a volume)
        for a client to write below its directory ``to`` (an absolute path in the
        client's mount namespace): ``paths`` (of the group's list) and what is below them,
        or all. Returns ``id``, ``device`` (a read-only loop device over the generation's
        checksum-verified image, the chain held), ``entries`` (what to write: compressed
        JSON) and the summary (group, generation, number, target, files, bytes,
        estimated_seconds). Refused before anything is served: no such group, generation
        or path (NotFound), files kept by content or unsettled (InvalidInput, named), a
        corrupt list (CorruptMetadata)."""
        ...

    def finish_restore_files(self, served_id: str, result: dict[str, Any]) -> None:
        """The client of :meth:`restore_files` is done (``result``: files, bytes, seconds,
        or error): the device is released and the result logged.

        :raises NotFound: nothing served under ``served_id``."""
        ...

    def drill_volume(self, volume: str) -> Job:
        """Run the restore drill of a volume now (a job): its newest generation restored
        into scratch space on its pool, read back against the stored checksums, timed
        against its RTO, the scratch removed.

        :raises NotFound: no such volume, or it has no generation.
        :raises Busy: a job of the volume is queued or running.
        """

    def drill(self, pool: str) -> Job:
        """Calibrate the restore-time model of a pool with a restore drill (a job): a
        synthetic chain written on the pool, restored in each mode, timed, removed.

        :raises NotFound: no such pool.
        :raises Busy: a drill of the pool is already queued or running.
        """

    def list_jobs(self) -> list[Job]: ...

    def get_job(self, job_id: int) -> Job: ...

    def cancel_job(self, job_id: int) -> None:
        """Ask a queued or running job to stop; it fails with ``JobCancelled``.

        :raises NotFound: no such job.
        :raises InvalidInput: it already ended.
        """

    # backup targets (issue 11)
    def add_target(
        self,
        target: str,
        url: str,
        pool: str,
        host_key: str = "",
        key_text: str = "",
        client_id: str = "",
        endpoint: str = "",
        credentials: str = "",
    ) -> Job:
        """Register a backup target at ``url`` (``ssh://user@host[:port]``), storing into
        its pool ``pool``; a job connects and measures the link, and records the target.
        An ``s3://BUCKET/PREFIX`` URL is an object store at ``endpoint`` (no pool, no host
        key); a job measures its PUT/GET and records it.

        :param host_key: the confirmed ``SHA256:...`` fingerprint of its host key.
        :param endpoint: an object store's http(s) URL.
        :param credentials: an object store's root-only credentials file ("" for the
            daemon's AWS environment).
        :param key_text: an exported master key to import (a new host).
        :raises HostKeyUnconfirmed: no ``host_key``: names the fingerprints offered.
        :raises HostKeyMismatch: the target offers no key with that fingerprint.
        :raises KeyTextInvalid: ``key_text`` does not parse.
        :raises AlreadyExists: a target of that id exists.
        :raises CredentialsFileRefused: (in the job) others may read the credentials.
        :raises NotAuthorized: (in the job) the target refused the key.
        """

    def remove_target(self, target: str) -> None:
        """Forget a target, its link's figures and its pinned host key."""

    def list_targets(self) -> list[dict[str, Any]]:
        """Every target: id, url, pool, state, link_down/up/round_trip, space_*."""

    def get_target(self, target: str) -> dict[str, Any]: ...

    def export_key(self) -> dict[str, str]:
        """``{"key": text, "warning": ...}``: the master key as text.

        :raises NotFound: no key yet (the first ``target add`` makes it).
        """

    def client_public_key(self, client_id: str = "") -> dict[str, str]:
        """``{"public_key", "authorized_keys_line"}`` of this host's ssh key."""

    # hooks for the daemon's adapters
    def reestablish_tracking(self) -> list[str]:
        """Set up change tracking of every protected volume again (at boot, before mounts).

        :returns: the names of the volumes whose tracking is active.
        """

    def watch_targets(self) -> WatchTargets:
        """The devices the udev watcher reports about."""

    def pool_device_vanished(self, device: str) -> None:
        """A pool disk disappeared: mark its pool degraded."""

    def rescan_tracking(self, volume: str) -> None:
        """The volume's device changed under us: check that tracking is still exact."""


ServiceFactory = Callable[..., Service]
