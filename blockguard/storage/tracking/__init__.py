"""Changed-block tracking: one :class:`ChangeTracker` interface, several backends.

``scan`` (any readable block device, full read per query) lives in
:mod:`blockguard.storage.tracking.scan`; ``era`` and ``thin`` (device-mapper) live beside it.
"""

# The package's names are base's public ones, listed once in base.__all__.
from blockguard.storage.tracking.base import *  # noqa: F403 -- re-export of base.__all__
from blockguard.storage.tracking.base import __all__ as __all__
