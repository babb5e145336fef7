"""Browse a generation: its image over FUSE and a read-only loop device on it, whose file
system the CLI mounts read-only; and the teardown of all three, also after a crash.

Each mount is recorded in a file of the state directory before anything is set up, and
that record is all a restarted daemon needs to undo it: the teardown touches only what the
record names, and checks first that it is still ours (the mount point's source is the
recorded loop device; the loop device is the recorded attachment, by its own identity in
sysfs: name and disk sequence number, in the same boot; the FUSE mount is of type
``fuse.blockguard``). Never by the loop's backing path: once the FUSE mount is detached (a
lazy unmount, or the mount namespace of a daemon that died) sysfs names the file just
``/image``. See docs/design/browse.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from blockguard.errors import BlockguardError, CorruptMetadata, EnvironmentProblem, InvalidInput
from blockguard.storage import fuse
from blockguard.storage.blockdev import unescape_mount
from blockguard.storage.genimage import GenerationImage
from blockguard.storage.manifest import write_atomic
from blockguard.storage.runner import Runner

log = logging.getLogger(__name__)

IMAGE_NAME = "image"
SYS_BLOCK = Path("/sys/block")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
#: Mount options per file system: read-only and without replaying a journal, which would
#: write to the (read-only) device or fail.
FS_OPTIONS = {"ext4": "ro,noload", "ext3": "ro,noload", "xfs": "ro,norecovery,nouuid"}


@dataclass(frozen=True)
class MountRecord:
    """One browse mount, as recorded in ``<state>/mounts/<name>.json``.

    :param name: the record's name (also the FUSE directory's).
    :param generation: the generation's public id (``VOLUME@ID``).
    :param chain: the generations it reads (held against removal while mounted).
    :param fuse_dir: where the FUSE file system with the image is mounted.
    :param loop: the read-only loop device on the image ("" until attached).
    :param fstype: the file system on the loop device.
    :param options: the options to mount it with (read-only, no journal replay).
    :param mountpoint: where the CLI mounts the loop device, in the caller's mount
        namespace (the daemon's may differ: systemd's ProtectSystem/PrivateTmp); "" for
        a device served to a file restore.
    :param boot: the kernel's boot id when recorded (a loop device is not the same one
        after a reboot, whatever its name and sequence number).
    :param loop_seq: the loop device's disk sequence number (``/sys/block/loopN/diskseq``,
        new at each attach): with ``loop`` and ``boot``, the attachment that is ours.
    :param image_dev: ``MAJ:MIN`` of the FUSE file system, and
    :param image_ino: the image's inode: what a loop attached but not yet recorded (a kill
        between ``losetup`` and the save) is found by (the loop's backing device and inode).
    """

    name: str
    volume: str
    pool: str
    generation: str
    chain: tuple[str, ...]
    mountpoint: str
    fuse_dir: str
    loop: str = ""
    fstype: str = ""
    options: str = ""
    boot: str = ""
    loop_seq: int = 0
    image_dev: str = ""
    image_ino: int = 0
    #: What the device is served for, when not a browse mount (``mountpoint`` is then
    #: ""): a file restore, whose client reads the loop device and mounts nothing.
    purpose: str = ""

    @property
    def label(self) -> str:
        """The mount or the use, for the log."""
        return self.purpose or f"browse mount {self.mountpoint}"

    @property
    def image(self) -> str:
        return str(Path(self.fuse_dir) / IMAGE_NAME)

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "chain": list(self.chain), "image": self.image}


class MountBook:
    """The mount records of a state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir) / "mounts"

    def save(self, record: MountRecord) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(self.dir / f"{record.name}.json", json.dumps(asdict(record)).encode())

    def drop(self, record: MountRecord) -> None:
        (self.dir / f"{record.name}.json").unlink(missing_ok=True)

    def all(self) -> list[MountRecord]:
        """Every record; an unreadable one is logged and left for a human."""
        found: list[MountRecord] = []
        for path in sorted(self.dir.glob("*.json")) if self.dir.is_dir() else []:
            try:
                raw = json.loads(path.read_bytes())
                raw["chain"] = tuple(raw["chain"])
                found.append(MountRecord(**raw))
            except (OSError, ValueError, TypeError, KeyError) as exc:
                log.error("%s", CorruptMetadata(what=f"mount record {path}", detail=str(exc)))
        return found


def mount_table(mountinfo: str = "/proc/self/mountinfo") -> dict[str, tuple[str, str]]:
    """Mount point -> ``(fstype, source)`` of what is mounted there (the topmost).

    :param mountinfo: the table to read (tests give a file of their own).
    """
    table: dict[str, tuple[str, str]] = {}
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as info:
        for line in info:
            fields = line.split()
            sep = fields.index("-")
            # Later lines are mounted over earlier ones: the last one at a point wins.
            table[unescape_mount(fields[4])] = (fields[sep + 1], fields[sep + 2])
    return table


def mounted_at(path: str) -> tuple[str, str] | None:
    """``(fstype, source)`` of what is mounted at ``path`` (the topmost), or None."""
    return mount_table().get(path)


def loop_backing_file(loop: str) -> str | None:
    """The backing file of loop device ``loop``, or None when it is not attached."""
    name = Path(loop).name
    try:
        text = (SYS_BLOCK / name / "loop" / "backing_file").read_text(encoding="utf-8")
    except OSError:
        return None
    return text.rstrip("\n")


def loop_diskseq(loop: str) -> int | None:
    """The disk sequence number of loop device ``loop`` while it is attached, else None.

    The kernel gives a loop device a new number, from one counter for the whole boot, each
    time it is attached: with the name it tells one attachment from any later one.
    """
    name = Path(loop).name
    if loop_backing_file(name) is None:
        return None
    try:
        return int((SYS_BLOCK / name / "diskseq").read_text(encoding="ascii"))
    except (OSError, ValueError):
        return None


def boot_id() -> str:
    try:
        return BOOT_ID.read_text(encoding="ascii").strip()
    except OSError:
        return ""


def loops_backed_by(dev: str, ino: int, runner: Runner) -> list[str]:
    """Every loop device whose backing file is inode ``ino`` of device ``dev``
    (``MAJ:MIN``), as the loop driver reports them (``losetup --list``): a FUSE file
    system's device number is its own while a loop device still holds its file."""
    done = runner.run(
        ["losetup", "--list", "--json", "--output", "NAME,BACK-MAJ:MIN,BACK-INO"],
        timeout=60,
        check=False,
    )
    try:
        listed = json.loads(done.stdout or "{}").get("loopdevices", [])
    except ValueError:
        log.error("losetup --list gave no JSON: %r", done.stdout[:200])
        return []
    return sorted(
        str(entry["name"])
        for entry in listed
        if str(entry.get("back-maj:min", "")).strip() == dev
        and str(entry.get("back-ino", "")).strip() == str(ino)
    )


def owned_loops(record: MountRecord, runner: Runner) -> list[str]:
    """The loop devices of ``record`` that are still its own: the recorded attachment (name
    and disk sequence number), or for a record saved before its loop device, those backed
    by the recorded image's device and inode; none after a reboot."""
    if not record.boot or record.boot != boot_id():
        return []
    if record.loop:
        seq = loop_diskseq(record.loop)
        if record.loop_seq and seq == record.loop_seq:
            return [record.loop]
        if seq is not None:
            log.warning(
                "%s is not the attachment recorded for the %s "
                "(sequence number %s, recorded %s): left alone",
                record.loop,
                record.label,
                seq,
                record.loop_seq or "none",
            )
        return []
    if record.image_dev and record.image_ino:
        return loops_backed_by(record.image_dev, record.image_ino, runner)
    return []


class BrowseMount:
    """A mount being set up or served: the image's FUSE server lives here.

    :param record: what to set up (saved, with the loop device, as it goes).
    """

    def __init__(
        self,
        record: MountRecord,
        image: GenerationImage,
        book: MountBook,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        self.record = record
        self.image = image
        self.book = book
        self._on_done = on_done
        self._finished = False
        # The image is closed (and ``on_done`` called: the chain's hold released) by the
        # serving thread when it ends, which after a lazy unmount (a process still in the
        # file system) is later than ``stop``: until then the chain is still read.
        self.server = fuse.FuseFile(
            Path(record.fuse_dir), IMAGE_NAME, image.size, self._read, on_exit=self._finish
        )

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        try:
            self.image.close()
        finally:
            if self._on_done is not None:
                self._on_done()

    def _read(self, offset: int, size: int) -> bytes:
        try:
            return self.image.read(offset, size)
        except BlockguardError as exc:
            # The named error in the log; the reader sees EIO for this read only.
            log.error("%s: %s", self.record.label, exc)
            raise OSError(5, str(exc)) from exc

    def start(self, runner: Runner, *, probe_fs: bool = True) -> None:
        """FUSE image and read-only loop device on it; the file system type and the
        options to mount it with are recorded. The mount itself is the caller's (the
        CLI's): a mount made in the daemon's mount namespace, which systemd makes
        private, would not be seen by the user (docs/design/browse.md).

        On failure everything done so far is undone before the error propagates.

        :param probe_fs: find the file system to mount (``restore-files`` reads the
            device at the files' extents and mounts nothing: False).
        :raises InvalidInput: no file system this can mount is on the generation.
        """
        rec = self.record = _with(self.record, boot=boot_id())
        Path(rec.fuse_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
        self.book.save(rec)
        try:
            self.server.start()
            # The image's identity before the loop device exists: a kill between losetup
            # and the next save leaves a loop device found by it (not by its path).
            st = os.stat(rec.image)
            dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
            rec = self.record = _with(rec, image_dev=dev, image_ino=st.st_ino)
            self.book.save(rec)
            loop = runner.run(
                ["losetup", "--find", "--show", "--read-only", rec.image], timeout=60
            ).stdout.strip()
            seq = loop_diskseq(loop)
            if seq is None:
                # Ours a moment ago: without its number it could not be told from a later
                # attachment of the same name, so it is detached now, found by its inode.
                raise EnvironmentProblem(detail=f"{loop} has no disk sequence number in sysfs")
            rec = self.record = _with(rec, loop=loop, loop_seq=seq)
            self.book.save(rec)
            if not probe_fs:
                return
            fstype = runner.run(
                ["blkid", "-p", "-o", "value", "-s", "TYPE", loop], timeout=60, check=False
            ).stdout.strip()
            if not fstype:
                raise InvalidInput(
                    detail=f"generation {rec.generation} holds no file system that blkid "
                    "recognises: there is nothing to mount"
                )
            rec = self.record = _with(rec, fstype=fstype, options=FS_OPTIONS.get(fstype, "ro"))
            self.book.save(rec)
        except BaseException:
            self.stop(runner)
            raise

    def stop(self, runner: Runner) -> None:
        """Tear down in reverse: file system, loop, FUSE; then forget the record."""
        started = self.server.serving
        try:
            teardown(self.record, runner, server=self.server)
        finally:
            if not started:
                self._finish()
        self.book.drop(self.record)


def _with(record: MountRecord, **changes: str | int) -> MountRecord:
    return MountRecord(**{**asdict(record), **changes})


def teardown(record: MountRecord, runner: Runner, server: fuse.FuseFile | None = None) -> None:
    """Undo what ``record`` names and is still ours (after a crash, too).

    :raises EnvironmentProblem: a step failed (the record is then kept for a retry).
    """
    table = mount_table()
    for loop in owned_loops(record, runner):
        at = table.get(record.mountpoint) if record.mountpoint else None
        if at is not None and os.path.realpath(at[1]) == os.path.realpath(loop):
            fuse.unmount(record.mountpoint)
        runner.run(["losetup", "-d", loop], timeout=60)
    if server is not None:
        if not server.stop():
            log.info("%s is still in use: unmounted lazily, served until released", record.label)
    else:
        at = table.get(record.fuse_dir)
        if at is not None and at[0] == fuse.FS_TYPE:
            fuse.unmount(record.fuse_dir)
    if mounted_at(record.fuse_dir) is not None:
        raise EnvironmentProblem(detail=f"{record.fuse_dir} is still mounted")
    with contextlib.suppress(OSError):
        # Empty once unmounted; it stays only while a lazy unmount still holds it.
        os.rmdir(record.fuse_dir)
