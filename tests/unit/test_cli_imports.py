"""blockguardctl starts fast by importing only what a command needs (issue 16).

Start-up, not the daemon, was most of a call's time: rich, asyncio and dbus-fast, the
engine's vocabulary. Time is not asserted here (the machine is shared and slow under
TCG; ``bench/bench_client.py`` prints the ratios); what is asserted is the set of modules a
fresh interpreter holds after each step, in a subprocess so that nothing this test process
imported counts. Piped output is written without rich: it must read as rich wrote it.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockguard.cli.main import QUICK, Action, quick_parse
from blockguard.cli.output import Column, Output
from blockguard.cli.parser import TREE, Cmd, build_parser, terminal_columns

REPO = Path(__file__).resolve().parents[2]
#: What the installed ``blockguardctl`` script runs.
ENTRY = "import sys; from blockguard.cli.main import main; sys.exit(main())"

#: Never needed to parse a command line, print help or a version, or explain an error.
HEAVY = ("rich", "dbus_fast", "asyncio", "importlib.metadata")
#: Never needed by the client at all: the daemon's side of the layers.
NOT_CLIENT = ("blockguard.engine", "blockguard.storage", "blockguard.daemon")
#: The modules of blockguard.core the client may use (the vocabulary and its formatters).
CORE_ALLOWED = ("blockguard.core", "blockguard.core.vocab", "blockguard.core.formats")


def modules_after(code: str, *, env: dict[str, str] | None = None) -> set[str]:
    """The modules a fresh interpreter holds after running ``code`` (whose stdout is
    discarded) and what it printed on stderr, if it failed."""
    script = (
        "import io, json, sys\n"
        "real = sys.stdout\n"
        "sys.stdout = io.StringIO()\n"
        f"try:\n    exec({code!r})\nexcept SystemExit:\n    pass\n"
        "real.write(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout))


def loaded(modules: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes))


def core_beyond_vocab(modules: set[str]) -> list[str]:
    return sorted(m for m in loaded(modules, ("blockguard.core",)) if m not in CORE_ALLOWED)


@pytest.mark.parametrize(
    "argv",
    [[], ["--help"], ["--version"], ["status", "--help"], ["plan"], ["pool", "nonsense"]],
    ids=["import", "help", "version", "status-help", "usage-error", "bad-command"],
)
def test_parsing_imports_nothing_heavy(argv: list[str]) -> None:
    code = "import blockguard.cli.main as m\n"
    if argv:
        code += f"m.main({argv!r})\n"
    modules = modules_after(code)
    # --version asks the installed distribution (importlib.metadata), as blockguardd does.
    heavy = loaded(modules, HEAVY[:-1] if argv == ["--version"] else HEAVY)
    assert heavy == [], heavy
    assert loaded(modules, NOT_CLIENT) == []
    assert core_beyond_vocab(modules) == []
    # No command ran: no action module, no D-Bus client.
    assert loaded(modules, ("blockguard.cli.actions", "blockguard.cli.client")) == []


def test_a_command_imports_no_dbus_fast_and_no_rich() -> None:
    # No bus to reach: the command fails after importing everything it needs to call.
    code = (
        "import blockguard.cli.main as m\n"
        "assert m.main(['--bus', 'unix:path=/nonexistent/blockguard-bus', 'status']) != 0\n"
        "assert m.main(['--bus', 'unix:path=/nonexistent/blockguard-bus', 'plan', 'db']) != 0\n"
    )
    modules = modules_after(code)
    assert {"blockguard.cli.health", "blockguard.cli.actions", "blockguard.cli.wire"} <= modules
    # cli.wire writes and reads the messages, on _socket: no dbus-fast, no asyncio.
    assert loaded(modules, ("asyncio", "dbus_fast", "socket", "selectors")) == []
    assert loaded(modules, ("rich", "dataclasses", "shutil")) == []
    assert loaded(modules, NOT_CLIENT) == []
    assert core_beyond_vocab(modules) == []


#: What a ``status`` call must not import: argparse (with gettext), enum, re, typing,
#: collections, socket (enum, selectors), json: together most of a call's start-up.
NOT_FOR_STATUS = ("argparse", "gettext", "enum", "re", "typing", "collections", "socket", "json")


def _importtime(code: str, argv: list[str]) -> list[tuple[str, int]]:
    """``-X importtime`` of a program: (module, depth) in the order each import ended (a
    module's own imports are listed before it, one level deeper)."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=subprocess.DEVNULL,
    )
    rows = []
    for line in out.stderr.splitlines():
        if line.startswith("import time:") and line.split("|")[1].strip().isdigit():
            name = line.split("|")[2]
            rows.append((name.strip(), (len(name) - len(name.lstrip())) // 2))
    return rows


def imported_in_order(argv: list[str]) -> list[tuple[str, str]]:
    """(module, the top-level import that brought it) for each module the program (as the
    console script runs it) imports, without the ones the interpreter's own start-up
    imports (``site`` runs the editable install's hook in a checkout's venv: enum, re ...
    for every program)."""
    start_up = {name for name, _ in _importtime("pass", [])}
    rows = _importtime(ENTRY, argv)
    return [
        # The top-level import that brought a module is the first one listed after it.
        (name, next(top for top, depth in rows[i:] if depth == 0))
        for i, (name, _) in enumerate(rows)
        if name not in start_up
    ]


def test_status_imports_nothing_heavy_until_it_fails() -> None:
    # No bus to reach: everything a call imports to connect is imported; explaining the
    # failure (the error tree: enum, typing) may import more, the way there may not.
    rows = imported_in_order(["--bus", "unix:path=/nonexistent/blockguard-bus", "status"])
    modules = {name for name, _ in rows}
    assert {"blockguard.cli.wire", "blockguard.cli.health"} <= modules
    explaining = ("blockguard.errors", "blockguard.cli.errors")
    heavy = [(m, top) for m, top in rows if loaded({m}, NOT_FOR_STATUS)]
    assert heavy and all(top in explaining for _, top in heavy), heavy
    assert loaded(modules, ("blockguard.cli.parser", "blockguard.cli.actions")) == []
    assert loaded(modules, ("dbus_fast", "asyncio", "rich")) == []


def test_piped_output_imports_no_rich() -> None:
    code = (
        "from blockguard.cli.output import Column, Output\n"
        "out = Output(False, io.StringIO(), io.StringIO())\n"
        "out.line('The next backup would be [bold]full[/].', markup=True)\n"
        "out.note('a note')\n"
        "out.table('T', [Column('id', keep=True), 'x'], [[1, 2]])\n"
        "assert not out.is_terminal\n"
    )
    assert loaded(modules_after(code), ("rich",)) == []
    # FORCE_COLOR makes rich call a pipe a terminal: then rich decides, as before.
    forced = modules_after(code.replace("assert not", "assert "), env={"FORCE_COLOR": "1"})
    assert "rich.console" in forced


SAMPLES = [
    ("plain words", False),
    ("a\tb\tc and\ttabs", False),
    ("bell\x07 back\x08 vt\x0b ff\x0c cr\r end", False),
    ("esc \x1b[31m passes", False),
    ("brackets [not a tag] [/x] \\[y] \\\\[bold]z", False),
    ("multi\nline", False),
    ("", False),
    ("é ünïcode", False),
    ("The next backup of db would be [bold]full[/] (the objectives cannot be met!).", True),
    ("[bold]a[/] \\[x] \\\\[bold]b[/] [c]", True),
]


@pytest.mark.parametrize(("message", "markup"), SAMPLES)
def test_piped_lines_read_as_rich_wrote_them(message: str, markup: bool) -> None:
    from rich.console import Console
    from rich.markup import escape

    ours, theirs = io.StringIO(), io.StringIO()
    Output(False, ours, io.StringIO()).line(message, markup=markup)
    Console(file=theirs, highlight=False, soft_wrap=True).print(
        message if markup else escape(message)
    )
    assert ours.getvalue() == theirs.getvalue()
    notes, rich_notes = io.StringIO(), io.StringIO()
    Output(False, io.StringIO(), notes).note(message)
    Console(file=rich_notes, highlight=False).print(escape(message))
    if "\n" not in message and len(message) < 80:  # rich wraps notes at its width
        assert notes.getvalue() == rich_notes.getvalue()


def test_a_terminal_still_draws_with_rich() -> None:
    buf = io.StringIO()
    out = Output(False, buf, io.StringIO(), terminal=True, width=80)
    out.table("T", [Column("id", keep=True)], [["x"]])
    out.line("[bold]b[/]", markup=True)
    assert "┏" in buf.getvalue() and "\x1b[1m" in buf.getvalue()


# --- the quick parse of the common commands is argparse's --------------------------------


def _leaf(words: tuple[str, ...]) -> Cmd:
    cmd = TREE
    for word in words:
        cmd = next(c for c in cmd.sub if c.name == word)
    return cmd


@pytest.mark.parametrize("words", sorted(QUICK), ids=" ".join)
def test_the_quick_commands_are_the_trees(words: tuple[str, ...]) -> None:
    action, dests, flags = QUICK[words]
    cmd = _leaf(words)
    assert cmd.run == Action(action) and not cmd.sub
    positionals = [a for a in cmd.args if not a.flags[0].startswith("-")]
    options = [a for a in cmd.args if a.flags[0].startswith("-")]
    assert tuple(a.flags[0] for a in positionals) == dests
    assert all(set(a.options) <= {"help", "metavar"} for a in positionals)
    assert tuple(a.flags[0] for a in options) == flags
    assert all(a.options.get("action") == "store_true" and len(a.flags) == 1 for a in options)


QUICK_ARGVS = [
    ["status"],
    ["status", "--check"],
    ["status", "--json", "--check"],
    ["--json", "status"],
    ["--json", "--propagate", "--bus", "unix:path=/x", "status", "--check", "--json"],
    ["--bus=session", "status"],
    ["plan", "db"],
    ["--json", "plan", "db"],
    ["plan", "--json", "db"],
    ["plan", "db@7"],
    ["plan", "é"],
    ["generations", "db"],
    ["volume", "list"],
    ["volume", "list", "--json"],
    ["volume", "show", "db"],
    ["pool", "list"],
]
#: Command lines the quick parse leaves to argparse (which refuses most of them).
ARGPARSE_ARGVS = [
    [],
    ["--help"],
    ["-h"],
    ["--version"],
    ["status", "--help"],
    ["status", "-h"],
    ["status", "extra"],
    ["status", "--chec"],  # argparse's abbreviation
    ["--jso", "status"],
    ["--bus", "status"],
    ["--bus", "-x", "status"],
    ["--bus=", "status"],
    ["status", "--bus", "x"],
    ["plan"],
    ["plan", "a", "b"],
    ["plan", "-x"],
    ["plan", "--", "db"],
    ["plan", ""],
    ["volume"],
    ["volume", "nonsense"],
    ["pool", "create", "p", "/dev/x"],
    ["jobs"],
    ["protect", "/dev/x", "v"],
]


@pytest.mark.parametrize("argv", QUICK_ARGVS, ids=" ".join)
def test_the_quick_parse_is_argparses(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    for bus in (None, "unix:path=/from/env"):
        if bus is None:
            monkeypatch.delenv("BLOCKGUARD_BUS", raising=False)
        else:
            monkeypatch.setenv("BLOCKGUARD_BUS", bus)
        quick = quick_parse(argv)
        assert quick is not None, argv
        assert vars(quick) == vars(build_parser().parse_args(argv))


@pytest.mark.parametrize("argv", ARGPARSE_ARGVS, ids=lambda argv: " ".join(argv) or "none")
def test_everything_else_is_left_to_argparse(argv: list[str]) -> None:
    assert quick_parse(argv) is None


def test_help_and_usage_errors_still_go_through_argparse() -> None:
    for argv in (["status", "--help"], ["plan"], ["status", "--chec"]):
        assert "argparse" in modules_after(f"import blockguard.cli.main as m\nm.main({argv!r})\n")


# --- the parser: a call builds only its own command's part of the tree --------------------

ARGVS = [
    ["status"],
    ["status", "--check", "--json"],
    ["--json", "plan", "db"],
    ["--bus", "session", "volume", "show", "db"],
    ["pool", "create", "p1", "/dev/a", "/dev/b", "--force"],
    ["jobs"],
    ["jobs", "wait", "3"],
    ["restore", "db@1", "--mode", "swap-in", "--json", "--no-wait"],
    ["protect", "/dev/x", "v", "--rpo", "15m", "--generations", "3", "--pool", "p"],
]


def _tree(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _tree(child, (*path, name))


@pytest.mark.parametrize("argv", ARGVS, ids=" ".join)
def test_the_lazy_parser_parses_as_the_whole_tree(argv: list[str]) -> None:
    assert vars(build_parser(lazy=True).parse_args(argv)) == vars(build_parser().parse_args(argv))


def test_the_lazy_parser_helps_and_refuses_as_the_whole_tree() -> None:
    whole = dict(_tree(build_parser()))
    assert len(whole) > 20
    for path, parser in whole.items():
        shown = io.StringIO()
        with contextlib.redirect_stdout(shown), pytest.raises(SystemExit):
            build_parser(lazy=True).parse_args([*path, "--help"])
        assert shown.getvalue() == parser.format_help(), path
    for argv in (["plan"], ["jobs", "wait", "x"], ["pool", "nonsense"], ["status", "--nope"]):
        errors = []
        for parser in (build_parser(), build_parser(lazy=True)):
            said = io.StringIO()
            with contextlib.redirect_stderr(said), pytest.raises(SystemExit):
                parser.parse_args(argv)
            errors.append(said.getvalue())
        assert errors[0] == errors[1] and "usage: blockguardctl" in errors[0], argv


@pytest.mark.parametrize("columns", [None, "40", "200", "0", "-3", "x", ""])
def test_help_is_as_wide_as_argparse_makes_it(
    columns: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    assert terminal_columns() == shutil.get_terminal_size().columns


# --- the program's exit: frozen garbage, nothing lost ---------------------------------


def test_the_program_prints_and_exits_as_main_returns(tmp_path: Path) -> None:
    # main() run as the program (no argv) freezes what the imports made, so the exit does
    # not collect through it; what it wrote and its exit code must be what main() makes.
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "80"}
    bus = f"unix:path={tmp_path}/no-bus"
    for argv in (["--bus", bus, "status"], ["status", "--help"], ["--bus", bus, "plan", "db"]):
        program = subprocess.run(
            [sys.executable, "-c", ENTRY, *argv],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            stdin=subprocess.DEVNULL,
        )
        code = (
            "import contextlib, io, sys, gc\n"
            "from blockguard.cli.main import main\n"
            "out, err = io.StringIO(), io.StringIO()\n"
            "with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):\n"
            "    try:\n"
            f"        code = main({argv!r})\n"
            "    except SystemExit as exc:\n"
            "        code = exc.code\n"
            "assert gc.get_freeze_count() == 0, 'main(argv) froze a caller\\'s objects'\n"
            "sys.__stdout__.write(repr((code, out.getvalue(), err.getvalue())))\n"
        )
        in_process = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
        )
        assert in_process.returncode == 0, in_process.stderr
        expected = ast.literal_eval(in_process.stdout)
        assert (program.returncode, program.stdout, program.stderr) == expected, argv
        assert program.stdout or program.stderr, argv
