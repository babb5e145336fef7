"""Watch block-device uevents and turn bursts of them into one rescan (lvmdbusd's idea).

A pyudev monitor runs inside the asyncio loop (its fd is registered with ``add_reader``).
Each event is classified against the devices the service owns (:class:`WatchTargets`):

- a pool disk that is removed -> the pool is degraded;
- a protected volume that changes or is removed (e.g. its dm table was replaced by someone
  else) -> its tracking must be checked again;
- anything else, new disks included, is ignored: blockguard never touches a disk it was
  not given.

Relevant events are collected and handed over as one :class:`RescanRequest` once no new
event came for ``debounce`` seconds (but at the latest after ``max_delay``).

Kernel-source events work everywhere (also without udevd, as on the CI hosts); on hosts with
udevd, ``source="udev"`` gives events after the rules (``udev/90-blockguard.rules``) ran.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from blockguard.engine.service import WatchTargets

log = logging.getLogger(__name__)

#: dm devices blockguard creates are named with this prefix: ``blockguard-<volume>``.
DM_PREFIX = "blockguard-"


@dataclass(frozen=True)
class DeviceEvent:
    """The part of a uevent the watcher looks at."""

    action: str
    devnode: str | None
    devnum: int  # os.makedev(major, minor); 0 if unknown
    dm_name: str | None = None

    @classmethod
    def from_pyudev(cls, device: Any) -> DeviceEvent:
        dm_name = device.properties.get("DM_NAME")
        return cls(
            action=device.action or "",
            devnode=device.device_node,
            devnum=int(device.device_number or 0),
            dm_name=dm_name,
        )


@dataclass
class RescanRequest:
    """What a burst of events asks the service to look at."""

    #: pool disk path -> pool name
    vanished_pool_devices: dict[str, str] = field(default_factory=dict)
    #: names of protected volumes whose device changed or vanished
    changed_volumes: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.vanished_pool_devices or self.changed_volumes)


class EventSource(Protocol):
    """What the watcher needs of a pyudev ``Monitor`` (tests use a fake)."""

    def fileno(self) -> int: ...

    def poll(self, timeout: float | None = None) -> Any: ...


class Debouncer:
    """Collects items and calls ``callback(items)`` once they stop coming.

    :param delay: quiet time after the last item before the callback runs.
    :param max_delay: the callback runs at the latest this long after the first item,
        so a device that never stops sending events cannot starve the rescan.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        callback: Callable[[list[Any]], None],
        delay: float = 0.5,
        max_delay: float = 5.0,
    ) -> None:
        self.loop = loop
        self.callback = callback
        self.delay = delay
        self.max_delay = max_delay
        self._items: list[Any] = []
        self._first = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def feed(self, item: Any) -> None:
        now = self.loop.time()
        if not self._items:
            self._first = now
        self._items.append(item)
        if self._timer is not None:
            self._timer.cancel()
        deadline = min(now + self.delay, self._first + self.max_delay)
        self._timer = self.loop.call_at(deadline, self._fire)

    def _fire(self) -> None:
        items, self._items, self._timer = self._items, [], None
        if items:
            self.callback(items)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._items = []


def _devnum_of(path: str) -> int:
    try:
        st = os.stat(path)
    except OSError:
        return 0
    return st.st_rdev if stat.S_ISBLK(st.st_mode) else 0


class UdevWatcher:
    """Classifies uevents against the service's devices and debounces them.

    :param on_rescan: called in the loop with one :class:`RescanRequest` per burst.
    :param debounce: quiet time that ends a burst.
    :param source: ``"kernel"`` or ``"udev"`` (used only when no ``monitor`` is given).
    :param monitor: an event source; default a pyudev netlink monitor of block devices.
    """

    def __init__(
        self,
        on_rescan: Callable[[RescanRequest], None],
        debounce: float = 0.5,
        source: str = "kernel",
        monitor: EventSource | None = None,
    ) -> None:
        self.on_rescan = on_rescan
        self.debounce = debounce
        self.source = source
        self.monitor = monitor
        self._pools: dict[str, str] = {}
        self._volumes: dict[str, str] = {}
        self._by_devnum: dict[int, tuple[str, str, str]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._debouncer: Debouncer | None = None

    def set_targets(self, targets: WatchTargets) -> None:
        """Remember the devices to watch; device numbers are resolved now, while they exist."""
        self._pools = {os.path.realpath(p): n for p, n in targets.pool_devices.items()}
        self._volumes = {os.path.realpath(p): n for p, n in targets.volume_devices.items()}
        by_devnum: dict[int, tuple[str, str, str]] = {}
        for kind, table, originals in (
            ("pool", self._pools, targets.pool_devices),
            ("volume", self._volumes, targets.volume_devices),
        ):
            for original in originals:
                devnum = _devnum_of(original)
                if devnum:
                    by_devnum[devnum] = (kind, original, table[os.path.realpath(original)])
        # A device that vanished keeps its old number in the table until the next refresh.
        for devnum, entry in self._by_devnum.items():
            by_devnum.setdefault(devnum, entry)
        self._by_devnum = by_devnum

    def classify(self, event: DeviceEvent) -> tuple[str, str, str] | None:
        """``("pool", path, pool)`` / ``("volume", path, volume)`` or None if not ours."""
        match = self._by_devnum.get(event.devnum) if event.devnum else None
        if match is None and event.devnode:
            node = os.path.realpath(event.devnode)
            if node in self._pools:
                match = ("pool", node, self._pools[node])
            elif node in self._volumes:
                match = ("volume", node, self._volumes[node])
        if match is None and event.dm_name and event.dm_name.startswith(DM_PREFIX):
            volume = event.dm_name[len(DM_PREFIX) :]
            if volume in self._volumes.values():
                match = ("volume", f"/dev/mapper/{event.dm_name}", volume)
        return match

    def handle(self, event: DeviceEvent) -> None:
        """Take one event (from the monitor, or from a test)."""
        match = self.classify(event)
        if match is None:
            return
        kind, path, name = match
        # A pool disk matters only when it goes; a volume also when it changes (table swap).
        relevant = event.action == "remove" or (kind == "volume" and event.action == "change")
        log.debug("uevent %s %s (%s %s): %s", event.action, path, kind, name, relevant)
        if relevant and self._debouncer is not None:
            self._debouncer.feed((kind, path, name))

    def _flush(self, items: Iterable[tuple[str, str, str]]) -> None:
        request = RescanRequest()
        for kind, path, name in items:
            if kind == "pool":
                request.vanished_pool_devices[path] = name
            else:
                request.changed_volumes.add(name)
        if request:
            log.info(
                "device events: vanished pool disks %s, changed volumes %s",
                sorted(request.vanished_pool_devices),
                sorted(request.changed_volumes),
            )
            self.on_rescan(request)

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start listening in ``loop`` (default: the running loop)."""
        self._loop = loop or asyncio.get_running_loop()
        self._debouncer = Debouncer(self._loop, self._flush, self.debounce, 10 * self.debounce)
        if self.monitor is None:
            import pyudev

            monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source=self.source)
            monitor.filter_by("block")
            monitor.start()
            self.monitor = monitor
        self._loop.add_reader(self.monitor.fileno(), self._readable)

    def _readable(self) -> None:
        assert self.monitor is not None
        while True:
            try:
                device = self.monitor.poll(timeout=0)
            except Exception:
                log.exception("reading a uevent failed")
                return
            if device is None:
                return
            try:
                self.handle(DeviceEvent.from_pyudev(device))
            except Exception:
                log.exception("handling a uevent failed")

    def stop(self) -> None:
        if self._loop is not None and self.monitor is not None:
            self._loop.remove_reader(self.monitor.fileno())
        if self._debouncer is not None:
            self._debouncer.cancel()
