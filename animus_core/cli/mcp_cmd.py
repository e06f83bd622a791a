"""``animus mcp``: this animus as an MCP server over stdio, acting as one animus role
(docs/mcp.md)."""

from __future__ import annotations

import argparse

from animus_core.cli.context import cli_animus
from animus_core.values.roles import ROLES


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("mcp", help="serve this animus to MCP clients over stdio (see "
                                   "docs/mcp.md)")
    p.add_argument("--role", choices=ROLES, default=None,
                   help="act as this animus role (SET ROLE animus_ROLE): the database allows "
                        "what it may do (default: the login of DATABASE_URL as it is)")
    p.set_defaults(handler=serve_stdio)


async def serve_stdio(args: argparse.Namespace) -> int:
    from animus_core.faculties.embedders import select_embedder
    from animus_core.faculties.plugins import make_plugin_manager
    from animus_core.governance.rules import RuleSet
    from animus_core.governance.work import GovernedWork
    from animus_core.infra.config import Settings
    from animus_core.store.db import Db
    from animus_core.web.mcp_server import mcp_server

    settings = Settings.from_env()
    rules = RuleSet.load(settings.rules_dir)  # a broken rules file stops here
    pm, _ = make_plugin_manager(settings)
    embedder = select_embedder(pm, settings)
    async with await cli_animus(actor="mcp").open_db() as admin:
        url = admin.url
    db = await Db.connect(url, max_size=4, actor="mcp",
                          role=f"animus_{args.role}" if args.role else None)
    try:
        await mcp_server(db, GovernedWork(db, rules), embedder).run_stdio_async()
    finally:
        await db.close()
    return 0
