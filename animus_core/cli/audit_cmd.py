"""``animus audit``: verify the hash chain, show one item's history."""

from __future__ import annotations

import argparse
import json

from animus_core.cli import open_db
from animus_core.cli.output import print_json, print_table


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = sub.add_parser("audit", help="the append-only, hash-chained audit trail")
    cmds = audit.add_subparsers(dest="audit_command", metavar="COMMAND", required=True)
    p = cmds.add_parser("verify", help="seal pending rows, then recompute the whole chain")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=verify)
    p = cmds.add_parser("show", help="one work item's history")
    p.add_argument("id", metavar="WORK_ID")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=show)


async def verify(args: argparse.Namespace) -> int:
    async with await open_db() as db:
        result = await db.verify_audit()
    if args.json:
        print_json(result)
    elif result.ok:
        print(f"audit chain intact: {result.checked} rows verified")
        if result.findings_total:
            print(f"{result.findings_total} rows hold JSON that animus's value model excludes "
                  "(written around animus, e.g. by hand with SQL); each is sealed over the text "
                  "Postgres stores, so a change to it is still detected:")
            for finding in result.findings:
                print(f"  {finding}")
            if result.findings_total > len(result.findings):
                print(f"  ... and {result.findings_total - len(result.findings)} more")
    else:
        print(f"audit chain BROKEN at row {result.first_bad_id}: {result.problem} "
              f"({result.checked} rows before it verified)")
    return 0 if result.ok else 1


async def show(args: argparse.Namespace) -> int:
    async with await open_db() as db:
        events = await db.history(args.id)
    if args.json:
        print_json(events)
        return 0
    print_table(
        ["#", "at", "event", "from", "to", "actor", "db user", "sealed", "details"],
        [(e.id, e.at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3], e.event, e.from_state, e.to_state,
          e.provenance.get("actor", ""), e.db_user, "yes" if e.sealed else "pending",
          json.dumps(e.payload, ensure_ascii=False)[:80]) for e in events],
    )
    return 0
