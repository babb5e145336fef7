"""Logging of blockguardd: journald with structured fields under systemd, stderr otherwise.

Code attaches domain fields with ``extra``::

    log.info("backup finished", extra={"VOLUME": "db", "GENERATION": "db@4"})

Under systemd (``JOURNAL_STREAM`` or ``INVOCATION_ID`` set) they become journal fields
(``journalctl VOLUME=db``); on stderr they are appended as ``[VOLUME=db GENERATION=db@4]``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping

from blockguard.daemon.audit import AUDIT_FIELDS

#: The structured fields blockguard uses (journal field names are upper case).
FIELDS = (
    "VOLUME",
    "POOL",
    "GENERATION",
    "JOB",
    "MESSAGE_ID",
    "ALERT",
    "ALERT_STATE",
    *AUDIT_FIELDS,
)


def _field(value: object) -> str:
    # A value with blanks (the audit's argument summary) is quoted, so the line stays
    # one ``KEY=VALUE`` per field.
    text = str(value)
    return (
        json.dumps(text, ensure_ascii=False)
        if not text or any(c.isspace() or c in '"[]' for c in text)
        else text
    )


def under_systemd(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return bool(env.get("JOURNAL_STREAM") or env.get("INVOCATION_ID"))


class FieldsFormatter(logging.Formatter):
    """Plain lines for stderr, with the structured fields at the end."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        present = [f"{k}={_field(getattr(record, k))}" for k in FIELDS if hasattr(record, k)]
        return f"{line} [{' '.join(present)}]" if present else line


def _journal_handler() -> logging.Handler | None:
    try:
        from systemd.journal import JournalHandler
    except ImportError:
        return None
    # SYSLOG_IDENTIFIER makes `journalctl -t blockguardd` work; record attributes in upper
    # case (the ``extra`` fields) are sent as journal fields by JournalHandler itself.
    return JournalHandler(SYSLOG_IDENTIFIER="blockguardd")


def setup_logging(level: str = "info", environ: Mapping[str, str] | None = None) -> str:
    """Configure the root logger once; returns ``"journal"`` or ``"stderr"``."""
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.setLevel(level.upper())
    target = "stderr"
    handler: logging.Handler | None = None
    if under_systemd(environ):
        handler = _journal_handler()
        if handler is not None:
            target = "journal"
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(FieldsFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    # dbus-fast logs every failed method at ERROR with a traceback; ours already did.
    logging.getLogger("dbus_fast").setLevel(max(root.level, logging.WARNING))
    return target
