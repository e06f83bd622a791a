"""``animus approve``, ``animus reject`` and ``animus roles``."""

from __future__ import annotations

import argparse
import getpass

from animus_core.cli.context import open_db
from animus_core.store.roles import ROLES, add_user, setup_roles


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for name, verb in (("approve", "approve"), ("reject", "reject")):
        p = sub.add_parser(name, help=f"{verb} a work item awaiting approval (as the database user)")
        p.add_argument("id", metavar="ID")
        p.add_argument("--reason", required=True, help="why (recorded in the audit trail)")
        p.set_defaults(handler=decide, decision=verb)

    roles = sub.add_parser("roles", help="Postgres roles: reader, submitter, approver, operator, admin")
    cmds = roles.add_subparsers(dest="roles_command", metavar="COMMAND", required=True)
    p = cmds.add_parser("setup", help="create the roles, grants and row-level security")
    p.set_defaults(handler=roles_setup)
    p = cmds.add_parser("add-user", help="create a login role that is a member of one role")
    p.add_argument("name")
    p.add_argument("--role", required=True, choices=ROLES)
    p.add_argument("--password", action="store_true", help="prompt for a password")
    p.set_defaults(handler=roles_add_user)


async def decide(args: argparse.Namespace) -> int:
    async with await open_db() as db:
        item = await db.decide(args.id, args.decision, args.reason)
    print(f"{item.id}: {item.state} ({item.reason})")
    return 0


async def roles_setup(args: argparse.Namespace) -> int:
    async with await open_db() as db, db.connection() as conn:
        await setup_roles(conn)
    print("roles ready: " + ", ".join(f"animus_{r}" for r in ROLES))
    return 0


async def roles_add_user(args: argparse.Namespace) -> int:
    password = getpass.getpass(f"password for {args.name}: ") if args.password else None
    async with await open_db() as db, db.connection() as conn:
        await add_user(conn, args.name, args.role, password)
    print(f"{args.name} is now a member of animus_{args.role}")
    return 0
