"""The read model: what ``animus status``, ``animus work list`` and the engine's reports
read, as msgspec structs, one query per view."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec

from animus_core.store.base import DbBase, work_id
from animus_core.values.errors import InvalidInput, WorkNotFound
from animus_core.values.states import State
from animus_core.values.work import WorkItem

__all__ = ["DeadItem", "QueueDepth", "ScheduleTick", "Status", "WaitingItem", "WaitingKind", "WorkCount",
           "WorkReads",
           "next_wakes", "queue_depths", "status", "unroutable_backlog"]


class QueueDepth(msgspec.Struct, frozen=True, kw_only=True):
    queue: str
    depth: int
    oldest_seconds: int | None


class WorkCount(msgspec.Struct, frozen=True, kw_only=True):
    work_type: str
    state: str
    n: int


class DeadItem(msgspec.Struct, frozen=True, kw_only=True):
    id: UUID
    work_type: str
    reason: str | None
    resolved_at: datetime | None


class ScheduleTick(msgspec.Struct, frozen=True, kw_only=True):
    """A schedule's latest tick, and the type of the work it submitted."""

    name: str
    last_tick: datetime
    work_type: str | None


class WaitingItem(msgspec.Struct, frozen=True, kw_only=True):
    """A waiting item: what it waits for (``wait``, and ``reason`` in words) and its timer."""

    id: UUID
    work_type: str
    wait: dict[str, Any] | None
    wake_at: datetime | None
    reason: str | None


class WaitingKind(msgspec.Struct, frozen=True, kw_only=True):
    """How many items wait for a ``kind`` of thing, and the earliest of their timers."""

    kind: str
    n: int
    next_wake_at: datetime | None


class Status(msgspec.Struct, frozen=True, kw_only=True):
    """What ``animus status`` shows: queues, live work by type and state (finished work
    left out, dead work kept), the latest dead letters, each schedule's latest tick, the
    waiting items by kind and the first of them to wake."""

    queues: list[QueueDepth]
    work: list[WorkCount]
    dead: list[DeadItem]
    schedules: list[ScheduleTick]
    waiting: list[WaitingKind] = []
    next_waking: list[WaitingItem] = []


_QUEUE_DEPTHS = "SELECT queue_name, queue_length, oldest_msg_age_sec FROM pgmq.metrics_all()"
_LIVE_COUNTS = """
    SELECT work_type, state::text, count(*) AS n FROM animus.work_items
     WHERE state NOT IN ('completed', 'merged', 'cancelled')
     GROUP BY 1, 2 ORDER BY 1, 2"""
_LATEST_DEAD = """
    SELECT id, work_type, reason, resolved_at FROM animus.work_items
     WHERE state = 'dead' ORDER BY resolved_at DESC NULLS LAST LIMIT $1"""
_WAITING_KINDS = """
    SELECT coalesce(wait->>'kind', '?'), count(*), min(wake_at) FROM animus.work_items
     WHERE state = 'waiting' GROUP BY 1 ORDER BY 1"""
_NEXT_WAKING = """
    SELECT id, work_type, wait, wake_at, reason FROM animus.work_items
     WHERE state = 'waiting' ORDER BY wake_at NULLS LAST, updated_at LIMIT $1"""
_LATEST_TICKS = """
    SELECT t.name, t.tick, w.work_type
      FROM (SELECT DISTINCT ON (name) name, tick, work_id FROM animus.schedule_ticks
             ORDER BY name, tick DESC) t
      LEFT JOIN animus.work_items w ON w.id = t.work_id
     ORDER BY t.name"""


async def queue_depths(db: DbBase) -> list[QueueDepth]:
    """Every pgmq queue's depth and the age of its oldest message."""
    async with db.connection() as conn:
        rows = await conn.fetch(_QUEUE_DEPTHS)
    return [QueueDepth(queue=r[0], depth=r[1], oldest_seconds=r[2]) for r in rows]


async def status(db: DbBase, *, dead_letters: int = 5, waiting: int = 5) -> Status:
    """The :class:`Status` view, read on one connection."""
    async with db.connection() as conn:
        queues = await conn.fetch(_QUEUE_DEPTHS)
        counts = await conn.fetch(_LIVE_COUNTS)
        dead = await conn.fetch(_LATEST_DEAD, dead_letters)
        kinds = await conn.fetch(_WAITING_KINDS)
        waking = await conn.fetch(_NEXT_WAKING, waiting) if kinds else []
        ticks = await conn.fetch(_LATEST_TICKS) if await conn.fetchval(
            "SELECT to_regclass('animus.schedule_ticks') IS NOT NULL") else []
    return Status(
        queues=[QueueDepth(queue=r[0], depth=r[1], oldest_seconds=r[2]) for r in queues],
        work=[WorkCount(work_type=r[0], state=r[1], n=r[2]) for r in counts],
        dead=[DeadItem(id=r[0], work_type=r[1], reason=r[2], resolved_at=r[3]) for r in dead],
        schedules=[ScheduleTick(name=r[0], last_tick=r[1], work_type=r[2]) for r in ticks],
        waiting=[WaitingKind(kind=r[0], n=r[1], next_wake_at=r[2]) for r in kinds],
        next_waking=[WaitingItem(id=r[0], work_type=r[1], wait=r[2], wake_at=r[3],
                                 reason=r[4]) for r in waking])


async def unroutable_backlog(db: DbBase, accepted: Sequence[str]) -> list[WorkCount]:
    """Queued work of each type not in ``accepted``, by type."""
    async with db.connection() as conn:
        rows = await conn.fetch(
            """SELECT work_type, count(*) FROM animus.work_items
                WHERE state = 'queued' AND NOT (work_type = ANY ($1::text[]))
                GROUP BY work_type""", list(accepted))
    return [WorkCount(work_type=r[0], state="queued", n=r[1]) for r in rows]


async def next_wakes(db: DbBase, queues: Sequence[str],
                     work_types: Sequence[str]) -> dict[str, tuple[datetime | None, bool]]:
    """For each of ``work_types`` with waiting items in ``queues`` that have a timer: the
    earliest timer still to run out (None: none), and whether some timer has run out
    already (its item is claimable now). One index-only query."""
    async with db.connection() as conn:
        rows = await conn.fetch(
            """SELECT t.work_type, w.next, w.due
                 FROM unnest($2::text[]) AS t(work_type)
                 CROSS JOIN LATERAL (
                     SELECT min(w.wake_at) FILTER (WHERE w.wake_at > now()) AS next,
                            coalesce(bool_or(w.wake_at <= now()), false) AS due
                       FROM animus.work_items w
                      WHERE w.state = 'waiting' AND w.wake_at IS NOT NULL
                        AND w.queue = ANY ($1::text[]) AND w.work_type = t.work_type) w
                WHERE w.next IS NOT NULL OR w.due""", list(queues), list(work_types))
    return {r[0]: (r[1], r[2]) for r in rows}


class WorkReads(DbBase):
    """Reading work items."""

    async def get_work_item(self, work_id: UUID | str) -> WorkItem:
        wid = _id(work_id)
        async with self.connection() as conn:
            row = await conn.fetchrow("SELECT * FROM animus.work_items WHERE id = $1", wid)
        if row is None:
            raise WorkNotFound(f"no work item with id {wid}")
        return WorkItem.from_row(row)

    async def list_work(
        self,
        *,
        state: State | str | Iterable[State | str] | None = None,
        work_type: str | None = None,
        parent_id: UUID | str | None = None,
        created_since: datetime | None = None,
        limit: int = 100,
        before: UUID | str | None = None,
    ) -> list[WorkItem]:
        """Newest first. Page with ``before=<id of the last item of the previous page>``."""
        states: list[str] | None = None
        if state is not None:
            raw = [state] if isinstance(state, str) else list(state)
            try:
                states = [State(s).value for s in raw]
            except ValueError:
                raise InvalidInput(
                    f"unknown state in {raw!r}: states are {', '.join(s.value for s in State)}"
                ) from None
        if not 1 <= limit <= 10_000:
            raise InvalidInput(f"limit must be from 1 to 10000, got {limit}")
        cursor = _id(before) if before is not None else None
        async with self.connection() as conn:
            rows = await conn.fetch(
                """SELECT * FROM animus.work_items
                    WHERE ($1::animus.work_state[] IS NULL OR state = ANY ($1))
                      AND ($2::text IS NULL OR work_type = $2)
                      AND ($3::uuid IS NULL OR parent_id = $3)
                      AND ($4::timestamptz IS NULL OR created_at >= $4)
                      AND ($5::uuid IS NULL OR (created_at, id) <
                           (SELECT c.created_at, c.id FROM animus.work_items c WHERE c.id = $5))
                    ORDER BY created_at DESC, id DESC LIMIT $6""",
                states, work_type, _id(parent_id) if parent_id else None, created_since,
                cursor, limit,
            )
        if not rows and cursor is not None:
            await self.get_work_item(cursor)  # raises WorkNotFound for an unknown cursor
        return [WorkItem.from_row(r) for r in rows]

    async def cancel_requests(self, work_ids: Sequence[UUID]) -> list[UUID]:
        """Which of these items someone asked to cancel while they run."""
        async with self.connection() as conn:
            rows = await conn.fetch(
                """SELECT id FROM animus.work_items WHERE id = ANY($1::uuid[])
                      AND cancel_requested IS NOT NULL AND state IN ('claimed', 'running')""",
                list(work_ids))
        return [r[0] for r in rows]


_id = work_id
