"""Run a callable in a child process whose block I/O is throttled by a cgroup.

This makes a "slow" and a "fast" pool disk on one host for tests and benches (see the
platform notes): cgroup v1 ``blkio.throttle.{read,write}_bps_device`` or cgroup v2
``io.max`` limit the bytes per second of one device for the processes in the group. The
kernel throttles bios where they are submitted, so it holds for ``O_DIRECT`` I/O (buffered
writes are throttled only at writeback, and not at all on v1).

The group is ``blockguard-test-<pid>-<n>`` under the blkio hierarchy (v1) or the unified root
(v2); it is always removed afterwards, and groups left behind by dead processes are removed
on the next use. Only the child process is moved into it, never the caller.
"""

from __future__ import annotations

import contextlib
import enum
import multiprocessing
import os
import signal
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

from blockguard.errors import EnvironmentProblem, InvalidInput

V1_BLKIO = Path("/sys/fs/cgroup/blkio")
V2_ROOT = Path("/sys/fs/cgroup")
PREFIX = "blockguard-test-"

T = TypeVar("T")

_counter = 0


class CgroupVersion(enum.Enum):
    V1 = "v1"
    V2 = "v2"


@dataclass(frozen=True)
class Support:
    """Which cgroup interface can throttle block I/O here, or why none can."""

    version: CgroupVersion | None
    root: Path | None
    reason: str = ""


def detect(v1_root: Path = V1_BLKIO, v2_root: Path = V2_ROOT) -> Support:
    """Find a usable block-throttling interface: v1 blkio first, then v2 ``io``.

    The result says why neither works (not root, no controller...), for a clean skip.
    """
    if os.geteuid() != 0:
        return Support(None, None, "creating cgroups needs root")
    if (v1_root / "blkio.throttle.read_bps_device").exists():
        if os.access(v1_root, os.W_OK):
            return Support(CgroupVersion.V1, v1_root)
        return Support(None, None, f"{v1_root} is not writable")
    controllers = v2_root / "cgroup.controllers"
    if controllers.exists():
        if "io" not in controllers.read_text().split():
            return Support(None, None, f"the io controller is not available in {v2_root}")
        return Support(CgroupVersion.V2, v2_root)
    return Support(None, None, "neither cgroup v1 blkio nor cgroup v2 io is mounted")


@dataclass(frozen=True)
class Limit:
    """Bandwidth limits of one device, bytes per second; ``None`` leaves it unlimited."""

    read_bps: int | None = None
    write_bps: int | None = None


@dataclass
class ThrottledGroup:
    """A created cgroup with limits set; see :func:`throttled_cgroup`."""

    path: Path
    version: CgroupVersion
    limits: Mapping[str, Limit] = field(default_factory=dict)

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = 600.0, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` in a forked child that is in this group.

        The child joins the group before calling ``fn``; threads it starts and programs it
        runs are in the group too. The result (or the exception) comes back pickled.

        :param timeout: seconds before the child is killed.
        :raises EnvironmentProblem: the child could not join, died, or timed out.
        :raises Exception: whatever ``fn`` raised, re-raised here.
        """
        ctx = multiprocessing.get_context("fork")
        receiver, sender = ctx.Pipe(duplex=False)
        child = ctx.Process(
            target=_child_main,
            args=(sender, self.path / "cgroup.procs", fn, args, kwargs),
            name=f"cgroup-{self.path.name}",
            daemon=True,
        )
        child.start()
        sender.close()
        try:
            if not receiver.poll(timeout):
                raise EnvironmentProblem(
                    detail=f"the child in {self.path} did not finish within {timeout} s"
                )
            try:
                ok, payload = receiver.recv()
            except EOFError:
                raise EnvironmentProblem(
                    detail=f"the child in {self.path} died (exit code {child.exitcode})"
                ) from None
        finally:
            receiver.close()
            if child.is_alive():
                child.join(5)
            if child.is_alive():
                child.kill()
            child.join(10)
        if ok:
            return payload  # type: ignore[no-any-return]
        if isinstance(payload, BaseException):
            raise payload
        raise EnvironmentProblem(detail=f"the child in {self.path} failed: {payload}")


def _child_main(
    conn: Connection,
    procs: Path,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    try:
        procs.write_text(f"{os.getpid()}\n")
        result: tuple[bool, Any] = (True, fn(*args, **kwargs))
    except BaseException as exc:  # sent back to the parent, which re-raises it
        result = (False, exc)
    try:
        conn.send(result)
    except Exception:  # not picklable: send the text instead
        conn.send((False, "".join(traceback.format_exception(result[1]))))
    conn.close()


def _group_name() -> str:
    global _counter
    _counter += 1
    return f"{PREFIX}{os.getpid()}-{_counter}"


def remove_stale(root: Path) -> None:
    """Remove empty groups of this module whose creating process is gone."""
    for group in root.glob(f"{PREFIX}*"):
        pid = group.name[len(PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            with contextlib.suppress(OSError):
                group.rmdir()


def _parse_devno(devno: str) -> str:
    major, sep, minor = devno.partition(":")
    if not (sep and major.isdigit() and minor.isdigit()):
        raise InvalidInput(detail=f"device number {devno!r} is not MAJ:MIN")
    return f"{int(major)}:{int(minor)}"


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as exc:
        raise EnvironmentProblem(
            detail=f"cannot write {text.strip()!r} to {path}: {exc.strerror}"
        ) from None


@contextlib.contextmanager
def throttled_cgroup(
    limits: Mapping[str, Limit], support: Support | None = None
) -> Iterator[ThrottledGroup]:
    """Create a cgroup with per-device bandwidth limits; remove it on exit.

    :param limits: ``"MAJ:MIN"`` -> :class:`Limit`.
    :param support: from :func:`detect` (detected when omitted).
    :raises EnvironmentProblem: no usable cgroup interface, or the kernel refused a limit.
    """
    support = support or detect()
    if support.version is None or support.root is None:
        raise EnvironmentProblem(detail=f"cannot throttle block I/O: {support.reason}")
    limits = {_parse_devno(devno): limit for devno, limit in limits.items()}
    remove_stale(support.root)
    if support.version is CgroupVersion.V2:
        _enable_v2_io(support.root)
    path = support.root / _group_name()
    try:
        path.mkdir()
    except OSError as exc:
        raise EnvironmentProblem(detail=f"cannot create cgroup {path}: {exc.strerror}") from None
    try:
        for devno, limit in limits.items():
            if support.version is CgroupVersion.V1:
                if limit.read_bps is not None:
                    _write(path / "blkio.throttle.read_bps_device", f"{devno} {limit.read_bps}\n")
                if limit.write_bps is not None:
                    _write(path / "blkio.throttle.write_bps_device", f"{devno} {limit.write_bps}\n")
            else:
                rbps = limit.read_bps if limit.read_bps is not None else "max"
                wbps = limit.write_bps if limit.write_bps is not None else "max"
                _write(path / "io.max", f"{devno} rbps={rbps} wbps={wbps}\n")
        yield ThrottledGroup(path, support.version, limits)
    finally:
        _remove(path)


def _enable_v2_io(root: Path) -> None:
    control = root / "cgroup.subtree_control"
    if "io" not in control.read_text().split():
        _write(control, "+io\n")


def _remove(path: Path) -> None:
    # The child has exited, but the kernel may take a moment to drop it from the group.
    # Whatever is still inside after a while was started by the child (a killed child's
    # fio, say): only the caller's own processes can be in this group, so end them.
    for attempt in range(100):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if attempt == 40:
                _kill_members(path)
            time.sleep(0.05)
    raise EnvironmentProblem(detail=f"cgroup {path} could not be removed (still in use?)")


def _kill_members(path: Path) -> None:
    try:
        pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
    except OSError:
        return
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
