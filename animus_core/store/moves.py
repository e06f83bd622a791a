"""The moves of work items: claim, start, lease extension, and how an attempt ends
(complete, fail, release, retry, dead-letter, cancel).

Each move is one SQL function call (one round trip, one transaction). The functions run as
the schema's owner, check the lease and the transition themselves, and the database writes
the audit rows in the same transaction (see docs/governance.md, Roles).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from uuid import UUID

import asyncpg
import msgspec

from animus_core.store.base import DEFAULT_QUEUE, check_reason, transition, work_id
from animus_core.store.errors import errors
from animus_core.store.records import (
    copy_executions,
    execution_json,
    executions_json,
    then_record_executions,
)
from animus_core.store.steps import WorkSteps
from animus_core.values import json_values
from animus_core.values.errors import IllegalTransition, InvalidInput, LeaseLost
from animus_core.values.limits import limits
from animus_core.values.records import ExecutionRecord
from animus_core.values.states import State
from animus_core.values.steps import StepRecord
from animus_core.values.work import Claimed, Lease, WorkItem

__all__ = ["DeadLetter", "Retry", "WorkMoves"]

_MAX_DELAY = 7 * 86_400
_COMPLETE = "SELECT animus.complete($1, $2, $3, $4::text[]::jsonb[], $5)"
_COMPLETE_RECORDED = then_record_executions(_COMPLETE, 6)


class Retry(msgspec.Struct, frozen=True):
    """After a failed attempt: queue the item again, visible after ``delay`` seconds."""

    delay: float
    reason: str | None = None


class DeadLetter(msgspec.Struct, frozen=True):
    """After a failed attempt: end the item ``dead`` with ``reason``."""

    reason: str


class WorkMoves(WorkSteps):
    """Claiming work and ending attempts."""

    async def claim(
        self,
        queue: str = DEFAULT_QUEUE,
        *,
        limit: int = 1,
        lease_seconds: int = 30,
        work_types: Sequence[str] | None = None,
        start: bool = False,
        max_attempts: Mapping[str, int] | None = None,
    ) -> list[Claimed]:
        """Claim up to ``limit`` visible items, highest priority first.

        The lease is the pgmq visibility timeout: unless extended, the item is claimable again
        after ``lease_seconds``. With ``start=True`` the items also move to ``running`` (one
        attempt each) in the same UPDATE, audited as both steps. ``max_attempts`` maps work
        types to the attempt limit of the faculty that runs them, which overrides the item's
        own: the claim writes it into each item it applies to (audited as a change).
        """
        sql, args = claim_call(queue, limit, lease_seconds, work_types, start, max_attempts)
        async with self.connection() as conn:  # one statement: atomic without BEGIN/COMMIT
            rows = await conn.fetch(f"SELECT * FROM {sql}", *args)
        return claimed_from(rows, start)

    async def start(self, lease: Lease) -> WorkItem:
        """``claimed -> running``: the focus begins; counts one attempt."""
        async with self.connection() as conn:
            row = await conn.fetchrow("SELECT * FROM animus.start($1, $2, $3)",
                                      lease.work_id, lease.msg_id, lease.token)
        transition("claimed", "running")
        return WorkItem.from_row(row)

    async def extend_lease(self, leases: Sequence[Lease], seconds: int) -> list[Lease]:
        """Push the visibility timeout of held items ``seconds`` from now. Returns the leases
        that are lost (not extended): the item was claimed again after the lease ran out, or
        its attempt was taken back as lost."""
        if not leases:
            return []
        lost: list[Lease] = []
        async with self.connection() as conn:
            for queue in {lease.queue for lease in leases}:
                mine = [le for le in leases if le.queue == queue]
                rows = await conn.fetch(
                    "SELECT * FROM animus.extend_leases($1, $2, $3, $4, $5)",
                    queue, [le.work_id for le in mine], [le.msg_id for le in mine],
                    [le.token for le in mine], seconds,
                )
                gone = {r[0] for r in rows}
                lost += [le for le in mine if le.work_id in gone]
        return lost

    async def complete(
        self, lease: Lease, data: Any = None, *, duration_ms: int | None = None
    ) -> None:
        """``running -> completed`` with the outcome; the message is archived."""
        await self.complete_many([(lease, data, duration_ms)])

    async def complete_many(self, done: Sequence[tuple[Lease, Any, int | None]],
                            *, conn: asyncpg.Connection | None = None,
                            executions: Sequence[ExecutionRecord] = (),
                            steps: Sequence[tuple[Lease, StepRecord]] = ()) -> None:
        """Complete a batch in one round trip. Raises :class:`LeaseLost` or
        :class:`IllegalTransition` (and completes none) if any lease is not held.

        An outcome may be given encoded already (a :class:`msgspec.Raw` of JSON text that
        :func:`animus_core.values.json_values.encode` made, within the outcome limit).
        ``steps`` are steps of these attempts not recorded yet (a resumed wait's): recorded
        first, in the same transaction. With ``conn``, the completion joins that
        connection's open transaction."""
        if not done:
            return
        # The outcomes go as JSON text: in a jsonb[] argument asyncpg would take a list
        # outcome for a nested array dimension (and keep only its first element).
        data = [_outcome_json(d[1]) for d in done]
        args: tuple[Any, ...] = ([d[0].work_id for d in done], [d[0].msg_id for d in done],
                                 [d[0].token for d in done], data, [d[2] for d in done])
        sql = _COMPLETE
        if executions:  # with the move, in the same statement
            sql, args = _COMPLETE_RECORDED, (*args, executions_json(executions))
        if conn is not None:
            if steps:
                await self.record_steps(steps, conn=conn)
            with errors():
                await conn.execute(sql, *args)
        else:
            async with self.connection() as c:
                if not steps:  # one statement: atomic without BEGIN/COMMIT
                    await c.execute(sql, *args)
                else:
                    async with c.transaction():
                        await self.record_steps(steps, conn=c)
                        await c.execute(sql, *args)
        transition("running", "completed", len(done))  # counted once it is done

    async def fail(self, lease: Lease, error: str, *, duration_ms: int | None = None,
                   execution: ExecutionRecord | None = None) -> WorkItem:
        """``running -> failed`` with the reason. Follow with :meth:`retry` or :meth:`dead_letter`
        (or use :meth:`fail_attempt`, which does both in one call).

        ``execution``, the attempt's record, is appended in the same transaction: only while
        the lease is held, so that an attempt taken back as lost keeps its one record."""
        check_reason(error)
        async with self.connection() as conn, conn.transaction():
            row = await conn.fetchrow("SELECT * FROM animus.fail($1, $2, $3, $4, $5)",
                                      lease.work_id, lease.msg_id, lease.token, error,
                                      duration_ms)
            if execution is not None:
                await copy_executions(conn, [execution])
        transition("running", "failed")
        return WorkItem.from_row(row)

    async def fail_attempt(self, lease: Lease, error: str, *, then: Retry | DeadLetter,
                           duration_ms: int | None = None,
                           execution: ExecutionRecord | None = None,
                           usage: dict[str, Any] | None = None) -> WorkItem:
        """End a failed attempt in one round trip and one transaction: add its model
        ``usage`` to the item's totals, record ``running -> failed`` with ``error`` and the
        attempt's ``execution`` record, then :class:`Retry` or :class:`DeadLetter` as
        ``then`` says. Returns the item as it is left (queued or dead).

        A lost lease raises :class:`LeaseLost` and changes nothing but the usage totals:
        what the attempt spent is kept."""
        check_reason(error)
        delay = None
        if isinstance(then, Retry):
            delay = _check_delay(then.delay)
        if then.reason is not None:
            check_reason(then.reason)
        try:
            async with self.connection() as conn:
                row = await conn.fetchrow(
                    "SELECT * FROM animus.fail_attempt($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    lease.work_id, lease.msg_id, lease.token, error, duration_ms,
                    execution_json(execution), usage, delay, then.reason)
        except LeaseLost:
            if usage:
                await self.record_usage(lease.work_id, usage)
            raise
        transition("running", "failed")
        transition("failed", "queued" if delay is not None else "dead")
        return WorkItem.from_row(row)

    async def cancel_attempt(self, lease: Lease, *, duration_ms: int | None = None,
                             execution: ExecutionRecord | None = None) -> WorkItem:
        """A requested cancellation stopped the attempt: ``running -> failed -> dead`` in
        one round trip, the reason (and the execution record's error) saying who asked,
        as ``cancelled while running: <request>``. Returns the dead item."""
        async with self.connection() as conn:
            row = await conn.fetchrow(
                "SELECT * FROM animus.cancel_attempt($1, $2, $3, $4, $5, $6)",
                lease.work_id, lease.msg_id, lease.token, duration_ms,
                execution_json(execution), limits().reason_chars)
        transition("running", "failed")
        transition("failed", "dead")
        return WorkItem.from_row(row)

    async def release(self, lease: Lease, reason: str) -> WorkItem:
        """``claimed|running -> queued`` without counting a failure (shutdown, could not start).

        An attempt already counted by :meth:`start` is given back."""
        check_reason(reason)
        async with self.connection() as conn:
            row = await conn.fetchrow(
                "SELECT r.was, (r.item).* FROM animus.release($1, $2, $3, $4) r",
                lease.work_id, lease.msg_id, lease.token, reason)
        transition(row["was"], "queued")
        return WorkItem.from_row(row)

    async def retry(
        self, work_id: UUID | str, *, delay: float = 0.0, reason: str | None = None
    ) -> WorkItem:
        """``failed -> queued``, visible again after ``delay`` seconds."""
        wid = _id(work_id)
        delay = _check_delay(delay)
        if reason is not None:
            check_reason(reason)
        async with self.connection() as conn:
            updated = await conn.fetchrow("SELECT * FROM animus.retry($1, $2, $3)",
                                          wid, delay, reason)
        transition("failed", "queued")
        return WorkItem.from_row(updated)

    async def dead_letter(self, work_id: UUID | str, reason: str) -> WorkItem:
        """End an item as ``dead`` with a reason (from queued, failed, or running via failed).
        An item awaiting approval is refused: a decision ends it (:meth:`decide`)."""
        wid = _id(work_id)
        check_reason(reason)
        async with self.connection() as conn:
            row = await conn.fetchrow(
                "SELECT r.was, (r.item).* FROM animus.dead_letter($1, $2) r", wid, reason)
        transition(row["was"], "dead")
        return WorkItem.from_row(row)

    async def cancel(self, work_id: UUID | str, reason: str = "cancelled") -> WorkItem:
        """``queued -> cancelled``. A claimed or running item cannot go to ``cancelled``
        (docs/concepts.md, States and transitions): the request is recorded and audited, and
        the engine running it stops the focus and ends the item ``dead`` with ``reason``."""
        wid = _id(work_id)
        check_reason(reason)
        try:
            async with self.connection() as conn:
                row = await conn.fetchrow("SELECT * FROM animus.cancel($1, $2)", wid, reason)
        except IllegalTransition:
            state = (await self.get_work_item(wid)).state
            if not state.terminal:
                raise
            raise IllegalTransition(f"work item {wid} is already {state}: there is nothing to "
                                    f"cancel (no transition {state} -> cancelled)") from None
        item = WorkItem.from_row(row)
        if item.state == State.CANCELLED:  # otherwise it was a request
            transition("queued", "cancelled")
        return item


_id = work_id


def _check_delay(delay: float) -> float:
    if not 0 <= delay <= _MAX_DELAY:  # also refuses NaN
        raise InvalidInput(f"retry delay must be from 0 to {_MAX_DELAY} seconds, got {delay}")
    return float(delay)


def _outcome_json(data: Any) -> str | None:
    if data is None:
        return None
    if isinstance(data, msgspec.Raw):  # checked and encoded by the caller
        return bytes(data).decode()
    return json_values.encode(data, "outcome", limit=limits().outcome_bytes,
                              setting="ANIMUS_MAX_OUTCOME_BYTES")


def claim_call(queue: str, limit: int, lease_seconds: int, work_types: Sequence[str] | None,
               start: bool, max_attempts: Mapping[str, int] | None) -> tuple[str, list[Any]]:
    """The call of ``animus.claim`` for these arguments, and its arguments."""
    if limit < 1 or lease_seconds < 1:
        raise InvalidInput("claim needs limit >= 1 and lease_seconds >= 1")
    args: list[Any] = [queue, limit, lease_seconds, list(work_types) if work_types else None,
                       start]
    if max_attempts:
        return "animus.claim($1, $2, $3, $4, $5, $6) AS c", [*args, dict(max_attempts)]
    return "animus.claim($1, $2, $3, $4, $5) AS c", args


def claimed_from(rows: list[Any], start: bool) -> list[Claimed]:
    """The claims of the rows ``animus.claim`` returned, sorted in place by priority, then
    by message id (items taken back from expired leases come after the rest in the rows)."""
    rows.sort(key=lambda r: (-r["priority"], r["msg_id"]))
    if rows:
        transition("queued", "claimed", len(rows))
        if start:
            transition("claimed", "running", len(rows))
    return [
        Claimed(
            item=WorkItem.from_row(r),
            lease=Lease(work_id=r["id"], queue=r["queue"], msg_id=r["msg_id"], token=r["lease"]),
        )
        for r in rows
    ]
