"""The ``animus`` command line.

Each command group lives in its own module and adds its sub-commands with ``add_commands``.
Handlers are ``async def handler(args) -> int``. Errors derived from
:class:`animus_core.values.errors.AnimusError` become one line on stderr and their ``exit_code``;
a traceback only with ``--debug``.
"""

from __future__ import annotations

import argparse
import enum
import sys
import traceback
from collections.abc import Sequence

from animus_core.infra import loop
from animus_core.values.errors import AnimusError
from animus_core.values.version import __version__

__all__ = ["ExitCode", "build_parser", "main"]


class ExitCode(enum.IntEnum):
    OK = 0
    ERROR = 1
    USAGE = 2
    INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    from animus_core.cli import (
        audit_cmd,
        db_cmd,
        engine_cmd,
        faculty_cmd,
        governance_cmd,
        mcp_cmd,
        memory_cmd,
        ops_cmd,
        pipeline_cmd,
        queue_cmd,
        step_cmd,
        web_cmd,
        work_cmd,
    )
    from animus_core.faculties.plugins import make_plugin_manager

    parser = _Parser(
        prog="animus", description="A substrate for long-running AI agents, on Postgres."
    )
    parser.add_argument("--version", action="version", version=f"animus {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (
        engine_cmd, work_cmd, governance_cmd, pipeline_cmd, faculty_cmd, memory_cmd,
        queue_cmd, db_cmd, audit_cmd, ops_cmd, step_cmd, web_cmd, mcp_cmd,
    ):
        module.add_commands(sub)
    try:
        pm, _ = make_plugin_manager()
        pm.hook.register_commands(cli=sub)
    except AnimusError:
        pass  # a broken environment still gets the built-in commands and their errors
    return parser


class _Parser(argparse.ArgumentParser):
    """Its sub-commands' parsers are of this class too: an argument a command does not take
    is refused with that command's usage (``animus work submit: error: ...``), not the
    top level's."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None,
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extra = super().parse_known_args(args, namespace)
        if extra:
            self.error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed, extra


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(argv))


def run(argv: Sequence[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    if given[:1] == ["step"]:  # runs inside hooks, often: no plugins to load
        from animus_core.cli.step_cmd import run_fast

        return run_fast(given[1:])
    parser = build_parser()
    passthrough = None
    for i in range(len(given) - 1):  # animus [--debug] db psql ARGS...: ARGS go to psql as given
        if given[i:i + 2] == ["db", "psql"] and all(a.startswith("-") for a in given[:i]):
            passthrough = given[i + 2:]
            passthrough = passthrough[1:] if passthrough[:1] == ["--"] else passthrough
            given = given[:i + 2]
            break
    args = parser.parse_args(given)
    if passthrough is not None:
        args.psql_args = passthrough
    try:
        return int(loop.run(args.handler(args)))
    except AnimusError as e:
        if args.debug:
            traceback.print_exc()
        print(f"animus: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    except BrokenPipeError:  # `animus work list | head`
        sys.stderr.close()
        return ExitCode.OK
