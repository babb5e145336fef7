"""The per-object D-Bus interfaces: ``org.blockguard1.Volume``, ``.Pool`` and ``.Job``.

Each object holds the last snapshot the service gave for it; :meth:`update` swaps in a new
snapshot and emits ``PropertiesChanged`` for exactly the properties that changed, so the
getters never call into the service (and never block the loop).
"""

from collections.abc import Callable
from typing import Any, ClassVar

from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_property

from blockguard.daemon.dbusutil import (
    IFACE_PREFIX,
    Bool,
    Double,
    ErrorPair,
    GenerationStructs,
    PoolDevices,
    SecondsDict,
    Str,
    Strs,
    UInt32,
    UInt64,
    VarDict,
    handler,
    to_vardict,
)
from blockguard.engine.jobs import Job, JobSnapshot
from blockguard.engine.service import GenerationInfo, PoolInfo, VolumeInfo

READ = PropertyAccess.READ


def generation_struct(gen: GenerationInfo) -> list[Any]:
    """A generation as the D-Bus struct ``(sssttsu)``: id, method, parent, created, bytes,
    state, number (the running number of ``VOLUME@NUMBER``; 0 when unknown)."""
    return [
        gen.id,
        gen.method,
        gen.parent,
        int(gen.created),
        int(gen.bytes),
        gen.state,
        int(gen.number),
    ]


class _Snapshotted(ServiceInterface):
    """Keeps a snapshot and emits PropertiesChanged for the D-Bus properties that differ."""

    #: D-Bus property name -> function of the snapshot giving its D-Bus value.
    PROPERTIES: ClassVar[dict[str, Callable[[Any], Any]]] = {}

    def __init__(self, name: str, snapshot: Any) -> None:
        super().__init__(name)
        self.snapshot = snapshot

    def value(self, prop: str) -> Any:
        return self.PROPERTIES[prop](self.snapshot)

    def update(self, snapshot: Any) -> None:
        old = {prop: fn(self.snapshot) for prop, fn in self.PROPERTIES.items()}
        self.snapshot = snapshot
        changed = {
            prop: fn(snapshot) for prop, fn in self.PROPERTIES.items() if fn(snapshot) != old[prop]
        }
        if changed:
            self.emit_properties_changed(changed)


def _snapshot_property(prop: str, annotation: Any) -> Any:
    """The read-only D-Bus property ``prop`` of type ``annotation`` (a dbus-fast signature
    annotation), read from the object's ``PROPERTIES`` table, with the usual error mapping.

    Every property of these objects is such a getter: one definition serves them all.
    """

    def getter(self: _Snapshotted) -> Any:
        return self.value(prop)

    getter.__name__ = getter.__qualname__ = prop
    getter.__annotations__ = {"return": annotation}
    return dbus_property(access=READ)(handler(read_only=True)(getter))


class VolumeObject(_Snapshotted):
    """``org.blockguard1.Volume`` at ``/org/blockguard1/volume/<escaped name>``."""

    PROPERTIES = {  # noqa: RUF012 -- a class-level constant table, never mutated
        "Name": lambda v: v.name,
        "Device": lambda v: v.device,
        "Pool": lambda v: v.pool,
        "Backend": lambda v: v.backend,
        "ChunkSize": lambda v: int(v.chunk_size),
        "Group": lambda v: v.group,
        "Objectives": lambda v: to_vardict(v.objectives),
        "TrackerState": lambda v: v.tracker_state,
        "ChangedBytesSinceBackup": lambda v: int(v.changed_bytes_since_backup),
        "ChangedBytesSinceFull": lambda v: int(v.changed_bytes_since_full),
        "EstimatedRestoreSeconds": lambda v: {
            k: float(s) for k, s in v.estimated_restore_seconds.items()
        },
        "RestoreEstimate": lambda v: to_vardict(v.restore_estimate),
        "NextMethod": lambda v: v.next_method,
        "NextMethodReasons": lambda v: list(v.next_method_reasons),
        "NextBackup": lambda v: int(v.next_backup),
        "Generations": lambda v: [generation_struct(g) for g in v.generations],
        "LastDrill": lambda v: to_vardict(v.last_drill),
        "NextDrill": lambda v: int(v.next_drill),
    }

    def __init__(self, info: VolumeInfo) -> None:
        super().__init__(f"{IFACE_PREFIX}.Volume", info)

    Name = _snapshot_property("Name", Str)
    Device = _snapshot_property("Device", Str)
    Pool = _snapshot_property("Pool", Str)
    Backend = _snapshot_property("Backend", Str)
    ChunkSize = _snapshot_property("ChunkSize", UInt64)
    Group = _snapshot_property("Group", Str)
    Objectives = _snapshot_property("Objectives", VarDict)
    TrackerState = _snapshot_property("TrackerState", Str)
    ChangedBytesSinceBackup = _snapshot_property("ChangedBytesSinceBackup", UInt64)
    ChangedBytesSinceFull = _snapshot_property("ChangedBytesSinceFull", UInt64)
    EstimatedRestoreSeconds = _snapshot_property("EstimatedRestoreSeconds", SecondsDict)
    #: The next method's restore estimate: seconds, upper_seconds, calibrated,
    #: calibration, mode, breakdown (seconds by term), upper_by_method, copy_target.
    RestoreEstimate = _snapshot_property("RestoreEstimate", VarDict)
    NextMethod = _snapshot_property("NextMethod", Str)
    NextMethodReasons = _snapshot_property("NextMethodReasons", Strs)
    NextBackup = _snapshot_property("NextBackup", UInt64)
    Generations = _snapshot_property("Generations", GenerationStructs)
    #: The last restore drill: at, result (ok | failed), problem, measured_seconds,
    #: predicted_seconds, upper_seconds, rto_seconds, mode, generation; empty if none.
    LastDrill = _snapshot_property("LastDrill", VarDict)
    NextDrill = _snapshot_property("NextDrill", UInt64)


def _pool_devices(pool: PoolInfo) -> list[list[Any]]:
    return [
        [
            d.path,
            to_vardict({"size": int(d.size), "state": d.state})
            | to_vardict({k: float(v) for k, v in d.perf.items()}),
        ]
        for d in pool.devices
    ]


class PoolObject(_Snapshotted):
    """``org.blockguard1.Pool`` at ``/org/blockguard1/pool/<escaped name>``."""

    PROPERTIES = {  # noqa: RUF012 -- a class-level constant table, never mutated
        "Name": lambda p: p.name,
        "Backend": lambda p: p.backend,
        "Devices": _pool_devices,
        "Capacity": lambda p: int(p.capacity),
        "Free": lambda p: int(p.free),
        "State": lambda p: p.state,
        "MetadataSize": lambda p: int(p.metadata_capacity),
        "MetadataFree": lambda p: int(p.metadata_free),
    }

    def __init__(self, info: PoolInfo) -> None:
        super().__init__(f"{IFACE_PREFIX}.Pool", info)

    Name = _snapshot_property("Name", Str)
    Backend = _snapshot_property("Backend", Str)
    Devices = _snapshot_property("Devices", PoolDevices)
    Capacity = _snapshot_property("Capacity", UInt64)
    Free = _snapshot_property("Free", UInt64)
    State = _snapshot_property("State", Str)
    #: The thin pool's metadata (0 for a pool without one): it can fill with data free.
    MetadataSize = _snapshot_property("MetadataSize", UInt64)
    MetadataFree = _snapshot_property("MetadataFree", UInt64)


class JobObject(_Snapshotted):
    """``org.blockguard1.Job`` at ``/org/blockguard1/job/<n>``.

    Eta is seconds left (-1 while unknown); Rate is bytes per second; Started and Finished
    are unix times (0 until then); Error is (D-Bus error name, message) or ("", "").
    """

    PROPERTIES = {  # noqa: RUF012 -- a class-level constant table, never mutated
        "Id": lambda j: j.id,
        "Kind": lambda j: j.kind.value,
        "Target": lambda j: j.target,
        "State": lambda j: j.state.value,
        "Progress": lambda j: float(j.progress),
        "BytesDone": lambda j: int(j.bytes_done),
        "BytesTotal": lambda j: int(j.bytes_total),
        "Rate": lambda j: float(j.rate),
        "Eta": lambda j: float(j.eta),
        "Error": lambda j: list(j.error),
        "Result": lambda j: to_vardict(j.result),
        "Started": lambda j: int(j.started),
        "Finished": lambda j: int(j.finished),
        "Done": lambda j: j.state.value in ("done", "failed"),
    }

    def __init__(self, job: Job) -> None:
        super().__init__(f"{IFACE_PREFIX}.Job", job.snapshot())
        self.job = job

    def refresh(self) -> None:
        """Take a new snapshot of the job (called in the loop after it changed)."""
        new: JobSnapshot = self.job.snapshot()
        self.update(new)

    Id = _snapshot_property("Id", UInt32)
    Kind = _snapshot_property("Kind", Str)
    Target = _snapshot_property("Target", Str)
    State = _snapshot_property("State", Str)
    Progress = _snapshot_property("Progress", Double)
    BytesDone = _snapshot_property("BytesDone", UInt64)
    BytesTotal = _snapshot_property("BytesTotal", UInt64)
    Rate = _snapshot_property("Rate", Double)
    Eta = _snapshot_property("Eta", Double)
    Error = _snapshot_property("Error", ErrorPair)
    Result = _snapshot_property("Result", VarDict)
    Started = _snapshot_property("Started", UInt64)
    Finished = _snapshot_property("Finished", UInt64)
    Done = _snapshot_property("Done", Bool)
