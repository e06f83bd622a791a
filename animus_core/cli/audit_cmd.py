"""``animus audit``: verify the hash chain, checkpoint its head, show one item's history,
and the newest rows of all (``tail``)."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import msgspec

from animus_core.cli.context import open_db
from animus_core.cli.output import page_size, print_json, print_table, since
from animus_core.infra import witness
from animus_core.store.audit import AuditEvent, Verification

_NO_KEY = "set ANIMUS_AUDIT_KEY or ANIMUS_AUDIT_KEY_FILE"


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = sub.add_parser("audit", help="the append-only, hash-chained audit trail")
    cmds = audit.add_subparsers(dest="audit_command", metavar="COMMAND", required=True)
    p = cmds.add_parser("verify", help="seal pending rows, then recompute the whole chain")
    p.add_argument("--against", metavar="FILE", type=Path,
                   help="also check the chain still holds every checkpoint in FILE")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=verify)
    p = cmds.add_parser("checkpoint", help="seal pending rows, then print the chain's head, "
                                           "signed with the audit key, to keep elsewhere")
    p.add_argument("--json", action="store_true", help="print it as one line of JSON")
    p.set_defaults(handler=checkpoint)
    p = cmds.add_parser("show", help="one work item's history")
    p.add_argument("id", metavar="WORK_ID", help="the work item whose audit rows to show")
    p.add_argument("--since", type=since, metavar="WHEN",
                   help="only rows since WHEN: an ISO time, or an age such as 30m, 2h, 7d")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=show)
    p = cmds.add_parser("tail", help="the newest audit rows of every item; --follow for more "
                                     "as they come")
    p.add_argument("-n", type=page_size, default=20, metavar="N",
                   help="how many of the newest rows, 1 to 10000 (default 20)")
    p.add_argument("--follow", "-f", action="store_true",
                   help="then print each new row as it is written, until Ctrl-C")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(handler=tail)


async def verify(args: argparse.Namespace) -> int:
    checkpoints = witness.read_checkpoints(args.against) if args.against else []
    async with await open_db() as db:
        result = await db.verify_audit(checkpoints)
    if args.json:
        print_json(result)
    elif result.ok:
        _print_intact(result, args.against)
    else:
        at = "" if result.first_bad_id is None else f" at row {result.first_bad_id}"
        print(f"audit chain BROKEN{at}: {result.problem} ({result.checked} rows "
              + ("verified)" if result.first_bad_id is None else "before it verified)"))
    return 0 if result.ok else 1


def _print_intact(result: Verification, against: Path | None) -> None:
    keys = ", ".join(result.key_ids)
    line = f"audit chain intact: {result.checked} rows verified"
    if result.authenticated:
        line += f" ({result.authenticated} authenticated with key {keys}"
        if result.unkeyed:
            line += f"; {result.unkeyed} sealed before a key was set"
        line += ")"
    print(line)
    if result.unauthenticated:
        print(f"{result.unauthenticated} of them are sealed with key {keys} and were not "
              f"authenticated: this process holds no audit key ({_NO_KEY}); their links were "
              "checked, not their contents")
    if against is not None:
        print(f"the chain still holds every checkpoint in {against} ({result.checkpoints} "
              f"checked; the newest: {result.newest_checkpoint})")
        if result.signatures_unchecked:
            print(f"{result.signatures_unchecked} of them are signed with a key this process "
                  "does not hold: their signatures were not checked")
    if result.waiting_for_key:
        print(f"{result.unsealed} rows wait to be sealed: the chain is sealed with key "
              f"{result.waiting_for_key}, and this process holds no audit key ({_NO_KEY})")
    elif result.unsealed:
        print(f"{result.unsealed} newer rows are not sealed yet, so not verified: engines seal "
              "them within seconds (this role only reads; an operator's verify seals them "
              "first)")
    if result.findings_total:
        print(f"{result.findings_total} rows hold JSON that animus's value model excludes "
              "(written around animus, e.g. by hand with SQL); each is sealed over the text "
              "Postgres stores, so a change to it is still detected:")
        for finding in result.findings:
            print(f"  {finding}")
        if result.findings_total > len(result.findings):
            print(f"  ... and {result.findings_total - len(result.findings)} more")


async def checkpoint(args: argparse.Namespace) -> int:
    async with await open_db() as db:
        cp = await db.audit_checkpoint()
    if args.json:
        print(cp.line())
        return 0
    signed = (f"signed with key {cp.key_id}" if cp.key_id
              else f"not signed: this process holds no audit key ({_NO_KEY})")
    print(f"audit checkpoint of {cp.database}: chain position {cp.seq} (audit row "
          f"{cp.audit_id}), hash {cp.hash}, at {cp.at}; {signed}")
    return 0


async def show(args: argparse.Namespace) -> int:
    async with await open_db() as db:
        events = await db.history(args.id)
    if args.since is not None:
        events = [e for e in events if e.at >= args.since]
    if args.json:
        print_json(events)
        return 0
    print_table(_HEADERS, [_row(e) for e in events])
    return 0


_HEADERS = ["#", "at", "event", "from", "to", "actor", "db user", "sealed", "details"]


def _row(e: AuditEvent, *, work: bool = False) -> tuple[object, ...]:
    return ((e.id, e.at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3])
            + ((e.work_id,) if work else ())
            + (e.event, e.from_state, e.to_state, e.provenance.get("actor", ""), e.db_user,
               "yes" if e.sealed else "pending", json.dumps(e.payload, ensure_ascii=False)[:80]))


async def tail(args: argparse.Namespace) -> int:
    async with await open_db() as db:
        events = await db.audit_tail(limit=args.n)
        headers = [*_HEADERS[:2], "work item", *_HEADERS[2:]]
        if args.json:
            for e in events:
                print(msgspec.json.encode(e).decode())
        else:
            print_table(headers, [_row(e, work=True) for e in events])
        last = events[-1].id if events else 0
        while args.follow:
            await asyncio.sleep(0.5)
            fresh = await db.audit_tail(limit=1000, after=last)
            for e in fresh:
                print(msgspec.json.encode(e).decode() if args.json else
                      "  ".join("" if c is None else str(c) for c in _row(e, work=True)),
                      flush=True)
            if fresh:
                last = fresh[-1].id
    return 0
