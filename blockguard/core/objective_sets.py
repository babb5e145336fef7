"""Stored sets of objectives as clients give them: checked key by key, merged, parsed.

A volume's (or group's) objectives are kept as the client typed them (``"every 15m"``,
``"5m"``), so ``Objectives`` shows what was asked for. ``SetObjectives`` sets only the
keys it is given (an empty string removes one), so setting ``rto`` never drops an ``rpo``
or resets ``generations``. Retention is ``generations`` (keep the newest N) and the
optional time tiers ``keep_hourly``, ``keep_daily``, ``keep_weekly``, ``keep_monthly``
(:func:`retention_of`; their buckets are in the set's ``tz``). ``drill`` (how often the
volume's restore drill runs) defaults to weekly for a set with an RTO and to off without
one (:func:`drill_of`). Every value is checked before anything is stored, and numbers
before any conversion, so a D-Bus ``t`` of 2**64-1 is a named refusal, not an
``OverflowError``.

The copy on a backup target (issue 11) has its own keys in the same set:
``remote_target`` (a registered target's id), ``remote_rpo``, ``remote_rto`` and
``remote_generations``, checked as their local namesakes; the last three need a
``remote_target`` (:func:`remote_of` gives them to the planner).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from blockguard.core.objectives import (
    DEFAULT_DRILL_INTERVAL,
    DEFAULT_GENERATIONS,
    DEFAULT_RESTORE_MODE,
    LEGACY_RESTORE_MODE,
    MAX_GENERATIONS,
    MAX_RTO,
    MIN_RTO,
    RecoveryObjectives,
    parse_drill,
    parse_objectives,
    parse_rpo,
    parse_rto,
)
from blockguard.core.retention import TIERS, RetentionPolicy
from blockguard.core.vocab import RestoreMode, check_name
from blockguard.errors import InvalidInput, InvalidObjectives

#: The keys a client may set; the values are kept as given (strings as typed).
#: The time-tier retention keys, ``keep_hourly`` .. ``keep_monthly`` (0..MAX_GENERATIONS).
KEEP_KEYS = tuple(f"keep_{tier}" for tier in TIERS)
#: The copy on a backup target: its target and the objectives that apply to it there.
REMOTE_KEYS = ("remote_target", "remote_rpo", "remote_rto", "remote_generations")
OBJECTIVE_KEYS = (
    "rpo",
    "rto",
    "restore_mode",
    "generations",
    *KEEP_KEYS,
    "tz",
    "drill",
    *REMOTE_KEYS,
)
#: A remote objective is checked as its local namesake.
_LOCAL_OF = {"remote_rpo": "rpo", "remote_rto": "rto", "remote_generations": "generations"}
#: The value that removes a key from a stored set (``SetObjectives`` sets only the keys given).
CLEAR = ""
#: No objective is typed with more characters than this; longer text is refused unread.
MAX_TEXT = 200


def _refuse(key: str, value: Any, why: str) -> InvalidObjectives:
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    # ``why`` is kept apart too, so a check that reuses another's names its own key.
    return InvalidObjectives(detail=f"{key} {shown} {why}", why=why)


def _why(exc: InvalidObjectives) -> str:
    """The reason of a refusal, without the key and value it names."""
    return str(exc.fields.get("why") or exc.fields.get("detail", exc))


def _check_text(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _refuse(key, value, "must be text")
    if len(value) > MAX_TEXT or "\0" in value or not value.isprintable():
        raise _refuse(key, value, f"must be printable text of at most {MAX_TEXT} characters")
    return value


def check_value(key: str, value: Any) -> Any:
    """One given objective, checked on its own; returns the value to store.

    Numbers are checked before any conversion, so an overflowing D-Bus integer (``t`` at
    2**64-1) or a NaN is a named refusal, never an ``OverflowError``.

    :raises InvalidObjectives: naming ``key`` and ``value``.
    """
    if key not in OBJECTIVE_KEYS:
        raise _refuse(key, value, f"is not an objective; known: {', '.join(OBJECTIVE_KEYS)}")
    if key in _LOCAL_OF:
        try:
            return check_value(_LOCAL_OF[key], value)
        except InvalidObjectives as exc:
            raise _refuse(key, value, _why(exc)) from exc
    if key == "remote_target":
        try:
            return check_name("target", _check_text(key, value))
        except InvalidInput as exc:
            raise _refuse(key, value, f"is refused: {exc.fields.get('detail', exc)}") from exc
    if key == "rto":
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise _refuse(key, value, "must be a duration such as 5m (or seconds)")
        if isinstance(value, int | float):
            if not math.isfinite(value) or not MIN_RTO.total_seconds() <= value <= (
                MAX_RTO.total_seconds()
            ):
                raise _refuse(
                    key,
                    value,
                    f"is outside {MIN_RTO.total_seconds():.0f}..{MAX_RTO.total_seconds():.0f} "
                    "seconds",
                )
            return value
        try:
            rto = parse_rto(_check_text(key, value))
        except InvalidObjectives as exc:
            raise _refuse(key, value, f"is refused: {exc.fields.get('detail', exc)}") from exc
        if not MIN_RTO <= rto <= MAX_RTO:
            raise _refuse(key, value, "is outside 1s..30d")
        return value
    if key == "generations" or key in KEEP_KEYS:
        low = 1 if key == "generations" else 0
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise _refuse(key, value, "must be a whole number")
        if isinstance(value, str):
            text = _check_text(key, value).strip()
            if not (text.isascii() and text.isdigit()) or len(text) > 6:
                raise _refuse(key, value, f"is not a whole number in {low}..{MAX_GENERATIONS}")
            value = int(text)
        if not low <= value <= MAX_GENERATIONS:
            raise _refuse(key, value, f"is not a whole number in {low}..{MAX_GENERATIONS}")
        return value
    text = _check_text(key, value)
    if key == "rpo":
        try:
            parse_rpo(text)
        except InvalidObjectives as exc:
            # The parser names what it understood ("interval 0s"); the user typed text.
            raise _refuse(key, value, f"is refused: {exc.fields.get('detail', exc)}") from exc
    elif key == "restore_mode":
        try:
            RestoreMode(text)
        except ValueError:
            raise _refuse(
                key, value, f"is not one of {', '.join(m.value for m in RestoreMode)}"
            ) from None
    elif key == "drill":
        try:
            parse_drill(text)
        except InvalidObjectives as exc:
            raise _refuse(key, value, f"is refused: {exc.fields.get('detail', exc)}") from exc
    elif key == "tz":
        try:
            ZoneInfo(text)
        except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
            raise _refuse(key, value, "is not a known IANA zone name") from exc
    return text


def merge_given(current: Mapping[str, Any], given: Any) -> dict[str, Any]:
    """The stored set after a client's ``SetObjectives``: only the keys given change.

    A key given as :data:`CLEAR` (the empty string) is removed. The result is checked as a
    whole (a daily RPO with its zone), so a refusal leaves nothing half-set.

    :param current: the set stored now (``{}`` for none).
    :param given: what the client sent.
    :raises InvalidObjectives: naming the offending key and value.
    """
    if not isinstance(given, Mapping):
        raise InvalidObjectives(detail=f"objectives {given!r} are not a dictionary")
    if not given:
        raise InvalidObjectives(
            detail=f"no objective given; known: {', '.join(OBJECTIVE_KEYS)} "
            "(an empty string clears one)"
        )
    unknown = sorted(str(k) for k in set(given) - set(OBJECTIVE_KEYS))
    if unknown:
        raise InvalidObjectives(
            detail=f"unknown keys {unknown}; known: {', '.join(OBJECTIVE_KEYS)}"
        )
    merged = dict(current)
    # A set stored without a mode for its RTO keeps its old meaning (LEGACY_RESTORE_MODE)
    # until the client names a mode or clears it.
    legacy = _given(current, "rto") and not _given(current, "restore_mode")
    for key, value in given.items():
        if value == CLEAR:
            merged.pop(key, None)
        else:
            merged[key] = check_value(key, value)
    if _given(merged, "rto") and not _given(merged, "restore_mode"):
        # Stored explicitly, so the set says what its RTO refers to (and a later change
        # of the default cannot change its meaning).
        kept = legacy and "restore_mode" not in given
        merged["restore_mode"] = (LEGACY_RESTORE_MODE if kept else DEFAULT_RESTORE_MODE).value
    parse_given(merged)
    remote_of(merged)
    return merged


def _given(given: Mapping[str, Any], key: str) -> bool:
    return given.get(key) not in (None, CLEAR)


def restore_mode_of(given: Mapping[str, Any]) -> RestoreMode:
    """The restore mode of a stored set: what its RTO refers to, and so the mode of a
    restore that names none.

    The set's ``restore_mode``; without one, :data:`LEGACY_RESTORE_MODE` for a set with an
    RTO (stored before sets carried their mode), else :data:`DEFAULT_RESTORE_MODE`.

    :raises InvalidObjectives: the stored mode is not a restore mode.
    """
    if _given(given, "restore_mode"):
        return RestoreMode(check_value("restore_mode", given["restore_mode"]))
    return LEGACY_RESTORE_MODE if _given(given, "rto") else DEFAULT_RESTORE_MODE


def parse_given(given: Mapping[str, Any]) -> RecoveryObjectives | None:
    """A stored set of objectives (see :data:`OBJECTIVE_KEYS`) for the planner.

    :returns: ``None`` when the set has neither an RPO nor an RTO (it may still say how
        many generations to keep: :func:`generations_of`).
    :raises InvalidObjectives: naming the offending key or value.
    """
    if not isinstance(given, Mapping):
        raise InvalidObjectives(detail=f"objectives {given!r} are not a dictionary")
    unknown = sorted(str(k) for k in set(given) - set(OBJECTIVE_KEYS))
    if unknown:
        raise InvalidObjectives(
            detail=f"unknown keys {unknown}; known: {', '.join(OBJECTIVE_KEYS)}"
        )
    checked = {k: check_value(k, v) for k, v in given.items() if v not in (None, CLEAR)}
    if "rpo" not in checked and "rto" not in checked:
        return None
    rto = checked.get("rto")
    return parse_objectives(
        rpo=checked.get("rpo"),
        rto=f"{rto}s" if isinstance(rto, int | float) else rto,
        generations=checked.get("generations"),
        restore_mode=restore_mode_of(checked).value,
        tz=checked.get("tz"),
        keep={t: checked.get(f"keep_{t}") for t in TIERS},
    )


def generations_of(given: Mapping[str, Any]) -> int:
    """How many generations a stored set keeps (the default when it does not say)."""
    value = given.get("generations")
    return DEFAULT_GENERATIONS if value in (None, CLEAR) else check_value("generations", value)


def retention_of(given: Mapping[str, Any]) -> RetentionPolicy:
    """The retention policy of a stored set: ``generations`` as keep-last (default 7), the
    ``keep_*`` tiers (default 0), buckets in the set's ``tz`` (default: local time).

    :raises InvalidObjectives: a stored value is not valid.
    """
    tiers = {
        tier: 0 if given.get(key) in (None, CLEAR) else check_value(key, given[key])
        for tier, key in zip(TIERS, KEEP_KEYS, strict=True)
    }
    tz = given.get("tz")
    return RetentionPolicy(
        last=generations_of(given),
        tz=None if tz in (None, CLEAR) else check_value("tz", tz),
        **tiers,
    )


def drill_of(given: Mapping[str, Any]) -> timedelta | None:
    """How often a stored set has its volume drilled; ``None``: drills are off.

    Without a ``drill`` key: :data:`DEFAULT_DRILL_INTERVAL` when the set has an RTO (a
    promise worth testing), else off.

    :raises InvalidObjectives: the stored value is not a drill objective.
    """
    value = given.get("drill")
    if value in (None, CLEAR):
        return DEFAULT_DRILL_INTERVAL if given.get("rto") not in (None, CLEAR) else None
    return parse_drill(check_value("drill", value))


def clean_given(given: Mapping[str, Any]) -> dict[str, Any]:
    """A complete new set, checked (what ``Protect`` stores): :func:`merge_given` on nothing."""
    return merge_given({}, given)


@dataclass(frozen=True)
class RemoteObjectives:
    """What a volume asks of its copy on a backup target.

    :param target: the registered target's id.
    :param objectives: the remote RPO and RTO (``None`` when neither is given: the copy is
        then made only when asked for); the RTO always refers to a copy restore, since a
        generation on a target can only be copied back.
    :param generations: how many remote generations to keep (keep-last).
    """

    target: str
    objectives: RecoveryObjectives | None
    generations: int = DEFAULT_GENERATIONS

    def describe(self) -> str:
        """One line for display, e.g. ``"to offsite: RPO daily at 02:00 ..., 7 generations"``."""
        if self.objectives is None:
            return f"to {self.target}: {self.generations} generations, on request"
        return f"to {self.target}: {self.objectives.describe()}"


def remote_of(given: Mapping[str, Any]) -> RemoteObjectives | None:
    """The remote objectives of a stored set, or ``None`` when it names no target.

    :raises InvalidObjectives: a remote objective without ``remote_target``, or a value
        that is not valid.
    """
    present = {k: given[k] for k in REMOTE_KEYS if given.get(k) not in (None, CLEAR)}
    if not present:
        return None
    if "remote_target" not in present:
        raise InvalidObjectives(
            detail=f"remote objectives ({', '.join(sorted(present))}) need a remote_target "
            "(the target they are for)"
        )
    checked = {k: check_value(k, v) for k, v in present.items()}
    rpo, rto = checked.get("remote_rpo"), checked.get("remote_rto")
    generations = checked.get("remote_generations", DEFAULT_GENERATIONS)
    tz = given.get("tz")
    objectives = None
    if rpo is not None or rto is not None:
        objectives = parse_objectives(
            rpo=rpo,
            rto=f"{rto}s" if isinstance(rto, int | float) else rto,
            generations=generations,
            restore_mode=RestoreMode.COPY.value,
            tz=None if tz in (None, CLEAR) else check_value("tz", tz),
        )
    return RemoteObjectives(checked["remote_target"], objectives, generations)
