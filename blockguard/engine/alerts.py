"""Alerts: raised once when a condition starts, resolved once when it ends.

Each raised or resolved alert goes out three ways:

- a service event (:class:`~blockguard.engine.service.AlertChanged`), which the D-Bus
  adapter turns into the ``Alert`` signal;
- a log entry with the kind's stable journal ``MESSAGE_ID``
  (:data:`blockguard.core.health.MESSAGE_IDS`) and the fields ``ALERT``, ``ALERT_STATE``
  and ``VOLUME`` or ``POOL`` (under systemd, journald gets them as fields);
- every executable in the alert directory (``/etc/blockguard/alert.d``), run with the
  alert as one JSON document on stdin (:func:`alert_record`), one at a time, in a thread
  of their own, each with a timeout. A hook that fails or hangs is logged; it never
  holds up or breaks the daemon. A hook that someone besides its owner (root) may
  change is not run: the daemon would run it as root.

Which alerts are active is kept in ``STATE_DIR/alerts.json``, so a restart neither
raises again what is still going on nor forgets to resolve it. :meth:`AlertCenter.fire`
sends a one-shot alert (no resolution: e.g. a restore drill that missed an RTO).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import socket
import stat
import threading
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from blockguard.core.health import MESSAGE_IDS, SEVERITY, AlertKind, Condition, transitions
from blockguard.engine import service as svc
from blockguard.engine.events import EventHub
from blockguard.errors import BlockguardError
from blockguard.storage.manifest import write_atomic
from blockguard.storage.runner import Runner

log = logging.getLogger(__name__)

#: The version of the JSON document a hook gets (bumped on an incompatible change).
RECORD_VERSION = 1
STATE_FILE = "alerts.json"
POOL_KINDS = frozenset({AlertKind.POOL_SPACE_LOW})
#: run-parts' rule: hooks are named of letters, digits, _ and - (no editor backups,
#: no .dpkg-old copies).
_HOOK_NAME = re.compile(r"[A-Za-z0-9_-]+")


def alert_record(
    kind: AlertKind,
    subject: str,
    state: str,
    message: str,
    details: Mapping[str, Any],
    at: float,
) -> dict[str, Any]:
    """The JSON document of one alert (what a hook reads on stdin)."""
    about = "pool" if kind in POOL_KINDS else "volume"
    return {
        "version": RECORD_VERSION,
        "kind": kind.value,
        "state": state,
        "severity": SEVERITY[kind].label,
        "subject": subject,
        "subject_type": about,
        about: subject,
        "message": message,
        "details": dict(details),
        "time": at,
        "time_iso": datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds"),
        "message_id": MESSAGE_IDS[kind],
        "host": socket.gethostname(),
    }


class HookRunner:
    """Runs the alert hooks in one thread of its own, alert after alert."""

    def __init__(self, directory: Path, timeout: float) -> None:
        self.directory = directory
        self.timeout = timeout
        self.runner = Runner()
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def hooks(self) -> list[Path]:
        """The executables of the directory, in name order."""
        try:
            entries = sorted(self.directory.iterdir())
        except FileNotFoundError:
            return []
        except OSError as exc:
            log.error("cannot read the alert hook directory %s: %s", self.directory, exc)
            return []
        return [p for p in entries if _HOOK_NAME.fullmatch(p.name) and self._trusted(p)]

    @staticmethod
    def _trusted(path: Path) -> bool:
        """An executable file that only its owner (root, or whoever runs the daemon) may
        change: the daemon runs hooks with its own rights."""
        try:
            st = path.stat()
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode) or not os.access(path, os.X_OK):
            return False
        if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
            log.error(
                "alert hook %s is not run: it must belong to root and not be writable by "
                "group or others (mode %o, owner uid %d)",
                path,
                stat.S_IMODE(st.st_mode),
                st.st_uid,
            )
            return False
        return True

    def submit(self, record: dict[str, Any]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="alert-hooks", daemon=True)
            self._thread.start()
        self._queue.put(record)

    def close(self, wait: float = 5.0) -> None:
        """Stop after the hooks already queued (waiting at most ``wait`` seconds)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(wait)
            self._thread = None

    def _work(self) -> None:
        while True:
            record = self._queue.get()
            if record is None:
                return
            data = json.dumps(record, sort_keys=True) + "\n"
            for hook in self.hooks():
                self._run(hook, data, record)

    def _run(self, hook: Path, data: str, record: Mapping[str, Any]) -> None:
        what = f"{record['kind']} {record['state']} ({record['subject']})"
        try:
            result = self.runner.run([str(hook)], input=data, timeout=self.timeout, check=False)
        except BlockguardError as exc:
            log.error("alert hook %s failed on %s: %s", hook, what, exc)
            return
        except Exception:
            log.exception("alert hook %s failed on %s", hook, what)
            return
        if result.returncode != 0:
            log.error(
                "alert hook %s exited %d on %s: %s",
                hook,
                result.returncode,
                what,
                (result.stderr or "").strip()[-500:],
            )


class AlertCenter:
    """Keeps which alerts are active and sends each change out (see the module docstring).

    :param state_dir: where ``alerts.json`` lives.
    :param events: where AlertChanged goes.
    :param hook_dir: the alert hook directory.
    :param hook_timeout: seconds per hook run.
    """

    def __init__(
        self, state_dir: Path, events: EventHub, hook_dir: Path, hook_timeout: float
    ) -> None:
        self.path = Path(state_dir) / STATE_FILE
        self.events = events
        self.hooks = HookRunner(hook_dir, hook_timeout)
        self._lock = threading.Lock()
        self.active: dict[str, dict[str, Any]] = self._load()

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
            active = data["active"]
            if not isinstance(active, dict):
                raise TypeError("active is not an object")
            return {str(k): dict(v) for k, v in active.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Worst case: an alert that is still on is raised once more.
            log.warning("%s is unreadable (%s); starting with no active alerts", self.path, exc)
            return {}

    def _save(self) -> None:
        body = json.dumps({"active": self.active}, indent=1, sort_keys=True).encode()
        try:
            write_atomic(self.path, body)
        except OSError as exc:
            log.error("cannot record the active alerts in %s: %s", self.path, exc)

    def update(self, conditions: Iterable[Condition], now: float | None = None) -> None:
        """Raise what started, resolve what ended (nothing if nothing changed)."""
        at = time.time() if now is None else now
        out = []
        with self._lock:
            raised, resolved = transitions(self.active, conditions)
            if not raised and not resolved:
                return
            for cond in raised:
                record = alert_record(
                    cond.kind, cond.subject, "raised", cond.message, cond.details, at
                )
                self.active[cond.key] = record
                out.append(record)
            for key in resolved:
                before = self.active.pop(key)
                record = {
                    **before,
                    "state": "resolved",
                    "message": f"resolved: {before['message']}",
                    "time": at,
                    "time_iso": datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds"),
                    "raised_time": before.get("time"),
                }
                out.append(record)
            self._save()
        for record in out:
            self._send(record)

    def fire(
        self,
        kind: AlertKind,
        subject: str,
        message: str,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        """Send a one-shot alert (it has no resolution and is not kept as active)."""
        self._send(alert_record(kind, subject, "raised", message, details or {}, time.time()))

    def active_records(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for _k, r in sorted(self.active.items())]

    def _send(self, record: dict[str, Any]) -> None:
        kind = AlertKind(record["kind"])
        raised = record["state"] == "raised"
        level = logging.INFO if not raised else logging.WARNING
        if raised and record["severity"] == "critical":
            level = logging.CRITICAL
        fields = {
            "MESSAGE_ID": MESSAGE_IDS[kind],
            "ALERT": kind.value,
            "ALERT_STATE": record["state"],
            record["subject_type"].upper(): record["subject"],
        }
        log.log(level, "alert %s: %s", record["state"], record["message"], extra=fields)
        self.events.emit(
            svc.AlertChanged(
                kind.value,
                record["subject"],
                record["state"],
                record["severity"],
                record["message"],
                json.dumps(record, sort_keys=True),
            )
        )
        self.hooks.submit(record)

    def close(self, wait: float = 5.0) -> None:
        """Stop after the hooks already queued (waiting at most ``wait`` seconds)."""
        self.hooks.close(wait)
