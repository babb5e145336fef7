"""Object-store targets (issue 12, docs/design/s3.md): ``target add ID s3://BUCKET/PREFIX
--endpoint URL [--credentials FILE]``.

As for an ssh target, ``target add`` is in two halves: :func:`prepare_s3` checks the
inputs and writes nothing; :func:`register_s3` (a job) makes or imports the master key,
loads the credentials, measures the store (PUT/GET of pack-sized objects and the small
GET's latency, :mod:`blockguard.storage.remote.storeprobe`: the probe is also the check
that the bucket can be written with this key) and only then records the target and its
figures, as the ``target:ID:link`` row of the performance table (reads = GET, writes =
PUT, the round trip = the small GET), which the remote plan and the restore estimate
read like an ssh target's link.

Credentials are never on a command line nor in the catalog: the catalog keeps the
path of a root-only credentials file (``--credentials``), or "" for the daemon's own
AWS environment (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, or a profile of
``AWS_SHARED_CREDENTIALS_FILE`` / ``~/.aws/credentials``, ``AWS_PROFILE``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from blockguard.core import vocab
from blockguard.core.catalog import PerfEntry, Target, link_perf_key
from blockguard.errors import InvalidInput, NotFound
from blockguard.storage.pool.s3pool import S3Pool
from blockguard.storage.remote import keys
from blockguard.storage.remote.objstore import (
    Credentials,
    ObjectStore,
    credentials_from_env,
    load_credentials,
)
from blockguard.storage.remote.s3lease import DEFAULT_LEASE_TIMEOUT
from blockguard.storage.remote.storeprobe import StoreSpeed

#: Bucket names as S3 allows them (3-63 lower-case letters, digits, dots, hyphens).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PREFIX_PART = re.compile(r"[A-Za-z0-9._-]+")

#: Measures a store (tests pass a smaller one).
StoreMeasure = Callable[[ObjectStore], StoreSpeed]


@dataclass(frozen=True)
class S3Address:
    """Where an object-store target's objects live."""

    bucket: str
    prefix: str

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


@dataclass(frozen=True)
class S3TargetRequest:
    """A checked ``target add`` of an object store."""

    id: str
    address: S3Address
    endpoint: str
    #: The credentials file's absolute path, or "" for the daemon's environment.
    credentials: str
    client_id: str
    key: keys.MasterKey | None


def is_s3_url(url: str) -> bool:
    return isinstance(url, str) and url.startswith("s3://")


def parse_s3_url(url: str) -> S3Address:
    """``s3://BUCKET[/PREFIX]`` as an address.

    :raises InvalidInput: the bucket or a part of the prefix is not a valid name.
    """
    rest = url[len("s3://") :] if is_s3_url(url) else ""
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise InvalidInput(
            detail=f"object-store URL {url!r:.200}: the bucket must be 3-63 lower-case "
            "letters, digits, dots or hyphens (s3://BUCKET/PREFIX)"
        )
    parts = [p for p in prefix.split("/") if p]
    for part in parts:
        if not _PREFIX_PART.fullmatch(part) or part in (".", ".."):
            raise InvalidInput(
                detail=f"object-store URL {url!r:.200}: prefix part {part!r:.80} may hold "
                "only letters, digits, dots, hyphens and underscores"
            )
    return S3Address(bucket, "/".join(parts))


def check_endpoint(endpoint: str) -> str:
    """:raises InvalidInput: not an http(s) URL."""
    if not isinstance(endpoint, str) or not re.fullmatch(r"https?://[^\s/]+(/[^\s]*)?", endpoint):
        raise InvalidInput(
            detail=f"endpoint {endpoint!r:.200} is not an http(s) URL (an object-store "
            "target needs --endpoint URL)"
        )
    return endpoint.rstrip("/")


def prepare_s3(
    target_id: str,
    url: str,
    endpoint: str,
    credentials: str,
    *,
    client_id: str,
    imported: keys.MasterKey | None,
    existing: Iterable[Target],
) -> S3TargetRequest:
    """Check an object-store ``target add``; nothing is read from the store or written.

    :raises InvalidInput: a bad id, URL, endpoint or credentials path.
    :raises CredentialsFileRefused: others may read the credentials file, or it is not one.
    :raises NotFound: no credentials file, or none in the daemon's environment.
    :raises AlreadyExists: (by the caller) a target of that id exists.
    """
    vocab.check_name("target", target_id)
    address = parse_s3_url(url)
    endpoint = check_endpoint(endpoint)
    if credentials and not os.path.isabs(credentials):
        raise InvalidInput(detail=f"credentials file {credentials!r:.200} must be an absolute path")
    # Loaded now, not only in the job: a file others may read (or none at all) is refused
    # by name before anything is made. The job loads them again for its own use.
    resolve_credentials(credentials)
    for other in existing:
        place = (other.endpoint, other.url, other.client_id)
        if other.kind == "s3" and place == (endpoint, address.url, client_id):
            # One host's generations are one chain per volume: two registrations of them
            # would each write and prune it. Another client id is another host's view
            # (a new host restoring what several hosts sent).
            raise InvalidInput(
                detail=f"target {other.id} already is {address.url} at {endpoint} "
                f"for client {client_id}"
            )
    return S3TargetRequest(target_id, address, endpoint, credentials, client_id, imported)


def resolve_credentials(path: str, env: Mapping[str, str] | None = None) -> Credentials:
    """The credentials of a target: its file, else the AWS environment, else a profile
    of the shared credentials file (each file refused unless root-only).

    :raises CredentialsFileRefused: a file others may read, or that is not one.
    :raises NotFound: none of them has credentials.
    """
    env = os.environ if env is None else env
    if path:
        return load_credentials(Path(path))
    found = credentials_from_env(env)
    if found is not None:
        return found
    shared = env.get("AWS_SHARED_CREDENTIALS_FILE") or (
        str(Path(env["HOME"]) / ".aws" / "credentials") if env.get("HOME") else ""
    )
    if shared and Path(shared).exists():
        return load_credentials(Path(shared), env.get("AWS_PROFILE") or "default")
    raise NotFound(
        what="object-store credentials",
        name="in the daemon's environment",
        hint="give --credentials FILE, a root-only AWS credentials file, or set "
        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for the daemon",
    )


def object_store(
    target_id: str, address: S3Address, endpoint: str, credentials: Credentials
) -> ObjectStore:
    return ObjectStore(
        target=target_id,
        endpoint=endpoint,
        bucket=address.bucket,
        prefix=address.prefix,
        credentials=credentials,
    )


def store_of(target: Target) -> ObjectStore:
    """The object store of a registered object-store target (credentials loaded now:
    a replaced file takes effect at the next transfer)."""
    return object_store(
        target.id,
        parse_s3_url(target.url),
        target.endpoint,
        resolve_credentials(target.credentials),
    )


def store_entry(target_id: str, where: str, speed: StoreSpeed, now: float) -> PerfEntry:
    """The store's performance-table row: GET down, PUT up (whole packs either way, so
    the random figures are the sequential ones)."""
    return PerfEntry(
        device_key=link_perf_key(target_id),
        kind="pool",
        measured_at=now,
        source="probe",
        device_path=where,
        transport="s3",
        seq_read=speed.get_rate,
        seq_write=speed.put_rate,
        rand_read=speed.get_rate,
        rand_write=speed.put_rate,
        chunk_size=speed.object_bytes,
    )


def s3_pool(
    target: Target,
    key: keys.MasterKey,
    volume_names: Callable[[], Iterable[str]],
    lease_timeout: float = DEFAULT_LEASE_TIMEOUT,
) -> S3Pool:
    """The generation store of an object-store target (its writers' leases live
    ``lease_timeout`` seconds without a renewal)."""
    return S3Pool(
        f"target:{target.id}",
        store_of(target),
        key,
        volume_names=volume_names,
        client=target.client_id,
        lease_timeout=lease_timeout,
    )


def describe_s3(target: Target) -> dict[str, object]:
    """The fields of ``target show`` an object store adds."""
    address = parse_s3_url(target.url)
    return {
        "kind": "s3",
        "endpoint": target.endpoint,
        "bucket": address.bucket,
        "prefix": address.prefix,
        "credentials": target.credentials or "environment",
    }
