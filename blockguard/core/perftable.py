"""The performance table (the seed's Fig. 3): what each device can do, as pure data.

One entry per pool device and per protected volume: identity, capacity, disk type, layout
and throughput, sequential (1 MiB requests) and random at the chunk size. The probe in
``blockguard/storage`` measures; this module only keeps the figures and blends live
observations from real backups and restores into them.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from blockguard.core.units import KiB, format_rate, format_size
from blockguard.errors import InvalidInput, NotFound

DEFAULT_CHUNK_SIZE = 64 * KiB
#: Weight of one live observation in the smoothed figure; live figures are noisy (other
#: load, caches), so one observation moves the table a third of the way.
DEFAULT_SMOOTHING = 0.3


class SpeedKind(enum.StrEnum):
    """Which of the four figures an observation is about."""

    SEQ_READ = "seq_read"
    SEQ_WRITE = "seq_write"
    RAND_READ = "rand_read"
    RAND_WRITE = "rand_write"


class Transport(enum.StrEnum):
    """How the device is attached."""

    NVME = "nvme"
    SATA = "sata"
    SCSI = "scsi"
    VIRTIO = "virtio"
    LOOP = "loop"
    OTHER = "other"


class DeviceRole(enum.StrEnum):
    """Whether an entry describes a pool device or a protected volume."""

    POOL = "pool"
    VOLUME = "volume"


def _check_rate(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(detail=f"{name} {value!r} is not a number of bytes per second")
    if not math.isfinite(value) or value <= 0:
        raise InvalidInput(detail=f"{name} {value!r} must be a positive number of bytes/s")
    return float(value)


@dataclass(frozen=True)
class DeviceSpeed:
    """Throughput of one device in bytes per second.

    :param seq_read: sequential read with 1 MiB requests.
    :param seq_write: sequential write with 1 MiB requests.
    :param rand_read: random read at ``chunk_size``.
    :param rand_write: random write at ``chunk_size``.
    :param chunk_size: the request size of the random figures.
    """

    seq_read: float
    seq_write: float
    rand_read: float
    rand_write: float
    chunk_size: int = DEFAULT_CHUNK_SIZE

    def __post_init__(self) -> None:
        for kind in SpeedKind:
            object.__setattr__(self, kind.value, _check_rate(kind.value, getattr(self, kind)))
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int):
            raise InvalidInput(detail=f"chunk size {self.chunk_size!r} is not a byte count")
        if self.chunk_size <= 0:
            raise InvalidInput(detail=f"chunk size {self.chunk_size} must be positive")

    @classmethod
    def uniform(cls, rate: float, chunk_size: int = DEFAULT_CHUNK_SIZE) -> DeviceSpeed:
        """A device that does ``rate`` for every kind of I/O (handy in tests and examples)."""
        return cls(rate, rate, rate, rate, chunk_size)

    def read(self, scattered: bool) -> float:
        """Read throughput for scattered (random at chunk size) or contiguous data."""
        return self.rand_read if scattered else self.seq_read

    def write(self, scattered: bool) -> float:
        """Write throughput for scattered (random at chunk size) or contiguous data."""
        return self.rand_write if scattered else self.seq_write

    def get(self, kind: SpeedKind) -> float:
        """The figure of one kind."""
        return float(getattr(self, SpeedKind(kind).value))

    def observed(
        self, kind: SpeedKind, rate: float, alpha: float = DEFAULT_SMOOTHING
    ) -> DeviceSpeed:
        """Blend a live observation into one figure by exponential smoothing.

        :param kind: which figure the observation is about.
        :param rate: the observed throughput in bytes/s.
        :param alpha: weight of the observation, in (0, 1].
        :returns: a new ``DeviceSpeed``; this one is unchanged.
        :raises InvalidInput: if the rate is not positive or alpha is out of range.
        """
        kind = SpeedKind(kind)
        rate = _check_rate(f"observed {kind.value}", rate)
        if not 0 < alpha <= 1:
            raise InvalidInput(detail=f"smoothing weight {alpha!r} is not in (0, 1]")
        old = self.get(kind)
        return replace(self, **{kind.value: alpha * rate + (1 - alpha) * old})

    def describe(self) -> str:
        """One line: sequential and random read/write figures with their units."""
        return (
            f"seq r/w {format_rate(self.seq_read)} / {format_rate(self.seq_write)}, "
            f"rand@{format_size(self.chunk_size)} r/w {format_rate(self.rand_read)} / "
            f"{format_rate(self.rand_write)}"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {**{k.value: self.get(k) for k in SpeedKind}, "chunk_size": self.chunk_size}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeviceSpeed:
        """Inverse of :meth:`to_dict`.

        :raises InvalidInput: if the mapping is malformed.
        """
        try:
            return cls(**{k.value: data[k.value] for k in SpeedKind}, chunk_size=data["chunk_size"])
        except (KeyError, TypeError) as exc:
            raise InvalidInput(detail=f"stored device speed {data!r} is malformed: {exc}") from exc


@dataclass(frozen=True)
class PerformanceEntry:
    """One row of the performance table.

    :param device_id: stable identity (WWN, dm/LVM UUID, or by-id path).
    :param role: pool device or protected volume.
    :param capacity: size in bytes.
    :param rotational: spinning disk or not.
    :param transport: how it is attached.
    :param layout: RAID/LVM layout, e.g. ``"linear"``, ``"striped 2"``, ``"2D+1P"``.
    :param speed: the throughput figures.
    :param measured_at: when the figures were last measured or updated (timezone-aware).
    """

    device_id: str
    role: DeviceRole
    capacity: int
    rotational: bool
    transport: Transport
    layout: str
    speed: DeviceSpeed
    measured_at: datetime

    def __post_init__(self) -> None:
        if not isinstance(self.device_id, str) or not self.device_id:
            raise InvalidInput(detail=f"device identity {self.device_id!r} is empty")
        if isinstance(self.capacity, bool) or not isinstance(self.capacity, int):
            raise InvalidInput(detail=f"capacity {self.capacity!r} is not a byte count")
        if self.capacity <= 0:
            raise InvalidInput(
                detail=f"capacity {self.capacity} of {self.device_id} is not positive"
            )
        if self.measured_at.tzinfo is None:
            raise InvalidInput(detail=f"measured_at {self.measured_at!r} has no time zone")
        object.__setattr__(self, "role", DeviceRole(self.role))
        object.__setattr__(self, "transport", Transport(self.transport))

    def observed(
        self, kind: SpeedKind, rate: float, at: datetime, alpha: float = DEFAULT_SMOOTHING
    ) -> PerformanceEntry:
        """This entry with a live observation blended in (see :meth:`DeviceSpeed.observed`)."""
        return replace(self, speed=self.speed.observed(kind, rate, alpha), measured_at=at)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "device_id": self.device_id,
            "role": self.role.value,
            "capacity": self.capacity,
            "rotational": self.rotational,
            "transport": self.transport.value,
            "layout": self.layout,
            "speed": self.speed.to_dict(),
            "measured_at": self.measured_at.isoformat(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PerformanceEntry:
        """Inverse of :meth:`to_dict`.

        :raises InvalidInput: if the mapping is malformed.
        """
        try:
            return cls(
                device_id=data["device_id"],
                role=DeviceRole(data["role"]),
                capacity=data["capacity"],
                rotational=bool(data["rotational"]),
                transport=Transport(data["transport"]),
                layout=data["layout"],
                speed=DeviceSpeed.from_dict(data["speed"]),
                measured_at=datetime.fromisoformat(data["measured_at"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(detail=f"stored performance entry is malformed: {exc}") from exc


class PerformanceTable:
    """The entries by device identity. A plain in-memory map; the catalog persists it."""

    def __init__(self, entries: Iterable[PerformanceEntry] = ()) -> None:
        self._entries: dict[str, PerformanceEntry] = {}
        for entry in entries:
            self.put(entry)

    def put(self, entry: PerformanceEntry) -> None:
        """Add or replace the entry of ``entry.device_id``."""
        self._entries[entry.device_id] = entry

    def get(self, device_id: str) -> PerformanceEntry:
        """The entry of one device.

        :raises NotFound: if the device has no entry.
        """
        try:
            return self._entries[device_id]
        except KeyError:
            raise NotFound(what="performance entry of device", name=device_id) from None

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._entries

    def __iter__(self) -> Iterator[PerformanceEntry]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def speeds(self, role: DeviceRole | None = None) -> dict[str, DeviceSpeed]:
        """Speed by device identity, optionally only of one role (what the planner takes)."""
        return {e.device_id: e.speed for e in self if role is None or e.role == role}

    def observe(
        self,
        device_id: str,
        kind: SpeedKind,
        rate: float,
        at: datetime,
        alpha: float = DEFAULT_SMOOTHING,
    ) -> PerformanceEntry:
        """Blend a live observation into a device's entry and store the result.

        :param device_id: the device observed.
        :param kind: which figure the observation is about.
        :param rate: observed bytes/s.
        :param at: when it was observed.
        :param alpha: weight of the observation.
        :returns: the updated entry.
        :raises NotFound: if the device has no entry.
        """
        entry = self.get(device_id).observed(kind, rate, at, alpha)
        self.put(entry)
        return entry

    def to_list(self) -> list[dict[str, Any]]:
        """JSON-friendly form."""
        return [e.to_dict() for e in self]

    @classmethod
    def from_list(cls, data: Iterable[Mapping[str, Any]]) -> PerformanceTable:
        """Inverse of :meth:`to_list`."""
        return cls(PerformanceEntry.from_dict(d) for d in data)
