"""``animus approve``, ``animus reject`` (also ``animus work approve|reject``), ``animus
approvals list`` and ``animus roles``."""

from __future__ import annotations

import argparse
import getpass

from animus_core.cli.context import open_db
from animus_core.cli.output import age, print_json, print_table
from animus_core.store import read
from animus_core.store.roles import ROLES, add_user, setup_roles


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    add_decisions(sub)

    approvals = sub.add_parser("approvals", help="the decisions people owe")
    cmds = approvals.add_subparsers(dest="approvals_command", metavar="COMMAND", required=True)
    p = cmds.add_parser("list", help="items awaiting a decision: their gate, who asked, "
                                     "the votes so far")
    p.add_argument("--json", action="store_true", help="print them as JSON")
    p.set_defaults(handler=approvals_list)

    roles = sub.add_parser("roles", help="Postgres roles: reader, submitter, approver, operator, admin")
    cmds = roles.add_subparsers(dest="roles_command", metavar="COMMAND", required=True)
    p = cmds.add_parser("setup", help="create the roles, grants and row-level security")
    p.set_defaults(handler=roles_setup)
    p = cmds.add_parser("add-user", help="create a login role that is a member of one role")
    p.add_argument("name")
    p.add_argument("--role", required=True, choices=ROLES)
    p.add_argument("--password", action="store_true", help="prompt for a password")
    p.set_defaults(handler=roles_add_user)


def add_decisions(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``approve`` and ``reject``: top-level commands, and under ``animus work`` too."""
    for verb in ("approve", "reject"):
        p = sub.add_parser(verb, help=f"{verb} a work item awaiting a decision (as the "
                                      "database user)")
        p.add_argument("id", metavar="ID")
        p.add_argument("--reason", required=True, help="why (recorded in the audit trail)")
        p.add_argument("--json", action="store_true", help="print the item as JSON")
        p.set_defaults(handler=decide, decision=verb)


async def decide(args: argparse.Namespace) -> int:
    async with await open_db() as db:
        item = await db.decide(args.id, args.decision, args.reason)
    if args.json:
        print_json(item)
    else:
        print(f"{item.id}: {item.state} ({item.reason})")
    return 0


async def approvals_list(args: argparse.Namespace) -> int:
    async with await open_db() as db:
        pending = await read.pending_approvals(db)
    if args.json:
        print_json(pending)
        return 0
    if not pending:
        print("no decision is pending")
        return 0
    print_table(["id", "type", "gate", "role", "votes", "requested by", "since", "why"],
                [(p.id, p.work_type,
                  "submit" + (f" ({p.rule})" if p.rule else "") if p.kind == "submit"
                  else f"step {p.position}", p.role,
                  f"{len(p.approvers)}/{p.quorum}"
                  + (f" ({', '.join(p.approvers)})" if p.approvers else ""),
                  p.requested_by or "", age(p.since), (p.why or "")[:60]) for p in pending])
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
