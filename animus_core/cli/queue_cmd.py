"""``animus queue``: create and list queues."""

from __future__ import annotations

import argparse

from animus_core.cli.context import open_db
from animus_core.cli.output import print_json, print_table
from animus_core.store import read


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    queue = sub.add_parser("queue", help="create and list queues")
    cmds = queue.add_subparsers(dest="queue_command", metavar="COMMAND", required=True)
    p = cmds.add_parser("create", help="create a queue (engines serve it with --queue NAME)")
    p.add_argument("name", help="1-47 ASCII letters, digits and underscores")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=create)
    p = cmds.add_parser("list", help="every queue, its depth and its oldest message's age, "
                                     "and the live engines that serve it")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=list_)


async def create(args: argparse.Namespace) -> int:
    async with await open_db() as db:
        existed = args.name in await db.queues()
        await db.create_queue(args.name)
    if args.json:
        print_json({"queue": args.name, "created": not existed})
    else:
        print(f"queue {args.name} " + ("exists already" if existed else "created"))
    return 0


async def list_(args: argparse.Namespace) -> int:
    async with await open_db() as db:
        view = await read.status(db)
    served = {q.queue: sorted(f"{e.host}:{e.pid}" for e in view.engines
                              if not e.lost and q.queue in e.queues) for q in view.queues}
    if args.json:
        print_json([{"queue": q.queue, "depth": q.depth, "oldest_seconds": q.oldest_seconds,
                     "engines": served[q.queue]} for q in view.queues])
        return 0
    print_table(["queue", "depth", "oldest", "served by"],
                [(q.queue, q.depth, f"{q.oldest_seconds}s" if q.oldest_seconds is not None
                  else "", ", ".join(served[q.queue]) or "no live engine")
                 for q in view.queues])
    return 0
