"""``animus db``: the database animus uses (embedded by default, or DATABASE_URL)."""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys

from animus_core.cli.output import print_json, print_table
from animus_core.infra.config import Settings
from animus_core.infra.embedded import pg_bin_dir
from animus_core.store.connect import connection_parts
from animus_core.store.db import Db, resolve_url


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    db = sub.add_parser("db", help="the database: url, migrate, status, psql")
    cmds = db.add_subparsers(dest="db_command", metavar="COMMAND", required=True)

    p = cmds.add_parser("url", help="print the connection string (for psql and other tools)")
    p.add_argument("--format", choices=["url", "pgmq", "json"], default="url",
                   help="url (default); pgmq: the PG_* environment variables of the pgmq "
                        "client; json: the parts one by one")
    p.set_defaults(handler=url)
    p = cmds.add_parser("migrate", help="apply pending migrations")
    p.set_defaults(handler=migrate)
    p = cmds.add_parser("status", help="applied and pending migrations, installed extensions")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=status)
    p = cmds.add_parser("psql", help="open psql on the animus database (the bundled psql)")
    p.add_argument("psql_args", nargs=argparse.REMAINDER, help="extra psql arguments")
    p.set_defaults(handler=psql)


async def url(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    target = await resolve_url(settings)
    if args.format == "url":
        print(target)
    else:
        parts = connection_parts(target)
        if args.format == "json":
            print_json(parts)
        else:  # the pgmq client reads these; the queues exist: it must not create pgmq
            env = {"PG_HOST": parts["host"], "PG_PORT": parts["port"],
                   "PG_DATABASE": parts["database"], "PG_USERNAME": parts["username"],
                   **({"PG_PASSWORD": parts["password"]} if parts["password"] else {}),
                   "PG_INIT_EXTENSION": "false"}
            for key, value in env.items():
                print(f"export {key}={shlex.quote(value)}")
    if not settings.database_url:
        print(
            "note: the embedded server stops when the last animus process exits; keep "
            "`animus up` running, or use `animus db psql`",
            file=sys.stderr,
        )
    return 0


async def migrate(args: argparse.Namespace) -> int:
    async with await Db.connect(max_size=2) as db:
        done = await db.migrate()
    for m in done:
        print(f"applied {m.version:04d}_{m.name}")
    if not done:
        print("up to date")
    return 0


async def status(args: argparse.Namespace) -> int:
    async with await Db.connect(max_size=2) as db:
        st = await db.migration_status()
    if args.json:
        print_json(st)
        return 0
    print(f"server:     PostgreSQL {st.server_version}")
    print(f"applied:    {', '.join(f'{v:04d}' for v in st.applied) or 'none'}")
    print(f"pending:    {', '.join(f'{v:04d}' for v in st.pending) or 'none'}")
    if st.components:
        print()
        print_table(["component", "install", "version"],
                    [(c.name, c.install, c.version) for c in st.components])
    return 0


async def psql(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    target = await resolve_url(settings)
    exe = "psql" if settings.database_url else str(pg_bin_dir() / "psql")
    proc = await asyncio.create_subprocess_exec(exe, target, *args.psql_args, env=os.environ.copy())
    return await proc.wait()
