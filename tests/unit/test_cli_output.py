"""What blockguardctl prints: values never as reprs, tables plain when piped, ids whole at
80 columns, one versioned JSON document."""

from __future__ import annotations

import io
import json

from blockguard.cli.output import Column, Output, snake, text

LONG = "db@20261201T184511.860410Z-0cf76af3"
COLUMNS = (
    Column("#", keep=True),
    Column("id", keep=True),
    Column("method"),
    Column("based on", drop=1),
    Column("created", drop=2),
    Column("size"),
    Column("state"),
)
ROWS = [[1, LONG, "full", None, "3 minutes ago", "32.0 MiB", "ok"]]


def test_values_read_as_text_never_as_reprs() -> None:
    assert text(None) == "-" and text("") == "-"
    assert text(True) == "yes" and text(False) == "no"
    assert text(["db@1", "db@2"]) == "db@1, db@2"
    assert text({"rpo": "15m", "rto": "5m"}) == "rpo 15m, rto 5m"
    assert text({"a": [1, 2]}) == "a 1, 2"
    assert text(0.123456) == "0.123"
    for value in (["x"], {"k": None}, ("a", "b")):
        assert not any(c in text(value) for c in "[]{}()'")


def test_piped_tables_are_plain_columns() -> None:
    buf = io.StringIO()
    Output(False, buf, io.StringIO()).table("Generations of db", COLUMNS, ROWS)
    lines = buf.getvalue().splitlines()
    assert lines[0].split() == ["#", "id", "method", "based", "on", "created", "size", "state"]
    assert lines[1].split()[:3] == ["1", LONG, "full"]
    assert not set("┃━│─┏") & set(buf.getvalue())


def test_a_narrow_terminal_drops_columns_but_never_cuts_an_id() -> None:
    buf, err = io.StringIO(), io.StringIO()
    Output(False, buf, err, terminal=True, width=70).table("Generations", COLUMNS, ROWS)
    assert LONG in buf.getvalue()
    assert "based on" not in buf.getvalue()
    assert "based on" in err.getvalue() and "--json" in err.getvalue()
    wide = io.StringIO()
    Output(False, wide, io.StringIO(), terminal=True, width=200).table("G", COLUMNS, ROWS)
    assert "based on" in wide.getvalue() and LONG in wide.getvalue()


def test_ids_wider_than_the_terminal_fall_back_to_plain_lines() -> None:
    buf = io.StringIO()
    Output(False, buf, io.StringIO(), terminal=True, width=30).table("G", COLUMNS, ROWS)
    assert LONG in buf.getvalue()


def test_json_is_one_versioned_document() -> None:
    buf = io.StringIO()
    Output(True, buf).json({"generations": []})
    assert json.loads(buf.getvalue()) == {"schema": 1, "generations": []}
    assert snake("BytesDone") == "bytes_done" and snake("Id") == "id"
