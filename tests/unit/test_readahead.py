"""The serve's read-ahead: the bytes come out as they went in, the end and an error of the
source come after every byte before them, and no more than the limit is held ahead."""

from __future__ import annotations

import io
import os
import threading

import pytest

from blockguard.storage.remote.readahead import READ_BYTES, ReadAhead
from tests.timeouts import scaled


def read_all(stream: ReadAhead, step: int) -> bytes:
    out = bytearray()
    while more := stream.read(step):
        assert len(more) <= step
        out += more
    return bytes(out)


@pytest.mark.parametrize("step", [7, 4095, READ_BYTES, 3 * READ_BYTES + 7])
def test_the_bytes_come_out_as_they_went_in_then_the_end(step: int) -> None:
    data = os.urandom(5 * READ_BYTES + 12345)
    ahead = ReadAhead(io.BufferedReader(io.BytesIO(data)), limit=2 * READ_BYTES)
    assert read_all(ahead, step) == data
    assert ahead.read(10) == b""


def test_an_error_of_the_source_comes_after_the_bytes_before_it() -> None:
    class Failing(io.RawIOBase):
        def __init__(self) -> None:
            self.sent = False

        def readable(self) -> bool:
            return True

        def readinto(self, buf: bytearray) -> int:  # type: ignore[override]
            if self.sent:
                raise OSError(5, "Input/output error")
            self.sent = True
            buf[:5] = b"hello"
            return 5

    ahead = ReadAhead(io.BufferedReader(Failing()))
    assert ahead.read(100) == b"hello"
    with pytest.raises(OSError, match="Input/output error"):
        ahead.read(100)


def test_no_more_than_the_limit_is_read_ahead_of_the_reader() -> None:
    # A pipe with more written than the limit: the thread stops at the limit (one read
    # past it at most), and goes on as the reader takes bytes.
    r, w = os.pipe()
    data = os.urandom(6 * READ_BYTES)
    writer = threading.Thread(target=lambda: (os.write(w, data), os.close(w)))
    writer.start()
    try:
        source = io.BufferedReader(io.FileIO(r, "rb"), buffer_size=READ_BYTES)
        ahead = ReadAhead(source, limit=2 * READ_BYTES)
        got = ahead.read(1)
        # Wait until the thread has stopped at the limit.
        deadline = threading.Event()
        for _ in range(int(scaled(50))):
            if ahead._held >= 2 * READ_BYTES - 1:
                break
            deadline.wait(0.1)
        assert ahead._held <= 3 * READ_BYTES
        got += read_all(ahead, 12345)
        assert got == data
    finally:
        writer.join()
