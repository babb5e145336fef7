"""Harnesses shared by the test suites (private bus, daemon, loop devices, data helpers).

Imported as ordinary modules; the ``conftest.py`` files only turn them into fixtures.
"""
