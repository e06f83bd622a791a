"""Following a work item from the command line (``--wait``, ``animus work follow``): its
audit trail as it grows, one line per change, and, when the wait ends first, what the item
is waiting for; and the warning at submit when no live engine will run its type."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterable
from typing import Any, TextIO
from uuid import UUID

from animus_core.store import read
from animus_core.store.audit import AuditEvent
from animus_core.store.db import Db
from animus_core.values.engines import stuck_work
from animus_core.values.states import State
from animus_core.values.work import WorkItem

__all__ = ["describe_event", "follow", "no_engine_for", "no_engine_for_each", "why_unfinished"]

POLL = 0.2  # seconds between looks at the item's audit trail


async def follow(db: Db, work_id: UUID, timeout: float, *, out: TextIO | None = None
                 ) -> WorkItem:
    """Print each new audit event of the item (to ``out``, default standard error) until it
    finishes or ``timeout`` seconds have passed; return the item as it is then."""
    out = out or sys.stderr
    deadline = time.monotonic() + timeout
    seen = 0
    while True:
        history = await db.history(work_id)
        for event in history[seen:]:
            line = describe_event(event)
            if line:
                print(f"  {event.at.strftime('%H:%M:%S')}  {line}", file=out, flush=True)
        seen = len(history)
        item = await db.get_work_item(work_id)
        if item.state.terminal or time.monotonic() > deadline:
            return item
        await asyncio.sleep(POLL)


def describe_event(e: AuditEvent) -> str:
    """One line for an audit event, as a person following the item wants it."""
    p, actor = e.payload, e.provenance.get("actor") or e.db_user
    attempt = p.get("attempts")
    match e.event:
        case "submitted":
            return f"submitted by {e.db_user}" + (f" ({e.to_state})" if e.to_state not in
                                                  (None, "queued") else "")
        case "claimed":
            return f"claimed by {actor}"
        case "running":
            return f"attempt {attempt} running"
        case "failed":
            return f"attempt {attempt} failed: {_short(p.get('error') or p.get('reason'))}"
        case "queued" | "dead" | "completed" | "cancelled" | "merged" | "awaiting_approval":
            detail = p.get("reason") or ""
            if e.event == "completed" and p.get("duration_ms") is not None:
                detail = f"in {p['duration_ms']} ms"
            return f"{e.event}" + (f": {_short(detail)}" if detail else "")
        case "suspended":
            return _said("waiting", p.get("reason"))
        case "woken":
            return _said("woken", p.get("reason"))
        case "step":
            return f"step {p.get('position')} {p.get('name')!r} recorded"
        case "signal":
            return f"signal {p.get('event')!r} from {p.get('sent_by')}"
        case "approval" | "rejection":
            return f"{e.event} by {e.db_user}"
        case "changed":
            return ""  # columns of the item, not a step of its progress
    return e.event


def _short(text: Any, limit: int = 160) -> str:
    s = "" if text is None else str(text)
    return s if len(s) <= limit else s[: limit - 3] + "..."


async def no_engine_for(db: Db, work_type: str, queue: str) -> str | None:
    """Why no live engine would run work of ``work_type`` in ``queue`` now, or None when one
    would (one read of the fleet's status)."""
    return (await no_engine_for_each(db, [work_type], queue)).get(work_type)


async def no_engine_for_each(db: Db, work_types: Iterable[str], queue: str) -> dict[str, str]:
    """For each of ``work_types`` that no live engine would run in ``queue`` now: why (one
    read of the fleet's status)."""
    view = await read.status(db)
    return {t: why for t in work_types if (why := _no_engine_in(view, t, queue)) is not None}


def _no_engine_in(view: read.Status, work_type: str, queue: str) -> str | None:
    if queue not in {q.queue for q in view.queues}:
        return None  # the submission itself fails, saying so
    serving = [e for e in view.engines if queue in e.queues]
    stuck = stuck_work(serving, {work_type: 1})
    if not stuck:
        return None
    if stuck[0].reason == "no engine is running" and any(not e.lost for e in view.engines):
        return f"no live engine serves queue {queue!r}"
    return stuck[0].reason


async def why_unfinished(db: Db, item: WorkItem) -> str:
    """What a work item that has not finished is waiting for, in a sentence."""
    if item.state == State.QUEUED:  # one read of the fleet says both why and how many ahead
        view = await read.status(db)
        why = _no_engine_in(view, item.work_type, item.queue)
        if why is not None:
            return f"it is queued and no live engine will run it: {why}"
        ahead = view.queued().get(item.work_type, 1) - 1
        return (f"it is queued behind {max(0, ahead)} other {item.work_type!r} items; "
                "the engines that run it are busy (`animus status` shows them)")
    if item.state == State.RUNNING:
        return f"attempt {item.attempts} is still running"
    if item.state in (State.WAITING, State.AWAITING_APPROVAL):
        return "it is " + _said(str(item.state), item.reason)
    return f"it is {item.state}" + (f": {item.reason}" if item.reason else "")


def _said(what: str, reason: Any) -> str:
    """``what: reason``, unless the reason starts with it already ("woken: signal 'go'
    arrived", "waiting for 2 children")."""
    text = _short(reason)
    return text if text.startswith(what) else f"{what}: {text}"
