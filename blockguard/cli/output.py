"""How blockguardctl prints: human tables and lines, or one versioned JSON document.

- Tables draw boxes only on a terminal; piped, they are plain columns separated by two
  spaces, one row a line, so ``awk``/``cut`` work. An id column is never cut short: on a
  narrow terminal the columns that may go are dropped (their data is in ``--json``).
- ``--json`` prints one document ``{"schema": 1, ...}`` (see docs/cli-json.md): snake_case
  keys, objects for what D-Bus carries as pairs, plain values only.
- Nothing is printed with ``repr``: values go through :func:`text`.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

#: The version of the JSON documents (docs/cli-json.md); bumped on incompatible change.
JSON_SCHEMA = 1


@dataclass(frozen=True)
class Column:
    """A table column.

    :param keep: never cut or dropped (ids, names).
    :param drop: the order in which columns go when the terminal is too narrow (1 goes
        first); 0 never goes.
    """

    title: str
    keep: bool = False
    drop: int = 0


def text(value: Any) -> str:
    """A value as a person reads it: lists joined by commas, mappings as ``k v`` pairs,
    booleans as yes/no, nothing as ``-`` — never a Python repr."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {text(v)}" for k, v in value.items()) or "-"
    if isinstance(value, list | tuple):
        return ", ".join(text(v) for v in value) or "-"
    return str(value)


_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def snake(name: str) -> str:
    """``BytesDone`` -> ``bytes_done``."""
    return _CAMEL.sub("_", name).lower()


class Output:
    """Human output on stdout (tables, lines), or JSON with ``--json``; progress and
    notes go to stderr."""

    def __init__(
        self,
        as_json: bool,
        stdout: Any = None,
        stderr: Any = None,
        *,
        terminal: bool | None = None,
        width: int | None = None,
    ) -> None:
        """:param terminal: and ``width``: as if stdout were a terminal that wide (tests)."""
        self.as_json = as_json
        self.stdout = stdout or sys.stdout
        self.console = Console(
            file=self.stdout,
            highlight=False,
            soft_wrap=True,
            force_terminal=terminal,
            width=width,
        )
        self.err = Console(file=stderr or sys.stderr, highlight=False)

    @property
    def is_terminal(self) -> bool:
        return self.console.is_terminal

    def json(self, data: Mapping[str, Any]) -> None:
        """Print one JSON document: ``{"schema": 1, **data}``."""
        self.stdout.write(
            json.dumps({"schema": JSON_SCHEMA, **data}, indent=2, sort_keys=True) + "\n"
        )
        self.stdout.flush()

    def line(self, message: str, markup: bool = False) -> None:
        """One line of text (``markup``: it holds rich markup of ours, nothing of the user's)."""
        self.console.print(message if markup else escape(message))

    def note(self, message: str) -> None:
        """A line on stderr (progress, hints), so stdout stays the answer."""
        self.err.print(escape(message))

    def fields(self, pairs: Iterable[tuple[str, Any]]) -> None:
        """``key  value`` lines, keys aligned."""
        items = [(k, text(v)) for k, v in pairs]
        width = max((len(k) for k, _ in items), default=0)
        for key, value in items:
            self.stdout.write(f"{key.ljust(width)}  {value}\n")
        self.stdout.flush()

    def table(
        self,
        title: str | None,
        columns: Sequence[Column | str],
        rows: Iterable[Sequence[Any]],
    ) -> None:
        """A table (see the module docstring); a plain string is a column that may be
        squeezed but is never dropped."""
        columns = [c if isinstance(c, Column) else Column(c) for c in columns]
        cells = [[text(c) for c in row] for row in rows]
        if not self.is_terminal:
            self._plain(columns, cells)
            return
        width = self.console.width or shutil.get_terminal_size().columns
        shown, need = _fit(columns, cells, width)
        if shown is None:
            # Even alone, the columns that must stay whole are wider than the terminal:
            # plain lines, which the terminal wraps, cut nothing.
            if title:
                self.stdout.write(f"{title}\n")
            self._plain(columns, cells)
            return
        table = Table(title=title, title_justify="left")
        for i in shown:
            col = columns[i]
            table.add_column(
                col.title,
                no_wrap=col.keep,
                overflow="fold",
                min_width=need[i] if col.keep else None,
            )
        for row in cells:
            table.add_row(*(escape(row[i]) for i in shown))
        self.console.print(table)
        dropped = [columns[i].title for i in range(len(columns)) if i not in shown]
        if dropped:
            self.note(f"(not shown at this width: {', '.join(dropped)}; see --json)")

    def _plain(self, columns: Sequence[Column], cells: list[list[str]]) -> None:
        header = [c.title for c in columns]
        widths = [max(len(r[i]) for r in [header, *cells]) for i in range(len(columns))]
        for row in [header, *cells]:
            line = "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True))
            self.stdout.write(line.rstrip() + "\n")
        self.stdout.flush()


def _fit(
    columns: Sequence[Column], cells: list[list[str]], width: int
) -> tuple[list[int] | None, list[int]]:
    """The columns to show and each column's widest cell: all, unless the ones that must
    stay whole do not fit beside them; then the droppable ones go, lowest ``drop`` first.
    None when even that does not fit."""
    header = [c.title for c in columns]
    need = [max(len(r[i]) for r in [header, *cells]) for i in range(len(columns))]
    shown = list(range(len(columns)))

    def total() -> int:
        # A boxed rich table: a border and one space of padding each side per column.
        return sum(need[i] + 3 for i in shown) + 1

    for i in sorted((i for i, c in enumerate(columns) if c.drop), key=lambda i: columns[i].drop):
        if total() <= width:
            break
        shown.remove(i)
    if total() > width and sum(need[i] + 3 for i in shown if columns[i].keep) + 1 > width:
        return None, need
    return shown, need
