"""A swap-in's scattered delta windows are written several at once, as they are read
(issue 14: one at a time, each waited for the last write's latency), and still land
bit-exact, each at its own place; a failed write stops the copy with its error."""

from __future__ import annotations

import random
import threading

import pytest

from blockguard.errors import DeviceIOError
from blockguard.storage.copyengine import CopyItem, copy_chunks

CHUNK = 4096
NCHUNKS = 64
#: A wait for the other writers scales with the harness: it is no timed assertion, only
#: how long a serial writer is given before the test calls it serial.
HARNESS_WAIT = 120.0


class Volume:
    def __init__(self, size: int) -> None:
        self.data = random.Random(size).randbytes(size)

    def read_chunks(self, first: int, view: memoryview) -> None:
        view[:] = self.data[first * CHUNK : first * CHUNK + len(view)]


def scattered_items(vol: Volume) -> list[CopyItem]:
    return [CopyItem(vol, first, 1) for first in range(0, NCHUNKS, 3)]


def test_scattered_windows_are_written_four_at_once_and_land_bit_exact() -> None:
    vol = Volume(NCHUNKS * CHUNK)
    target = bytearray(NCHUNKS * CHUNK)
    # Every one of the first four writes waits until four are in flight: a copy that
    # wrote one window at a time would break the barrier instead.
    together = threading.Barrier(4, timeout=HARNESS_WAIT)
    calls = 0
    lock = threading.Lock()

    def sink(first: int, view: memoryview, _digests: object) -> None:
        nonlocal calls
        with lock:
            calls += 1
            mine = calls
        if mine <= 4:
            together.wait()
        target[first * CHUNK : first * CHUNK + len(view)] = view

    items = scattered_items(vol)
    copied = copy_chunks(
        items, sink, chunk_size=CHUNK, volume_size=len(target), readers=4, writers=4
    )
    assert copied == len(items) * CHUNK
    for first in range(NCHUNKS):
        want = vol.data[first * CHUNK : (first + 1) * CHUNK] if first % 3 == 0 else bytes(CHUNK)
        assert target[first * CHUNK : (first + 1) * CHUNK] == want, first


def test_a_failed_write_among_several_stops_the_copy_with_its_error() -> None:
    vol = Volume(NCHUNKS * CHUNK)

    def sink(first: int, view: memoryview, _digests: object) -> None:
        if first == 30:
            raise DeviceIOError(
                path="/dev/target", offset=first * CHUNK, op="writing", reason="EIO"
            )

    with pytest.raises(DeviceIOError):
        copy_chunks(
            scattered_items(vol), sink, chunk_size=CHUNK, volume_size=NCHUNKS * CHUNK, writers=4
        )
