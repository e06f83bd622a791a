"""``animus work``: submit, follow, list, show, cancel, signal and retry work items."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from typing import Any
from uuid import UUID

import msgspec

from animus_core.cli.context import cli_animus, governed, open_db
from animus_core.cli.follow import follow, no_engine_for, why_unfinished
from animus_core.cli.governance_cmd import add_decisions
from animus_core.cli.output import (
    age,
    attempts,
    option_id,
    page_size,
    print_json,
    print_table,
    seconds,
    since,
)
from animus_core.cli.params import parse_params
from animus_core.store.db import DEFAULT_QUEUE, Db
from animus_core.values import json_values
from animus_core.values.errors import AnimusError, InvalidInput
from animus_core.values.records import FILE_TEXT_LIMIT
from animus_core.values.states import State
from animus_core.values.steps import Step
from animus_core.values.waits import Signal, Wait
from animus_core.values.work import Created, Merged, NewWorkItem, WorkItem


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    work = sub.add_parser("work", help="submit, list, show, cancel, signal, retry work items")
    cmds = work.add_subparsers(dest="work_command", metavar="COMMAND", required=True)

    p = cmds.add_parser("submit", help="submit a work item")
    p.add_argument("work_type", metavar="TYPE", help="the work type (a faculty that accepts it runs it)")
    p.add_argument("--param", "-p", action="append", default=[], metavar="K=V",
                   help="a parameter; V is parsed as JSON when it can be, else kept as text")
    p.add_argument("--params", metavar="JSON", help="all parameters as one JSON object")
    p.add_argument("--dedup-key", metavar="K", help="a live item with the same key absorbs this one "
                                                         "(it is merged, not run twice)")
    p.add_argument("--priority", type=int, default=0, metavar="N", help="higher runs first")
    p.add_argument("--source", default="cli", metavar="S", help="who submits (provenance)")
    p.add_argument("--parent", metavar="ID", help="the parent work item (child work)")
    p.add_argument("--max-attempts", type=attempts, default=3, metavar="N",
                   help="attempts before it is dead-lettered, 1-1000 (default 3; a faculty's "
                        "own limit overrides it)")
    p.add_argument("--queue", default=DEFAULT_QUEUE, help="the queue to send it to (default work)")
    p.add_argument("--wait", action="store_true",
                   help="follow the item until it finishes (its changes on standard error) "
                        "and print its outcome")
    p.add_argument("--timeout", type=seconds, default=300.0, help="seconds to --wait")
    p.add_argument("--strict", action="store_true",
                   help="refuse to submit when no live engine would run the work type "
                        "(by default: a warning)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=submit)

    add_decisions(cmds)  # animus work approve|reject, as animus approve|reject

    p = cmds.add_parser("follow", help="follow a work item until it finishes: each change "
                                       "as it happens, then its outcome")
    p.add_argument("id", metavar="ID", help="the work item (its id)")
    p.add_argument("--timeout", type=seconds, default=300.0, help="seconds to follow it")
    p.add_argument("--json", action="store_true", help="print the finished item as JSON")
    p.set_defaults(handler=follow_cmd)

    p = cmds.add_parser("list", help="list work items, newest first")
    p.add_argument("--state", action="append", choices=[s.value for s in State],
                   metavar="STATE", help="only items in this state (repeat for several): "
                                         + ", ".join(s.value for s in State))
    p.add_argument("--type", dest="work_type", help="only items of this work type")
    p.add_argument("--exclude-type", action="append", default=[], metavar="TYPE",
                   help="leave out items of this work type (repeat for several)")
    p.add_argument("--source", metavar="S", help="only items submitted with this source")
    p.add_argument("--since", type=since, metavar="WHEN",
                   help="only items created since WHEN: an ISO time, or an age such as 30m, "
                        "2h, 7d")
    p.add_argument("--parent", metavar="ID", help="only children of this item")
    p.add_argument("--limit", type=page_size, default=50,
                   help="at most this many, 1 to 10000 (default 50)")
    p.add_argument("--before", metavar="ID", help="page: items older than this one")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=list_)

    p = cmds.add_parser("show", help="show one work item")
    p.add_argument("id", metavar="ID", help="the work item (its id)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=show)

    p = cmds.add_parser("cancel", help="cancel a queued or waiting work item")
    p.add_argument("id", metavar="ID", help="the work item (its id)")
    p.add_argument("--reason", default="cancelled from the command line",
                   help="why (recorded on the item and in the audit trail)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=cancel)

    p = cmds.add_parser("signal", help="send a signal to a work item (wakes it if it waits "
                                       "for that event)")
    p.add_argument("id", metavar="ID", help="the work item (its id)")
    p.add_argument("event", metavar="EVENT", help="the event's name (what a wait_for waits for)")
    p.add_argument("--data", metavar="JSON", help="the signal's payload, as JSON")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=signal)

    p = cmds.add_parser("retry", help="retry a failed item now, or replay a dead one")
    p.add_argument("id", metavar="ID", help="the work item (its id)")
    p.add_argument("--from-step", metavar="NAME",
                   help="replay a dead item from its recorded step NAME: the steps before "
                        "it are copied and replayed, NAME and after run afresh")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=retry)

    p = cmds.add_parser("explain", help="what each attempt was bound to (execution records)")
    p.add_argument("id", metavar="ID", help="the work item (its id)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=explain)

    p = cmds.add_parser("diff", help="name the inputs and outputs that differ between two runs")
    p.add_argument("a", metavar="ID1", help="the first work item")
    p.add_argument("b", metavar="ID2", help="the second work item")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=diff)

    p = cmds.add_parser("rerun", help="submit a linked rerun and compare it with the original")
    p.add_argument("id", metavar="ID", help="the work item (its id)")
    p.add_argument("--timeout", type=seconds, default=300.0, help="seconds to wait for the rerun")
    p.add_argument("--no-wait", action="store_true", help="submit and return")
    p.add_argument("--from-step", metavar="NAME",
                   help="resume from the original's recorded step NAME: the steps before it "
                        "are copied and replayed, NAME and after run afresh")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=rerun)


async def explain(args: argparse.Namespace) -> int:
    async with await open_db() as db:
        item = await db.get_work_item(args.id)
        records = await db.executions(item.id)
        steps = await db.steps(item.id)
    if args.json:
        print_json({"work_id": str(item.id), "records": records, "steps": steps})
        return 0
    print(f"{item.id}  {item.work_type}  {item.state}  ({len(records)} attempts recorded)")
    _print_steps(steps)
    for r in records:
        env = r.environment or {}
        print(f"\nattempt {r.attempt}: {r.result}  {r.started_at.isoformat()}")
        fac = r.faculty
        if fac is None:  # a lost attempt, recorded by the claim that took its item back
            print("  inputs        not known: the engine that ran it was lost with its lease")
            print(f"  error         {r.error}")
            ran = [f"{s.position}:{s.name}" for s in steps
                   if s.attempt == r.attempt and s.copied_from is None]
            if ran:  # what it recorded before it was lost
                print(f"  steps ran      {', '.join(ran)}")
            continue
        print(f"  params        {r.params_hash}")
        if fac.get("kind") == "toml":
            print(f"  faculty       {fac.get('file')} {fac.get('file_sha256')}")
            for phase, hook in sorted(fac.get("hooks", {}).items()):
                print(f"    {phase:12}{hook.get('command')}  {hook.get('sha256')}")
            if fac.get("model"):
                print(f"    {'model':12}{fac['model']}")
            for server in fac.get("mcp", []):  # where the model's MCP tools came from
                where = server.get("url") or f"{server.get('command')}  {server.get('sha256')}"
                print(f"    {'mcp ' + str(server.get('name')):12}{where}")
        else:
            print(f"  faculty       {fac.get('class')} ({fac.get('origin')})")
        print(f"  engine        animus {r.engine_version}")
        print(f"  environment   {r.environment_hash}  Python {env.get('python')} on "
              f"{env.get('platform')}, {len(env.get('distributions', {}))} distributions")
        print(f"  models        {', '.join(r.models) or 'none'}")
        if r.steps:
            for kind in ("replayed", "ran"):
                marks = [f"{m['position']}:{m['name']}" for m in r.steps.get(kind, [])]
                print(f"  steps {kind:<8} {', '.join(marks) or 'none'}")
        if r.outcome_hash:
            print(f"  outcome       {r.outcome_hash}")
        if r.error:
            print(f"  error         {r.error[:200]}")
    return 0


async def diff(args: argparse.Namespace) -> int:
    from animus_core.governance.records import compare

    async with await open_db() as db:
        c = await compare(db, args.a, args.b)
    if args.json:
        print_json({"a": str(c.a.id), "b": str(c.b.id), "verdict": c.verdict,
                    "differences": {k: {"a": v[0], "b": v[1]}
                                    for k, v in c.differences.items()},
                    "files": c.files})
        return 0
    print(f"a: {c.a.id} ({c.a.state}, attempt {c.record_a.attempt})\n"
          f"b: {c.b.id} ({c.b.state}, attempt {c.record_b.attempt})")
    print(c.verdict)
    for field, (va, vb) in c.differences.items():
        print(f"  {field}\n    a: {_value(va)}\n    b: {_value(vb)}")
    _print_script_diffs(c.files)
    return 0


def _print_script_diffs(scripts: dict[str, str | None]) -> None:
    for field, text in scripts.items():
        if text is None:
            print(f"\n{field}: the text of one version was not kept (larger than "
                  f"{FILE_TEXT_LIMIT // 1024} KiB, not UTF-8, or run before animus kept faculty "
                  "files)")
        else:
            print(f"\n{text}", end="" if text.endswith("\n") else "\n")


def _value(value: Any) -> str:
    """A differing value as JSON text (a string quoted, so "1" and 1 read apart)."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


async def rerun(args: argparse.Namespace) -> int:
    from animus_core.governance.records import compare

    async with cli_animus() as animus:
        db = animus.db
        old = await db.get_work_item(args.id)
        if not old.state.terminal or old.state == State.MERGED:
            raise InvalidInput(f"work item {old.id} is {old.state}: rerun a finished item")
        # no dedup key (a rerun must run, not merge into live work) and no parent
        again = old.again(source="cli", trigger=f"rerun of {old.id}"
                          + (f" from step {args.from_step}" if args.from_step else ""))
        if args.from_step:
            created = await animus.governed.submit_from_step(again, old.id, args.from_step,
                                                             queue=old.queue)
        else:
            created = await animus.governed.submit(again, queue=old.queue)
        if args.no_wait:
            print(f"rerun {created.id} submitted; compare with: animus work diff {old.id} "
                  f"{created.id}")
            return 0
        item = await animus.wait_finished(created.id, args.timeout)
        if not item.state.terminal:
            print(f"rerun {created.id} is still {item.state} after {args.timeout:g}s: "
                  f"{await why_unfinished(db, item)}", file=sys.stderr)
            return 1
        c = await compare(db, old.id, item.id)
    if args.json:
        print_json({"rerun_id": str(item.id), "verdict": c.verdict,
                    "differences": {k: {"a": v[0], "b": v[1]}
                                    for k, v in c.differences.items()},
                    "files": c.files})
    else:
        print(f"rerun {item.id}: {item.state}")
        print(c.verdict)
        for field, (va, vb) in c.differences.items():
            print(f"  {field}: {va} -> {vb}")
        _print_script_diffs(c.files)
    return 0


async def submit(args: argparse.Namespace) -> int:
    new = (
        NewWorkItem(args.work_type, source=args.source)
        .params(parse_params(args.param, args.params))
        .priority(args.priority)
        .max_attempts(args.max_attempts)
    )
    if args.dedup_key is not None:
        new = new.dedup_key(args.dedup_key)
    parent = option_id(args.parent, "--parent")
    if parent is not None:
        new = new.parent(parent)
    async with cli_animus() as animus:
        db = animus.db
        if parent is not None:
            await db.get_work_item(parent)
        governed_work = animus.governed  # the rules, read first: a broken file stops here
        why = None
        with contextlib.suppress(AnimusError):  # a check, never a reason not to submit
            why = await no_engine_for(db, args.work_type, args.queue)
        if why is not None:
            if args.strict:
                raise InvalidInput(f"no live engine would run work type {args.work_type!r}: "
                                   f"{why}; not submitted (--strict)")
            print(f"animus: warning: no live engine would run work type {args.work_type!r} "
                  f"now: {why}; it waits in queue {args.queue!r} until one does",
                  file=sys.stderr)
        result = await governed_work.submit(new, queue=args.queue)
        if args.wait:
            print(f"submitted {result.canonical_id}" + (
                "" if isinstance(result, Created) else f" (merged into live work: {result.id} "
                "was not created)"), file=sys.stderr, flush=True)
            return await follow_to_end(db, result.canonical_id, args.timeout, args.json)
    if args.json:
        print_json(result)
    elif isinstance(result, Created):
        item = result.item  # rules may have gated or denied it at submit: say so
        print(f"created {item.id}" + ("" if item.state == State.QUEUED
                                       else f" ({item.state}: {item.reason})"))
    else:
        print(f"merged {result.id} into {result.canonical_id}")
    return 0


async def follow_cmd(args: argparse.Namespace) -> int:
    async with await open_db() as db:
        item = await db.get_work_item(args.id)
        return await follow_to_end(db, item.id, args.timeout, args.json)


async def follow_to_end(db: Db, work_id: UUID, timeout: float, as_json: bool) -> int:
    """Follow the item (its changes on standard error), then print it; 0 if it completed.
    Interrupted (Ctrl-C), say how to pick it up again."""
    try:
        item = await follow(db, work_id, timeout)
    except asyncio.CancelledError:
        print(f"\nstopped following {work_id}; it goes on without you. Follow it again with "
              f"`animus work follow {work_id}`, or look with `animus work show {work_id}`",
              file=sys.stderr)
        raise
    if as_json:
        print_json(item)
    else:
        _describe(item)
    if item.state == State.COMPLETED:
        return 0
    if not item.state.terminal:
        print(f"animus: still {item.state} after {timeout:g}s: "
              f"{await why_unfinished(db, item)}", file=sys.stderr)
    return 1


async def list_(args: argparse.Namespace) -> int:
    parent, before = option_id(args.parent, "--parent"), option_id(args.before, "--before")
    async with await open_db() as db:
        items = await db.list_work(
            state=args.state, work_type=args.work_type, parent_id=parent,
            limit=args.limit + 1, before=before, source=args.source,
            created_since=args.since, exclude_types=args.exclude_type,
        )
        more = len(items) > args.limit
        items = items[:args.limit]
        approved = await _approved(db, items)
    if args.json:
        print_json(items)
        if more:
            print(f"more items exist: the next page is --before {items[-1].id}",
                  file=sys.stderr)
        return 0
    waiting = any(i.state == State.WAITING for i in items)
    print_table(
        ["id", "type", "state", "tries", "prio", "created"]
        + (["waits for"] if waiting else []) + ["reason"],
        [(i.id, i.work_type, i.state, f"{i.attempts - i.suspensions}/{i.max_attempts}",
          i.priority, age(i.created_at))
         + ((waits_for(i, approved.get(i.id)) or "",) if waiting else ())
         + ((i.reason or "")[:60],)
         for i in items],
    )
    if more:
        print(f"(more exist: the next {args.limit} with --before {items[-1].id})")
    return 0



def waits_for(item: WorkItem, so_far: int | None = None) -> str | None:
    """What a waiting item waits for, and until when: ``sleep until T``, ``'event' until T``
    or ``'event'`` (no timeout), ``approval by ROLE (k of n) until T`` (``so_far``: the
    approvals that count so far), or ``N children`` (``K of N children finished`` when
    ``so_far`` says how many have). None for an item that is not waiting."""
    if item.state != State.WAITING or not item.wait:
        return None
    until = f" until {item.wake_at.isoformat()}" if item.wake_at else ""
    if item.wait.get("kind") == "sleep":
        return f"sleep{until}"
    if item.wait.get("kind") == "approval":
        return (f"approval by {item.wait.get('role')} ({so_far or 0} of "
                f"{item.wait.get('quorum')}){until}")
    if item.wait.get("kind") == "children":
        total = len(item.wait.get("children") or [])
        if so_far is None:
            return f"{total} children{until}"
        return f"{so_far} of {total} children finished{until}"
    return f"{item.wait.get('event')!r}{until}"


async def _approved(db: Any, items: list[WorkItem]) -> dict[Any, int]:
    """For each item waiting for an approval in its focus: how many approvals count."""
    out: dict[Any, int] = {}
    for i in items:
        if i.state == State.WAITING and i.wait and i.wait.get("kind") == "approval":
            gate = Wait.from_json(i.wait)
            decisions = await db.gate_decisions(i.id, gate.position, gate.role)
            out[i.id] = sum(1 for d in decisions if d.counts and d.decision == "approve")
    return out


async def _children_finished(db: Db, item: WorkItem) -> int | None:
    """How many of the children a waiting item waits for have finished (None: it does not
    wait for children)."""
    if item.state != State.WAITING or not item.wait or item.wait.get("kind") != "children":
        return None
    ended = await db.children_results(item.wait.get("children") or [])
    return sum(1 for r in ended if r is not None)


def _describe(item: WorkItem, so_far: int | None = None) -> None:
    fields: list[tuple[str, object]] = [
        ("id", item.id), ("type", item.work_type), ("state", item.state),
        ("reason", item.reason), ("queue", item.queue), ("priority", item.priority),
        ("dedup key", item.dedup_key), ("source", item.provenance.source),
        ("trigger", item.provenance.trigger), ("parent", item.parent_id),
        ("merged into", item.merged_into), ("replay of", item.replay_of),
        ("requester", item.requested_by),
        ("gate", _gate(item.gate)),
        ("attempts", f"{item.attempts}/{item.max_attempts}" if not item.suspensions else
         f"{item.attempts - item.suspensions}/{item.max_attempts} counted, "
         f"{item.attempts} in all ({item.suspensions} suspended)"),
        ("waits for", waits_for(item, so_far)),
        ("created", item.created_at.isoformat()), ("updated", item.updated_at.isoformat()),
        ("resolved", item.resolved_at.isoformat() if item.resolved_at else None),
        ("params", json.dumps(item.params, ensure_ascii=False)),
    ]
    if item.outcome.data is not None:
        fields.append(("outcome", json.dumps(item.outcome.data, ensure_ascii=False)))
    if item.outcome.error:
        fields.append(("error", item.outcome.error))
    if item.outcome.duration_ms is not None:
        fields.append(("duration", f"{item.outcome.duration_ms} ms"))
    if item.usage:
        fields.append(("usage", json.dumps(item.usage, ensure_ascii=False, sort_keys=True)))
    for name, value in fields:
        if value is not None:
            print(f"{name + ':':13}{value}")


def _gate(gate: dict[str, Any] | None) -> str | None:
    """The submit gate an item was held at: its role, quorum, rule and why."""
    if not gate:
        return None
    return (f"{gate.get('quorum', 1)} x {gate.get('role', 'approver')}"
            + (f" (rule {gate['rule']})" if gate.get("rule") else "")
            + (f": {gate['reason']}" if gate.get("reason") else ""))


async def show(args: argparse.Namespace) -> int:
    async with await open_db() as db:
        item = await db.get_work_item(args.id)
        steps = await db.steps(item.id)
        signals = await db.signals(item.id)
        approvals = await db.approvals(item.id)
        so_far = (await _approved(db, [item])).get(item.id)
        if so_far is None:
            so_far = await _children_finished(db, item)
    if args.json:
        print_json({**msgspec.to_builtins(item), "steps": steps, "signals": signals})
    else:
        _describe(item, so_far)
        _print_steps(steps)
        _print_signals(signals)
        _print_approvals(approvals)
    return 0


def _print_approvals(approvals: list[dict[str, Any]]) -> None:
    """The decisions on the item: which gate (the submit gate, or the approval at step n of
    its focus), who, what, when, and why."""
    if not approvals:
        return
    print("decisions:")
    for a in approvals:
        gate = "submit gate" if a["position"] is None else f"step {a['position']}"
        print(f"  {gate:11}  {a['decision']:8} {a['approver']:16} {a['at'].isoformat()}  "
              f"{a['reason']}")


def _print_signals(signals: list[Signal]) -> None:
    """The signals sent to the item: id, event, sender, when, and the wait that took it."""
    if not signals:
        return
    print("signals:")
    for s in signals:
        taken = (f"taken by step {s.consumed_by_position}"
                 if s.consumed_by_position is not None else "not taken yet")
        print(f"  {s.id:>5}  {s.event:24} {s.sent_by:16} {s.sent_at.isoformat()}  {taken}")


async def signal(args: argparse.Namespace) -> int:
    try:
        data = None if args.data is None else json_values.decode(args.data, "--data")
    except InvalidInput as e:
        raise InvalidInput(f"{e} (a text is JSON in quotes: --data '\"text\"')") from None
    async with await open_db() as db:
        sent = await db.signal(args.id, args.event, data)
    if args.json:
        print_json(sent)
        return 0
    print(f"signal {sent.signal_id} {args.event!r} sent to {args.id}: "
          + ("it was waiting for it and is queued again" if sent.woke
             else "kept until a wait of the item takes it"))
    return 0


def _print_steps(steps: list[Step]) -> None:
    """The item's recorded steps: position, name, the attempt that ran it (or the item it
    was copied from), duration and result hash."""
    if not steps:
        return
    print("steps:")
    for s in steps:
        by = (f"copied from {s.copied_from}" if s.copied_from
              else f"attempt {s.attempt}")
        print(f"  {s.position:>3}  {s.name:24} {by:14} {s.duration_ms:>7} ms  {s.result_hash}")


async def cancel(args: argparse.Namespace) -> int:
    async with await open_db() as db:
        item = await db.cancel(args.id, args.reason)
    if args.json:
        print_json(item)
    elif item.state == State.CANCELLED:
        print(f"cancelled {item.id}")
    else:
        print(f"cancellation of {item.id} requested: it is {item.state}; the engine running it "
              "stops the focus and ends it dead")
    return 0


async def retry(args: argparse.Namespace) -> int:
    async with await open_db() as db:
        item = await db.get_work_item(args.id)
        if item.state == State.DEAD:
            result = await governed(db).replay(item.id, source="cli",
                                               from_step=args.from_step)
            if args.json:
                print_json(result)
            elif args.from_step and isinstance(result, Merged):  # live work holds its key
                print(f"replayed {item.id}: merged into {result.canonical_id} (no steps "
                      "copied)")
            else:
                print(f"replayed {item.id} as {result.id}"
                      + (f" from step {args.from_step}" if args.from_step else ""))
        elif args.from_step:
            raise InvalidInput(
                f"work item {item.id} is {item.state}: --from-step replays a dead item (a "
                "retried item replays all of its recorded steps; rerun a finished one with "
                "animus work rerun --from-step)")
        else:
            again = await db.retry(item.id, reason="retried from the command line")
            if args.json:
                print_json(again)
            else:
                print(f"queued {item.id} for another attempt")
    return 0
