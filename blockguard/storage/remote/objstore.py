"""An S3-compatible object store as seen by blockguard: put, get (a range), head, list,
delete of objects under one bucket and prefix, with every failure a named error.

A thin layer over obstore (the Python binding of Rust's ``object_store``; chosen by
``bench/bench_s3_client.py``, figures in docs/design/s3.md). The mapping of its
exceptions is done once, here (the I/O edge of a remote store, as
:mod:`blockguard.storage.ioedge` is for devices):

=====================================  ==============================================
the store says                          error
=====================================  ==============================================
no connection (refused, timeout, DNS)   :class:`~blockguard.errors.TargetUnreachable`
the connection reset or closed in the   :class:`~blockguard.errors.WireClosed`
middle of a request
401, 403 (bad signature, unknown key,   :class:`~blockguard.errors.NotAuthorized`
access denied)
404 (no such key, no such bucket)       :class:`~blockguard.errors.NotFound`
412 (the object changed: If-Match)      :class:`~blockguard.errors.DataError`
a quota or storage-full code, 507       :class:`~blockguard.errors.PoolSpaceLow`
anything else (5xx, a stray 4xx)        :class:`~blockguard.errors.StoreFailed`
=====================================  ==============================================

and an object shorter than asked (a range past its end comes back short, without error)
or of another size than its metadata says is a :class:`~blockguard.errors.DataError`.

Credentials come from a root-only file (refused when group or others may read it, as
the remote key file is) or from the AWS environment variables; the secret is never in a
repr, a log line or an error message.
"""

from __future__ import annotations

import configparser
import errno
import logging
import os
import re
import stat
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import obstore
from obstore.exceptions import (
    BaseError,
    PermissionDeniedError,
    PreconditionError,
    UnauthenticatedError,
)
from obstore.store import S3Store

from blockguard.core.units import MiB
from blockguard.errors import (
    CredentialsFileRefused,
    DataError,
    InvalidInput,
    NotAuthorized,
    NotFound,
    PoolSpaceLow,
    StoreFailed,
    TargetUnreachable,
    WireClosed,
)
from blockguard.storage.ioedge import io_edge

log = logging.getLogger(__name__)

#: Objects above this go up as multipart uploads, in parts of :data:`PART_SIZE`.
MULTIPART_THRESHOLD = 16 * MiB
PART_SIZE = 8 * MiB
#: S3 error codes (and the HTTP status) that mean "no room": AWS, MinIO, Ceph RGW. SeaweedFS
#: says 500 InternalError for a bucket over its quota (docs/design/s3.md).
SPACE_CODES = frozenset(
    {"QuotaExceeded", "XMinioStorageFull", "XMinioAdminBucketQuotaExceeded",
     "InsufficientStorage", "EntityTooLarge"}
)  # fmt: skip
INSUFFICIENT_STORAGE = 507
_STATUS = re.compile(r"status code: (\d{3})")
_CODE = re.compile(r"<Code>([A-Za-z0-9.]+)</Code>")
#: obstore's debug dump of an HTTP error that came after the connection was made (hyper
#: "SendRequest" with a reset, a broken pipe or an early close), and the OS's words.
_INTERRUPTED = re.compile(r"kind: Interrupted\b|connection closed before message completed")
_OS_MESSAGE = re.compile(r'message: "([^"]{1,120})"')
_NO_CONNECTION = (
    "error sending request",
    "connection refused",
    "connect error",
    "dns error",
    "timed out",
    "operation timed out",
)


@dataclass(frozen=True)
class Credentials:
    """An access key and its secret (never shown by repr)."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class ObjectInfo:
    """What the store says of one object."""

    key: str
    size: int
    etag: str | None
    #: When the store says it was written (its own clock: listings and :meth:`head`).
    modified: datetime | None = None


def load_credentials(path: Path, profile: str = "default") -> Credentials:
    """The credentials in ``path``, in the AWS shared-credentials format (an INI section
    ``[PROFILE]`` with ``aws_access_key_id`` and ``aws_secret_access_key``, and
    ``aws_session_token`` if any).

    :raises NotFound: there is no such file.
    :raises CredentialsFileRefused: not a regular file of this user's with mode 0600 (or
        stricter), or it lacks the profile or a key (the reason says which; never a value).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise NotFound(what="credentials file", name=str(path), hint="") from None
    except OSError as exc:
        reason = "it is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
        raise CredentialsFileRefused(path=path, reason=reason or str(exc)) from exc
    try:
        with io_edge(path, "reading the credentials file"):
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CredentialsFileRefused(path=path, reason="it is not a regular file")
            if st.st_uid != os.geteuid():
                raise CredentialsFileRefused(
                    path=path, reason=f"it belongs to uid {st.st_uid}, not to {os.geteuid()}"
                )
            if st.st_mode & 0o077:
                raise CredentialsFileRefused(
                    path=path,
                    reason=f"it has mode {stat.S_IMODE(st.st_mode):04o}: group or others "
                    "have access; it must be 0600",
                )
            raw = os.read(fd, 64 * 1024 + 1)
    finally:
        os.close(fd)
    if len(raw) > 64 * 1024:
        raise CredentialsFileRefused(path=path, reason="it is larger than 64 KiB")
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(raw.decode("utf-8"), source=str(path))
    except (UnicodeDecodeError, configparser.Error) as exc:
        # configparser's messages quote lines, and a line may hold the secret.
        raise CredentialsFileRefused(
            path=path, reason=f"it is not an AWS credentials file ({type(exc).__name__})"
        ) from None
    if not parser.has_section(profile):
        raise CredentialsFileRefused(path=path, reason=f"it has no [{profile}] section")
    section = parser[profile]
    for name in ("aws_access_key_id", "aws_secret_access_key"):
        if not section.get(name, "").strip():
            raise CredentialsFileRefused(path=path, reason=f"[{profile}] has no {name}")
    token = section.get("aws_session_token", "").strip() or None
    return Credentials(
        section["aws_access_key_id"].strip(), section["aws_secret_access_key"].strip(), token
    )


def credentials_from_env(env: Mapping[str, str] | None = None) -> Credentials | None:
    """The credentials of the AWS environment variables, or None when they are not set."""
    env = os.environ if env is None else env
    key, secret = env.get("AWS_ACCESS_KEY_ID", ""), env.get("AWS_SECRET_ACCESS_KEY", "")
    if not key or not secret:
        return None
    return Credentials(key, secret, env.get("AWS_SESSION_TOKEN") or None)


class ObjectStore:
    """The objects under ``prefix`` of one bucket of one S3 endpoint; named ``target``
    in every error. Safe to share between threads (obstore's client is)."""

    def __init__(
        self,
        *,
        target: str,
        endpoint: str,
        bucket: str,
        credentials: Credentials,
        prefix: str = "",
        region: str = "us-east-1",
        timeout: float = 60.0,
        connect_timeout: float = 5.0,
        retries: int = 2,
    ) -> None:
        if not endpoint.startswith(("http://", "https://")):
            raise InvalidInput(detail=f"endpoint {endpoint!r} is not an http(s) URL")
        self.target = target
        self.endpoint = endpoint
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        # The id is no secret (every request carries it in clear): errors name it.
        self.access_key_id = credentials.access_key_id
        secrets = {
            "access_key_id": credentials.access_key_id,
            "secret_access_key": credentials.secret_access_key,
        }
        if credentials.session_token:
            secrets["token"] = credentials.session_token
        self._store = S3Store(
            bucket,
            prefix=self.prefix or None,
            endpoint=endpoint,
            region=region,
            virtual_hosted_style_request=False,
            client_options={
                "allow_http": endpoint.startswith("http://"),
                "timeout": timedelta(seconds=timeout),
                "connect_timeout": timedelta(seconds=connect_timeout),
            },
            retry_config={
                "max_retries": retries,
                "retry_timeout": timedelta(seconds=timeout),
                "backoff": {
                    "init_backoff": timedelta(milliseconds=100),
                    "max_backoff": timedelta(seconds=5),
                    "base": 2,
                },
            },
            **secrets,  # type: ignore[arg-type]
        )

    def __repr__(self) -> str:
        return f"ObjectStore(target={self.target!r}, {self.endpoint}/{self.bucket}/{self.prefix})"

    def put(self, key: str, data: bytes) -> str | None:
        """Store ``data`` as ``key`` whole or not at all (a multipart upload above
        :data:`MULTIPART_THRESHOLD`); returns its ETag."""
        multipart = len(data) > MULTIPART_THRESHOLD
        log.debug("put %s/%s: %d bytes%s", self.target, key, len(data), " (multipart)" * multipart)
        with self._edge("putting", key):
            result = obstore.put(
                self._store, key, data, use_multipart=multipart, chunk_size=PART_SIZE,
                max_concurrency=4,
            )  # fmt: skip
        return result.get("e_tag")

    def get(
        self, key: str, start: int = 0, length: int | None = None, *, etag: str | None = None
    ) -> bytes:
        """The object's bytes, or ``length`` of them from ``start``; with ``etag``, only
        if the object is still that version.

        :raises DataError: fewer bytes came than asked (or than the object's size), or
            the object is no longer ``etag``.
        """
        if start < 0 or (length is not None and length <= 0):
            raise InvalidInput(detail=f"range {start}+{length} of {key}")
        options: dict[str, object] = {}
        if etag is not None:
            options["if_match"] = etag
        if length is not None:
            options["range"] = (start, start + length)
        elif start:
            options["range"] = {"offset": start}
        with self._edge("getting", key):
            result = obstore.get(self._store, key, options=options or None)  # type: ignore[arg-type]
            data = bytes(result.bytes())
        size = int(result.meta["size"])
        want = length if length is not None else size - start
        if len(data) != want:
            raise DataError(
                detail=f"object {key} on target {self.target}: {len(data)} bytes from offset "
                f"{start}, {want} expected (its size is {size})"
            )
        return data

    def head(self, key: str) -> ObjectInfo:
        """What the store says of ``key``."""
        with self._edge("looking up", key):
            meta = obstore.head(self._store, key)
        return ObjectInfo(key, int(meta["size"]), meta.get("e_tag"), meta.get("last_modified"))

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (a folder: ``"packs/"``), sorted."""
        found: list[ObjectInfo] = []
        with self._edge("listing", prefix or "/"):
            for batch in obstore.list(self._store, prefix or None):
                found.extend(
                    ObjectInfo(
                        str(m["path"]), int(m["size"]), m.get("e_tag"), m.get("last_modified")
                    )
                    for m in batch
                )
        return sorted(found, key=lambda info: info.key)

    def delete(self, key: str) -> None:
        """Delete ``key`` (no error when it is already gone: S3 says nothing of it)."""
        log.debug("delete %s/%s", self.target, key)
        with self._edge("deleting", key):
            obstore.delete(self._store, key)

    @contextmanager
    def _edge(self, op: str, key: str) -> Iterator[None]:
        try:
            yield
        except (BaseError, OSError) as exc:
            # obstore's own errors, and the builtin ones it raises for a missing object
            # or a connection; anything else (a TypeError) is a bug and stays one.
            raise self._named(exc, op, key) from exc

    def _named(self, exc: Exception, op: str, key: str) -> Exception:
        """The named error of an obstore (or connection) exception."""
        text = str(exc)
        status_match, code_match = _STATUS.search(text), _CODE.search(text)
        status = int(status_match.group(1)) if status_match else None
        code = code_match.group(1) if code_match else ""
        reason = _short(text)
        where = f"{self.bucket}/{self.prefix + '/' if self.prefix else ''}{key}"
        log.debug("%s %s on target %s failed: %s", op, where, self.target, reason)
        if status is None and _INTERRUPTED.search(text):
            # The store was reached and the request was on its way: not "cannot reach",
            # but a link that dropped (a load balancer, a proxy, a reset); retried next run.
            cause = _OS_MESSAGE.search(text)
            return WireClosed(
                peer=f"object store {self.target} ({self.endpoint})",
                where=f"while {op} {where}"
                + (f" ({cause.group(1).lower()})" if cause else " (connection closed)"),
            )
        if status is None and (
            isinstance(exc, ConnectionError | TimeoutError)
            or any(mark in text.lower() for mark in _NO_CONNECTION)
        ):
            return TargetUnreachable(target=self.target, address=self.endpoint, reason=reason)
        if code in SPACE_CODES or status == INSUFFICIENT_STORAGE:
            return PoolSpaceLow(pool=f"target {self.target}", path=where, free="no", needed=None)
        if isinstance(exc, PermissionDeniedError | UnauthenticatedError) or status in (401, 403):
            return NotAuthorized(
                detail=f"target {self.target} ({self.endpoint}) refused access key "
                f"{self.access_key_id} while {op} {where}: {code or status}"
            )
        if isinstance(exc, FileNotFoundError) or status == 404:
            what = "bucket" if code == "NoSuchBucket" else "object"
            name = self.bucket if what == "bucket" else where
            return NotFound(what=what, name=name, hint=f" on target {self.target}")
        if isinstance(exc, PreconditionError) or status == 412:
            return DataError(
                detail=f"object {where} on target {self.target} changed (it is no longer "
                "the version that was asked for)"
            )
        detail = f"HTTP {status} {code}".strip() if status else reason
        return StoreFailed(target=self.target, op=op, key=where, detail=detail)


def _short(text: str) -> str:
    """The first line of an obstore message, without its debug dump, at most 200 chars."""
    head = text.split("\n\nDebug source:", 1)[0].split("<?xml", 1)[0].strip()
    head = " ".join(head.split())
    return head if len(head) <= 200 else head[:197] + "..."
