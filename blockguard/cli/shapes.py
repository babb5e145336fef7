"""The objects of the JSON documents (docs/cli-json.md), from what D-Bus carries.

D-Bus names properties in CamelCase and carries some objects as structs (a generation
``(sssttsu)``, an error ``(ss)``, a pool disk ``(sa{sv})``); the JSON has snake_case keys
and an object for each of them, the same for every command that shows it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from blockguard.cli.output import snake

GENERATION_FIELDS = ("id", "method", "parent", "created", "bytes", "state", "number")


def generation(struct: Sequence[Any]) -> dict[str, Any]:
    """A generation: its long ``id``, its ``number`` and ``short_id`` (``db@7``)..."""
    gen = dict(zip(GENERATION_FIELDS, struct, strict=True))
    volume = gen["id"].partition("@")[0]
    gen["short_id"] = f"{volume}@{gen['number']}" if gen["number"] else ""
    gen["parent"] = gen["parent"] or None
    return gen


def generations(structs: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    return [generation(s) for s in structs]


def _props(path: str, props: dict[str, Any]) -> dict[str, Any]:
    return {"path": path, **{snake(k): v for k, v in props.items()}}


def volume(path: str, props: dict[str, Any]) -> dict[str, Any]:
    out = _props(path, props)
    out["generations"] = generations(props.get("Generations", []))
    return out


def pool(path: str, props: dict[str, Any]) -> dict[str, Any]:
    out = _props(path, props)
    out["devices"] = [{"path": dev, **info} for dev, info in props.get("Devices", [])]
    return out


def job(path: str, props: dict[str, Any]) -> dict[str, Any]:
    out = _props(path, props)
    name, message = (props.get("Error") or ["", ""])[:2]
    out["error"] = {"name": name, "message": message} if name else None
    return out
