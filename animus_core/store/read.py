"""The read model: what ``animus status``, ``animus work list`` and the engine's reports
read, as msgspec structs, one query per view."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec

from animus_core.store.base import DbBase, work_id
from animus_core.values.engines import Engine, StuckWork, stuck_work
from animus_core.values.errors import InvalidInput, WorkNotFound
from animus_core.values.states import State
from animus_core.values.work import WorkItem

__all__ = ["DeadItem", "PendingApproval", "QueueDepth", "ScheduleTick", "Status", "WaitingItem",
           "WaitingKind", "WorkCount", "WorkReads", "next_wakes", "pending_approvals",
           "queue_depths", "status", "unroutable_backlog"]


class QueueDepth(msgspec.Struct, frozen=True, kw_only=True):
    queue: str
    depth: int
    oldest_seconds: int | None


class WorkCount(msgspec.Struct, frozen=True, kw_only=True):
    work_type: str
    state: str
    n: int
    #: when the oldest of them was submitted
    oldest: datetime | None = None


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
    """What ``animus status`` shows: the registered engines (live and lost), queues, live
    work by type and state (finished work left out, dead work kept), the latest dead
    letters, each schedule's latest tick, the waiting items by kind and the first of them
    to wake; ``now`` is the database's clock when it was read."""

    now: datetime
    engines: list[Engine]
    queues: list[QueueDepth]
    work: list[WorkCount]
    dead: list[DeadItem]
    schedules: list[ScheduleTick]
    waiting: list[WaitingKind] = []
    next_waking: list[WaitingItem] = []

    def queued(self) -> dict[str, int]:
        """Queued items by work type."""
        return {c.work_type: c.n for c in self.work if c.state == "queued"}

    def stuck(self) -> list[StuckWork]:
        """Queued work that no live engine will run, and why."""
        return stuck_work(self.engines, self.queued())


_QUEUE_DEPTHS = "SELECT queue_name, queue_length, oldest_msg_age_sec FROM pgmq.metrics_all()"
_status = msgspec.json.Decoder(Status)


async def queue_depths(db: DbBase) -> list[QueueDepth]:
    """Every pgmq queue's depth and the age of its oldest message."""
    async with db.connection() as conn:
        rows = await conn.fetch(_QUEUE_DEPTHS)
    return [QueueDepth(queue=r[0], depth=r[1], oldest_seconds=r[2]) for r in rows]


async def status(db: DbBase, *, dead_letters: int = 5, waiting: int = 5) -> Status:
    """The :class:`Status` view: one query (``animus.status_view``), which needs only the
    reader role."""
    async with db.connection() as conn:
        text = await conn.fetchval("SELECT animus.status_view($1, $2)::text", dead_letters,
                                   waiting)
    return _status.decode(text)


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


class PendingApproval(msgspec.Struct, frozen=True, kw_only=True):
    """A decision people owe: an item held at its submit gate (``kind`` ``submit``) or a
    focus waiting at an approval (``focus``, at step ``position``)."""

    id: UUID
    work_type: str
    kind: str
    role: str
    quorum: int
    why: str | None
    rule: str | None
    requested_by: str | None
    since: datetime
    until: str | None
    position: int | None
    #: who approved so far (whether each counts for the role is the database's to say at
    #: the decision)
    approvers: list[str]


_PENDING = """
    SELECT w.id, w.work_type, w.requested_by,
           -- since it waits: a gate from its submission, a focus's approval from its
           -- suspension (each decision updates the item: its updated_at moves)
           CASE WHEN w.state = 'awaiting_approval' THEN w.created_at
                ELSE coalesce((SELECT max(a.at) FROM animus.audit_log a
                                WHERE a.work_id = w.id AND a.event = 'suspended'),
                              w.updated_at) END AS since,
           CASE WHEN w.state = 'awaiting_approval' THEN 'submit' ELSE 'focus' END AS kind,
           coalesce(w.gate->>'role', w.wait->>'role') AS role,
           coalesce((w.gate->>'quorum')::int, (w.wait->>'quorum')::int, 1) AS quorum,
           coalesce(w.gate->>'reason', w.wait->>'why') AS why, w.gate->>'rule' AS rule,
           CASE WHEN w.state = 'waiting' THEN w.wait->>'until' END AS until,
           CASE WHEN w.state = 'waiting' THEN (w.wait->>'position')::int END AS position,
           coalesce((SELECT array_agg(a.approver ORDER BY a.at, a.id) FROM animus.approvals a
                      WHERE a.work_id = w.id AND a.decision = 'approve'
                        AND a.position IS NOT DISTINCT FROM
                            CASE WHEN w.state = 'waiting' THEN (w.wait->>'position')::int END),
                    '{}') AS approvers
      FROM (SELECT * FROM animus.work_items WHERE state = 'awaiting_approval'
            UNION ALL  -- two index ranges (an OR of them made the planner read every item)
            SELECT * FROM animus.work_items
             WHERE state = 'waiting' AND wait->>'kind' = 'approval') w
     ORDER BY since, w.id
     LIMIT $1"""


async def pending_approvals(db: DbBase, *, limit: int = 1000) -> list[PendingApproval]:
    """The decisions people owe, oldest first (one query; the reader role reads it)."""
    async with db.connection() as conn:
        rows = await conn.fetch(_PENDING, limit)
    return [PendingApproval(id=r["id"], work_type=r["work_type"], kind=r["kind"],
                            role=r["role"] or "approver", quorum=r["quorum"], why=r["why"],
                            rule=r["rule"], requested_by=r["requested_by"], since=r["since"],
                            until=r["until"], position=r["position"],
                            approvers=list(r["approvers"])) for r in rows]


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
        source: str | None = None,
        exclude_types: Sequence[str] = (),
    ) -> list[WorkItem]:
        """Newest first, of ``work_type`` and ``source`` if given, not of ``exclude_types``.
        Page with ``before=<id of the last item of the previous page>``."""
        states: list[str] | None = None
        if state is not None:
            raw = [state] if isinstance(state, str) else list(state)
            try:
                states = [State(s).value for s in raw]
            except ValueError:
                raise InvalidInput(
                    f"unknown state in {raw!r}: states are {', '.join(s.value for s in State)}"
                ) from None
        if not 1 <= limit <= 10_001:  # a page of 10000, and one more to say whether more exist
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
                      AND ($7::text IS NULL OR source = $7)
                      AND NOT (work_type = ANY ($8::text[]))
                    ORDER BY created_at DESC, id DESC LIMIT $6""",
                states, work_type, _id(parent_id) if parent_id else None, created_since,
                cursor, limit, source, list(exclude_types),
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
