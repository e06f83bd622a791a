"""``animus web``: the web console, and ``animus web user`` for the people who sign in."""

from __future__ import annotations

import argparse
import getpass
import os
import sys

from animus_core.cli.context import cli_animus
from animus_core.cli.output import http_url, parse_bind, print_json, print_table
from animus_core.infra.config import Settings
from animus_core.values.errors import InvalidInput
from animus_core.values.roles import ROLES

DEFAULT_PORT = 8480


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    web = sub.add_parser("web", help="serve the web console (see docs/console.md)")
    web.add_argument("--bind", default=None, metavar="HOST:PORT",
                     help=f"where to listen (default: the address $ANIMUS_BIND, else "
                          f"127.0.0.1, port {DEFAULT_PORT})")
    web.add_argument("--secure-cookies", action="store_true",
                     help="send the session cookie over HTTPS only (behind a TLS proxy)")
    web.set_defaults(handler=web_serve)
    users = web.add_subparsers(dest="web_command", metavar="COMMAND")
    user = users.add_parser("user", help="the people who may sign in")
    user_sub = user.add_subparsers(dest="user_command", metavar="COMMAND", required=True)
    p = user_sub.add_parser("add", help="let NAME sign in with ROLE (or change their role or "
                            "password); asks for the password, or reads it from stdin")
    p.add_argument("name", help="the person's name, also their database login role "
                   "(lowercase letters, digits and _)")
    p.add_argument("--role", required=True, choices=ROLES, help="what they may do")
    p.add_argument("--password-stdin", action="store_true",
                   help="read the password from the first line of stdin")
    p.add_argument("--json", action="store_true", help="print the person as JSON")
    p.set_defaults(handler=user_add)
    p = user_sub.add_parser("list", help="who may sign in, and with which role")
    p.add_argument("--json", action="store_true", help="print the people as JSON")
    p.set_defaults(handler=user_list)
    p = user_sub.add_parser("remove", help="NAME may no longer sign in")
    p.add_argument("name", help="the person's name")
    p.set_defaults(handler=user_remove)
    p = user_sub.add_parser("token", help="a new token with which NAME reaches `animus mcp "
                            "--bind` (the one before stops working), or --revoke it")
    p.add_argument("name", help="the person's name")
    p.add_argument("--revoke", action="store_true", help="NAME's token stops working; no new "
                   "one")
    p.set_defaults(handler=user_token)


async def web_serve(args: argparse.Namespace) -> int:
    from animus_core.faculties.embedders import select_embedder
    from animus_core.faculties.plugins import make_plugin_manager
    from animus_core.governance.rules import RuleSet
    from animus_core.web import console_app, console_secret, serve

    address = os.environ.get("ANIMUS_BIND") or "127.0.0.1"  # as the compose files read it
    host, port = parse_bind(args.bind or f"{address}:{DEFAULT_PORT}")
    settings = Settings.from_env()
    secret = console_secret(settings)
    rules = RuleSet.load(settings.rules_dir)  # a broken rules file stops here, not a submit
    pm, _ = make_plugin_manager(settings)
    embedder = select_embedder(pm, settings)
    async with await cli_animus(pool_size=4, actor="web").open_db() as db:
        app = console_app(db, db.url, secret, secure_cookies=args.secure_cookies, rules=rules,
                          trace_url=settings.trace_url, embedder=embedder)
        print(f"animus web: serving {http_url(host, port)} (Ctrl-C stops)", file=sys.stderr,
              flush=True)
        await serve(app, host, port)
    return 0


async def user_add(args: argparse.Namespace) -> int:
    from animus_core.web import add_person, console_secret

    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"console password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            raise InvalidInput("the two passwords differ")
    secret = console_secret(Settings.from_env())
    async with await cli_animus().open_db() as db:
        person = await add_person(db, secret, args.name, args.role, password)
    if args.json:
        print_json(person)
    else:
        print(f"{person.name} may sign in to the console as {person.role}")
    return 0


async def user_list(args: argparse.Namespace) -> int:
    from animus_core.web import list_people

    async with await cli_animus().open_db() as db:
        people = await list_people(db)
    if args.json:
        print_json(people)
    elif not people:
        print("nobody may sign in yet: animus web user add NAME --role ROLE")
    else:
        print_table(["name", "role", "added", "by"],
                    [(p.name, p.role, p.created_at, p.created_by) for p in people])
    return 0


async def user_remove(args: argparse.Namespace) -> int:
    from animus_core.web import remove_person

    async with await cli_animus().open_db() as db:
        removed = await remove_person(db, args.name)
    if not removed:
        raise InvalidInput(f"{args.name!r} may not sign in anyway (animus web user list)")
    print(f"{args.name} may no longer sign in (their database role stays: animus roles "
          "remove-user drops it)")
    return 0


async def user_token(args: argparse.Namespace) -> int:
    from animus_core.web import issue_mcp_token, revoke_mcp_token

    async with await cli_animus().open_db() as db:
        if args.revoke:
            if not await revoke_mcp_token(db, args.name):
                raise InvalidInput(f"{args.name!r} may not sign in anyway (animus web user "
                                   "list)")
            print(f"{args.name}'s MCP token works no more", file=sys.stderr)
            return 0
        token = await issue_mcp_token(db, args.name)
    print(token)
    print(f"{args.name}'s MCP token (shown once; any before it works no more)", file=sys.stderr)
    return 0
