#!/usr/bin/env python3
"""Which S3 client the object-store target uses (issue 12), chosen by a measurement.

    .venv/bin/python bench/bench_s3_client.py [--mib 256] [--object-mib 8] [--gets 200]

Starts the SeaweedFS cluster of tests/support/seaweed.py (master, two volume servers,
filer, S3 gateway on 127.0.0.1) in a temporary directory. For each candidate client
(boto3; obstore, the Python binding of Rust's object_store, when installed) and each
concurrency (1, 4, 8 threads), uploads ``--mib`` MiB as ``--object-mib`` MiB objects of
random bytes (single PUTs: the raw speed, multipart is not what is compared), then
downloads them all, then deletes them. Then the latency of ``--gets`` GETs of one 4 KiB
object, one at a time. Prints a table (MiB/s, median and p95 ms); asserts nothing.
Absolute figures drift on a shared machine: compare the clients within one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.seaweed import ADMIN, REGION, SeaweedCluster, seaweed_cluster

MiB = 1024 * 1024
BUCKET = "bench"
CONCURRENCY = (1, 4, 8)


class Candidate:
    """put/get/delete of whole objects with one client library."""

    name = ""

    def put(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def get(self, key: str) -> bytes:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError


class Boto3(Candidate):
    def __init__(self, endpoint: str) -> None:
        import boto3
        from botocore.config import Config

        self.name = f"boto3 {boto3.__version__}"
        self.s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=ADMIN.access_key,
            aws_secret_access_key=ADMIN.secret_key,
            region_name=REGION,
            config=Config(max_pool_connections=16, s3={"addressing_style": "path"}),
        )

    def put(self, key: str, data: bytes) -> None:
        self.s3.put_object(Bucket=BUCKET, Key=key, Body=data)

    def get(self, key: str) -> bytes:
        return self.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()

    def delete(self, key: str) -> None:
        self.s3.delete_object(Bucket=BUCKET, Key=key)


class Obstore(Candidate):
    def __init__(self, endpoint: str) -> None:
        import obstore
        from obstore.store import S3Store

        self.obstore = obstore
        self.name = f"obstore {obstore.__version__}"
        self.store = S3Store(
            BUCKET,
            endpoint=endpoint,
            access_key_id=ADMIN.access_key,
            secret_access_key=ADMIN.secret_key,
            region=REGION,
            virtual_hosted_style_request=False,
            client_options={"allow_http": True},
        )

    def put(self, key: str, data: bytes) -> None:
        self.obstore.put(self.store, key, data, use_multipart=False)

    def get(self, key: str) -> bytes:
        return bytes(self.obstore.get(self.store, key).bytes())

    def delete(self, key: str) -> None:
        self.obstore.delete(self.store, key)


def candidates(endpoint: str) -> list[Candidate]:
    found: list[Candidate] = []
    for cls in (Boto3, Obstore):
        try:
            found.append(cls(endpoint))
        except ImportError as exc:
            print(f"skipped {cls.__name__}: {exc}", file=sys.stderr)
    return found


def run_all(threads: int, fn: Callable[[str], object], keys: list[str]) -> float:
    """Seconds to run ``fn`` over ``keys`` with ``threads`` threads."""
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(fn, keys))
    return time.perf_counter() - started


def throughput(client: Candidate, threads: int, total: int, size: int) -> tuple[float, float]:
    """(upload, download) MiB/s of ``total`` bytes in objects of ``size``."""
    blocks = [os.urandom(size) for _ in range(4)]  # different bytes, no dedup anywhere
    keys = [f"t{threads}/{client.name.split()[0]}/{i}" for i in range(total // size)]
    up = run_all(threads, lambda k: client.put(k, blocks[hash(k) % 4]), keys)
    sizes: list[int] = []
    down = run_all(threads, lambda k: sizes.append(len(client.get(k))), keys)
    if sum(sizes) != len(keys) * size:
        raise SystemExit(f"{client.name}: downloaded {sum(sizes)} bytes, not {len(keys) * size}")
    run_all(threads, client.delete, keys)
    mib = len(keys) * size / MiB
    return mib / up, mib / down


def small_get_latency(client: Candidate, gets: int) -> tuple[float, float]:
    """(median, p95) milliseconds of a GET of a 4 KiB object."""
    key = f"small/{client.name.split()[0]}"
    client.put(key, os.urandom(4096))
    client.get(key)  # the connection is open before the clock runs
    times = []
    for _ in range(gets):
        started = time.perf_counter()
        client.get(key)
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.95) - 1]


def bench(cluster: SeaweedCluster, total: int, size: int, gets: int) -> None:
    cluster.client().create_bucket(Bucket=BUCKET)  # type: ignore[attr-defined]
    clients = candidates(cluster.endpoint)
    print(f"{total // MiB} MiB in {size // MiB} MiB objects per cell; MiB/s")
    print(f"{'client':<18}{'conc':>5}{'upload':>10}{'download':>10}")
    for client in clients:
        for threads in CONCURRENCY:
            up, down = throughput(client, threads, total, size)
            print(f"{client.name:<18}{threads:>5}{up:>10.1f}{down:>10.1f}", flush=True)
    print(f"\nGET of a 4 KiB object, {gets} times, one at a time (ms)")
    print(f"{'client':<18}{'median':>8}{'p95':>8}")
    for client in clients:
        median, p95 = small_get_latency(client, gets)
        print(f"{client.name:<18}{median:>8.2f}{p95:>8.2f}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="MiB per client and concurrency")
    parser.add_argument("--object-mib", type=int, default=8, help="object size in MiB")
    parser.add_argument("--gets", type=int, default=200, help="small GETs for the latency")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="bg-bench-s3-") as tmp,
        seaweed_cluster(Path(tmp)) as cluster,
    ):
        bench(cluster, args.mib * MiB, args.object_mib * MiB, args.gets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
