"""Fixtures of the host tests: the real daemon on a private bus (:mod:`tests.support`)."""

from tests.support.fixtures import (  # noqa: F401 (fixtures, used by name)
    bus,
    engine,
    notify_socket,
    shared_dir,
)
