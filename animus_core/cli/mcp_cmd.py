"""``animus mcp``: this animus as an MCP server, over stdio acting as one animus role, or over
streamable HTTP for the console's people, each with their token (docs/mcp.md)."""

from __future__ import annotations

import argparse
import logging
import sys

from animus_core.cli.context import cli_animus
from animus_core.cli.output import http_url, parse_bind
from animus_core.values.errors import InvalidInput
from animus_core.values.roles import ROLES

#: requests served at once over HTTP; more are answered 503 at once
MAX_REQUESTS = 256


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("mcp", help="serve this animus to MCP clients, over stdio or HTTP (see "
                                   "docs/mcp.md)")
    p.add_argument("--role", choices=ROLES, default=None,
                   help="over stdio, act as this animus role (SET ROLE animus_ROLE): the "
                        "database allows what it may do (default: the login of DATABASE_URL "
                        "as it is)")
    p.add_argument("--bind", default=None, metavar="HOST:PORT",
                   help="serve streamable HTTP at http://HOST:PORT/mcp instead, to the "
                        "console's people: each request carries a token from `animus web user "
                        "token`")
    p.set_defaults(handler=serve)


async def serve(args: argparse.Namespace) -> int:
    from animus_core.faculties.embedders import select_embedder
    from animus_core.faculties.plugins import make_plugin_manager
    from animus_core.governance.rules import RuleSet
    from animus_core.infra.config import Settings
    from animus_core.infra.logs import setup_logging
    from animus_core.store.db import Db
    from animus_core.web import People, console_secret, serve
    from animus_core.web.mcp_server import mcp_http_app, mcp_server

    if args.bind is not None and args.role is not None:
        raise InvalidInput("--role is for stdio: over HTTP each call runs as the person whose "
                           "token it carries (their role is theirs: animus web user add)")
    settings = Settings.from_env()
    setup_logging(settings.log_level)  # on stderr, redacted (stdout is MCP's over stdio)
    logging.getLogger("mcp").setLevel(logging.WARNING)  # not a line per session
    rules = RuleSet.load(settings.rules_dir)  # a broken rules file stops here
    pm, _ = make_plugin_manager(settings)
    embedder = select_embedder(pm, settings)
    if args.bind is not None:
        host, port = parse_bind(args.bind)
        secret = console_secret(settings, create=False)  # the people's passwords' secret
        async with await cli_animus(pool_size=2, actor="mcp").open_db() as service:
            people = People(service, service.url, secret)
            try:
                print(f"animus mcp: serving {http_url(host, port, '/mcp')} (Ctrl-C stops)",
                      file=sys.stderr, flush=True)
                await serve(mcp_http_app(people, rules, embedder), host, port,
                            limit_concurrency=MAX_REQUESTS)
            finally:
                await people.close()
        return 0
    async with await cli_animus(actor="mcp").open_db() as admin:
        url = admin.url
    db = await Db.connect(url, max_size=4, actor="mcp",
                          role=f"animus_{args.role}" if args.role else None)

    async def access(_ctx: object) -> Db:
        return db
    try:
        await mcp_server(access, rules, embedder).run_stdio_async()
    finally:
        await db.close()
    return 0
