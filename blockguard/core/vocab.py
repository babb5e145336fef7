"""The one vocabulary every layer shares: names, kinds and bounds that clients, the engine
and storage must spell the same way. It imports nothing but the standard library.

The values of the enums are what manifests, the catalog, D-Bus and the CLI store and show;
they never change (a pool written today must read tomorrow).
"""

from __future__ import annotations

import enum
import os
import re

# How sizes, durations and times are written: a module of its own, which the CLI imports
# without this one's enums and patterns (issue 16); offered here as they always were.
from blockguard.core.formats import format_ago as format_ago
from blockguard.core.formats import format_duration as format_duration
from blockguard.core.formats import format_rate as format_rate
from blockguard.core.formats import format_size as format_size
from blockguard.core.formats import format_time as format_time
from blockguard.errors import InvalidInput

MAX_GENERATIONS = 10_000
"""The most generations an objective may keep (the CLI bounds its argument by it too)."""
DEFAULT_GENERATIONS = 7
"""How many of the newest generations retention keeps when the objectives do not say."""
#: The time tiers of retention (``keep_daily`` ...), finest first: :mod:`.retention`.
RETENTION_TIERS = ("hourly", "daily", "weekly", "monthly")


class GenerationKind(enum.StrEnum):
    """What a generation holds relative to its base and parent.

    Members are listed from cheapest to costliest to take (the planner weighs them in
    that order); :data:`GENERATION_KINDS` lists them as stored, full first.
    """

    INCREMENTAL = "incremental"
    DIFFERENTIAL = "differential"
    FULL = "full"

    @property
    def cost_rank(self) -> int:
        """0 for the cheapest backup (incremental), 2 for the costliest (full)."""
        return list(GenerationKind).index(self)


#: The kinds as the catalog and manifests spell them, full first.
GENERATION_KINDS: tuple[str, ...] = tuple(k.value for k in reversed(GenerationKind))


class RestoreMode(enum.StrEnum):
    """What the RTO refers to, and how a drill or a calibration restores."""

    #: The backup is switched in as the volume (reflink/thin snapshot of the full, deltas
    #: applied on top): the full costs no copying.
    SWAP_IN = "swap-in"
    #: The backup is copied back to a new device: the full is copied too.
    COPY = "copy"


RESTORE_MODES: tuple[str, ...] = tuple(m.value for m in RestoreMode)


class RestoreTarget(enum.StrEnum):
    """Where a restore puts the data."""

    SWAP_IN = "swap-in"
    IN_PLACE = "in-place"
    NEW_DEVICE = "new-device"

    @property
    def mode(self) -> RestoreMode:
        """The restore-time model's mode: swap-in, or a copy onto a device."""
        return RestoreMode.SWAP_IN if self is RestoreTarget.SWAP_IN else RestoreMode.COPY


class PoolKind(enum.StrEnum):
    """The kinds of pool (``backend`` of CreatePool)."""

    DIR = "dir"
    LVM = "lvm"


POOL_BACKENDS: tuple[str, ...] = tuple(k.value for k in PoolKind)


class TrackingKind(enum.StrEnum):
    """The changed-block tracking backends of a volume."""

    SCAN = "scan"
    ERA = "era"
    THIN = "thin"


TRACKING_BACKENDS: tuple[str, ...] = tuple(k.value for k in TrackingKind)


def check_choice(what: str, value: object, allowed: tuple[str, ...]) -> str:
    """:raises InvalidInput: ``value`` is not one of ``allowed`` (the error lists them)."""
    if value not in allowed:
        raise InvalidInput(detail=f"{what} {value!r} is not one of {', '.join(allowed)}")
    return str(value)


#: Volume, pool and reference names: they become directory names, dm names, LV names and
#: D-Bus path elements, so they are plain ASCII, never start with punctuation ("." or "-"
#: would read as hidden files or options) and stay short enough to compose.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
NAME_RULE = "1-64 letters, digits, '_', '.', '+', '-' and start with a letter or digit"


def check_name(what: str, name: object) -> str:
    """The one rule for names an administrator gives (volumes, pools, reference points).

    :param what: what the name names, e.g. ``"volume"``; the error says "``what`` name".
    :returns: ``name``.
    :raises InvalidInput: unless ``name`` follows :data:`NAME_RULE`.
    """
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidInput(detail=f"{what} name {name!r} must be {NAME_RULE}")
    return name


def devno(rdev: int) -> str:
    """``MAJ:MIN`` of a device number, as sysfs, dmsetup and the cgroup files spell it."""
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def scalar_signature(value: object) -> str | None:
    """The D-Bus type a plain scalar travels as in ``a{sv}``: the client and the daemon
    must spell a value the same way (an objective sent as ``t`` is read back as ``t``).

    :returns: ``b`` for bool, ``t`` for an int (``x`` if negative), ``d`` for a float,
        ``s`` for a str; None for anything else (the caller decides).
    """
    if isinstance(value, bool):
        return "b"
    if isinstance(value, int):
        return "t" if value >= 0 else "x"
    if isinstance(value, float):
        return "d"
    if isinstance(value, str):
        return "s"
    return None
