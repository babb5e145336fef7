"""The data transfer line measured, like the pool probes measure a disk: throughput each
way and the round trip, through a live session (the target's ``probe`` operation), so
that ssh's encryption and the frames are in the figures.

Down is target -> protected host (what a restore from the target reads), up is the
other way (what a backup writes). The performance table takes them as a
:class:`~blockguard.core.perftable.DeviceSpeed` of the link; a target area's entry is
``min(area, link)`` per figure (:meth:`LinkSpeed.limit`), so a restore piece costs
``bytes / min(target read, link, local write)`` with no change to the restore model.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from blockguard.core.perftable import DEFAULT_CHUNK_SIZE, DeviceSpeed
from blockguard.core.units import format_rate
from blockguard.storage.remote.session import RemoteSession

MiB = 1 << 20
#: Bytes a throughput sample carries each way: long enough that the round trip and
#: TCP's start are a small part of it on a WAN line (~0.4 s at 20 MiB/s).
DEFAULT_PAYLOAD = 8 * MiB


@dataclass(frozen=True)
class LinkSpeed:
    """A measured link: ``down`` and ``up`` in bytes/s, ``round_trip`` in seconds."""

    down: float
    up: float
    round_trip: float

    def device_speed(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> DeviceSpeed:
        """The link as the performance table's figures: reads come down, writes go up;
        scattered or not is the same to a link (its fixed cost per request is the round
        trip, fitted with the restore terms)."""
        return DeviceSpeed(self.down, self.up, self.down, self.up, chunk_size)

    def limit(self, area: DeviceSpeed) -> DeviceSpeed:
        """A target area's figures as seen from the protected host: each the slower of
        the area's own and the link's."""
        return DeviceSpeed(
            min(area.seq_read, self.down),
            min(area.seq_write, self.up),
            min(area.rand_read, self.down),
            min(area.rand_write, self.up),
            area.chunk_size,
        )

    def describe(self) -> str:
        return (
            f"down {format_rate(self.down)}, up {format_rate(self.up)}, "
            f"round trip {self.round_trip * 1000:.1f} ms"
        )


def measure_link(
    session: RemoteSession,
    *,
    payload: int = DEFAULT_PAYLOAD,
    rounds: int = 3,
    pings: int = 5,
    clock: Callable[[], float] = time.monotonic,
) -> LinkSpeed:
    """Measure the link of ``session``: the median of ``pings`` empty round trips, and of
    ``rounds`` transfers of ``payload`` random bytes each way (random: a link that
    compresses must not look faster than it is). A transfer's time less one round trip
    is its time on the line; a transfer that took less than two round trips is counted
    whole (its line time would be noise).

    :raises WireError: the link broke (the session is over).
    """
    if payload <= 0 or rounds <= 0 or pings <= 0:
        raise ValueError("payload, rounds and pings must be positive")

    def timed(action: Callable[[], object]) -> float:
        start = clock()
        action()
        return max(clock() - start, 1e-9)

    round_trip = statistics.median(timed(session.probe) for _ in range(pings))

    def rate(seconds: float) -> float:
        line = seconds - round_trip if seconds > 2 * round_trip else seconds
        return payload / line

    down = statistics.median(
        rate(timed(lambda: session.probe(down=payload))) for _ in range(rounds)
    )
    data = os.urandom(payload)
    up = statistics.median(rate(timed(lambda: session.probe(up=data))) for _ in range(rounds))
    return LinkSpeed(down=down, up=up, round_trip=round_trip)
