"""The protected host's side of a conversation with a backup target: ``ssh -T`` spawned
through the runner, a :class:`~.channel.Channel` on its pipes, and one typed method per
operation the target answers (``engine/serving.py``'s table).

Errors the target reports arrive as the project's named errors (a full disk is
:class:`~blockguard.errors.PoolSpaceLow`, a missing generation
:class:`~blockguard.errors.NotFound`) and leave the conversation in step: the session goes
on. A broken channel (:class:`~blockguard.errors.WireError`) ends it: the child is reaped
at once and, when ssh itself failed (exit 255), its error is named from its stderr
(:func:`.ssh.ssh_failure`: wrong host key, refused key, target unreachable) with the wire
error as the cause. The session moves opaque bytes: packs and manifests are sealed
before they get here (``seal.py``).
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blockguard.errors import (
    BlockguardError,
    WireClosed,
    WireCorrupt,
    WireError,
    stderr_tail,
)
from blockguard.storage.remote.areaprobe import AreaReport
from blockguard.storage.remote.channel import (
    AREAS_VERSION,
    LINK_VERSION,
    MAX_OUTSTANDING,
    PROTOCOL_VERSIONS,
    Channel,
)
from blockguard.storage.remote.packvalues import GenerationState, Space
from blockguard.storage.remote.ssh import SshOptions, TargetAddress, ssh_argv, ssh_failure
from blockguard.storage.remote.wire import Frame
from blockguard.storage.runner import Runner, SpawnedChild, default_runner

#: Puts in flight by default: enough to fill a long link with 8 MiB packs, few enough
#: that a cut re-sends little (see docs/design/remote.md, Resume).
DEFAULT_WINDOW = 4
#: The capacity of the pipes to and from ssh (the kernel's default is 64 KiB; 1 MiB is
#: what an unprivileged process may ask by default). A put blocks on the pipe while ssh
#: drains it onto the line, and the next pack is read and sealed only after; the larger
#: pipe, with ssh's channel window and the socket's buffer behind it, keeps the line busy
#: through that and through a daemon that a loaded host does not schedule for a while.
#: Restores read through the other one: ssh goes on reading the socket while a pack is
#: opened here.
PIPE_BYTES = 1 << 20
#: Seconds a closed ssh has to end (after BYE it ends at once) before it is killed.
DEFAULT_CLOSE_TIMEOUT = 30.0

#: Maps a child's exit code and stderr to the named error of its failure (or None).
FailureMap = Callable[[int | None, str], BlockguardError | None]


@dataclass(frozen=True)
class RemoteGeneration:
    """A committed generation as ``list`` reports it; ``manifest`` is its sealed manifest."""

    generation: str
    meta: dict[str, Any]
    packs: int
    size: int
    committed: float
    manifest: bytes
    problem: str | None = None


class RemoteSession:
    """One conversation with a target (after the hello); close it, or use ``with``.

    A session has one owner thread, as its channel does.

    :param child: the spawned ssh (or any program speaking the protocol on its pipes).
    :param peer: how errors name the target, e.g. ``"target backup1"``.
    :param failure: names the child's own failure from its exit code and stderr.
    :param window: puts in flight at once (1 to the channel's limit).
    """

    def __init__(
        self,
        child: SpawnedChild,
        *,
        peer: str,
        failure: FailureMap | None = None,
        window: int = DEFAULT_WINDOW,
    ) -> None:
        if not 1 <= window <= MAX_OUTSTANDING:
            raise ValueError(f"a window of {window} puts is not 1-{MAX_OUTSTANDING}")
        self.child = child
        self.peer = peer
        self.window = window
        self._failure = failure or (lambda _rc, _err: None)
        self.channel = Channel(child.stdout, child.stdin, peer=peer)
        self._open = True

    @classmethod
    def start(
        cls,
        argv: Sequence[str],
        *,
        peer: str,
        runner: Runner | None = None,
        failure: FailureMap | None = None,
        window: int = DEFAULT_WINDOW,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
        env: Mapping[str, str] | None = None,
    ) -> RemoteSession:
        """Spawn ``argv`` and say hello.

        :raises WireVersionMismatch: no protocol version in common.
        :raises NotAuthorized: the target refused this client at the hello.
        :raises BlockguardError: the child's failure as ``failure`` names it.
        """
        child = (runner or default_runner()).spawn(
            argv, close_timeout=close_timeout, env=env, pipe_bytes=PIPE_BYTES
        )
        session = cls(child, peer=peer, failure=failure, window=window)
        try:
            with session._guard():
                session.channel.greet(PROTOCOL_VERSIONS)
        except BaseException:
            session.abort()
            raise
        return session

    @classmethod
    def connect(
        cls,
        target: str,
        address: TargetAddress,
        *,
        key: Path,
        known_hosts: Path,
        options: SshOptions | None = None,
        runner: Runner | None = None,
        window: int = DEFAULT_WINDOW,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    ) -> RemoteSession:
        """``ssh -T`` to target ``target`` at ``address`` and say hello.

        :raises HostKeyMismatch: the target's host key is not the one pinned.
        :raises NotAuthorized: the target refused the key (or, at the hello, the client).
        :raises TargetUnreachable: ssh could not reach the target's sshd.
        """
        argv = ssh_argv(address, key=key, known_hosts=known_hosts, options=options or SshOptions())

        def failure(returncode: int | None, stderr: str) -> BlockguardError | None:
            return ssh_failure(
                returncode, stderr, target=target, address=address, known_hosts=known_hosts
            )

        return cls.start(
            argv,
            peer=f"target {target}",
            runner=runner,
            failure=failure,
            window=window,
            close_timeout=close_timeout,
        )

    # --- the end of a session ---------------------------------------------------------

    def close(self) -> int:
        """Say BYE and reap the child (killed if it does not end in time).

        :returns: the child's exit code (0: the target ended in order).
        """
        if self._open:
            self._open = False
            try:
                self.channel.bye()
            except BaseException:
                # The child is reaped however the goodbye failed (a broken pipe, an
                # interrupt): no process outlives its session.
                self.child.close(kill=True)
                raise
        return self.child.close()

    def abort(self) -> int:
        """End at once (a broken channel, an error of ours): kill and reap the child."""
        self._open = False
        return self.child.close(kill=True)

    @property
    def alive(self) -> bool:
        """False once the session ended (closed, or its channel broke)."""
        return self._open

    def __enter__(self) -> RemoteSession:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        # A target's refusal leaves the conversation in step: end it in order.
        if exc_type is None or (isinstance(exc, BlockguardError) and self._open):
            self.close()
        else:
            self.abort()

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """A named error of the target passes (the session goes on); a broken channel
        ends the session, named by the child's own failure where it has one."""
        if not self._open:
            raise WireClosed(peer=self.peer, where="earlier (this session is closed)")
        try:
            yield
        except WireError as exc:
            self._open = False
            # A closed channel is mostly a child that is ending: give it its close
            # timeout to say why. Anything else: the stream is out of step, kill it.
            returncode = self.child.close(kill=not isinstance(exc, WireClosed))
            stderr = self.child.stderr()
            named = self._failure(returncode, stderr)
            if named is not None:
                raise named from exc
            # WireClosed itself, not WireTruncated: that one's message says enough.
            if type(exc) is WireClosed and returncode != 0:
                tail = stderr_tail(stderr) or "no error output"
                program = Path(self.child.argv[0]).name
                raise WireClosed(
                    peer=self.peer,
                    where=f"{exc.fields.get('where', '')} ({program} exited {returncode}: {tail})",
                ) from exc
            raise
        except BlockguardError:
            raise
        except BaseException:
            self.abort()
            raise

    def _call(self, op: str, args: Mapping[str, Any] | None = None, payload: bytes = b"") -> Frame:
        with self._guard():
            return self.channel.call(op, args, payload)

    # --- the operations ---------------------------------------------------------------

    def begin(
        self, generation: str, meta: Mapping[str, Any] | None = None, needed: int = 0
    ) -> GenerationState:
        """Open ``generation`` on the target (or find it open: a resume).

        :param needed: bytes it will take (the target refuses with PoolSpaceLow up front).
        """
        args = {"generation": generation, "meta": dict(meta or {}), "needed": needed}
        return self._state(self._call("begin", args))

    def status(self, generation: str) -> GenerationState:
        """Which packs of ``generation`` the target holds, and whether it is committed."""
        return self._state(self._call("status", {"generation": generation}))

    def put(self, generation: str, pack: int, data: bytes) -> int:
        """Store one pack (durable on the target when this returns). :returns: its size."""
        return self.put_packs(generation, [(pack, data)])[pack]

    def put_packs(self, generation: str, packs: Iterable[tuple[int, bytes]]) -> dict[int, int]:
        """Store packs with up to :attr:`window` puts in flight.

        When the target refuses one (a full disk), no pack is sent once that is seen
        (those already in flight may still be stored), the answers in flight are
        collected (so the session stays usable) and the first refusal is raised; what
        was stored stays for a resume.

        :returns: pack number -> bytes stored, for every pack sent.
        """
        puts = self.put_window(generation)
        for number, data in packs:
            if not puts.send(number, data):
                break
        return puts.finish()

    def put_window(self, generation: str) -> PutWindow:
        """Puts of ``generation`` sent one by one as they are made (a writer's packs),
        with up to :attr:`window` in flight: see :class:`PutWindow`."""
        return PutWindow(self, generation)

    def commit(self, generation: str, index: Mapping[str, Any], manifest: bytes) -> GenerationState:
        """Commit ``generation`` with its pack ``index`` and sealed ``manifest`` (atomic on
        the target; a retry after a lost answer answers as the first did)."""
        args = {"generation": generation, "index": dict(index)}
        return self._state(self._call("commit", args, manifest))

    def list(self) -> list[RemoteGeneration]:
        """The committed generations of this client, with their sealed manifests."""
        answer = self._call("list")
        entries = answer.meta.get("generations")
        if not isinstance(entries, list):
            raise self._corrupt("a list answer without generations")
        found, offset = [], 0
        for entry in entries:
            try:
                size = entry["manifest_size"]
                fields = {k: v for k, v in entry.items() if k != "manifest_size"}
                manifest = answer.payload[offset : offset + size]
                offset += size
                found.append(RemoteGeneration(**fields, manifest=manifest))
            except (KeyError, TypeError):
                raise self._corrupt(f"a malformed list entry {entry!r:.200}") from None
        if offset != len(answer.payload):
            raise self._corrupt("the manifests of a list answer do not add up to its payload")
        return found

    def get(self, generation: str, pack: int) -> bytes:
        """One pack of a committed generation, as stored (the target re-checked it)."""
        answer = self._call("get", {"generation": generation, "pack": pack})
        if self._int(answer.meta, "size") != len(answer.payload):
            raise self._corrupt(f"pack {pack} came with a size that is not its length")
        return answer.payload

    def remove(self, generation: str) -> None:
        """Remove ``generation`` (committed or not) from the target."""
        self._call("remove", {"generation": generation})

    def mark_damaged(self, generation: str, reason: str, chunk: int | None = None) -> None:
        """Record damage found in ``generation`` on the target, so every client sees it."""
        args: dict[str, Any] = {"generation": generation, "reason": reason}
        if chunk is not None:
            # The target takes an int or nothing: damage of a whole pack names no chunk.
            args["chunk"] = chunk
        self._call("mark-damaged", args)

    @property
    def can_link(self) -> bool:
        """The target links packs (``link``: protocol version 2 and later)."""
        return (self.channel.version or 0) >= LINK_VERSION

    def link(
        self, generation: str, source: str, packs: Iterable[tuple[int, int]]
    ) -> dict[int, dict[str, Any]] | None:
        """Make packs of the open ``generation`` on the target from packs of its committed
        ``source`` (``(source pack, pack)`` pairs): a synthesized full's unchanged packs.

        :returns: pack -> its index entry (``pack``, ``size``, ``xxh3_128``); ``None`` when
            the target predates ``link`` (the hello agreed on an older version).
        """
        if not self.can_link:
            return None
        args = {"generation": generation, "source": source, "packs": [list(p) for p in packs]}
        answer = self._call("link", args)
        made: dict[int, dict[str, Any]] = {}
        for entry in answer.meta.get("packs") or []:
            try:
                made[int(entry["pack"])] = {
                    "pack": int(entry["pack"]),
                    "size": int(entry["size"]),
                    "xxh3_128": str(entry["xxh3_128"]),
                }
            except (KeyError, TypeError, ValueError):
                raise self._corrupt(f"a malformed link entry {entry!r:.200}") from None
        return made

    def space(self) -> Space:
        """The target area's free and total bytes and what this client uses."""
        meta = self._call("space").meta
        return Space(self._int(meta, "free"), self._int(meta, "total"), self._int(meta, "used"))

    def areas(self) -> list[AreaReport] | None:
        """The target's areas with their sizes and measured speeds.

        :returns: ``None`` when the target predates ``areas`` (the hello agreed on an
            older protocol version): the caller plans with the link alone.
        """
        if (self.channel.version or 0) < AREAS_VERSION:
            return None
        found = self._call("areas").meta.get("areas")
        if not isinstance(found, list):
            raise self._corrupt("an areas answer without a list of areas")
        try:
            return [AreaReport.from_dict(a) for a in found]
        except ValueError as exc:
            raise self._corrupt(f"an areas answer that does not fit: {exc}") from None

    def probe(self, down: int = 0, up: bytes = b"") -> bytes:
        """Send ``up`` (discarded by the target), receive ``down`` random bytes."""
        answer = self._call("probe", {"down": down}, up)
        if self._int(answer.meta, "received") != len(up) or len(answer.payload) != down:
            raise self._corrupt("a probe answer of the wrong size")
        return answer.payload

    # --- reading answers ----------------------------------------------------------------

    def _corrupt(self, detail: str) -> WireCorrupt:
        # A well-formed frame that says something impossible: the peer is not what we
        # think; the session cannot go on.
        self.abort()
        return WireCorrupt(peer=self.peer, detail=detail)

    def _int(self, meta: Mapping[str, Any], name: str) -> int:
        value = meta.get(name)
        if type(value) is not int or value < 0:
            raise self._corrupt(f"an answer whose {name} is {value!r:.40}")
        return value

    def _state(self, answer: Frame) -> GenerationState:
        meta = answer.meta
        try:
            packs = {int(n): int(size) for n, size in meta["packs"]}
            state = GenerationState(
                generation=str(meta["generation"]),
                committed=bool(meta["committed"]),
                packs=packs,
                meta=dict(meta["meta"]),
            )
        except (KeyError, TypeError, ValueError):
            raise self._corrupt(f"a malformed generation state {dict(meta)!r:.200}") from None
        return state


class PutWindow:
    """Puts of one generation with up to the session's window in flight, fed one pack at
    a time (:meth:`send`), collected by :meth:`finish`.

    When the target refuses a put (a full disk), nothing is sent after that is seen, the
    answers in flight are collected (the session stays usable) and :meth:`finish`
    raises the first refusal; what was stored stays for a resume.
    """

    def __init__(self, session: RemoteSession, generation: str) -> None:
        self.session = session
        self.generation = generation
        #: Pack number -> bytes stored, for every put answered.
        self.stored: dict[int, int] = {}
        self.refused: BlockguardError | None = None
        self._in_flight: collections.deque[tuple[int, int]] = collections.deque()

    def send(self, number: int, data: bytes) -> bool:
        """Send pack ``number`` (after collecting answers while the window is full).

        :returns: False when a refusal was seen (the pack was not sent; call
            :meth:`finish` to raise it).
        """
        session = self.session
        while len(self._in_flight) >= session.window:
            self._collect()
        if self.refused is not None:
            return False
        with session._guard():
            request_id = session.channel.request(
                "put", {"generation": self.generation, "pack": number}, data
            )
        self._in_flight.append((request_id, number))
        return True

    def finish(self) -> dict[int, int]:
        """Collect every answer in flight.

        :returns: pack number -> bytes stored, for every pack sent.
        :raises BlockguardError: the first refusal.
        """
        while self._in_flight:
            self._collect()
        if self.refused is not None:
            raise self.refused
        return self.stored

    def _collect(self) -> None:
        session = self.session
        request_id, number = self._in_flight.popleft()
        try:
            with session._guard():
                answer = session.channel.response(request_id)
        except BlockguardError as exc:
            if not session.alive:
                raise  # the channel broke: the session is over
            self.refused = self.refused or exc
            return
        self.stored[number] = session._int(answer.meta, "size")
