"""The shared vocabulary: stored spellings never change, one name rule, one device number format."""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

import pytest

from blockguard.core import vocab
from blockguard.core.vocab import GenerationKind, RestoreMode, RestoreTarget
from blockguard.errors import InvalidInput

VOCAB = Path(vocab.__file__)


def test_stored_spellings_stay() -> None:
    # Manifests, the catalog, D-Bus and the CLI hold these strings: they must read forever.
    assert vocab.GENERATION_KINDS == ("full", "differential", "incremental")
    assert [k.cost_rank for k in GenerationKind] == [0, 1, 2]
    assert GenerationKind.INCREMENTAL.cost_rank < GenerationKind.FULL.cost_rank
    assert set(vocab.RESTORE_MODES) == {"swap-in", "copy"}
    assert set(vocab.POOL_BACKENDS) == {"dir", "lvm"}
    assert set(vocab.TRACKING_BACKENDS) == {"scan", "era", "thin"}
    assert GenerationKind("full") is GenerationKind.FULL and GenerationKind.FULL == "full"


def test_restore_targets_map_to_model_modes() -> None:
    assert RestoreTarget.SWAP_IN.mode is RestoreMode.SWAP_IN
    assert RestoreTarget.IN_PLACE.mode is RestoreMode.COPY
    assert RestoreTarget.NEW_DEVICE.mode is RestoreMode.COPY


@pytest.mark.parametrize("name", ["db", "A", "pg-main_2.data+x", "0db", "x" * 64])
def test_names_follow_the_one_rule(name: str) -> None:
    assert vocab.check_name("volume", name) == name


@pytest.mark.parametrize(
    "name", ["", ".", "..", ".x", "-x", "_x", "a/b", "a b", "a@b", "a:b", "é", "x" * 65, None, 3]
)
def test_other_names_are_refused_with_what_they_name(name: object) -> None:
    with pytest.raises(InvalidInput, match="pool name"):
        vocab.check_name("pool", name)


def test_choice_lists_the_allowed() -> None:
    assert vocab.check_choice("pool backend", "dir", vocab.POOL_BACKENDS) == "dir"
    with pytest.raises(InvalidInput, match="pool backend 'zfs' is not one of dir, lvm"):
        vocab.check_choice("pool backend", "zfs", vocab.POOL_BACKENDS)


def test_devno() -> None:
    assert vocab.devno(os.makedev(253, 7)) == "253:7"
    assert vocab.devno(os.makedev(259, 1 << 12)) == "259:4096"


def test_vocab_imports_only_the_standard_library_the_error_tree_and_its_formatters() -> None:
    tree = ast.parse(VOCAB.read_text())
    modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    outside = {
        m for m in modules if m.split(".")[0] not in sys.stdlib_module_names and m != "__future__"
    }
    assert outside == {"blockguard.errors", "blockguard.core.formats"}
    formats = ast.parse((VOCAB.parent / "formats.py").read_text())
    assert {a.name for n in ast.walk(formats) if isinstance(n, ast.Import) for a in n.names} == {
        "time"
    }
    assert {n.module for n in ast.walk(formats) if isinstance(n, ast.ImportFrom)} == {
        "__future__",
        "datetime",  # for a type annotation only
    }
    errors = ast.parse((VOCAB.parents[1] / "errors.py").read_text())
    assert not {
        n.module
        for n in ast.walk(errors)
        if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("blockguard")
    }
