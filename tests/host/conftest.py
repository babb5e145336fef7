"""Fixtures of the host tests: the real daemon on a private bus (from the daemon tests)."""

from tests.daemon.conftest import (  # noqa: F401 (fixtures, used by name)
    bus,
    engine,
    notify_socket,
    shared_dir,
)
