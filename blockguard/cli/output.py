"""How blockguardctl prints: human tables and lines, or one versioned JSON document.

- Tables draw boxes only on a terminal; piped, they are plain columns separated by two
  spaces, one row a line, so ``awk``/``cut`` work. An id column is never cut short: on a
  narrow terminal the columns that may go are dropped (their data is in ``--json``).
- ``--json`` prints one document ``{"schema": 1, ...}`` (see docs/cli-json.md): snake_case
  keys, objects for what D-Bus carries as pairs, plain values only.
- Nothing is printed with ``repr``: values go through :func:`text`.
- rich is imported only to draw on a terminal: piped output (scripts, monitoring, the
  common case of a call that must be quick) is written here as rich would write it to a
  file, without importing it (issue 16: rich was a large part of every call's start-up).
"""

from __future__ import annotations

import os
import sys

# Mapping for isinstance, from where collections.abc takes it: the interpreter loads
# _collections_abc at start-up, collections.abc imports the collections package too
# (~1 ms of a call, issue 16).
from _collections_abc import Mapping

from blockguard.core.formats import format_ago, format_duration

TYPE_CHECKING = False  # typing is not imported to run (issue 16: ~2 ms of a call)
if TYPE_CHECKING:
    import re
    from collections.abc import Iterable, Sequence
    from typing import Any

    from rich.console import Console

#: The version of the JSON documents (docs/cli-json.md); bumped on incompatible change.
JSON_SCHEMA = 1


class Column:
    """A table column.

    :param keep: never cut or dropped (ids, names).
    :param drop: the order in which columns go when the terminal is too narrow (1 goes
        first); 0 never goes.
    """

    # Not a NamedTuple: typing compiles each of its (string) annotations at import, a
    # few hundred microseconds of every call (issue 16).
    __slots__ = ("drop", "keep", "title")

    def __init__(self, title: str, keep: bool = False, drop: int = 0) -> None:
        self.title = title
        self.keep = keep
        self.drop = drop

    def __repr__(self) -> str:
        return f"Column({self.title!r}, keep={self.keep}, drop={self.drop})"


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


#: Patterns, compiled when first used: re is imported only by a command that needs one
#: (issue 16). Between a lower-case letter or digit and a capital: ``BytesDone``.
_CAMEL = r"(?<=[a-z0-9])(?=[A-Z])"
#: rich's markup tags (rich.markup.RE_TAGS): ``[bold]``, ``[/]``, ``\\[escaped]``.
_TAGS = r"((\\*)\[([a-z#/@][^[]*?)])"
#: The control characters rich drops from printed text (rich.control.strip_control_codes).
_CONTROL = dict.fromkeys((7, 8, 11, 12, 13))


def snake(name: str) -> str:
    """``BytesDone`` -> ``bytes_done``."""
    import re

    return re.sub(_CAMEL, "_", name).lower()


def human_seconds(seconds: float) -> str:
    """An estimate in seconds; negative means unknown."""
    return "?" if seconds < 0 else format_duration(seconds)


def drill_text(drill: dict[str, Any]) -> str:
    """A volume's last restore drill in one line: when, result, measured vs predicted."""
    if not drill:
        return "-"
    when = format_ago(int(drill["at"]))
    if drill.get("measured_seconds", -1) < 0:
        return f"{when}: {drill['result']}: {drill.get('problem', '')}"
    rto = drill.get("rto_seconds", 0)
    held = f" against RTO {human_seconds(rto)}" if rto else " (no RTO)"
    text = (
        f"{when}: {drill['result']}, {drill.get('generation', '')} restored in "
        f"{human_seconds(drill['measured_seconds'])} ({drill.get('mode', '')}; predicted "
        f"{human_seconds(drill['predicted_seconds'])}, upper "
        f"{human_seconds(drill['upper_seconds'])}){held}"
    )
    return text + (f": {drill['problem']}" if drill.get("problem") else "")


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
        self.stderr = stderr or sys.stderr
        self._terminal = terminal
        self._width = width
        self._console: Console | None = None
        self._err: Console | None = None

    @property
    def console(self) -> Console:
        """The rich console on stdout (imports rich)."""
        if self._console is None:
            from rich.console import Console

            self._console = Console(
                file=self.stdout,
                highlight=False,
                soft_wrap=True,
                force_terminal=self._terminal,
                width=self._width,
            )
        return self._console

    @property
    def err(self) -> Console:
        """The rich console on stderr (imports rich): progress bars, spinners."""
        if self._err is None:
            from rich.console import Console

            self._err = Console(file=self.stderr, highlight=False)
        return self._err

    @property
    def is_terminal(self) -> bool:
        """Whether stdout is a terminal, as rich decides it; rich is asked only when the
        answer is not a plain no (a file or a pipe, and no FORCE_COLOR/TTY_COMPATIBLE)."""
        if self._terminal is None and not _maybe_terminal(self.stdout):
            return False
        return self.console.is_terminal

    @property
    def err_is_terminal(self) -> bool:
        """Whether stderr is a terminal (progress bars and spinners are drawn only there)."""
        if not _maybe_terminal(self.stderr):
            return False
        return self.err.is_terminal

    def json(self, data: Mapping[str, Any]) -> None:
        """Print one JSON document: ``{"schema": 1, **data}``."""
        import json

        self.stdout.write(
            json.dumps({"schema": JSON_SCHEMA, **data}, indent=2, sort_keys=True) + "\n"
        )
        self.stdout.flush()

    def line(self, message: str, markup: bool = False) -> None:
        """One line of text (``markup``: it holds rich markup of ours, nothing of the user's)."""
        if not self.is_terminal:
            _write_plain(self.stdout, _strip_markup(message) if markup else message)
            return
        from rich.markup import escape

        self.console.print(message if markup else escape(message))

    def note(self, message: str) -> None:
        """A line on stderr (progress, hints), so stdout stays the answer."""
        if not self.err_is_terminal:
            _write_plain(self.stderr, message)
            return
        from rich.markup import escape

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
        import shutil

        width = self.console.width or shutil.get_terminal_size().columns
        shown, need = _fit(columns, cells, width)
        if shown is None:
            # Even alone, the columns that must stay whole are wider than the terminal:
            # plain lines, which the terminal wraps, cut nothing.
            if title:
                self.stdout.write(f"{title}\n")
            self._plain(columns, cells)
            return
        from rich.markup import escape
        from rich.table import Table

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


def _maybe_terminal(stream: Any) -> bool:
    """False when rich would certainly not treat ``stream`` as a terminal (see
    ``rich.console.Console.is_terminal``): no TTY_COMPATIBLE or FORCE_COLOR in the
    environment and not a tty. True means: ask rich."""
    if "TTY_COMPATIBLE" in os.environ or "FORCE_COLOR" in os.environ:
        return True
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed file
        return False


def _strip_markup(message: str) -> str:
    """``message`` without its rich markup tags, as rich prints it to a file."""

    def replace(match: re.Match[str]) -> str:
        full, escapes, _tag = match.groups()
        backslashes, escaped = divmod(len(escapes), 2)
        return "\\" * backslashes + (full[len(escapes) :] if escaped else "")

    import re

    return re.sub(_TAGS, replace, message)


def _write_plain(stream: Any, message: str) -> None:
    """One line as rich's console writes it to a file: no styles, tabs expanded, the
    control characters it drops dropped (no emoji codes replaced: the text is the text)."""
    stream.write(message.translate(_CONTROL).expandtabs(8) + "\n")
    stream.flush()


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
