"""Names and identifiers: what clients see versus what the catalog and the pool store.

The pool names a generation ``20261103T120501.123456Z-1a2b3c4d`` (unique per volume, sorts
by time); the catalog wants a UUID; clients see ``VOLUME@POOLID``. The catalog UUID is
derived from the other two, so a catalog rebuilt from the pool gets the same ids.

People type generations more briefly; :func:`resolve_generation` is the one place that
reads what they typed, for every call that takes a generation:

- ``db@7``: the volume's running number (given at commit, kept in the manifest);
- ``db@latest``, ``db@latest~2``: the newest, the one two before it;
- ``db@20261201T18``: a prefix of the long id, if only one generation has it;
- ``db@20261201T184511.860410Z-0cf76af3``: the long id itself.

A selector of digits only with fewer than 8 of them is a number (a long id starts with an
8-digit date); a restore, which already names its volume, may leave ``db@`` out.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence

from blockguard.core.vocab import NAME_RE
from blockguard.errors import AmbiguousGeneration, InvalidInput, NotFound

_NAMESPACE = uuid.UUID("6f1c1c2e-5b0e-4d59-9d0c-6b6c6f636b67")


def catalog_id(volume: str, pool_id: str) -> str:
    """The catalog's UUID of a generation."""
    return str(uuid.uuid5(_NAMESPACE, f"{volume}/{pool_id}"))


def public_id(volume: str, pool_id: str) -> str:
    """The id clients see, e.g. ``db@20261103T120501.123456Z-1a2b3c4d``."""
    return f"{volume}@{pool_id}"


def split_public_id(generation: str) -> tuple[str, str]:
    """``(volume, pool id)`` of a client's generation id.

    :raises InvalidInput: it is not ``VOLUME@ID``.
    """
    volume, sep, pool_id = (
        generation.partition("@") if isinstance(generation, str) else ("", "", "")
    )
    if not sep or not NAME_RE.fullmatch(volume) or not pool_id or "/" in pool_id:
        raise InvalidInput(
            detail=f"generation {generation!r} is not a generation id such as VOLUME@ID"
        )
    return volume, pool_id


def short_id(volume: str, number: int) -> str:
    """The id by running number, e.g. ``db@7`` (``""`` for a generation without one)."""
    return f"{volume}@{number}" if number > 0 else ""


_LATEST_RE = re.compile(r"latest(?:~([0-9]{1,6}))?")
#: Digits only and shorter than the 8-digit date a long id starts with: a running number.
_NUMBER_RE = re.compile(r"[0-9]{1,7}")
#: What each character of a long id is (``20261103T120501.123456Z-1a2b3c4d``), to tell a
#: prefix of one from something that cannot be.
_LONG_ID_SHAPE = "D" * 8 + "T" + "D" * 6 + "." + "D" * 6 + "Z-" + "H" * 8


def _could_be_long_id(text: str) -> bool:
    if len(text) > len(_LONG_ID_SHAPE):
        return False
    for char, shape in zip(text, _LONG_ID_SHAPE, strict=False):
        if shape == "D":
            ok = char.isascii() and char.isdigit()
        elif shape == "H":
            ok = char in "0123456789abcdef"
        else:
            ok = char == shape
        if not ok:
            return False
    return True


def resolve_generation(volume: str, text: str, generations: Sequence[tuple[str, int]]) -> str:
    """The pool id of the generation of ``volume`` that ``text`` names (see the module
    docstring for the forms).

    :param text: ``VOLUME@SELECTOR``, or the selector alone.
    :param generations: ``(pool id, running number)`` of every generation of the volume,
        oldest first; number 0 when it has none (an unreadable manifest).
    :raises InvalidInput: ``text`` is malformed or names another volume.
    :raises AmbiguousGeneration: a prefix that more than one id starts with.
    :raises NotFound: nothing matches (the message says what there is).
    """
    if not isinstance(text, str) or not text:
        raise InvalidInput(detail="give a generation, e.g. VOLUME@7, VOLUME@latest or its id")
    if "@" in text:
        owner, selector = split_public_id(text)
        if owner != volume:
            raise InvalidInput(detail=f"generation {text} belongs to volume {owner}, not {volume}")
    else:
        selector = text
    shown = f"{volume}@{selector}"
    latest = _LATEST_RE.fullmatch(selector)
    if latest is not None:
        back = int(latest.group(1) or 0)
        if back < len(generations):
            return generations[len(generations) - 1 - back][0]
    elif _NUMBER_RE.fullmatch(selector):
        for pool_id, number in generations:
            if number == int(selector):
                return pool_id
    else:
        if not _could_be_long_id(selector):
            raise InvalidInput(
                detail=f"generation {shown} is not a generation: give VOLUME@NUMBER, "
                "VOLUME@latest, VOLUME@latest~N or the start of its id (VOLUME@20261201T18)"
            )
        matches = [pool_id for pool_id, _ in generations if pool_id.startswith(selector)]
        if selector in matches:
            return selector
        if len(matches) == 1:
            return matches[0]
        if matches:
            numbered = dict(generations)
            raise AmbiguousGeneration(
                name=shown,
                candidates=", ".join(_describe(volume, g, numbered[g]) for g in matches),
            )
    raise NotFound(what="generation", name=shown, hint=_range_hint(volume, generations))


def _describe(volume: str, pool_id: str, number: int) -> str:
    long = public_id(volume, pool_id)
    return f"{short_id(volume, number)} ({long})" if number else long


def _range_hint(volume: str, generations: Sequence[tuple[str, int]]) -> str:
    numbers = [n for _, n in generations if n]
    if not generations:
        return f"{volume} has no generations yet"
    have = f"{volume} has {len(generations)}"
    if numbers:
        have += f", numbered {min(numbers)}..{max(numbers)}"
    return f"{have}; blockguardctl generations {volume} lists them"
