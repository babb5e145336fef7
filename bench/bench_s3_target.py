#!/usr/bin/env python3
"""An S3 target's generation writer and reader against the same store's raw PUT/GET of
the same bytes with the same client (issue 12's bench: the ratio should be >= 0.8).

    .venv/bin/python bench/bench_s3_target.py [--mib 256] [--runs 2]

Starts the SeaweedFS cluster of tests/support/seaweed.py in a temporary directory. Per
run: ``--mib`` MiB of random bytes (incompressible: the seal's zstd gives up, as on
real encrypted or compressed data) are

- PUT raw as 8 MiB objects, one at a time (``ObjectStore.put``), then GET back;
- written as a full generation of an ``S3Pool`` in 64 KiB chunks (keyed chunk ids,
  8 MiB packs, sealed with zstd + ChaCha20-Poly1305, one index object per pack, the
  manifest), then read back whole by the pool's reader (each pack fetched, opened,
  the checksums checked);

and the target registration's probe (``measure_store``) is run for comparison with what
the remote plan and the restore estimate are given. Prints MiB/s and the ratios;
asserts nothing. Absolute figures drift on a shared machine: compare within one run.
"""

from __future__ import annotations

import argparse
import array
import os
import sys
import tempfile
import time
from pathlib import Path

import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blockguard.core.vocab import GenerationKind
from blockguard.storage.manifest import VolumeIdentity
from blockguard.storage.pool.s3pool import S3Pool
from blockguard.storage.pool.values import GenerationSpec
from blockguard.storage.remote.keys import MasterKey
from blockguard.storage.remote.objstore import Credentials, ObjectStore
from blockguard.storage.remote.s3chunks import PACK_BYTES
from blockguard.storage.remote.storeprobe import measure_store
from tests.support.seaweed import ADMIN, seaweed_cluster

MiB = 1024 * 1024
CHUNK = 64 * 1024
BUCKET = "bench"


def raw(store: ObjectStore, data: bytes) -> tuple[float, float]:
    """Seconds to PUT then GET ``data`` as pack-sized objects, one at a time."""
    keys = [f"raw/{n}" for n in range(0, len(data), PACK_BYTES)]
    started = time.monotonic()
    for key, off in zip(keys, range(0, len(data), PACK_BYTES), strict=True):
        store.put(key, data[off : off + PACK_BYTES])
    put = time.monotonic() - started
    started = time.monotonic()
    for key in keys:
        store.get(key)
    get = time.monotonic() - started
    for key in keys:
        store.delete(key)
    return put, get


def through_pool(pool: S3Pool, data: bytes, name: str) -> tuple[float, float]:
    """Seconds to write ``data`` as a full generation, then to read it back whole."""
    spec = GenerationSpec(VolumeIdentity(name, len(data), "7:0"), GenerationKind.FULL, CHUNK)
    sums = array.array(
        "Q", (xxhash.xxh3_64_intdigest(data[o : o + CHUNK]) for o in range(0, len(data), CHUNK))
    )
    started = time.monotonic()
    view = memoryview(data)
    per_call = PACK_BYTES // CHUNK
    with pool.begin_generation(spec) as writer:
        for first in range(0, len(sums), per_call):
            end = min(len(sums), first + per_call)
            writer.write_chunks(first, view[first * CHUNK : end * CHUNK], sums[first:end])
        manifest = writer.commit(sums)
    put = time.monotonic() - started
    out = bytearray(len(data))
    started = time.monotonic()
    with pool.open_generation(manifest) as reader:
        reader.read_chunks(0, memoryview(out))
    get = time.monotonic() - started
    if out != data:
        raise SystemExit("the generation read back differs from what was written")
    return put, get


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="bench-s3-target-") as tmp,
        seaweed_cluster(Path(tmp) / "seaweed") as cluster,
    ):
        cluster.client().create_bucket(Bucket=BUCKET)  # type: ignore[attr-defined]
        creds = Credentials(ADMIN.access_key, ADMIN.secret_key)
        store = ObjectStore(
            target="bench", endpoint=cluster.endpoint, bucket=BUCKET, credentials=creds
        )
        pool = S3Pool("bench", store, MasterKey.generate())
        size = args.mib * MiB
        print(f"{args.mib} MiB per cell, 8 MiB objects / packs, one at a time; MiB/s")
        print("run  raw PUT  pool PUT  ratio   raw GET  pool GET  ratio   probe PUT/GET")
        for run in range(1, args.runs + 1):
            data = os.urandom(size)
            raw_put, raw_get = raw(store, data)
            pool_put, pool_get = through_pool(pool, data, f"vol{run}")
            probe = measure_store(store)
            rates = [size / MiB / s for s in (raw_put, pool_put, raw_get, pool_get)]
            print(
                f"{run:>3}  {rates[0]:7.1f}  {rates[1]:8.1f}  {rates[1] / rates[0]:5.2f}"
                f"   {rates[2]:7.1f}  {rates[3]:8.1f}  {rates[3] / rates[2]:5.2f}"
                f"   {probe.put_rate / MiB:.1f}/{probe.get_rate / MiB:.1f}"
            )


if __name__ == "__main__":
    main()
