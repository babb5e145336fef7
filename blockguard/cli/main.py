"""``blockguardctl``: the command-line client of blockguardd.

The argument tree is data (:data:`blockguard.cli.parser.TREE`), turned into argparse
parsers by :func:`~blockguard.cli.parser.build_parser`; each leaf names a small function
of :mod:`blockguard.cli.actions`. Failures are explained in one plain sentence on stderr
with a documented :class:`~blockguard.errors.ExitCode`; ``--propagate`` re-raises them
instead (for tests).

Start-up is most of a call's time (issue 16), so this module imports only what a call
needs: the common commands that only ask the daemon (``status``, ``plan VOLUME``, the
lists...) are parsed by :func:`quick_parse` without argparse (argparse, with re, enum and
gettext, was a fifth of a ``status`` call), into the same arguments argparse makes;
every other command line, ``--help``, ``--version`` and every usage error go to argparse
(:mod:`blockguard.cli.parser`, whose names this module still offers: ``build_parser``
for ``scripts/install``'s man page and completion). A leaf's function is imported when it
runs (:class:`Action`), the D-Bus client when a command connects, rich when something is
drawn on a terminal. ``tests/unit/test_cli_imports.py`` guards that.
"""

from __future__ import annotations

import gc
import os
import sys

TYPE_CHECKING = False  # typing is not imported to run (issue 16: ~2 ms of a call)
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any


class Action:
    """The function of a leaf, ``module.function`` of :mod:`blockguard.cli`, imported when
    it is called: parsing ``--help`` or a usage error imports no action module."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: Any) -> Any:
        module, _, function = self.name.rpartition(".")
        __import__(f"blockguard.cli.{module}")
        return getattr(sys.modules[f"blockguard.cli.{module}"], function)(*args)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Action) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"Action({self.name!r})"


class Arguments:
    """What :func:`quick_parse` makes of a command line: the attributes argparse's
    ``Namespace`` would have (``vars()`` gives the same dict)."""

    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)

    def __repr__(self) -> str:
        return f"Arguments({self.__dict__!r})"


#: The commands :func:`quick_parse` reads: words -> (action, positional dests, flags).
#: Each must be a leaf of the tree whose positionals take one plain word each and whose
#: options are ``store_true`` flags; ``tests/unit/test_cli_imports.py`` holds this table
#: to the tree and every parse to argparse's.
QUICK: dict[tuple[str, ...], tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    ("status",): ("health.status", (), ("--check",)),
    ("plan",): ("actions.plan", ("volume",), ()),
    ("generations",): ("actions.generations", ("volume",), ()),
    ("volume", "list"): ("actions.volume_list", (), ()),
    ("volume", "show"): ("actions.volume_show", ("name",), ()),
    ("pool", "list"): ("actions.pool_list", (), ()),
}
#: The options of the top level argparse knows (the others are its business).
_TOP_FLAGS = ("--json", "--propagate")


def quick_parse(argv: Sequence[str]) -> Arguments | None:
    """The arguments of a common command line (:data:`QUICK`) as argparse would parse
    them, or None for anything else (help, a version, other commands, anything unusual
    or wrong): argparse then parses it, and says what is wrong."""
    values: dict[str, Any] = {
        "json": False,
        "bus": os.environ.get("BLOCKGUARD_BUS", "system"),
        "propagate": False,
    }
    i = 0
    # The top level's options, before the command (argparse's subcommands know no --bus).
    while i < len(argv) and argv[i].startswith("-"):
        word = argv[i]
        if word in _TOP_FLAGS:
            values[word[2:]] = True
        elif word == "--bus" and i + 1 < len(argv) and _plain_word(argv[i + 1]):
            i += 1
            values["bus"] = argv[i]
        elif word.startswith("--bus=") and _plain_word(word[6:]):
            values["bus"] = word[6:]
        else:
            return None
        i += 1
    command = tuple(argv[i : i + 2])
    if command not in QUICK:
        command = command[:1]
        if command not in QUICK:
            return None
    action, dests, flags = QUICK[command]
    values.update({flag[2:].replace("-", "_"): False for flag in flags})
    positionals = []
    for word in argv[i + len(command) :]:
        if word == "--json":
            values["json"] = True
        elif word in flags:
            values[word[2:].replace("-", "_")] = True
        elif _plain_word(word):
            positionals.append(word)
        else:
            return None
    if len(positionals) != len(dests):
        return None
    values.update(zip(dests, positionals, strict=True))
    values["func"] = Action(action)
    return Arguments(**values)


def _plain_word(word: str) -> bool:
    """A word argparse takes as a value as it is: not empty, not like an option."""
    return bool(word) and not word.startswith("-")


def check_text(args: Any) -> None:
    """Refuse a value that is not UTF-8 (a name or path of bytes that are not, which Python
    keeps as surrogates): D-Bus carries text as UTF-8 only, so no call could carry it.

    :raises InvalidInput: naming the option and the value, its bytes shown as ``\\xff``.
    """
    for dest, value in vars(args).items():
        for text in value if isinstance(value, list) else (value,):
            if not isinstance(text, str) or text.isascii():
                continue
            try:
                text.encode()
            except UnicodeEncodeError:
                from blockguard.errors import InvalidInput

                shown = os.fsencode(text).decode(errors="backslashreplace")
                raise InvalidInput(
                    detail=f"{dest.replace('_', '-')} '{shown}' is not UTF-8 text; "
                    "names, devices and objectives must be (D-Bus carries nothing else)"
                ) from None


def run(argv: Sequence[str] | None = None) -> int:
    """Parse and run; errors propagate (``main`` explains them)."""
    args: Any = quick_parse(sys.argv[1:] if argv is None else argv)
    if args is None:
        from blockguard.cli.parser import build_parser

        args = build_parser(lazy=True).parse_args(argv)
    check_text(args)
    from blockguard.cli.client import Client
    from blockguard.cli.output import Output

    out = Output(args.json)
    with Client(args.bus) as client:
        args.func(client, args, out)
    return 0  # ExitCode.OK


def main(argv: Sequence[str] | None = None) -> int:
    """The program (``argv`` None: ``sys.argv``, and the process exits after it)."""
    args = sys.argv[1:] if argv is None else list(argv)
    propagate = "--propagate" in args
    try:
        return int(run(args))
    except SystemExit:
        raise
    except BaseException as exc:
        if propagate:
            raise
        from blockguard.cli.errors import explain, next_step

        message, code = explain(exc)
        sys.stderr.write(f"blockguardctl: {message}\n")
        step = next_step(exc)
        if step:
            sys.stderr.write(f"  next: {step}\n")
        return int(code)
    finally:
        if argv is None:
            # The interpreter's exit collects garbage through every object the imports
            # made (modules, classes, enums): a sixth of a ``status`` call (issue 16).
            # Frozen, they are left to the OS; nothing of ours needs a finalizer (the
            # connection is closed, the output flushed at exit as always).
            gc.freeze()


def __getattr__(name: str) -> Any:
    """The parser's names (``build_parser``, ``TREE``, ``bounded_int`` ...), as this
    module had them before the tree moved to :mod:`blockguard.cli.parser`: imported
    when asked for, not by a call that does not need them."""
    if name.startswith("__"):
        raise AttributeError(name)
    from blockguard.cli import parser

    try:
        return getattr(parser, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


if __name__ == "__main__":
    sys.exit(main())
