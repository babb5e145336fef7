"""The one vocabulary every layer shares: names, kinds and bounds that clients, the engine
and storage must spell the same way. It imports nothing but the standard library."""

from __future__ import annotations

MAX_GENERATIONS = 10_000
"""The most generations an objective may keep (the CLI bounds its argument by it too)."""
