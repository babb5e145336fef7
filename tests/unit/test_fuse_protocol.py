"""The FUSE server's answers, request by request, without a kernel: requests packed as the
kernel sends them (include/uapi/linux/fuse.h), replies read back from a pipe. Reads return
exactly the file's bytes, a damaged chunk is EIO for that read only, writing is refused,
and a name that is not the file is ENOENT."""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockguard.errors import ChecksumMismatch
from blockguard.storage import fuse

DATA = bytes(range(256)) * 40 + b"tail"
BAD = 4096  # a read starting here hits the "damaged chunk"


def read(offset: int, size: int) -> bytes:
    if offset <= BAD < offset + size:
        raise ChecksumMismatch(generation="g2", chunk=1)
    return DATA[offset : offset + size]


@pytest.fixture
def server() -> Iterator[tuple[fuse.FuseFile, int]]:
    rfd, wfd = os.pipe()
    srv = fuse.FuseFile(Path("/nonexistent"), "image", len(DATA), read)
    srv._fd = wfd  # the replies go to the pipe instead of /dev/fuse
    try:
        yield srv, rfd
    finally:
        os.close(rfd)
        os.close(wfd)


def ask(
    server: tuple[fuse.FuseFile, int], op: int, body: bytes = b"", node: int = fuse.ROOT_ID
) -> tuple[int, bytes]:
    """(errno, reply body) of one request."""
    srv, rfd = server
    req = fuse.IN_HEADER.pack(fuse.IN_HEADER.size + len(body), op, 77, node, 0, 0, 1, 0, 0) + body
    assert srv._handle(req)  # the protocol step under test
    raw = os.read(rfd, 1 << 20)
    length, error, unique = fuse.OUT_HEADER.unpack_from(raw)
    assert unique == 77 and length == len(raw)
    return -error, raw[fuse.OUT_HEADER.size :]


def read_req(offset: int, size: int) -> bytes:
    return struct.pack("<QQIIQII", 0, offset, size, 0, 0, 0, 0)


def test_init_answers_the_protocol_version(server: tuple[fuse.FuseFile, int]) -> None:
    err, body = ask(server, fuse.INIT, struct.pack("<IIII", 7, 40, 131072, fuse.FUSE_MAX_PAGES))
    assert err == 0 and len(body) == 64
    major, minor, readahead, flags = struct.unpack_from("<IIII", body)
    assert (major, minor, readahead, flags) == (7, 31, 131072, fuse.FUSE_MAX_PAGES)


def test_lookup_finds_only_the_image(server: tuple[fuse.FuseFile, int]) -> None:
    err, body = ask(server, fuse.LOOKUP, b"image\0")
    assert err == 0
    nodeid = struct.unpack_from("<Q", body)[0]
    attr = fuse.ATTR.unpack_from(body, fuse.ENTRY_OUT.size)
    assert nodeid == fuse.FILE_ID and attr[1] == len(DATA)
    assert attr[9] == stat.S_IFREG | 0o444
    assert ask(server, fuse.LOOKUP, b"other\0")[0] == errno.ENOENT


def test_reads_are_the_bytes_and_a_damaged_chunk_is_eio(
    server: tuple[fuse.FuseFile, int],
) -> None:
    assert ask(server, fuse.READ, read_req(100, 1000), fuse.FILE_ID) == (0, DATA[100:1100])
    # Past the end: short, then nothing.
    assert ask(server, fuse.READ, read_req(len(DATA) - 3, 100), fuse.FILE_ID) == (0, b"ail")
    assert ask(server, fuse.READ, read_req(len(DATA), 100), fuse.FILE_ID) == (0, b"")
    assert ask(server, fuse.READ, read_req(BAD - 10, 100), fuse.FILE_ID) == (errno.EIO, b"")
    # Only that read: the next one is whole again.
    assert ask(server, fuse.READ, read_req(0, 4096), fuse.FILE_ID) == (0, DATA[:4096])


def test_open_for_writing_is_refused(server: tuple[fuse.FuseFile, int]) -> None:
    assert ask(server, fuse.OPEN, struct.pack("<II", os.O_RDWR, 0), fuse.FILE_ID)[0] == errno.EROFS
    assert ask(server, fuse.OPEN, struct.pack("<II", os.O_RDONLY, 0), fuse.FILE_ID)[0] == 0
    assert ask(server, 16, b"\0" * 40, fuse.FILE_ID)[0] == errno.EROFS  # WRITE


def test_readdir_lists_the_image(server: tuple[fuse.FuseFile, int]) -> None:
    err, body = ask(server, fuse.READDIR, read_req(0, 4096))
    names = []
    off = 0
    while off < len(body):
        _ino, _next, namelen, _kind = fuse.DIRENT.unpack_from(body, off)
        start = off + fuse.DIRENT.size
        names.append(body[start : start + namelen].decode())
        off = start + namelen + (-(fuse.DIRENT.size + namelen) % 8)
    assert err == 0 and names == [".", "..", "image"]
    # From the cookie of the last entry on: nothing more.
    assert ask(server, fuse.READDIR, read_req(3, 4096)) == (0, b"")


def test_forget_gets_no_reply(server: tuple[fuse.FuseFile, int]) -> None:
    srv, rfd = server
    req = fuse.IN_HEADER.pack(fuse.IN_HEADER.size + 8, fuse.FORGET, 5, 2, 0, 0, 1, 0, 0)
    assert srv._handle(req + struct.pack("<Q", 1))  # the step under test
    os.set_blocking(rfd, False)
    with pytest.raises(BlockingIOError):
        os.read(rfd, 100)
