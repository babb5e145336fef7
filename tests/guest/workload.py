"""A seeded random write workload whose expected change set is known exactly."""

from __future__ import annotations

import os
import random

from pyroaring import BitMap

from blockguard.storage.blockdev import BlockDevice


def random_writes(path: str, size: int, chunk: int, rng: random.Random, n: int) -> BitMap:
    """Write ``n`` random-content pieces to ``path`` — whole chunks, partial chunks,
    unaligned, and spans straddling chunk boundaries — then fsync.

    :returns: the chunks the writes touched.
    """
    touched = BitMap()
    with BlockDevice(path, write=True) as dev:
        for _ in range(n):
            kind = rng.choice(["chunk", "partial", "unaligned", "straddle", "multi"])
            c = rng.randrange(size // chunk)
            if kind == "chunk":
                off, length = c * chunk, chunk
            elif kind == "partial":
                off, length = c * chunk + rng.randrange(0, chunk, 512), 512
            elif kind == "unaligned":
                off, length = c * chunk + rng.randrange(chunk - 100), rng.randrange(1, 100)
            elif kind == "straddle":
                c = max(c, 1)
                off = c * chunk - rng.randrange(1, 3000)
                length = rng.randrange(3001, 9000)
            else:
                off, length = c * chunk + rng.randrange(chunk), rng.randrange(chunk, 3 * chunk)
            length = min(length, size - off)
            dev.pwrite_all(os.urandom(length), off)
            touched.add_range(off // chunk, (off + length - 1) // chunk + 1)
        dev.flush()
    return touched
