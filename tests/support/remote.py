"""A remote session to a target's serve command run locally over pipes (no ssh).

The serve command is the real one (``python3 -m blockguard.engine.servecmd``) over a
client root made with ``PackStore.create``; only the line is a pipe instead of sshd.
"""

from __future__ import annotations

import sys
from pathlib import Path

from blockguard.storage.remote.session import RemoteSession
from blockguard.storage.runner import Runner
from tests.timeouts import scaled

REPO = Path(__file__).resolve().parents[2]


def local_serve(
    area: Path, client: str = "C1", *, window: int = 4, close_timeout: float = 30
) -> RemoteSession:
    """A session to ``servecmd --client CLIENT --root AREA``."""
    argv = [sys.executable, "-m", "blockguard.engine.servecmd", "--client", client]
    return RemoteSession.start(
        [*argv, "--root", str(area)],
        peer="target t1",
        runner=Runner(),
        env={"PYTHONPATH": str(REPO)},
        window=window,
        close_timeout=scaled(close_timeout),
    )
