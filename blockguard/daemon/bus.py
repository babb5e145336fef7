"""blockguardd on D-Bus: ``org.blockguard1.Manager`` and the tree of exported objects.

A thin adapter over :class:`~blockguard.engine.service.Service`: each method converts its
arguments, calls the service in a worker thread (so the loop never blocks), and returns the
object path of what it created. Service events become signals and property changes.
The API contract is the committed introspection XML in ``tests/daemon/introspection/``.
"""

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from dbus_fast import BusType, Message, MessageType, NameFlag, RequestNameReply, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusSignature
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property, dbus_signal

import blockguard
from blockguard.core import vocab
from blockguard.daemon.dbusutil import (
    BUS_NAME,
    DEFAULT_ADMIN_GROUP,
    IFACE_PREFIX,
    ROOT_PATH,
    Authorizer,
    Bool,
    GenerationStructs,
    ObjPath,
    ObjPaths,
    Str,
    Strs,
    SwapIns,
    UInt64,
    VarDict,
    VarDicts,
    current_sender,
    from_variant,
    handler,
    job_path,
    pool_path,
    record_current_call,
    to_vardict,
    unescape_path_element,
    volume_path,
)
from blockguard.daemon.objects import JobObject, PoolObject, VolumeObject, generation_struct
from blockguard.engine import service as svc
from blockguard.engine.jobs import Job
from blockguard.errors import EnvironmentProblem, InvalidInput, NotAuthorized, NotFound

log = logging.getLogger(__name__)

T = TypeVar("T")


class ObjectTree:
    """The exported volume, pool and job objects, kept in step with the service.

    Every method must be called in the loop's thread.
    """

    def __init__(self, bus: MessageBus, loop: asyncio.AbstractEventLoop) -> None:
        self.bus = bus
        self.loop = loop
        self.volumes: dict[str, VolumeObject] = {}
        self.pools: dict[str, PoolObject] = {}
        self.jobs: dict[int, JobObject] = {}

    def volume(self, info: svc.VolumeInfo) -> str:
        """Export the volume or update its properties; returns its path."""
        path = volume_path(info.name)
        obj = self.volumes.get(info.name)
        if obj is None:
            self.volumes[info.name] = obj = VolumeObject(info)
            self.bus.export(path, obj)
        else:
            obj.update(info)
        return path

    def remove_volume(self, name: str) -> None:
        if self.volumes.pop(name, None) is not None:
            self.bus.unexport(volume_path(name))

    def pool(self, info: svc.PoolInfo) -> str:
        path = pool_path(info.name)
        obj = self.pools.get(info.name)
        if obj is None:
            self.pools[info.name] = obj = PoolObject(info)
            self.bus.export(path, obj)
        else:
            obj.update(info)
        return path

    def remove_pool(self, name: str) -> None:
        if self.pools.pop(name, None) is not None:
            self.bus.unexport(pool_path(name))

    def job(self, job: Job) -> str:
        """Export the job (once) and follow its changes with PropertiesChanged."""
        path = job_path(job.id)
        if job.id in self.jobs:
            return path
        obj = JobObject(job)
        self.jobs[job.id] = obj
        self.bus.export(path, obj)

        def changed(_job: Job, _fields: dict[str, Any]) -> None:
            # Called in the worker thread: hand over to the loop.
            self.loop.call_soon_threadsafe(obj.refresh)

        job.subscribe(changed)
        obj.refresh()  # it may have moved on between creation and export
        return path

    def paths(self) -> set[str]:
        """Object paths of every exported volume, pool and job."""
        return (
            {volume_path(n) for n in self.volumes}
            | {pool_path(n) for n in self.pools}
            | {job_path(i) for i in self.jobs}
        )

    def remove_job(self, job_id: int) -> None:
        if self.jobs.pop(job_id, None) is not None:
            self.bus.unexport(job_path(job_id))


Signal2 = Annotated[list[Any], DBusSignature("ss")]


class ManagerInterface(ServiceInterface):
    """``org.blockguard1.Manager`` at ``/org/blockguard1``.

    Methods marked ``read_only`` may be called by anyone; all others need root or the
    admin group (checked here and by the bus policy ``data/org.blockguard1.conf``).
    """

    def __init__(self, service: svc.Service, tree: ObjectTree, authorizer: Authorizer) -> None:
        super().__init__(f"{IFACE_PREFIX}.Manager")
        self.service = service
        self.tree = tree
        self.authorizer = authorizer
        self.status_line = ""
        #: Generations served to restore-files (their id) -> the caller's unique bus name.
        self.served_to: dict[str, str] = {}

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    # --- pools ---

    @dbus_method()
    @handler()
    async def CreatePool(self, name: Str, backend: Str, devices: Strs, force: Bool) -> ObjPath:
        info = await self._call(self.service.create_pool, name, backend, list(devices), force)
        return self.tree.pool(info)

    @dbus_method()
    @handler()
    async def ExtendPool(self, name: Str, devices: Strs, force: Bool) -> ObjPath:
        info = await self._call(self.service.extend_pool, name, list(devices), force)
        return self.tree.pool(info)

    @dbus_method()
    @handler()
    async def RemovePool(self, name: Str, force: Bool, delete_generations: Bool) -> None:
        await self._call(self.service.remove_pool, name, force, delete_generations)
        self.tree.remove_pool(name)

    @dbus_method()
    @handler()
    async def ImportPool(self, devices: Strs) -> Str:
        """Rebuild the catalog rows of the pool on ``devices``; returns its name."""
        name = await self._call(self.service.import_pool, list(devices))
        self.tree.pool(await self._call(self.service.get_pool, name))
        for info in await self._call(self.service.list_volumes):
            if info.pool == name:
                self.tree.volume(info)
        return name

    # --- volumes ---

    @dbus_method()
    @handler()
    async def Protect(
        self,
        device: Str,
        name: Str,
        chunk_size: UInt64,
        backend: Str,
        pool: Str,
        objectives: VarDict,
    ) -> ObjPath:
        """chunk_size 0, backend "" and pool "" mean: let the daemon choose."""
        request = svc.ProtectRequest(
            device,
            name,
            chunk_size or None,
            backend or None,
            pool or None,
            from_variant(objectives),
        )
        info = await self._call(self.service.protect, request)
        return self.tree.volume(info)

    @dbus_method()
    @handler()
    async def Unprotect(self, name: Str, delete_generations: Bool) -> None:
        """Without ``delete_generations`` a volume with generations stays, detached."""
        await self._call(self.service.unprotect, name, delete_generations)
        try:
            self.tree.volume(await self._call(self.service.get_volume, name))
        except NotFound:
            self.tree.remove_volume(name)

    @dbus_method()
    @handler()
    async def SetObjectives(self, volume_or_group: Str, objectives: VarDict) -> ObjPaths:
        plain = from_variant(objectives)
        names = await self._call(self.service.set_objectives, volume_or_group, plain)
        paths = []
        for name in names:
            paths.append(self.tree.volume(await self._call(self.service.get_volume, name)))
        return paths

    # --- long operations: each returns a Job path ---

    @dbus_method()
    @handler()
    async def BackupNow(self, volume: Str) -> ObjPath:
        return self.tree.job(await self._call(self.service.backup_now, volume))

    @dbus_method()
    @handler()
    async def RestoreFromTarget(
        self, volume: Str, generation: Str, target: Str, device: Str, force: Bool
    ) -> ObjPath:
        """Restore ``generation`` (``""``: the newest) of ``volume`` from backup target
        ``target`` onto ``device``; returns the job."""
        job = await self._call(
            self.service.restore_from_target, volume, generation, target, device, force
        )
        return self.tree.job(job)

    @dbus_method()
    @handler()
    async def TransferNow(self, volume: Str) -> ObjPath:
        """Send the newest generation of ``volume`` to its backup target; returns the job."""
        return self.tree.job(await self._call(self.service.transfer_now, volume))

    @dbus_method()
    @handler()
    async def BackupNowWithOptions(self, volume: Str, options: VarDict) -> ObjPath:
        """``BackupNow`` with options: ``full`` (b) takes a full whatever the planner says."""
        given = from_variant(options)
        unknown = sorted(set(given) - {"full"})
        if unknown or not isinstance(given.get("full", False), bool):
            raise InvalidInput(detail=f"backup options are full (b); got {sorted(given)}")
        full = given.get("full", False)
        job = await self._call(self.service.backup_now, volume, *([True] if full else []))
        return self.tree.job(job)

    @dbus_method()
    @handler()
    async def Restore(
        self, volume: Str, generation: Str, mode: Str, target: Str, force: Bool
    ) -> ObjPath:
        """generation "" means the newest; mode "" the mode the volume's RTO refers to
        (its objectives' restore_mode, copy without one); target "" the original device."""
        if mode:
            vocab.check_choice("restore mode", mode, vocab.RESTORE_MODES)
        job = await self._call(self.service.restore, volume, generation, mode, target, force)
        return self.tree.job(job)

    @dbus_method()
    @handler()
    async def CancelJob(self, job_id: UInt64) -> None:
        """Stop a queued or running job (it fails with org.blockguard1.Error.Cancelled)."""
        await self._call(self.service.cancel_job, int(job_id))

    @dbus_method()
    @handler(read_only=True)
    async def ListSwapIns(self) -> SwapIns:
        """Swap-ins restores left: (pool, name, device; "" when detached)."""
        found = await self._call(self.service.list_swap_ins)
        return [[s["pool"], s["name"], s["device"]] for s in found]

    @dbus_method()
    @handler()
    async def ReleaseSwapIn(self, name_or_device: Str) -> None:
        """Detach and delete a swap-in (refused while its device is mounted or open)."""
        await self._call(self.service.release_swap_in, name_or_device)

    @dbus_method()
    @handler()
    async def Mount(self, generation: Str, mountpoint: Str) -> VarDict:
        """Mount a generation's file system read-only at an empty directory (its image
        over FUSE, a read-only loop device); returns the mount's record."""
        return to_vardict(await self._call(self.service.mount, generation, mountpoint))

    @dbus_method()
    @handler()
    async def Unmount(self, mountpoint: Str) -> VarDict:
        """Tear down the browse mount at ``mountpoint`` (file system, loop, FUSE)."""
        return to_vardict(await self._call(self.service.unmount, mountpoint))

    @dbus_method()
    @handler(read_only=True)
    async def ListMounts(self) -> VarDicts:
        """The browse mounts of generations."""
        return [to_vardict(m) for m in await self._call(self.service.list_mounts)]

    @dbus_method()
    @handler()
    async def CreateFileGroup(self, name: Str, volume: Str, paths: Strs) -> VarDict:
        """Record a file group: paths of a protected volume's mounted file system."""
        found = await self._call(self.service.create_file_group, name, volume, list(paths))
        return to_vardict(found)

    @dbus_method()
    @handler(read_only=True)
    async def ListFileGroups(self) -> VarDicts:
        """Every file group (name, volume, paths, created)."""
        return [to_vardict(g) for g in await self._call(self.service.list_file_groups)]

    @dbus_method()
    @handler(read_only=True)
    async def ShowFileGroup(self, name: Str) -> VarDict:
        """One file group, with where its volume is mounted now."""
        return to_vardict(await self._call(self.service.show_file_group, name))

    @dbus_method()
    @handler()
    async def RemoveFileGroup(self, name: Str) -> None:
        """Forget a file group."""
        await self._call(self.service.remove_file_group, name)

    @dbus_method()
    @handler()
    async def RestoreFiles(self, group: Str, paths: Strs, to: Str) -> VarDict:
        """Serve a file group's files (``GROUP[@GEN]``) for the caller to write into its
        directory ``to``: a read-only loop device of the generation and what to write
        (``entries``: compressed JSON, ``ay``); end with FinishRestoreFiles."""
        found = await self._call(self.service.restore_files, group, list(paths), to)
        self.served_to[found["id"]] = current_sender()
        return to_vardict({**found, "entries": Variant("ay", found["entries"])})

    @dbus_method()
    @handler()
    async def FinishRestoreFiles(self, served: Str, result: VarDict) -> None:
        """The caller of RestoreFiles is done (``result``: files, bytes, seconds, or
        error): the loop device is released."""
        await self._call(self.service.finish_restore_files, served, from_variant(result))
        self.served_to.pop(served, None)

    async def client_left(self, name: str) -> None:
        """A bus client went away: what it was served and did not finish is released
        (a restore-files killed while it wrote must not hold the generation)."""
        for served in [k for k, v in self.served_to.items() if v == name]:
            self.served_to.pop(served, None)
            result = {"error": f"the client {name} left the bus before it finished"}
            with contextlib.suppress(NotFound):  # finished meanwhile
                await self._call(self.service.finish_restore_files, served, result)

    @dbus_method()
    @handler()
    async def Verify(self, generation: Str) -> ObjPath:
        return self.tree.job(await self._call(self.service.verify, generation))

    @dbus_method()
    @handler()
    async def Drill(self, pool: Str) -> ObjPath:
        """Calibrate the restore-time model of ``pool`` with a restore drill."""
        return self.tree.job(await self._call(self.service.drill, pool))

    @dbus_method()
    @handler()
    async def DrillVolume(self, volume: Str) -> ObjPath:
        """Run the restore drill of ``volume`` now (as the scheduler does when it is due)."""
        return self.tree.job(await self._call(self.service.drill_volume, volume))

    # --- reading ---

    @dbus_method()
    @handler(read_only=True)
    async def Plan(self, volume: Str) -> VarDict:
        return to_vardict(await self._call(self.service.plan, volume))

    @dbus_method()
    @handler(read_only=True)
    async def ListVolumes(self) -> ObjPaths:
        return [self.tree.volume(v) for v in await self._call(self.service.list_volumes)]

    @dbus_method()
    @handler(read_only=True)
    async def ListPools(self) -> ObjPaths:
        return [self.tree.pool(p) for p in await self._call(self.service.list_pools)]

    @dbus_method()
    @handler(read_only=True)
    async def ListJobs(self) -> ObjPaths:
        return [self.tree.job(j) for j in await self._call(self.service.list_jobs)]

    @dbus_method()
    @handler(read_only=True)
    async def ListGenerations(self, volume: Str) -> GenerationStructs:
        gens = await self._call(self.service.list_generations, volume)
        return [generation_struct(g) for g in gens]

    @dbus_method()
    @handler(read_only=True)
    async def GetStatus(self) -> VarDict:
        return to_vardict(await self._call(self.service.status))

    @dbus_method()
    @handler(read_only=True)
    async def GetHealth(self) -> VarDict:
        """Health now (assessing it raises and resolves alerts); see docs/busctl.md."""
        return to_vardict(await self._call(self.service.health))

    @dbus_method()
    @handler(read_only=True)
    async def GetStatusAndHealth(self) -> VarDict:
        """GetStatus (after) and GetHealth in one call: ``{"status": ..., "health": ...}``
        (what ``blockguardctl status`` shows, with one round trip and one look)."""
        status, health = await self._call(self.service.status_and_health)
        return to_vardict({"status": status, "health": health})

    # --- backup targets (issue 11) ---

    @dbus_method()
    @handler()
    async def AddTarget(self, target: Str, url: Str, pool: Str, options: VarDict) -> ObjPath:
        """Register a backup target; returns the job that connects and measures the link.

        ``options``: ``host_key`` (the confirmed ``SHA256:...`` fingerprint; without it the
        call is refused with ``HostKeyUnconfirmed`` naming the offered ones), ``key_text``
        (an exported master key to import on a new host), ``client_id``; for an
        ``s3://BUCKET/PREFIX`` URL: ``endpoint`` and ``credentials`` (a file's path).
        """
        opts = {k: from_variant(v) for k, v in options.items()}
        known = {"host_key", "key_text", "client_id", "endpoint", "credentials"}
        unknown = sorted(set(opts) - known)
        if unknown:
            raise InvalidInput(detail=f"unknown AddTarget options {', '.join(unknown)}")
        for name, value in opts.items():
            if not isinstance(value, str):
                raise InvalidInput(detail=f"AddTarget option {name} must be a string")
        job = await self._call(
            self.service.add_target,
            target,
            url,
            pool,
            opts.get("host_key", ""),
            opts.get("key_text", ""),
            opts.get("client_id", ""),
            opts.get("endpoint", ""),
            opts.get("credentials", ""),
        )
        return self.tree.job(job)

    @dbus_method()
    @handler()
    async def RemoveTarget(self, target: Str) -> None:
        await self._call(self.service.remove_target, target)

    @dbus_method()
    @handler()
    async def ImportTarget(self, target: Str) -> VarDict:
        """List the volumes and generations ``target`` holds of this host and record
        them, so that ``RestoreFromTarget`` can use them (a new host, the same key)."""
        return to_vardict(await self._call(self.service.import_target, target))

    @dbus_method()
    @handler()
    async def CollectTarget(self, target: Str) -> ObjPath:
        """Sweep object-store target ``target``'s bucket now (garbage collection); returns
        the job."""
        return self.tree.job(await self._call(self.service.collect_target, target))

    @dbus_method()
    @handler(read_only=True)
    async def ListTargets(self) -> VarDicts:
        return [to_vardict(t) for t in await self._call(self.service.list_targets)]

    @dbus_method()
    @handler(read_only=True)
    async def GetTarget(self, target: Str) -> VarDict:
        return to_vardict(await self._call(self.service.get_target, target))

    @dbus_method()
    @handler()
    async def ExportKey(self) -> VarDict:
        """The remote master key as text, with the warning: root only (not the admin
        group, which may run backups but must not carry the key away), audited."""
        caller = await self.authorizer.identify("ExportKey")
        if caller.uid != 0:
            raise NotAuthorized(
                detail=f"ExportKey hands out the master key and needs root "
                f"(the caller has uid {caller.uid})"
            )
        return to_vardict(await self._call(self.service.export_key))

    @dbus_method()
    @handler()
    async def ClientKey(self, client_id: Str) -> VarDict:
        """This host's ssh key for targets (made on first use) and the authorized_keys
        line a target needs for it."""
        return to_vardict(await self._call(self.service.client_public_key, client_id))

    # --- properties ---

    @dbus_property(access=PropertyAccess.READ)
    @handler(read_only=True)
    def Version(self) -> Str:
        return blockguard.__version__

    @dbus_property(access=PropertyAccess.READ)
    @handler(read_only=True)
    def Status(self) -> Str:
        return self.status_line

    def set_status(self, line: str) -> None:
        if line != self.status_line:
            self.status_line = line
            self.emit_properties_changed({"Status": line})

    # --- signals (arguments documented in docs/busctl.md) ---

    @dbus_signal()
    def BackupStarted(self, volume: str, job: str) -> Annotated[list[Any], DBusSignature("so")]:
        return [volume, job]

    @dbus_signal()
    def BackupFinished(
        self, volume: str, generation: str, method: str, nbytes: int
    ) -> Annotated[list[Any], DBusSignature("ssst")]:
        return [volume, generation, method, nbytes]

    @dbus_signal()
    def BackupFailed(
        self, volume: str, error_name: str, message: str
    ) -> Annotated[list[Any], DBusSignature("sss")]:
        return [volume, error_name, message]

    @dbus_signal()
    def RestoreFinished(
        self, volume: str, generation: str, target: str
    ) -> Annotated[list[Any], DBusSignature("sss")]:
        return [volume, generation, target]

    @dbus_signal()
    def PoolSpaceLow(
        self, pool: str, free: int, needed: int
    ) -> Annotated[list[Any], DBusSignature("stt")]:
        return [pool, free, needed]

    @dbus_signal()
    def ObjectiveInfeasible(self, volume: str, reason: str) -> Signal2:
        return [volume, reason]

    @dbus_signal()
    def TrackingLost(self, volume: str, reason: str) -> Signal2:
        return [volume, reason]

    @dbus_signal()
    def Alert(
        self, kind: str, subject: str, state: str, severity: str, message: str, record: str
    ) -> Annotated[list[Any], DBusSignature("ssssss")]:
        return [kind, subject, state, severity, message, record]


async def connect(address: str) -> MessageBus:
    """Connect to ``"system"``, ``"session"`` or a D-Bus address.

    The system bus honours ``DBUS_SYSTEM_BUS_ADDRESS`` (which the tests set).
    """
    if address == "system":
        bus = MessageBus(bus_type=BusType.SYSTEM)
    elif address == "session":
        bus = MessageBus(bus_type=BusType.SESSION)
    else:
        bus = MessageBus(bus_address=address)
    try:
        return await bus.connect()
    except (OSError, ValueError) as exc:
        raise EnvironmentProblem(
            detail=f"cannot connect to the D-Bus bus {address}: {exc}"
        ) from exc


#: The bus's signal that a name lost its owner (arg2, the new owner, empty): for a unique
#: name, that client left the bus.
NAME_OWNER_CHANGED = (
    "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
    "member='NameOwnerChanged',arg2=''"
)


class DaemonBus:
    """Everything blockguardd exports, wired to a service.

    :param bus: a connected bus.
    :param service: the domain facade (already open).
    :param admin_group: group whose members may change things besides root.
    """

    def __init__(
        self, bus: MessageBus, service: svc.Service, admin_group: str = DEFAULT_ADMIN_GROUP
    ) -> None:
        self.bus = bus
        self.service = service
        self.loop = asyncio.get_running_loop()
        self.tree = ObjectTree(bus, self.loop)
        self.manager = ManagerInterface(service, self.tree, Authorizer(bus, admin_group))
        self.on_status: Callable[[str], None] | None = None
        self.closed = False

    def close(self) -> None:
        """Before the bus is disconnected: events from jobs still finishing are dropped
        from now on (their signals would go to a closed socket; the catalog has them)."""
        self.closed = True

    async def start(self) -> None:
        """Export the objects, then take the bus name (fails if someone else holds it)."""
        self.bus.add_message_handler(record_current_call)
        self.bus.add_message_handler(self._unknown_object)
        self.bus.add_message_handler(self._name_lost)
        await self.bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="AddMatch",
                signature="s",
                body=[NAME_OWNER_CHANGED],
            )
        )
        self.bus.export(ROOT_PATH, self.manager)
        for pool in self.service.list_pools():
            self.tree.pool(pool)
        for volume in self.service.list_volumes():
            self.tree.volume(volume)
        for job in self.service.list_jobs():
            self.tree.job(job)
        self.service.subscribe(self._event_from_any_thread)
        self.refresh_status()
        reply = await self.bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            raise EnvironmentProblem(
                detail=f"the bus name {BUS_NAME} is taken ({reply.name}): "
                "is another blockguardd running?"
            )
        log.info("holding bus name %s", BUS_NAME)

    def _name_lost(self, msg: Message) -> bool:
        """NameOwnerChanged of a unique name to nobody: that client left the bus."""
        if (
            msg.message_type == MessageType.SIGNAL
            and msg.member == "NameOwnerChanged"
            and msg.sender == "org.freedesktop.DBus"
            and len(msg.body) == 3
            and msg.body[0].startswith(":")
            and not msg.body[2]
            and msg.body[0] in self.manager.served_to.values()
        ):
            self.loop.create_task(self.manager.client_left(msg.body[0]))
        return False

    def _unknown_object(self, msg: Message) -> Message | bool:
        """Calls to a volume, pool or job that does not exist get our named NotFound error.

        (Without this the client gets the generic ``UnknownObject``; introspection of such
        paths still works as usual.)
        """
        if msg.message_type != MessageType.METHOD_CALL or not msg.path:
            return False
        if msg.interface == "org.freedesktop.DBus.Introspectable":
            return False
        kind, _, element = msg.path.removeprefix(ROOT_PATH + "/").partition("/")
        if kind not in ("volume", "pool", "job") or not element or "/" in element:
            return False
        if msg.path in self.tree.paths():
            return False
        try:
            name = element if kind == "job" else unescape_path_element(element)
        except (ValueError, UnicodeDecodeError):
            name = element
        error = NotFound(what=kind, name=name)
        return Message.new_error(msg, error.dbus_name, error.message)

    def forget_job_from_any_thread(self, job: Job) -> None:
        """For :meth:`JobRunner.on_forget_job`: unexport the job in the loop."""
        self._soon(self.tree.remove_job, job.id)

    def _soon(self, fn: Callable[..., Any], *args: Any) -> None:
        # A closed loop means we are shutting down and nobody listens any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(fn, *args)

    def _event_from_any_thread(self, event: svc.ServiceEvent) -> None:
        self._soon(self._handle_event, event)

    def refresh_status(self) -> str:
        line = str(self.service.status().get("summary", ""))
        self.manager.set_status(line)
        if self.on_status is not None:
            self.on_status(line)
        return line

    def _handle_event(self, event: svc.ServiceEvent) -> None:
        if self.closed:
            log.debug("bus closed: not signalling %r", event)
            return
        try:
            self._dispatch(event)
        except Exception:
            log.exception("handling service event %r failed", event)
        self.refresh_status()

    def _refresh_volume(self, name: str) -> None:
        try:
            self.tree.volume(self.service.get_volume(name))
        except NotFound:
            self.tree.remove_volume(name)

    def _refresh_pool(self, name: str, info: svc.PoolInfo | None = None) -> None:
        try:
            self.tree.pool(info if info is not None else self.service.get_pool(name))
        except NotFound:
            self.tree.remove_pool(name)

    def _dispatch(self, event: svc.ServiceEvent) -> None:
        m = self.manager
        match event:
            case svc.VolumeChanged(volume=name):
                self._refresh_volume(name)
            case svc.VolumeRemoved(volume=name):
                self.tree.remove_volume(name)
            case svc.PoolChanged(pool=name, info=info):
                self._refresh_pool(name, info)
            case svc.PoolRemoved(pool=name):
                self.tree.remove_pool(name)
            case svc.JobAdded(job=job):
                self.tree.job(job)
            case svc.BackupStarted(volume=volume, job_id=job_id):
                log.info("backup of %s started", volume, extra={"VOLUME": volume, "JOB": job_id})
                m.BackupStarted(volume, job_path(job_id))
            case svc.BackupFinished(volume=volume, generation=gen, method=method, bytes=nbytes):
                log.info(
                    "backup of %s finished: %s generation %s, %d bytes",
                    volume,
                    method,
                    gen,
                    nbytes,
                    extra={"VOLUME": volume, "GENERATION": gen},
                )
                m.BackupFinished(volume, gen, method, nbytes)
            case svc.BackupFailed(volume=volume, error_name=name, message=message):
                log.warning("backup of %s failed: %s", volume, message, extra={"VOLUME": volume})
                m.BackupFailed(volume, name, message)
            case svc.RestoreFinished(volume=volume, generation=gen, target=target):
                log.info(
                    "restore of %s to %s finished",
                    gen,
                    target,
                    extra={"VOLUME": volume, "GENERATION": gen},
                )
                m.RestoreFinished(volume, gen, target)
            case svc.PoolSpaceLow(pool=pool, free=free, needed=needed):
                log.warning("pool %s is low on space", pool, extra={"POOL": pool})
                m.PoolSpaceLow(pool, free, needed)
            case svc.ObjectiveInfeasible(volume=volume, reason=reason):
                log.warning("objectives of %s: %s", volume, reason, extra={"VOLUME": volume})
                m.ObjectiveInfeasible(volume, reason)
            case svc.TrackingLost(volume=volume, reason=reason):
                log.error("tracking of %s lost: %s", volume, reason, extra={"VOLUME": volume})
                m.TrackingLost(volume, reason)
                self._refresh_volume(volume)
            case svc.AlertChanged():
                # The engine logged it already, with its journal MESSAGE_ID.
                m.Alert(
                    event.kind,
                    event.subject,
                    event.state,
                    event.severity,
                    event.message,
                    event.record,
                )
            case _:
                log.warning("unknown service event %r", event)
