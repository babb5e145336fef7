"""The argument tree of ``blockguardctl`` and the argparse parsers made from it.

The tree is data (:data:`TREE`), turned into argparse parsers by :func:`build_parser`; each
leaf names a small function of :mod:`blockguard.cli.actions` (an
:class:`~blockguard.cli.main.Action`). ``scripts/install`` makes the man page and the shell
completion from :func:`build_parser` (through :mod:`blockguard.cli.main`).

A call of a common command is parsed without argparse (:mod:`blockguard.cli.main`); this
module is imported for every other command line, for ``--help``, ``--version`` and usage
errors, and then a call adds the arguments of its own command only
(``build_parser(lazy=True)``). ``tests/unit/test_cli_imports.py`` guards both.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from typing import Any

from blockguard.cli.main import Action
from blockguard.core.vocab import DEFAULT_GENERATIONS, MAX_GENERATIONS, RESTORE_MODES


# Arg, Cmd (and output.Column) are not dataclasses: importing dataclasses (inspect, ast,
# dis) was a tenth of a call's start-up once dbus-fast's own imports were gone (issue 16).
class Arg:
    """One argparse argument: ``Arg("--force", action="store_true", help=...)``."""

    __slots__ = ("flags", "options")

    def __init__(self, *flags: str, **options: Any) -> None:
        self.flags = flags
        self.options = options


class Cmd:
    """A (sub)command: either ``run`` (a leaf) or ``sub`` (a group of commands)."""

    # Not a NamedTuple: typing compiles each of its (string) annotations at import,
    # most of this module's own import time (issue 16).
    __slots__ = ("args", "help", "name", "run", "sub")

    def __init__(
        self,
        name: str,
        help: str,
        run: Action | None = None,
        args: tuple[Arg, ...] = (),
        sub: tuple[Cmd, ...] = (),
    ) -> None:
        self.name = name
        self.help = help
        self.run = run
        self.args = args
        self.sub = sub


#: The largest value of a D-Bus ``t`` (u64).
U64_MAX = (1 << 64) - 1


def _version() -> str:
    """The installed distribution's version (pyproject takes it from blockguard.__version__)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("blockguard")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


class _VersionAction(argparse._VersionAction):
    """``--version``: the version is looked up when it is printed (or read), not each time
    the parser is built."""

    @property  # type: ignore[override]
    def version(self) -> str:
        return f"%(prog)s {_version()}"

    @version.setter
    def version(self, value: str | None) -> None:
        pass  # always the installed distribution's


def bounded_int(what: str, low: int, high: int, clearable: bool = False) -> Callable[[str], Any]:
    """An argparse type: a whole number in ``low..high``, checked before any call.

    argparse turns the ``ArgumentTypeError`` into a usage error (exit 2) that names the
    option and the value, so no number reaches the bus that it cannot carry.

    :param clearable: an empty string passes through (it clears an objective).
    """

    def parse(text: str) -> int | str:
        if clearable and text == "":
            return ""
        stripped = text.strip()
        # isdigit() alone lets "²" or "١" through, which int() may refuse or misread.
        if not (stripped.isascii() and stripped.isdigit()) or len(stripped) > 20:
            raise argparse.ArgumentTypeError(f"{what} {text!r} is not a whole number")
        value = int(stripped)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{what} {text!r} is outside {low}..{high}")
        return value

    parse.__name__ = what  # argparse names the type in "invalid <name> value"
    return parse


def objective_text(what: str) -> Callable[[str], str]:
    """An argparse type for text objectives: printable, at most 200 characters."""

    def parse(text: str) -> str:
        if len(text) > 200 or not text.isprintable():
            raise argparse.ArgumentTypeError(
                f"{what} {text[:40]!r} must be printable text of at most 200 characters"
            )
        return text

    parse.__name__ = what
    return parse


FORCE = Arg("--force", action="store_true", help="do it even if it destroys something")
DELETE_GENERATIONS = Arg(
    "--delete-generations",
    action="store_true",
    help="also delete its generations from the pool (default: keep them)",
)
NO_WAIT = Arg("--no-wait", action="store_true", help="print the job and return at once")
#: Objectives: only the options given are set; an empty value ("") clears that objective.
OBJECTIVE_ARGS = (
    Arg(
        "--rpo",
        type=objective_text("rpo"),
        help='recovery point objective: 15m, every 4h, daily 02:30, changed 10GiB ("" clears)',
    ),
    Arg("--rto", type=objective_text("rto"), help='recovery time objective, e.g. 5m ("" clears)'),
    Arg(
        "--restore-mode",
        choices=[*RESTORE_MODES, ""],
        help="what the RTO refers to, and so what `restore` does without --mode "
        '(default copy; "" clears)',
    ),
    Arg(
        "--generations",
        "--keep-last",
        type=bounded_int("generations", 1, MAX_GENERATIONS, clearable=True),
        metavar="N",
        help=f"keep the newest N generations (1..{MAX_GENERATIONS}; default {DEFAULT_GENERATIONS})",
    ),
    *(
        Arg(
            f"--keep-{tier}",
            type=bounded_int(f"keep-{tier}", 0, MAX_GENERATIONS, clearable=True),
            metavar="N",
            help=f"also keep the newest generation of each of the last N {unit} that have "
            'one (0 or "" clears; buckets in --tz, default local time)',
        )
        for tier, unit in (
            ("hourly", "hours"),
            ("daily", "days"),
            ("weekly", "ISO weeks"),
            ("monthly", "months"),
        )
    ),
    Arg(
        "--tz",
        type=objective_text("tz"),
        help="time zone of a daily RPO and of the --keep-* buckets (default: local time)",
    ),
    Arg(
        "--drill",
        type=objective_text("drill"),
        help="restore drill of the newest generation: weekly (the default with an RTO), "
        'daily, off or an interval such as 3d ("" clears)',
    ),
)

#: The copy of a volume on a backup target (``objectives`` only: ``protect`` has no target).
REMOTE_OBJECTIVE_ARGS = (
    Arg(
        "--target",
        "--remote-target",
        dest="remote_target",
        type=objective_text("target"),
        metavar="ID",
        help='copy the generations to this registered backup target ("" clears)',
    ),
    Arg(
        "--remote-rpo",
        type=objective_text("remote rpo"),
        help='how old the newest copy on the target may be: 1h, daily 02:00 ("" clears)',
    ),
    Arg(
        "--remote-rto",
        type=objective_text("remote rto"),
        help='how long a restore from the target may take, e.g. 2h ("" clears)',
    ),
    Arg(
        "--remote-generations",
        type=bounded_int("remote generations", 1, MAX_GENERATIONS, clearable=True),
        metavar="N",
        help=f"keep the newest N generations on the target (default {DEFAULT_GENERATIONS})",
    ),
)

TREE = Cmd(
    "blockguardctl",
    "Control blockguardd, the block-layer backup daemon.",
    sub=(
        Cmd(
            "pool",
            "backup pools",
            sub=(
                Cmd(
                    "create",
                    "create a pool on the given disks",
                    Action("actions.pool_create"),
                    (
                        Arg("name"),
                        Arg("devices", nargs="+", metavar="DEVICE"),
                        Arg("--backend", default="", help="pool backend (default: automatic)"),
                        FORCE,
                    ),
                ),
                Cmd(
                    "extend",
                    "add disks to a pool",
                    Action("actions.pool_extend"),
                    (Arg("name"), Arg("devices", nargs="+", metavar="DEVICE"), FORCE),
                ),
                Cmd(
                    "remove",
                    "remove a pool (refused while it holds generations)",
                    Action("actions.pool_remove"),
                    (Arg("name"), FORCE, DELETE_GENERATIONS),
                ),
                Cmd(
                    "import",
                    "rebuild the catalog of a pool from its disks (lost catalog, new host)",
                    Action("actions.pool_import"),
                    (Arg("devices", nargs="+", metavar="DEVICE"),),
                ),
                Cmd("list", "list pools", Action("actions.pool_list")),
                Cmd(
                    "drill",
                    "calibrate the restore-time model with a restore drill on the pool",
                    Action("actions.pool_drill"),
                    (Arg("name"), NO_WAIT),
                ),
            ),
        ),
        Cmd(
            "target",
            "backup targets: other hosts reached over ssh, or S3-compatible object stores",
            sub=(
                Cmd(
                    "add",
                    "register a backup target (its host key confirmed, the link measured; an "
                    "object store's PUT/GET measured)",
                    Action("targets.target_add"),
                    (
                        Arg("id", help="the name this host gives the target"),
                        Arg("url", help="ssh://user@host[:port] or s3://BUCKET/PREFIX"),
                        Arg(
                            "--pool",
                            default="",
                            help="the pool on the target to store into (ssh targets: required)",
                        ),
                        Arg(
                            "--endpoint",
                            default="",
                            metavar="URL",
                            help="the object store's http(s) URL (s3:// targets: required)",
                        ),
                        Arg(
                            "--credentials",
                            default="",
                            metavar="FILE",
                            help="a root-only (0600) AWS credentials file for the object store "
                            "(default: the daemon's AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
                            "its AWS profile); its path is recorded, never its secret",
                        ),
                        Arg(
                            "--host-key",
                            default="",
                            metavar="SHA256:...",
                            help="the target's host key fingerprint, confirmed on the target "
                            "(without it, the offered ones are shown and nothing is recorded)",
                        ),
                        Arg(
                            "--key",
                            default="",
                            metavar="FILE",
                            help="import this host's master key from FILE (key export's "
                            "text; a new host restoring from the target)",
                        ),
                        Arg(
                            "--client",
                            default="",
                            help="this host's client id on the target (default: host name)",
                        ),
                        NO_WAIT,
                    ),
                ),
                Cmd("list", "list backup targets and their links", Action("targets.target_list")),
                Cmd("show", "show one backup target", Action("targets.target_show"), (Arg("id"),)),
                Cmd(
                    "import",
                    "list and record the generations a target holds of this host (a new "
                    "host: after target add --key)",
                    Action("targets.target_import"),
                    (Arg("id"),),
                ),
                Cmd(
                    "gc",
                    "sweep an object-store target's bucket now (garbage collection: packs "
                    "no generation of any host references, after the grace period)",
                    Action("targets.target_gc"),
                    (Arg("id"), NO_WAIT),
                ),
                Cmd(
                    "remove",
                    "forget a backup target, its link figures and its pinned host key",
                    Action("targets.target_remove"),
                    (Arg("id"),),
                ),
                Cmd(
                    "client-key",
                    "print the line a target's authorized_keys needs for this host",
                    Action("targets.client_key"),
                    (Arg("--client", default="", help="client id (default: host name)"),),
                ),
            ),
        ),
        Cmd(
            "key",
            "the master key that encrypts backups on targets",
            sub=(
                Cmd(
                    "export",
                    "print the master key as text to keep off this host (root only)",
                    Action("targets.key_export"),
                    (
                        Arg(
                            "--output",
                            default="",
                            metavar="FILE",
                            help="write it to FILE (made 0600; never overwritten)",
                        ),
                    ),
                ),
            ),
        ),
        Cmd(
            "volume",
            "protected volumes",
            sub=(
                Cmd("list", "list protected volumes", Action("actions.volume_list")),
                Cmd("show", "show one volume", Action("actions.volume_show"), (Arg("name"),)),
                Cmd(
                    "drill",
                    "restore the newest generation to scratch space, verify and time it now",
                    Action("actions.volume_drill"),
                    (Arg("name"), NO_WAIT),
                ),
            ),
        ),
        Cmd(
            "protect",
            "start protecting a block device",
            Action("actions.protect"),
            (
                Arg("device"),
                Arg("name", help="name of the volume"),
                Arg(
                    "--chunk-size",
                    type=bounded_int("chunk size", 0, U64_MAX),
                    default=0,
                    help="tracking chunk in bytes (default: automatic)",
                ),
                Arg("--backend", default="", help="tracking backend (default: automatic)"),
                Arg(
                    "--pool",
                    default="",
                    help="pool to back up into (default: the one with the most room)",
                ),
                *OBJECTIVE_ARGS,
            ),
        ),
        Cmd(
            "unprotect",
            "stop protecting a volume (its generations are kept: it becomes detached)",
            Action("actions.unprotect"),
            (Arg("name"), DELETE_GENERATIONS),
        ),
        Cmd(
            "objectives",
            "set the recovery objectives of a volume or group",
            Action("actions.objectives"),
            (Arg("target", metavar="VOLUME_OR_GROUP"), *OBJECTIVE_ARGS, *REMOTE_OBJECTIVE_ARGS),
        ),
        Cmd(
            "backup",
            "back a volume up now",
            Action("actions.backup"),
            (
                Arg("volume"),
                Arg(
                    "--full",
                    action="store_true",
                    help="take a full backup whatever the planner would choose",
                ),
                NO_WAIT,
            ),
        ),
        Cmd(
            "transfer",
            "send the newest generation of a volume to its backup target now",
            Action("actions.transfer"),
            (Arg("volume"), NO_WAIT),
        ),
        Cmd(
            "restore",
            "restore a generation",
            Action("actions.restore"),
            (
                Arg(
                    "volume",
                    nargs="?",
                    default="",
                    metavar="VOLUME[@GENERATION]",
                    help="the volume, or one of its generations: db@7, db@latest~1, db@<id prefix>",
                ),
                Arg(
                    "--release",
                    metavar="SWAP_IN",
                    default="",
                    help="detach and delete a swap-in (its device or name) once service left it",
                ),
                Arg(
                    "--swap-ins",
                    action="store_true",
                    help="list the swap-ins restores left (attached or not)",
                ),
                Arg(
                    "--generation",
                    default="",
                    help="7, latest, latest~2 or a unique prefix of the id (default: the newest)",
                ),
                Arg(
                    "--mode",
                    default="",
                    choices=RESTORE_MODES,
                    help="copy (onto the device) or swap-in (the backup becomes a device); "
                    "default: the mode the volume's RTO refers to (its objectives' "
                    "restore_mode; copy when they do not say)",
                ),
                Arg("--target", default="", help="device to restore onto (default: the original)"),
                Arg(
                    "--from",
                    dest="from_target",
                    default="",
                    metavar="TARGET_ID",
                    help="restore from this backup target (a copy onto --target DEV)",
                ),
                FORCE,
                NO_WAIT,
            ),
        ),
        Cmd(
            "generations",
            "list the generations of a volume",
            Action("actions.generations"),
            (Arg("volume"),),
        ),
        Cmd(
            "verify",
            "verify a generation",
            Action("actions.verify"),
            (Arg("generation", help="db@7, db@latest, db@latest~2 or db@<id prefix>"), NO_WAIT),
        ),
        Cmd(
            "mount",
            "mount a generation's file system read-only to browse it",
            Action("browse.mount"),
            (
                Arg("generation", help="db@7, db@latest, db@latest~2 or db@<id prefix>"),
                Arg("mountpoint", help="an empty directory"),
            ),
        ),
        Cmd(
            "umount",
            "unmount a generation mounted by mount (its loop and FUSE devices too)",
            Action("browse.umount"),
            (Arg("mountpoint"),),
        ),
        Cmd("mounts", "list the generations mounted by mount", Action("browse.mounts"), ()),
        Cmd(
            "restore-files",
            "restore files of a file group from a generation into a directory",
            Action("filegroups.restore_files"),
            (
                Arg("group", help="GROUP (its newest generation) or GROUP@GEN (as for a volume)"),
                Arg(
                    "paths",
                    nargs="*",
                    metavar="PATH",
                    help="paths of the group (and what is below them); none: all",
                ),
                Arg("--to", required=True, metavar="DIR", help="the directory to restore into"),
                Arg(
                    "--overwrite",
                    action="store_true",
                    help="replace files that exist there (refused otherwise, nothing written)",
                ),
                NO_WAIT,
            ),
        ),
        Cmd(
            "filegroup",
            "file groups: paths on a protected volume's file system, restored by file",
            sub=(
                Cmd(
                    "create",
                    "record a file group (the volume's file system must be mounted)",
                    Action("filegroups.filegroup_create"),
                    (
                        Arg("name"),
                        Arg("--volume", required=True, help="the protected volume"),
                        Arg(
                            "paths",
                            nargs="+",
                            metavar="PATH",
                            help="files or directories, relative to the volume's mount point",
                        ),
                    ),
                ),
                Cmd("list", "list file groups", Action("filegroups.filegroup_list")),
                Cmd(
                    "show",
                    "show one file group",
                    Action("filegroups.filegroup_show"),
                    (Arg("name"),),
                ),
                Cmd(
                    "remove",
                    "forget a file group (the volume's generations are kept)",
                    Action("filegroups.filegroup_remove"),
                    (Arg("name"),),
                ),
            ),
        ),
        Cmd(
            "status",
            "health of every volume and pool: last backup, RPO and RTO, pool space",
            Action("health.status"),
            (
                Arg(
                    "--check",
                    action="store_true",
                    help="for monitoring: exit 0 ok, 1 warning, 2 critical (an objective "
                    "missed), 3 unknown (daemon unreachable)",
                ),
            ),
        ),
        Cmd(
            "plan",
            "explain what the next backup would be and why",
            Action("actions.plan"),
            (Arg("volume"),),
        ),
        Cmd(
            "jobs",
            "list recent jobs (or follow one)",
            Action("actions.jobs"),
            sub=(
                Cmd("list", "list recent jobs", Action("actions.jobs")),
                Cmd(
                    "wait",
                    "follow a job until it ends (its exit code is the job's)",
                    Action("actions.jobs_wait"),
                    (Arg("id", type=bounded_int("job id", 1, U64_MAX)),),
                ),
                Cmd(
                    "cancel",
                    "stop a job (a backup commits nothing; a restore leaves a partial target)",
                    Action("actions.jobs_cancel"),
                    (Arg("id", type=bounded_int("job id", 1, U64_MAX)), NO_WAIT),
                ),
            ),
        ),
    ),
)


JSON_HELP = "print one JSON document (docs/cli-json.md) instead of tables"


class _Subcommands(argparse._SubParsersAction):  # type: ignore[type-arg]
    """Subcommands whose parsers are made only when argparse picks one: a call needs its
    own command's parser and options, not the whole tree's (issue 16; making the fifteen
    parsers of the top level was a tenth of a ``status`` call's own time)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: name -> what makes that command's parser (with its arguments and subcommands)
        self.unmade: dict[str, Callable[[], argparse.ArgumentParser]] = {}

    def defer(self, name: str, help: str, make: Callable[[], argparse.ArgumentParser]) -> None:
        """Offer command ``name`` (in usage, help and "invalid choice" as ``add_parser``
        would) and make its parser with ``make`` when it is parsed."""
        # What add_parser records besides the parser: the choice (a placeholder until
        # made) and the line of the help listing.
        self._name_parser_map[name] = None  # type: ignore[assignment]
        self._choices_actions.append(self._ChoicesPseudoAction(name, (), help))
        self.unmade[name] = make

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
        make = self.unmade.pop(values[0], None)
        if make is not None:
            self._name_parser_map[values[0]] = make()
        super().__call__(parser, namespace, values, option_string)


def terminal_columns() -> int:
    """``shutil.get_terminal_size().columns``, without importing shutil (and zlib, bz2 and
    lzma with it): COLUMNS if it is a positive number, else the width of the terminal on
    stdout, else 80."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns > 0:
        return columns
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):
        return 80


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, which is made for every argument added (to check its
    metavar); its width as argparse's own, found without importing shutil."""

    def __init__(self, prog: str, *args: Any, width: int | None = None, **kwargs: Any) -> None:
        super().__init__(
            prog, *args, width=terminal_columns() - 2 if width is None else width, **kwargs
        )


def _add(parser: argparse.ArgumentParser, cmd: Cmd, top: bool = False, lazy: bool = False) -> None:
    if not top:
        # --json is accepted anywhere on the line; SUPPRESS keeps a subcommand from
        # resetting what an earlier --json set.
        parser.add_argument(
            "--json", action="store_true", default=argparse.SUPPRESS, help=JSON_HELP
        )
    for arg in cmd.args:
        parser.add_argument(*arg.flags, **arg.options)
    if cmd.run is not None:
        parser.set_defaults(func=cmd.run)
    if cmd.sub:
        # A command that runs by itself (``jobs``) has optional subcommands.
        # prog as argparse would make it (no command has positionals before its
        # subcommands), given: formatting usages imports shutil and costs time.
        subparsers = parser.add_subparsers(
            title="commands",
            metavar="COMMAND",
            required=cmd.run is None,
            action=_Subcommands,
            prog=parser.prog,
        )
        for child in cmd.sub:
            options = {
                "formatter_class": _HelpFormatter,
                "description": child.help,
                "prog": f"{parser.prog} {child.name}",
            }
            if lazy:
                make = functools.partial(_make, subparsers._parser_class, options, child)
                subparsers.defer(child.name, child.help, make)
            else:
                _add(subparsers.add_parser(child.name, help=child.help, **options), child)


def _make(
    parser_class: type[argparse.ArgumentParser], options: dict[str, Any], cmd: Cmd
) -> argparse.ArgumentParser:
    """The parser of ``cmd`` as ``add_parser`` makes it, with its arguments (lazily)."""
    parser = parser_class(**options)
    _add(parser, cmd, lazy=True)
    return parser


def build_parser(lazy: bool = False) -> argparse.ArgumentParser:
    """The parser of the whole tree (``scripts/install`` makes man pages and completion
    from it); ``lazy``: a subcommand's arguments are added when it is the one parsed."""
    parser = argparse.ArgumentParser(
        prog=TREE.name, description=TREE.help, formatter_class=_HelpFormatter
    )
    parser.add_argument("--version", action=_VersionAction)
    parser.add_argument("--json", action="store_true", help=JSON_HELP)
    parser.add_argument(
        "--bus",
        default=os.environ.get("BLOCKGUARD_BUS", "system"),
        help="'system' (default; honours DBUS_SYSTEM_BUS_ADDRESS), 'session' or an address",
    )
    parser.add_argument(
        "--propagate", action="store_true", help="re-raise errors with a traceback (debugging)"
    )
    _add(parser, TREE, top=True, lazy=lazy)
    return parser
