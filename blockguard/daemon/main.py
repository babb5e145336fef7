"""``blockguardd``: the daemon's entry point.

Start-up order matters to systemd (``Type=notify``): open the state, connect, export the
objects, take the bus name, and only then send ``READY=1``. SIGTERM/SIGINT (or losing the
bus) shut down cleanly. ``--reestablish-tracking-only`` is the early-boot mode of
``blockguard-early.service``: open the state, set tracking up again, exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.metadata
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from blockguard.daemon.bus import DaemonBus, connect
from blockguard.daemon.dbusutil import DEFAULT_ADMIN_GROUP
from blockguard.daemon.logsetup import setup_logging
from blockguard.daemon.notify import Notifier
from blockguard.daemon.udevwatch import RescanRequest, UdevWatcher
from blockguard.engine.jobs import JobRunner
from blockguard.engine.service import Service
from blockguard.errors import BlockguardError, EnvironmentProblem, ExitCode, InvalidInput

log = logging.getLogger("blockguardd")

DEFAULT_STATE_DIR = "/var/lib/blockguard"
DEFAULT_SERVICE = "blockguard.engine.engine:make_service"


def _version() -> str:
    """The installed distribution's version (pyproject takes it from blockguard.__version__)."""
    try:
        return importlib.metadata.version("blockguard")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The command line (also read by scripts/install for the man page and completion)."""
    parser = argparse.ArgumentParser(
        prog="blockguardd", description="Block-layer backup daemon (D-Bus name org.blockguard1)."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "--config",
        type=Path,
        help="settings file (TOML; default $BLOCKGUARD_CONFIG or /etc/blockguard/blockguard.toml, "
        "which may be missing); BLOCKGUARD_* environment variables override it",
    )
    parser.add_argument(
        "--bus",
        default="system",
        help="'system' (default; honours DBUS_SYSTEM_BUS_ADDRESS), 'session' or a D-Bus address",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(os.environ.get("BLOCKGUARD_STATE_DIR") or DEFAULT_STATE_DIR),
        help=f"catalog and state (default $BLOCKGUARD_STATE_DIR or {DEFAULT_STATE_DIR})",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument(
        "--service",
        default=DEFAULT_SERVICE,
        help="the domain implementation: MODULE:FACTORY, a callable taking state_dir= and "
        f"runner= and returning a Service (default {DEFAULT_SERVICE}, the real engine)",
    )
    parser.add_argument(
        "--admin-group",
        default=DEFAULT_ADMIN_GROUP,
        help=f"group whose members may change things besides root (default {DEFAULT_ADMIN_GROUP})",
    )
    parser.add_argument(
        "--udev-source",
        default="auto",
        choices=["auto", "udev", "kernel", "none"],
        help="uevents to watch: 'auto' takes udev events when udevd runs, else kernel events",
    )
    parser.add_argument(
        "--allow-empty-catalog",
        action="store_true",
        help="start even when the catalog is empty although this state directory was used "
        "before (a lost catalog: import the pools with 'blockguardctl pool import'); "
        "also BLOCKGUARD_ALLOW_EMPTY_CATALOG=1",
    )
    parser.add_argument(
        "--reestablish-tracking-only",
        action="store_true",
        help="set up change tracking of all protected volumes again and exit (early boot)",
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def make_service(kind: str, state_dir: Path, runner: JobRunner) -> Service:
    """Build the service named by ``--service`` (``MODULE:FACTORY``)."""
    module_name, sep, attr = kind.partition(":")
    if not sep or not module_name or not attr:
        raise InvalidInput(detail=f"--service {kind!r} is not MODULE:FACTORY")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise EnvironmentProblem(detail=f"cannot load service {kind}: {exc}") from exc
    return factory(state_dir=state_dir, runner=runner)


def _udev_source(choice: str) -> str | None:
    if choice == "none":
        return None
    if choice == "auto":
        return "udev" if os.path.exists("/run/udev/control") else "kernel"
    return choice


async def _rescan(service: Service, request: RescanRequest) -> None:
    for device in request.vanished_pool_devices:
        await asyncio.to_thread(service.pool_device_vanished, device)
    for volume in request.changed_volumes:
        await asyncio.to_thread(service.rescan_tracking, volume)


async def serve(args: argparse.Namespace) -> int:
    """Run the daemon until SIGTERM/SIGINT or the bus goes away."""
    loop = asyncio.get_running_loop()
    notifier = Notifier()
    runner = JobRunner()
    if args.allow_empty_catalog:
        # The service factory takes only state_dir and runner: the engine reads this.
        os.environ["BLOCKGUARD_ALLOW_EMPTY_CATALOG"] = "1"
    if args.config is not None:
        # The service factory takes only state_dir and runner: the engine's settings read
        # this, when the service is made (a bad key stops the start there, named).
        os.environ["BLOCKGUARD_CONFIG"] = str(args.config)
    service = make_service(args.service, args.state_dir, runner)
    await asyncio.to_thread(service.open)
    try:
        if args.reestablish_tracking_only:
            names = await asyncio.to_thread(service.reestablish_tracking)
            log.info("tracking re-established for %d volumes: %s", len(names), ", ".join(names))
            return ExitCode.OK

        bus = await connect(args.bus)
        daemon_bus = DaemonBus(bus, service, args.admin_group)
        await daemon_bus.start()
        runner.on_forget_job(daemon_bus.forget_job_from_any_thread)

        watcher: UdevWatcher | None = None
        source = _udev_source(args.udev_source)
        if source is not None:
            tasks: set[asyncio.Task[None]] = set()

            def on_rescan(request: RescanRequest) -> None:
                task = loop.create_task(_rescan(service, request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

            watcher = UdevWatcher(on_rescan, source=source)
            watcher.set_targets(service.watch_targets())
            service.subscribe(
                lambda _event: loop.call_soon_threadsafe(
                    lambda: watcher.set_targets(service.watch_targets())
                )
            )
            try:
                watcher.start(loop)
            except OSError as exc:
                log.warning("cannot watch uevents (%s): device changes go unnoticed", exc)
                watcher = None

        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)

        # A service with a scheduler (the real one) runs it on this loop.
        run_scheduler = getattr(service, "run_scheduler", None)
        scheduler = loop.create_task(run_scheduler()) if run_scheduler is not None else None

        status = daemon_bus.refresh_status()
        daemon_bus.on_status = notifier.status
        # Logged before READY=1 goes out, so whoever saw READY finds the line in the log.
        log.info("ready: %s", status)
        notifier.ready(status)
        notifier.start_watchdog()

        # Shielded: cancelling our wait must not cancel the bus's own disconnect future.
        disconnected = asyncio.shield(bus.wait_for_disconnect())
        stopping = loop.create_task(stop.wait())
        done, _ = await asyncio.wait({disconnected, stopping}, return_when=asyncio.FIRST_COMPLETED)
        lost_bus = disconnected in done
        for task in (disconnected, stopping):
            task.cancel()

        notifier.stopping()
        daemon_bus.close()
        if scheduler is not None:
            scheduler.cancel()
        log.info("shutting down%s", " (lost the bus)" if lost_bus else "")
        if watcher is not None:
            watcher.stop()
        if not lost_bus:
            bus.disconnect()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(bus.wait_for_disconnect()), 5)
        return ExitCode.ENVIRONMENT if lost_bus else ExitCode.OK
    finally:
        notifier.close()
        runner.shutdown(wait=False)
        await asyncio.to_thread(service.close)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    try:
        return int(asyncio.run(serve(args)))
    except BlockguardError as exc:
        log.error("%s", exc)
        return int(exc.exit_code)
    except Exception:
        log.exception("blockguardd failed")
        return int(ExitCode.INTERNAL)


if __name__ == "__main__":
    sys.exit(main())
