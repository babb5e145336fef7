"""Writes to a catalog in a loop until it is killed: the subject of the kill -9 test.

Usage: ``python catalog_crash_writer.py CATALOG [PAUSE_AFTER]``

Each transaction records one backup the way the daemon does: a committed generation
(every fifth a full, the others incrementals chained on it) and the job that made it,
run and finished with the generation in its result — all of it or none of it. After each
commit it prints ``<generation> <job>`` and flushes, so the test knows what was committed.
With ``PAUSE_AFTER``, after that many transactions it writes most of the next one, prints
``inside <generation> <job>`` and sleeps inside the open transaction until killed.
"""

from __future__ import annotations

import sys
import time

from blockguard.core.catalog import Catalog, DeviceIdentity
from blockguard.errors import NotFound

VOLUME = "vol"
POOL = "pool"
#: Makes each transaction span several pages, so kills land inside page writes too.
PADDING = "x" * 3000


def main(argv: list[str]) -> None:
    catalog = Catalog(argv[1])
    pause_after = int(argv[2]) if len(argv) > 2 else None
    with catalog.transaction():
        try:
            catalog.get_volume(VOLUME)
        except NotFound:
            catalog.add_pool(POOL, "dir", "/srv/pool")
            catalog.add_volume(
                VOLUME,
                "/dev/test/vol",
                DeviceIdentity(253, 0, 1 << 30),
                chunk_size=65536,
                tracker_backend="scan",
                pool=POOL,
            )
    print("ready", flush=True)
    generations = catalog.list_generations(VOLUME)
    fulls = [g.id for g in generations if g.kind == "full"]
    base = fulls[-1] if fulls else None
    parent = generations[-1].id if generations else None
    n = len(generations)
    while True:
        full = base is None or n % 5 == 0
        with catalog.transaction():
            gen = catalog.add_generation(
                VOLUME,
                "full" if full else "incremental",
                base=None if full else base,
                parent=None if full else parent,
                location={"n": n, "padding": PADDING},
            )
            job = catalog.create_job("backup", volume=VOLUME, generation=gen.id)
            catalog.update_job(job.id, state="running")
            if pause_after is not None and n >= pause_after:
                print("inside", gen.id, job.id, flush=True)
                time.sleep(3600)
            catalog.commit_generation(gen.id, bytes_stored=n * 65536, chunks=n)
            catalog.update_job(job.id, progress=1.0, bytes_done=n * 65536)
            catalog.finish_job(job.id, result={"generation": gen.id, "n": n})
        print(gen.id, job.id, flush=True)
        if full:
            base = gen.id
        parent = gen.id
        n += 1


if __name__ == "__main__":
    main(sys.argv)
