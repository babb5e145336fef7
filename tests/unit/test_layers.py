"""The layers hold on imports: each package imports only what its layer may touch.

core      pure decisions and the vocabulary: nothing of storage, engine, daemon, cli, D-Bus
storage   everything that touches a device: core, never engine, daemon, cli or D-Bus
engine    the application: core and storage, never daemon, cli or D-Bus
daemon    D-Bus adapters: the engine's service interface and jobs only, never storage or core
          decisions (the vocabulary excepted)
cli       a D-Bus client: errors, the vocabulary and itself

Every import statement counts, including the ones inside functions. The test reads the
source with ``ast``; it imports nothing of blockguard.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "blockguard"

# The vocabulary's formatters are a module of their own so that the CLI can print sizes
# and ages without importing the vocabulary's enums (issue 16); they are vocabulary too.
ALWAYS = ("blockguard.errors", "blockguard.core.vocab", "blockguard.core.formats")
# Which blockguard modules each layer may import (prefixes), and which outside packages it
# must not.
ALLOWED: dict[str, tuple[str, ...]] = {
    "core": ("blockguard.core",),
    "storage": ("blockguard.core", "blockguard.storage"),
    "engine": ("blockguard.core", "blockguard.storage", "blockguard.engine"),
    "daemon": ("blockguard.daemon", "blockguard.engine.service", "blockguard.engine.jobs"),
    "cli": ("blockguard.cli",),
}
FORBIDDEN_OUTSIDE: dict[str, tuple[str, ...]] = {
    "core": ("dbus_fast", "pyudev", "systemd"),
    "storage": ("dbus_fast",),
    "engine": ("dbus_fast",),
    "daemon": (),
    "cli": (),
}
# The daemon's entry point names the package (for __version__) and loads the engine's
# factory by a string; nothing else is excepted.
EXCEPTIONS: dict[str, set[str]] = {
    "daemon/bus.py": {"blockguard"},
}


def _imports(path: Path) -> list[tuple[int, str]]:
    package = ".".join(("blockguard", *path.relative_to(ROOT).parent.parts))
    return _imports_of(path.read_text(), package)


def _imports_of(text: str, package: str) -> list[tuple[int, str]]:
    tree = ast.parse(text)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # "from pkg import name": name may be a submodule, so judge pkg.name.
            found.extend(
                (node.lineno, f"{module}.{alias.name}".lstrip(".")) for alias in node.names
            )
    return sorted(found)


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _modules(layer: str) -> list[Path]:
    return sorted((ROOT / layer).rglob("*.py"))


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_what_it_may(layer: str) -> None:
    bad: list[str] = []
    for path in _modules(layer):
        rel = str(path.relative_to(ROOT))
        for line, module in _imports(path):
            if module in EXCEPTIONS.get(rel, set()):
                continue
            if module == "blockguard" or module.startswith("blockguard."):
                if not _within(module, ALLOWED[layer] + ALWAYS):
                    bad.append(f"{rel}:{line} imports {module}")
            elif _within(module, FORBIDDEN_OUTSIDE[layer]):
                bad.append(f"{rel}:{line} imports {module}")
    assert not bad, f"{layer} reaches outside its layer:\n" + "\n".join(bad)


def test_every_package_is_a_known_layer() -> None:
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == set(ALLOWED), "a new package needs its place in the layer rules"


def test_the_checker_resolves_relative_and_nested_imports() -> None:
    text = "from ...engine import jobs\ndef f():\n    import dbus_fast\nfrom . import vocab\n"
    found = [m for _, m in _imports_of(text, "blockguard.core.catalog")]
    assert found == ["blockguard.engine.jobs", "dbus_fast", "blockguard.core.catalog.vocab"]
    found = [
        m for _, m in _imports_of("from blockguard.engine import service", "blockguard.daemon")
    ]
    assert found == ["blockguard.engine.service"]
    assert not _within("blockguard.engine.jobs", ALLOWED["core"] + ALWAYS)


# --- device command lines -------------------------------------------------------------

#: The programs of device-mapper, LVM and the thin/era metadata tools.
DEVICE_PROGRAMS = frozenset(
    {
        "dmsetup",
        *(f"lv{c}" for c in ("s", "create", "remove", "change", "extend", "reduce", "resize")),
        *(f"lv{c}" for c in ("rename", "convert", "display", "scan")),
        *(f"vg{c}" for c in ("s", "create", "extend", "reduce", "remove", "change", "scan")),
        *(f"vg{c}" for c in ("display", "rename", "import", "export", "cfgrestore")),
        *(f"pv{c}" for c in ("s", "create", "remove", "scan", "move", "display", "resize")),
        *(f"thin_{c}" for c in ("delta", "check", "dump", "ls", "repair", "restore", "rmap")),
        "thin_metadata_size",
        *(f"era_{c}" for c in ("invalidate", "check", "dump", "restore")),
        *(f"cache_{c}" for c in ("check", "dump", "repair", "restore")),
    }
)
#: The only modules that build their command lines (lvm.py, dm.py: one builder each).
COMMAND_MODULES = frozenset({"storage/dm.py", "storage/lvm.py"})


def _command_literals(text: str) -> list[tuple[int, str]]:
    """Where ``text`` names a device program: any string constant that is one, and
    ``"lvm"`` heading a list or tuple whose next item is not a plain string (an argv
    ``["lvm", command, ...]``; elsewhere "lvm" names the pool backend)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Constant) and node.value in DEVICE_PROGRAMS:
            found.append((node.lineno, node.value))
        elif isinstance(node, ast.List | ast.Tuple) and len(node.elts) > 1:
            first, second = node.elts[:2]
            argv = not (isinstance(second, ast.Constant) and isinstance(second.value, str))
            if isinstance(first, ast.Constant) and first.value == "lvm" and argv:
                found.append((first.lineno, "lvm"))
    return sorted(found)


def test_device_command_lines_are_built_only_in_the_command_modules() -> None:
    bad = [
        f"{rel}:{line} names {program!r}"
        for path in sorted(ROOT.rglob("*.py"))
        if (rel := str(path.relative_to(ROOT))) not in COMMAND_MODULES
        for line, program in _command_literals(path.read_text())
    ]
    assert not bad, "device commands built outside storage/dm.py, storage/lvm.py:\n" + "\n".join(
        bad
    )


def test_the_command_checker_finds_argv_and_subcommands() -> None:
    text = (
        'run(["dmsetup", "targets"])\nlvm.lvm("lvcreate", "-n", x)\n'
        'x = ("lvm", "vgs")\nkind = "lvm"\nif k == "lvm": pass\n"""lvs are listed"""\n'
        'run(["lvm", cmd, *args])\nBACKENDS = ("lvm", "dir")\n'
    )
    assert _command_literals(text) == [
        (1, "dmsetup"),
        (2, "lvcreate"),
        (3, "vgs"),
        (7, "lvm"),
    ]
