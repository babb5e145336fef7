"""Fixtures of the daemon tests: the real daemon on a private bus (:mod:`tests.support`)."""

from tests.support.fixtures import (  # noqa: F401 (fixtures, used by name)
    bus,
    client,
    daemon,
    engine,
    notify_socket,
    policy_bus,
    policy_engine,
    shared_dir,
)
