"""Backup targets: registration, the host's key material, the link in the performance
table (issue 11, docs/design/remote.md).

``target add`` is in two halves. :meth:`TargetRegistry.prepare` decides, quickly and
before anything is written: the inputs are checked (id, URL, pool, fingerprint, an
imported key's text), and without a confirmed fingerprint the target's sshd is asked for
its host keys and the call is refused with :class:`HostKeyUnconfirmed` showing them
(never trust on first use). With one, the key is pinned into a known_hosts file of this
registration only; a target offering no key with that fingerprint is
:class:`HostKeyMismatch` and nothing is kept. :meth:`TargetRegistry.register` then does
the long part (a job): the master key and the client key are made (once, kept
forever), ssh connects, the hello, ``space``, the link measured; only when all of that
worked are the target, its link (a performance-table row) and its pinned host key
recorded. A target that refuses the client key is :class:`NotAuthorized` with the line
for its authorized_keys.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blockguard.core import vocab
from blockguard.core.catalog import (
    Catalog,
    PerfEntry,
    Target,
    area_of_perf_key,
    area_perf_key,
    link_perf_key,
)
from blockguard.engine import s3targets
from blockguard.engine.s3targets import S3TargetRequest, StoreMeasure
from blockguard.errors import (
    AlreadyExists,
    BlockguardError,
    Busy,
    HostKeyUnconfirmed,
    InvalidInput,
    NotAuthorized,
    NotFound,
    WireError,
)
from blockguard.storage.pool.remotepool import RemotePool
from blockguard.storage.pool.s3pool import S3Pool
from blockguard.storage.remote import keys, ssh
from blockguard.storage.remote.areaprobe import AreaReport
from blockguard.storage.remote.linkprobe import LinkSpeed, measure_link
from blockguard.storage.remote.session import RemoteSession, Space
from blockguard.storage.remote.storeprobe import measure_store
from blockguard.storage.runner import Runner

log = logging.getLogger(__name__)

#: Under the state directory: the client key (and ``.pub``), and the pinned host keys.
CLIENT_KEY = Path("keys") / "ssh_ed25519"
KNOWN_HOSTS = Path("known_hosts")
#: The forced command a target's authorized_keys gives this host's key (the standalone
#: serve over a directory; ``DIR`` is the target's area for it).
SERVE_FORCED_COMMAND = "python3 -m blockguard.engine.servecmd --client {client} --root DIR"

#: Measures the link of a session (tests pass a smaller one).
LinkMeasure = Callable[[RemoteSession], LinkSpeed]


@dataclass(frozen=True)
class TargetRequest:
    """A checked ``target add``: everything :meth:`TargetRegistry.register` needs."""

    id: str
    address: ssh.TargetAddress
    pool: str
    client_id: str
    host_key: ssh.HostKey
    #: The pinned host key of this registration alone, merged into known_hosts on success.
    known_hosts: Path
    #: An imported master key (``target add --key`` on a new host), or None.
    key: keys.MasterKey | None


def default_client_id() -> str:
    """This host's id on targets: its short host name when it follows the name rule."""
    name = socket.gethostname().split(".", 1)[0]
    try:
        return vocab.check_name("client id", name)
    except InvalidInput:
        return "host"


def area_entry(
    target_id: str, url: str, area: AreaReport, link: LinkSpeed, now: float
) -> PerfEntry:
    """A target area's performance-table row as seen from this host: each figure the
    slower of the area's own and the link's (reads come down, writes go up). An area the
    target could not measure gets no figures (the planner then takes the link alone)."""
    speed = area.speed
    limited = None if speed is None else link.limit(speed)
    return PerfEntry(
        device_key=area_perf_key(target_id, area.name),
        kind="pool",
        measured_at=area.measured_at or now,
        source="probe",
        device_path=f"{url} {area.name}",
        capacity=area.total,
        rotational=None if area.disk not in ("hdd", "ssd") else area.disk == "hdd",
        transport="ssh",
        layout=area.layout or None,
        seq_read=None if limited is None else limited.seq_read,
        seq_write=None if limited is None else limited.seq_write,
        rand_read=None if limited is None else limited.rand_read,
        rand_write=None if limited is None else limited.rand_write,
        chunk_size=None if limited is None else limited.chunk_size,
    )


def target_areas(catalog: Catalog, target_id: str) -> dict[str, PerfEntry]:
    """The performance-table rows of the target's areas, by area name."""
    found = {}
    for entry in catalog.list_perf("pool"):
        name = area_of_perf_key(target_id, entry.device_key)
        if name is not None:
            found[name] = entry
    return found


class TargetRegistry:
    """The registered targets of this host and its key material.

    :param catalog: where targets and the link figures are recorded.
    :param state_dir: the daemon's state directory (keys, known_hosts).
    :param runner: runs ssh-keygen, ssh-keyscan and ssh.
    :param measure: measures a session's link.
    """

    def __init__(
        self,
        catalog: Catalog,
        state_dir: Path,
        runner: Runner,
        measure: LinkMeasure = measure_link,
        measure_s3: StoreMeasure = measure_store,
        lease_timeout: float = s3targets.DEFAULT_LEASE_TIMEOUT,
    ) -> None:
        self.catalog = catalog
        #: Seconds an object-store writer's lease lives without a renewal.
        self.lease_timeout = lease_timeout
        self.state_dir = Path(state_dir)
        self.runner = runner
        self.measure = measure
        self.measure_s3 = measure_s3
        # The key files are made once: a registration's job and a ClientKey call must
        # not both find none and race to make one.
        self._keys_lock = threading.Lock()
        #: Serializes read-modify-writes of known_hosts (jobs of two registrations).
        self._hosts_lock = threading.RLock()

    @property
    def key_path(self) -> Path:
        return self.state_dir / keys.KEY_FILE

    @property
    def client_key_path(self) -> Path:
        return self.state_dir / CLIENT_KEY

    @property
    def known_hosts(self) -> Path:
        return self.state_dir / KNOWN_HOSTS

    # --- deciding ------------------------------------------------------------------------

    def prepare(
        self,
        target_id: str,
        url: str,
        pool: str,
        host_key: str = "",
        *,
        key_text: str = "",
        client_id: str = "",
        endpoint: str = "",
        credentials: str = "",
    ) -> TargetRequest | S3TargetRequest:
        """Check a ``target add`` and pin the confirmed host key for it (see the module
        docstring); nothing is recorded. An ``s3://`` URL is an object store
        (:mod:`.s3targets`): ``endpoint`` and ``credentials`` are for it alone.

        :param host_key: the ``SHA256:...`` fingerprint the administrator confirmed, or
            empty to be shown the target's.
        :param key_text: an exported master key to import (a new host), or empty.
        :raises InvalidInput: a bad id, URL, pool, client id or fingerprint.
        :raises AlreadyExists: a target of that id exists.
        :raises KeyTextInvalid: ``key_text`` does not parse (its checksum, a character).
        :raises HostKeyUnconfirmed: no fingerprint was given (it names the offered ones).
        :raises HostKeyMismatch: the target offers no key with that fingerprint.
        :raises TargetUnreachable: its sshd does not answer.
        """
        vocab.check_name("target", target_id)
        s3 = s3targets.is_s3_url(url)
        if not s3 and (endpoint or credentials):
            raise InvalidInput(
                detail="--endpoint and --credentials are for object-store targets (s3://...)"
            )
        if s3 and (pool or host_key):
            raise InvalidInput(
                detail="an object-store target (s3://...) has no --pool or --host-key"
            )
        address = None if s3 else ssh.parse_target_url(url)
        if not s3:
            vocab.check_name("target pool", pool)
        client_id = vocab.check_name("client id", client_id or default_client_id())
        imported = keys.parse_key_text(key_text) if key_text else None
        if imported is not None and self.key_path.exists():
            existing = keys.load_key_file(self.key_path)
            if existing != imported:
                raise InvalidInput(
                    detail=f"this host already has another master key ({self.key_path}); "
                    "an imported key must be the same key (export it with key export)"
                )
        with contextlib.suppress(NotFound):
            self.catalog.get_target(target_id)
            raise AlreadyExists(what="target", name=target_id)
        if s3:
            return s3targets.prepare_s3(
                target_id,
                url,
                endpoint,
                credentials,
                client_id=client_id,
                imported=imported,
                existing=self.catalog.list_targets(),
            )
        assert address is not None
        if not host_key:
            offered = ssh.scan_host_keys(address, target=target_id, runner=self.runner)
            first = offered[0].fingerprint
            raise HostKeyUnconfirmed(
                target=target_id,
                address=address.hostport,
                offered=", ".join(f"{k.key_type} {k.fingerprint}" for k in offered),
                fingerprint=first,
            )
        pinned = self.state_dir / "keys" / f"known_hosts.adding.{target_id}"
        pinned.unlink(missing_ok=True)
        found = ssh.pin_host_key(address, host_key, pinned, target=target_id, runner=self.runner)
        return TargetRequest(target_id, address, pool, client_id, found, pinned, imported)

    # --- doing -----------------------------------------------------------------------------

    def register(self, request: TargetRequest | S3TargetRequest) -> Target:
        """Connect to the target, measure the link and record it (the long half of
        ``target add``; runs in a job).

        :raises NotAuthorized: the target refused this host's key (the message has the
            line for its authorized_keys) or its client id.
        :raises WireError: the link failed (nothing is recorded).
        """
        if isinstance(request, S3TargetRequest):
            return self._register_s3(request)
        try:
            self.master_key(request.key)
            public = self.client_public_key()
            try:
                session = RemoteSession.connect(
                    request.id,
                    request.address,
                    key=self.client_key_path,
                    known_hosts=request.known_hosts,
                    runner=self.runner,
                )
            except NotAuthorized as exc:
                line = self.authorized_keys_line(request.client_id, public)
                raise NotAuthorized(
                    detail=f"{exc.fields.get('detail', exc)}; on the target, add this line to "
                    f"the authorized_keys of {request.address.user} (DIR: the directory of "
                    f"pool {request.pool}, prepared with `python3 -m "
                    f"blockguard.engine.servecmd --create --client {request.client_id} "
                    f"--root DIR`): {line}"
                ) from exc
            with session:
                space = session.space()
                reported = self._areas(request.id, session)
                link = self.measure(session)
            log.info("target %s: %s", request.id, link.describe())
            now = self.catalog.now()
            areas = [area_entry(request.id, request.address.url, a, link, now) for a in reported]
            speed = link.device_speed()
            entry = PerfEntry(
                device_key=link_perf_key(request.id),
                kind="pool",
                measured_at=self.catalog.now(),
                source="probe",
                device_path=request.address.url,
                transport="ssh",
                seq_read=speed.seq_read,
                seq_write=speed.seq_write,
                rand_read=speed.rand_read,
                rand_write=speed.rand_write,
                chunk_size=speed.chunk_size,
            )
            with self._hosts_lock:
                return self._record(request, entry, link, space, areas)
        finally:
            request.known_hosts.unlink(missing_ok=True)

    def _register_s3(self, request: S3TargetRequest) -> Target:
        """Make (or import) the master key, load the credentials, measure the store and
        record the target with its figures; nothing is recorded when any step fails.

        :raises NotAuthorized: the store refused the key.
        :raises NotFound: no such bucket, or no credentials.
        :raises TargetUnreachable: the endpoint does not answer.
        :raises CredentialsFileRefused: others may read the credentials file.
        """
        self.master_key(request.key)
        address = request.address
        credentials = s3targets.resolve_credentials(request.credentials)
        store = s3targets.object_store(request.id, address, request.endpoint, credentials)
        speed = self.measure_s3(store)
        where = f"{request.endpoint}/{address.bucket}/{address.prefix}".rstrip("/")
        entry = s3targets.store_entry(request.id, where, speed, self.catalog.now())
        return self.catalog.add_target(
            request.id,
            url=address.url,
            client_id=request.client_id,
            pool="",
            host_key="",
            link=entry,
            round_trip=speed.latency,
            kind="s3",
            endpoint=request.endpoint,
            credentials=request.credentials,
        )

    def _record(
        self,
        request: TargetRequest,
        entry: PerfEntry,
        link: LinkSpeed,
        space: Space,
        areas: list[PerfEntry],
    ) -> Target:
        """Pin the host key and record the target, as one step against other writers of
        known_hosts (the caller holds ``_hosts_lock``)."""
        before = self._pinned(request.address.known_hosts_name)
        self._pin(request)
        try:
            return self.catalog.add_target(
                request.id,
                url=request.address.url,
                client_id=request.client_id,
                pool=request.pool,
                host_key=request.host_key.fingerprint,
                link=entry,
                round_trip=link.round_trip,
                space=(space.free, space.total, space.used),
                areas=areas,
            )
        except BaseException:
            # Back as it was: another target may share the address and its key.
            self._rewrite_known_hosts(request.address.known_hosts_name, before)
            raise

    @staticmethod
    def _areas(target_id: str, session: RemoteSession) -> list[AreaReport]:
        """The target's areas; none from a target that predates them or refuses them (the
        planner then takes the link alone)."""
        try:
            found = session.areas()
        except WireError:
            raise  # the link itself failed: the registration fails as for any call
        except BlockguardError as exc:  # a refusal of the target's: plan with the link
            log.warning("target %s reports no areas: %s", target_id, exc)
            return []
        if found is None:
            log.info("target %s predates areas: planning with the link alone", target_id)
            return []
        return found

    def remove(self, target_id: str) -> None:
        """Forget a target: its record, its link's figures and its pinned host key (when
        no other target shares its address).

        :raises NotFound: no target of that id.
        :raises Busy: generations on it are recorded, or objectives name it (their
            copies would be forgotten, or planned against nothing).
        """
        target = self.catalog.get_target(target_id)
        users = self._users(target_id)
        if users:
            raise Busy(what=f"target {target_id}", reason=users)
        if target.kind == "s3":
            # Nothing pinned: the record and its figures only (the bucket is left as it is).
            self.catalog.remove_target(target_id)
            return
        with self._hosts_lock:
            self._forget(target)

    def _forget(self, target: Target) -> None:
        """Drop the record, and its pinned host key when no other target shares the
        address (the caller holds ``_hosts_lock``)."""
        self.catalog.remove_target(target.id)
        address = ssh.parse_target_url(target.url)
        if not any(
            ssh.parse_target_url(t.url).known_hosts_name == address.known_hosts_name
            for t in self.catalog.list_targets()
            if t.kind == "ssh"
        ):
            self._unpin(address)

    def _users(self, target_id: str) -> str:
        """What still refers to the target, for a person ("" for nothing)."""
        held = sorted({r.volume for r in self.catalog.list_remote_generations(target_id)})
        named = [
            f"volume {v.name}"
            for v in self.catalog.list_volumes()
            if (v.objectives or {}).get("remote_target") == target_id
        ] + [
            f"group {g.name}"
            for g in self.catalog.list_groups()
            if (g.objectives or {}).get("remote_target") == target_id
        ]
        parts = []
        if held:
            parts.append(f"it holds generations of {', '.join(held)}")
        if named:
            parts.append(
                f"the objectives of {', '.join(named)} name it (clear them with "
                '`blockguardctl objectives NAME --target "" --remote-rpo "" ...`)'
            )
        return "; ".join(parts)

    def describe(self, target: Target) -> dict[str, Any]:
        """What ``target list`` / ``target show`` tell of a target."""
        link = self.catalog.get_perf(link_perf_key(target.id), "pool")
        found: dict[str, Any] = {
            "id": target.id,
            "kind": target.kind,
            "url": target.url,
            "pool": target.pool,
            "client_id": target.client_id,
            "host_key": target.host_key,
            "state": target.state,
            "state_reason": target.state_reason,
            "added": target.added,
        }
        if target.kind == "s3":
            found |= s3targets.describe_s3(target)
        if link is not None:
            found["link_down"] = link.seq_read
            found["link_up"] = link.seq_write
            found["link_measured_at"] = link.measured_at
        if target.round_trip is not None:
            found["link_round_trip"] = target.round_trip
        areas = target_areas(self.catalog, target.id)
        if areas:
            found["areas"] = [
                {
                    "name": name,
                    "read": e.seq_read,
                    "write": e.seq_write,
                    "rand_read": e.rand_read,
                    "rand_write": e.rand_write,
                    "total": e.capacity,
                    "disk": {None: "unknown", True: "hdd", False: "ssd"}[e.rotational],
                    "measured_at": e.measured_at,
                }
                for name, e in areas.items()
            ]
        if target.space_total is not None:
            found["space_free"] = target.space_free
            found["space_total"] = target.space_total
            found["space_used"] = target.space_used
            found["space_checked_at"] = target.checked_at
        return found

    # --- key material ----------------------------------------------------------------------

    def remote_pool(self, target_id: str) -> RemotePool | S3Pool:
        """The generation store on a registered target: ssh with the pinned known_hosts
        and the client key, sealed with the master key (a new session after a cut); or
        the bucket of an object-store target.

        :raises NotFound: no target of that id.
        :raises KeyFileRefused: the master key cannot be loaded.
        :raises CredentialsFileRefused: an object store's credentials cannot be loaded.
        """
        target = self.catalog.get_target(target_id)
        key = keys.load_key_file(self.key_path)

        def session() -> RemoteSession:
            return RemoteSession.connect(
                target.id,
                address,
                key=self.client_key_path,
                known_hosts=self.known_hosts,
                runner=self.runner,
            )

        def volume_names() -> set[str]:
            # What this host calls its volumes: a generation whose manifest does not open
            # is shown by its volume's name, not the id the target knows it by.
            names = {v.name for v in self.catalog.list_volumes()}
            return names | {r.volume for r in self.catalog.list_remote_generations(target.id)}

        if target.kind == "s3":
            return s3targets.s3_pool(target, key, volume_names, self.lease_timeout)
        address = ssh.parse_target_url(target.url)
        return RemotePool(
            f"target:{target.id}",
            session,
            key,
            target=target.id,
            area=target.pool,
            volume_names=volume_names,
        )

    def master_key(self, imported: keys.MasterKey | None = None) -> keys.MasterKey:
        """This host's master key: loaded, or made now (``imported`` on a new host)."""
        with self._keys_lock:
            return self._master_key(imported)

    def _master_key(self, imported: keys.MasterKey | None) -> keys.MasterKey:
        if self.key_path.exists() or self.key_path.is_symlink():
            existing = keys.load_key_file(self.key_path)
            if imported is not None and existing != imported:
                raise InvalidInput(
                    detail=f"this host already has another master key ({self.key_path})"
                )
            return existing
        made = keys.create_key_file(self.key_path, imported)
        log.warning("made the remote master key %s: %s", self.key_path, keys.KEY_WARNING)
        return made

    def export_key(self) -> dict[str, str]:
        """The master key as text with the warning (``key export``).

        :raises NotFound: no key yet (it is made by the first ``target add``).
        """
        key = keys.load_key_file(self.key_path)
        log.warning("the remote master key %s was exported", self.key_path)
        return {"key": keys.export_key_text(key), "warning": keys.KEY_WARNING}

    def client_public_key(self) -> str:
        """The client key's public line (the key is made on first use, then kept)."""
        public = self.client_key_path.with_name(self.client_key_path.name + ".pub")
        with self._keys_lock:
            if not public.exists():
                comment = f"blockguard@{default_client_id()}"
                return ssh.create_client_key(
                    self.client_key_path, comment=comment, runner=self.runner
                )
            return public.read_text().strip()

    @staticmethod
    def authorized_keys_line(client_id: str, public: str) -> str:
        """The line a target's authorized_keys needs for this host's key."""
        command = SERVE_FORCED_COMMAND.format(client=client_id)
        return f'restrict,command="{command}" {public}'

    # --- known_hosts -----------------------------------------------------------------------

    def _pin(self, request: TargetRequest) -> None:
        """Move the registration's pinned key into known_hosts (replacing that address's)."""
        name = request.address.known_hosts_name
        key = request.host_key
        self._rewrite_known_hosts(name, f"{name} {key.key_type} {key.blob}")

    def _pinned(self, name: str) -> str | None:
        """The known_hosts line of ``name``, if one is pinned."""
        if not self.known_hosts.exists():
            return None
        lines = self.known_hosts.read_text().splitlines()
        return next((x for x in lines if x.split(maxsplit=1)[:1] == [name]), None)

    def _unpin(self, address: ssh.TargetAddress) -> None:
        self._rewrite_known_hosts(address.known_hosts_name, None)

    def _rewrite_known_hosts(self, name: str, line: str | None) -> None:
        with self._hosts_lock:
            ssh.rewrite_known_hosts(self.known_hosts, name, line)
