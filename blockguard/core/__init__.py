"""Pure domain logic: objectives, planner, restore-time model, catalog, retention.

Nothing here opens a device, runs a command or imports a D-Bus library.
"""
