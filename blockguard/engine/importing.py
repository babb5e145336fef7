"""``pool import``: rebuild the catalog rows of a pool from its disks alone.

A pool is self-describing: ``pool.json`` (or the VG) names it, a volume record per volume
keeps what the catalog knew of it (device, identity, chunk size, objectives, group), and
a manifest per generation holds everything a restore needs. Import reads all of that and
writes nothing to the pool: the disks are identified through read-only mounts, the pool
is opened without its garbage collection, and every manifest's checksum array is checked
against the manifest before anything is recorded.

Every refusal (a disk that is not a pool, a pool or volume name the catalog already has,
a disk the catalog already knows) comes before the catalog changes; the rows are written
in one transaction. Only then is each volume whose original device is present protected
again with a fresh tracker, so its next backup is a full; the others stay *detached* (see
:mod:`.volumes`), with the reason and the way to re-attach as the volume's reason.

The device is the volume's own when it has the recorded size and the key recorded at
protect time, or at the first backup for volumes protected before keys were kept
(:mod:`blockguard.storage.devidentity`: a loop device's backing file, inode and birth
time, a dm/md UUID, a disk's WWID or serial); a device with that key under another path
(the backing file attached again under another loop number) is taken instead of the
recorded path. The device number alone is believed only where nothing better exists
and it is tied to the hardware: a whole disk or partition (``sd``, ``vd``, ``nvme``...)
that has no WWID or serial, and whose record has no key either. Loop, dm and md devices
are numbered in the order they are set up, and an unrelated one of the same size can
take a freed number: without a recorded key (a record older than the key) such a volume
is never matched, and the administrator re-attaches it with ``blockguardctl protect
DEVICE NAME``. Protecting the wrong device would put another disk's bytes into the
volume's chain, and retention would then prune the real ones; a detached volume loses
nothing.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from blockguard.core.catalog import DeviceIdentity
from blockguard.core.damage import Damage, DamageCause
from blockguard.core.vocab import PoolKind
from blockguard.engine import protection
from blockguard.engine import service as svc
from blockguard.engine.pools import PoolRegistry, _block_device, _describe
from blockguard.engine.volumes import DETACHED, VolumeRegistry, detached_path
from blockguard.errors import AlreadyExists, BlockguardError, DeviceInUse, InvalidInput
from blockguard.storage.blockdev import BlockDevice, device_rdev
from blockguard.storage.devidentity import device_key, find_device
from blockguard.storage.manifest import Manifest
from blockguard.storage.pool.base import PoolBackend, VolumeRecord
from blockguard.storage.pool.discover import identify

log = logging.getLogger(__name__)


def _check_devices(pools: PoolRegistry, volumes: VolumeRegistry, devices: Sequence[str]) -> None:
    if not isinstance(devices, list | tuple) or not devices:
        raise InvalidInput(detail="give the pool's disks")
    if len(set(devices)) != len(devices):
        raise InvalidInput(detail="a device is listed twice")
    rdevs = {path: device_rdev(_block_device(path)) for path in devices}
    if len(set(rdevs.values())) != len(rdevs):
        raise InvalidInput(detail="two of the paths given are the same device")
    for dev in pools.catalog.list_pool_devices():
        for path, rdev in rdevs.items():
            if dev.device_path == path or _rdev_or_none(dev.device_path) == rdev:
                raise DeviceInUse(path=path, reason=f"it is a disk of pool {dev.pool}")
    for vol in volumes.catalog.list_volumes():
        for path, rdev in rdevs.items():
            if _rdev_or_none(vol.device_path) == rdev:
                raise DeviceInUse(path=path, reason=f"it is protected volume {vol.name}")


def _rdev_or_none(path: str) -> int | None:
    """The device number of a known disk; None when it is absent (vanished, detached)."""
    try:
        return device_rdev(path)
    except (BlockguardError, OSError):
        return None


def _verified(backend: PoolBackend) -> tuple[list[Manifest], dict[str, dict[str, Damage]]]:
    """Every readable manifest (oldest first), and by volume the generations whose
    checksum array does not match their manifest (imported, and shown corrupt)."""
    found = backend.scan()
    manifests = found.manifests + [d.manifest for d in found.damaged if d.manifest]
    manifests.sort(key=lambda m: (m.created, m.generation_id))
    bad: dict[str, dict[str, Damage]] = {}
    for m in found.manifests:
        try:
            with backend.open_generation(m) as reader:
                reader.checksums()
        except BlockguardError as exc:
            log.error("import of pool %s: generation %s: %s", backend.name, m.generation_id, exc)
            damage = Damage(m.generation_id, DamageCause.METADATA, str(exc))
            bad.setdefault(m.volume.name, {})[m.generation_id] = damage
    for d in found.damaged:
        log.error("import of pool %s: %s is damaged: %s", backend.name, d.generation_id, d.reason)
    return manifests, bad


def _device_refusal(record: VolumeRecord) -> str | None:
    """Why the device the record names is not taken for the volume's own (None: it is).

    Decides only; see the module docstring for the rules.
    """
    path = record.device_path
    try:
        with BlockDevice(path) as dev:
            ident = dev.identity
        now = device_key(path)
    except BlockguardError as exc:
        return f"its device {path} is not there ({exc})"
    if ident.size != record.size:
        return f"{now.shown} is {ident.size} bytes, the volume {record.size}"
    if record.serial:
        if now.stable == record.serial:
            return None
        return f"{now.shown} is not the device the volume was protected on ({record.serial})"
    # Nothing stable was recorded (an older record, or a device with no identity).
    if now.stable is None and now.numbered_by_hardware:
        if (ident.major, ident.minor) == (record.major, record.minor):
            return None
        return f"{now.shown} is not device {record.major}:{record.minor} any more"
    return (
        f"the volume's record keeps no identity of its device, and {now.shown} could be "
        "another device under the same number"
    )


def _own_device(record: VolumeRecord) -> tuple[VolumeRecord, str | None]:
    """The record, pointed at where its device is now when it moved (a loop device
    attached again under another number), and why that is not its device (None: it is)."""
    refusal = _device_refusal(record)
    if refusal is None or not record.serial:
        return record, refusal
    elsewhere = find_device(record.serial)
    if elsewhere is None or elsewhere == record.device_path:
        return record, refusal
    moved = dataclasses.replace(record, device_path=elsewhere)
    if _device_refusal(moved) is not None:
        return record, refusal
    log.info("import: %s's device is now %s (was %s)", record.name, elsewhere, record.device_path)
    return moved, None


def import_pool(pools: PoolRegistry, volumes: VolumeRegistry, devices: Sequence[str]) -> str:
    """Import the pool on ``devices``; returns its name. See the module docstring.

    :raises NotAPool: a disk holds no blockguard pool, or the disks hold different pools.
    :raises AlreadyExists: the catalog has a pool or volume of the same name.
    :raises DeviceInUse: a disk is already a pool disk or a protected volume.
    """
    _check_devices(pools, volumes, devices)
    scratch = pools.settings.mount_root
    found = identify(list(devices), scratch, pools.cmd, lvm_available=pools.lvm_backend_available())
    if found.name in pools.names():
        raise AlreadyExists(what="pool", name=found.name)
    backend = pools.open_for_import(found.name, found.kind, list(found.devices))
    try:
        records = backend.volume_records()
        manifests, bad = _verified(backend)
        by_volume: dict[str, list[Manifest]] = {}
        for m in manifests:
            by_volume.setdefault(m.volume.name, []).append(m)
        names = sorted(set(records) | set(by_volume))
        known = {v.name for v in volumes.catalog.list_volumes()}
        clash = sorted(known & set(names))
        if clash:
            raise AlreadyExists(what="volume", name=", ".join(clash))
        _add_rows(pools, volumes, backend, found.devices, records, by_volume, names)
    except BaseException:
        pools.close_backend(found.name, backend)
        raise
    for volume, damage in bad.items():
        volumes.found_corrupt.setdefault(volume, {}).update(damage)
    pools.events.emit(svc.PoolChanged(found.name))
    for name in names:
        # Only chains with readable manifests become catalog rows (the catalog's rules);
        # the rest is listed from the pool, as corrupt.
        volumes.sync_generations(name)
    for name in names:
        record = records.get(name)
        if record is not None and record.tracker_backend != DETACHED:
            record, refusal = _own_device(record)
            if refusal is None:
                try:
                    chosen = record.tracker_backend or None
                    again = svc.ProtectRequest(record.device_path, name, record.chunk_size, chosen)
                    protection.protect(volumes, again)
                    log.info("import: %s protected again on %s", name, record.device_path)
                    continue
                except BlockguardError as exc:
                    refusal = str(exc)
            _leave_detached(volumes, name, refusal)
        volumes.refresh(name)
    log.info(
        "imported pool %s (%s) from %s: volumes %s, %d generations",
        found.name,
        found.kind,
        ", ".join(found.devices),
        ", ".join(names) or "none",
        len(manifests),
        extra={"POOL": found.name},
    )
    return found.name


def _leave_detached(volumes: VolumeRegistry, name: str, refusal: str) -> None:
    """Say why ``name`` stays detached: in the log and as the volume's reason."""
    reason = (
        f"detached: not protected again on import: {refusal}; if it is the volume's "
        f"device, re-attach it with: blockguardctl protect DEVICE {name}"
    )
    log.warning("import: volume %s stays detached: %s", name, refusal, extra={"VOLUME": name})
    volumes.catalog.set_tracker_state(name, "unknown", reason)


def _add_rows(
    pools: PoolRegistry,
    volumes: VolumeRegistry,
    backend: PoolBackend,
    devices: Sequence[str],
    records: dict[str, VolumeRecord],
    by_volume: dict[str, list[Manifest]],
    names: list[str],
) -> None:
    """The catalog rows of the pool, its disks and its volumes (detached), in one
    transaction; the pool is served from then on."""
    catalog = pools.catalog
    name = backend.name
    groups = {g.name for g in catalog.list_groups()}
    with catalog.transaction():
        location = str(pools.settings.mount_root / name)
        catalog.add_pool(
            name, backend.kind, location if backend.kind == PoolKind.DIR else f"bg_{name}"
        )
        sizes = {d.devno: d.size for d in backend.devices()}
        for path in devices:
            with BlockDevice(path) as dev:
                ident = dev.identity
            serial = _describe(path)
            size = sizes.get(f"{ident.major}:{ident.minor}", ident.size)
            catalog.add_pool_device(
                name, path, DeviceIdentity(ident.major, ident.minor, ident.size, serial), size
            )
        for volume in names:
            record = records.get(volume)
            gens = by_volume.get(volume, [])
            chunk = record.chunk_size if record is not None else gens[-1].chunk_size
            size = record.size if record is not None else gens[-1].volume.size
            objectives: dict[str, Any] = dict(record.objectives) if record is not None else {}
            group = record.group if record is not None else None
            if group is not None and group not in groups:
                catalog.add_group(group, dict(record.group_objectives) if record else {})
                groups.add(group)
            catalog.add_volume(
                volume,
                detached_path(volume),
                DeviceIdentity(None, None, size, None),
                chunk_size=chunk,
                tracker_backend=DETACHED,
                objectives=objectives,
                group=group,
                pool=name,
                tracker_reason="detached",
            )
    pools.adopt(name, backend)
