"""``animus approve``, ``animus reject`` (also ``animus work approve|reject``), ``animus
approvals list`` and ``animus roles``."""

from __future__ import annotations

import argparse
import getpass
from pathlib import Path

import msgspec

from animus_core.cli.context import open_db
from animus_core.cli.output import age, print_json, print_table
from animus_core.cli.params import parse_params
from animus_core.governance.rules import RuleSet
from animus_core.infra.config import Settings
from animus_core.store import read
from animus_core.store.roles import ROLES, add_user, members, remove_user, setup_roles


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    add_decisions(sub)

    rules = sub.add_parser("rules", help="the rules (ANIMUS_RULES): list, check, test")
    cmds = rules.add_subparsers(dest="rules_command", metavar="COMMAND", required=True)
    p = cmds.add_parser("list", help="every rule, in the order they are checked")
    p.add_argument("--json", action="store_true", help="print them as JSON")
    p.set_defaults(handler=rules_list)
    p = cmds.add_parser("check", help="load the rules; say what is wrong, and which rules "
                                      "can never match")
    p.set_defaults(handler=rules_check)
    p = cmds.add_parser("test", help="which rule decides work of TYPE (or a tool call), "
                                     "and why the rules before it do not")
    p.add_argument("work_type", metavar="TYPE", help="the work type to test")
    p.add_argument("--param", "-p", action="append", default=[], metavar="K=V",
                   help="a parameter (or, with --tool, a field of the call's input); V is "
                        "parsed as JSON when it can be")
    p.add_argument("--params", metavar="JSON", help="all parameters as one JSON object")
    p.add_argument("--source", default="cli", metavar="S",
                   help="the submitter's source (default cli)")
    p.add_argument("--tool", metavar="NAME",
                   help="test a model's call of this tool in a focus of TYPE instead")
    p.add_argument("--json", action="store_true", help="print the decision as JSON")
    p.set_defaults(handler=rules_test)

    approvals = sub.add_parser("approvals", help="the decisions people owe")
    cmds = approvals.add_subparsers(dest="approvals_command", metavar="COMMAND", required=True)
    p = cmds.add_parser("list", help="items awaiting a decision: their gate, who asked, "
                                     "the votes so far")
    p.add_argument("--json", action="store_true", help="print them as JSON")
    p.set_defaults(handler=approvals_list)

    roles = sub.add_parser("roles", help="Postgres roles: reader, submitter, approver, operator, admin")
    cmds = roles.add_subparsers(dest="roles_command", metavar="COMMAND", required=True)
    p = cmds.add_parser("setup", help="create the roles, grants and row-level security")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=roles_setup)
    p = cmds.add_parser("list", help="who is a member of which animus role")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=roles_list)
    p = cmds.add_parser("remove-user", help="take a database user out of every animus role")
    p.add_argument("name", help="the database user")
    p.add_argument("--drop", action="store_true",
                   help="also drop the login role (it must own nothing)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=roles_remove_user)
    p = cmds.add_parser("add-user", help="create a login role that is a member of one role")
    p.add_argument("name", help="the login role to create (a person or a service)")
    p.add_argument("--role", required=True, choices=ROLES,
                   help="the animus role it becomes a member of")
    p.add_argument("--password", action="store_true", help="prompt for a password")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=roles_add_user)


def add_decisions(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``approve`` and ``reject``: top-level commands, and under ``animus work`` too."""
    for verb in ("approve", "reject"):
        p = sub.add_parser(verb, help=f"{verb} a work item awaiting a decision (as the "
                                      "database user)")
        p.add_argument("id", metavar="ID", help="the work item (its id)")
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
    if args.json:
        print_json({"roles": [f"animus_{r}" for r in ROLES]})
    else:
        print("roles ready: " + ", ".join(f"animus_{r}" for r in ROLES))
    return 0


async def roles_add_user(args: argparse.Namespace) -> int:
    password = getpass.getpass(f"password for {args.name}: ") if args.password else None
    async with await open_db() as db, db.connection() as conn:
        await add_user(conn, args.name, args.role, password)
    if args.json:
        print_json({"user": args.name, "role": f"animus_{args.role}"})
    else:
        print(f"{args.name} is now a member of animus_{args.role}")
    return 0


def _rules() -> RuleSet:
    return RuleSet.load(Settings.from_env().rules_dir)


async def rules_list(args: argparse.Namespace) -> int:
    ruleset = _rules()
    never = {id(r): (ep, e) for _, r, ep, e in ruleset.shadowed()}
    if args.json:
        print_json([{"file": path, **msgspec.to_builtins(rule),
                     "never_matches": never[id(rule)][1].name if id(rule) in never else None}
                    for path, rule in ruleset.rules])
        return 0
    if not ruleset.rules:
        print(f"no rules in {Settings.from_env().rules_dir}: every submission is allowed")
        return 0
    print_table(["#", "file", "rule", "effect", "work type", "source", "params", "gate"],
                [(i + 1, Path(path).name, rule.name
                  + (" (never matches)" if id(rule) in never else ""),
                  rule.effect, rule.work_type if rule.tool is None
                  else f"{rule.work_type} tool {rule.tool}", rule.source,
                  msgspec.json.encode(rule.params).decode() if rule.params else "",
                  f"{rule.quorum} x {rule.role}" if rule.effect == "require_approval" else "")
                 for i, (path, rule) in enumerate(ruleset.rules)])
    print("\nthe first rule that matches decides, across files in name order; with rules, "
          "work that none matches is denied")
    return 0


async def rules_check(args: argparse.Namespace) -> int:
    ruleset = _rules()  # a broken file raises, naming it (exit 2)
    files = {path for path, _ in ruleset.rules}
    print(f"{_count(len(ruleset.rules), 'rule')} in {_count(len(files), 'file')}: they load")
    shadowed = ruleset.shadowed()
    for path, rule, earlier_path, earlier in shadowed:
        print(f"warning: {path}: rule {rule.name!r} can never match: rule {earlier.name!r} "
              f"({earlier_path}) comes first and matches all it would")
    return 1 if shadowed else 0


async def rules_test(args: argparse.Namespace) -> int:
    params = parse_params(args.param, args.params)
    ruleset = _rules()
    if args.tool:
        decision = ruleset.decide_tool(args.tool, params, work_type=args.work_type,
                                       source=args.source)
    else:
        decision = ruleset.decide(args.work_type, params, args.source)
    steps = ruleset.explain(args.work_type, params, args.source, tool=args.tool)
    if args.json:
        print_json({"decision": decision,
                    "rules": [{"file": path, "rule": rule.name, "matches": miss is None,
                               "why_not": miss} for path, rule, miss in steps]})
        return 0
    what = f"a call of tool {args.tool!r} in {args.work_type!r}" if args.tool \
        else f"{args.work_type!r} from {args.source!r}"
    print(f"{what}: {decision.effect}"
          + (f" ({decision.quorum} x {decision.role})" if decision.role else "")
          + f": {decision.reason}")
    for path, rule, miss in steps:
        mark = "decides" if miss is None else f"no: {miss}"
        print(f"  {Path(path).name}: {rule.name!r}: {mark}")
    if not steps or steps[-1][2] is not None:
        print("  no rule matches" + ("" if not ruleset.rules else
                                      " (work: denied, rules fail closed; tools: allowed)"))
    return 0


async def roles_list(args: argparse.Namespace) -> int:
    async with await open_db() as db, db.connection() as conn:
        found = await members(conn)
    if args.json:
        print_json(found)
        return 0
    if not found:
        print("nobody is a member of an animus role (animus roles add-user NAME --role ROLE)")
        return 0
    print_table(["user", "roles", "login"],
                [(m.name, ", ".join(m.roles) + (" (superuser)" if m.superuser else ""),
                  "yes" if m.login else "no") for m in found])
    return 0


async def roles_remove_user(args: argparse.Namespace) -> int:
    async with await open_db() as db, db.connection() as conn:
        left = await remove_user(conn, args.name, drop=args.drop)
    if args.json:
        print_json({"user": args.name, "left": [f"animus_{r}" for r in left],
                    "dropped": args.drop})
    else:
        print(f"{args.name} left " + ", ".join(f"animus_{r}" for r in left)
              + (" and was dropped" if args.drop else ""))
    return 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")
