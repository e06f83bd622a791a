"""The ``animus`` command line.

Each command group lives in its own module and adds its sub-commands with ``add_commands``.
Handlers are ``async def handler(args) -> int``. Errors derived from
:class:`animus_core.values.errors.AnimusError` become one line on stderr and their ``exit_code``;
a traceback only with ``--debug``.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import getpass
import sys
import traceback
from collections.abc import Sequence

from animus_core.governance.rules import RuleSet
from animus_core.governance.work import GovernedWork
from animus_core.infra.config import Settings
from animus_core.store.db import Db, describe_url
from animus_core.values.errors import AnimusError, MigrationError
from animus_core.values.version import __version__

__all__ = ["ExitCode", "build_parser", "governed", "main", "open_db"]


class ExitCode(enum.IntEnum):
    OK = 0
    ERROR = 1
    USAGE = 2
    INTERRUPTED = 130


async def open_db(max_size: int = 2) -> Db:
    """Connect for a CLI command. The embedded database is migrated on first use; another
    server must be migrated on purpose (``animus db migrate``)."""
    settings = Settings.from_env()
    db = await Db.connect(settings=settings, max_size=max_size, actor=f"cli:{getpass.getuser()}")
    try:
        status = await db.migration_status()
        if status.pending:
            if settings.database_url:
                raise MigrationError(
                    f"the database at {describe_url(db.url)} has pending animus migrations "
                    f"({', '.join(f'{v:04d}' for v in status.pending)}): run `animus db migrate`"
                )
            await db.migrate()
    except BaseException:
        await db.close()
        raise
    return db


def governed(db: Db) -> GovernedWork:
    """Submissions from the command line, with the rules of ``ANIMUS_RULES`` applied."""
    return GovernedWork(db, RuleSet.load(Settings.from_env().rules_dir))


def build_parser() -> argparse.ArgumentParser:
    from animus_core.cli import (
        audit_cmd,
        db_cmd,
        engine_cmd,
        faculty_cmd,
        governance_cmd,
        memory_cmd,
        ops_cmd,
        pipeline_cmd,
        work_cmd,
    )
    from animus_core.faculties.plugins import make_plugin_manager

    parser = argparse.ArgumentParser(
        prog="animus", description="A substrate for long-running AI agents, on Postgres."
    )
    parser.add_argument("--version", action="version", version=f"animus {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (
        engine_cmd, work_cmd, governance_cmd, pipeline_cmd, faculty_cmd, memory_cmd,
        db_cmd, audit_cmd, ops_cmd,
    ):
        module.add_commands(sub)
    try:
        pm, _ = make_plugin_manager()
        pm.hook.register_commands(cli=sub)
    except AnimusError:
        pass  # a broken environment still gets the built-in commands and their errors
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(argv))


def run(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(asyncio.run(args.handler(args)))
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
