"""Hashing a mounted file system's device without racing the kernel.

A mounted ext4 keeps writing on its own after ``mount`` returns: the journal commits the
mount's superblock update a few seconds later (jbd2's commit interval), and lazy init
writes inode tables (tests make ext4 with ``lazy_itable_init=0,lazy_journal_init=0`` for
that). A before/after hash of the device taken while it is mounted thus changes with
nobody else writing: a refusal test failed that way on a loaded machine. Frozen
(``fsfreeze``), the file system has flushed everything and writes nothing until thawed.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def frozen(mountpoint: str | Path) -> Iterator[None]:
    """Freeze the file system mounted on ``mountpoint`` for the body; always thaw it
    (an unmount of a frozen file system would wait for ever)."""
    subprocess.run(["fsfreeze", "--freeze", str(mountpoint)], check=True, timeout=120)
    try:
        yield
    finally:
        subprocess.run(["fsfreeze", "--unfreeze", str(mountpoint)], timeout=120)
