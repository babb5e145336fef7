"""Delivery of service events to the adapters that subscribed (D-Bus, udev watcher)."""

from __future__ import annotations

import logging
import threading

from blockguard.engine import service as svc

log = logging.getLogger(__name__)


class EventHub:
    """Calls every subscriber for every event, in the thread that raised it.

    A subscriber that fails is logged and does not keep the others from hearing the event.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: list[svc.EventCallback] = []

    def subscribe(self, callback: svc.EventCallback) -> None:
        with self._lock:
            self._subscribers.append(callback)

    def emit(self, *events: svc.ServiceEvent) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for event in events:
            for callback in subscribers:
                try:
                    callback(event)
                except Exception:
                    log.exception("event subscriber failed on %r", event)
