"""Fixtures of the host tests: the real daemon on a private bus, the two-namespace network
lab of the remote-target tests (:mod:`tests.support`)."""

from tests.support.fixtures import (  # noqa: F401 (fixtures, used by name)
    bus,
    engine,
    notify_socket,
    shared_dir,
)
from tests.support.netlab import net_lab  # noqa: F401 (a fixture, used by name)
from tests.support.seaweed import seaweed  # noqa: F401 (a fixture, used by name)
