"""How long tests wait: generous bases, scaled to the harness.

A wait in a test is a bound on "it will happen", never a measurement: it ends as soon as
the thing happens, so a large bound costs nothing when all is well and saves a spurious
failure on a loaded machine or under TCG emulation (10-20x slower, and a busy guest can
take a minute to start the daemon). ``BLOCKGUARD_TEST_TIMEOUT_SCALE`` multiplies every
wait; without it the factor is 1 on the host and :data:`GUEST_SCALE` inside the guest
(``scripts/vm`` sets ``BLOCKGUARD_GUEST=1``).
"""

from __future__ import annotations

import os

#: The default factor inside the guest kernel harness (TCG emulation).
GUEST_SCALE = 6.0


def timeout_scale() -> float:
    """The factor every test wait is multiplied by (see the module docstring)."""
    raw = os.environ.get("BLOCKGUARD_TEST_TIMEOUT_SCALE", "")
    if raw:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"BLOCKGUARD_TEST_TIMEOUT_SCALE={raw!r} is not a number") from None
        if value > 0:
            return value
    return GUEST_SCALE if os.environ.get("BLOCKGUARD_GUEST") == "1" else 1.0


def scaled(seconds: float) -> float:
    """``seconds`` times :func:`timeout_scale`."""
    return seconds * timeout_scale()
