"""Suspension in the store: a running attempt suspends (``running -> waiting``), signals are
sent to items and taken by their waits, and the decisions on an approval inside a focus are
read by the attempt that resumes from it. A waiting item's timer is its queue message's
visibility: the claim that finds it visible wakes it (``waiting -> queued``) and claims it.
See ``0017_waiting.sql``, ``0019_focus_approvals.sql`` and docs/concepts.md, Waiting."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec

from animus_core.store.base import transition, work_id
from animus_core.store.moves import WorkMoves, claim_call, claimed_from
from animus_core.store.records import execution_json
from animus_core.values import json_values
from animus_core.values.errors import InvalidInput
from animus_core.values.limits import limits
from animus_core.values.records import ExecutionRecord
from animus_core.values.states import State
from animus_core.values.steps import Step
from animus_core.values.waits import Approval, Resume, Signal, Wait
from animus_core.values.work import Claimed, Lease, WorkItem, check_name

__all__ = ["Signalled", "WorkWaits"]

# Whether the approver counts: a superuser, or a member of the gate's role now (as
# Db.approvers counts a submit gate's approvals before engage).
_GATE_DECISIONS = """
    SELECT a.approver, a.decision, a.reason, a.at, a.position,
           coalesce(r.rolsuper OR CASE WHEN EXISTS (
                        SELECT 1 FROM pg_roles WHERE rolname = 'animus_' || $3)
                    THEN pg_has_role(r.oid, 'animus_' || $3, 'MEMBER') ELSE false END,
                    false) AS counts
      FROM animus.approvals a
      LEFT JOIN pg_roles r ON r.rolname = a.approver
     WHERE a.work_id = $1 AND a.position = $2
     ORDER BY a.at, a.id"""

# The item's steps, then (signal_id not null) the signal its wait at $2 for event $3 took
_RESUME = """
    SELECT work_id, position, name, attempt, result, result_hash, started_at, finished_at,
           duration_ms, copied_from, NULL::bigint AS signal_id, NULL::text AS sent_by
      FROM animus.steps WHERE work_id = $1
    UNION ALL
    SELECT work_id, consumed_by_position, event, NULL, payload, NULL, sent_at, consumed_at,
           NULL, NULL, id, sent_by
      FROM animus.signals
     WHERE work_id = $1 AND consumed_by_position = $2 AND event = $3
     ORDER BY signal_id NULLS FIRST, position"""

# The claim of an engine: the items claimed and started, and for each that ran before (or
# has copied steps, or a kept wait) its recorded steps and the signal its wait took, so that
# the attempt reads nothing more before it replays them. The signal is ordered by an
# expression of its id that no index supplies, so that it is found through its item whatever
# the statistics said when the plan was made (see migration 0047).
_CLAIM_RESUMING = """
    SELECT c.*,
           CASE WHEN c.attempts > 1 OR c.replay_of IS NOT NULL OR c.wait IS NOT NULL THEN
               coalesce((SELECT jsonb_agg(to_jsonb(s) ORDER BY s.position)
                           FROM animus.steps s WHERE s.work_id = c.id), '[]')
           END AS resume_steps,
           CASE WHEN c.wait->>'kind' = 'event' THEN
               (SELECT to_jsonb(sg) FROM animus.signals sg
                 WHERE sg.work_id = c.id AND sg.event = c.wait->>'event'
                   AND sg.consumed_by_position = (c.wait->>'position')::int
                 ORDER BY sg.id + 0 LIMIT 1)
           END AS resume_signal
      FROM {call}"""


_SIGNALS = """
    SELECT id, work_id, event, payload, sent_by, sent_at, consumed_by_position, consumed_at
      FROM animus.signals WHERE work_id = $1 ORDER BY id"""


class Signalled(msgspec.Struct, frozen=True, kw_only=True):
    """What :meth:`WorkWaits.signal` did: the signal's id, and whether it woke the item (it
    was waiting for that event)."""

    signal_id: int
    woke: bool


class WorkWaits(WorkMoves):
    """Suspending attempts, and signals."""

    async def suspend(self, lease: Lease, wait: Wait, *, wake_at: datetime | None,
                      duration_ms: int | None = None,
                      execution: ExecutionRecord | None = None) -> WorkItem:
        """``running -> waiting`` for the attempt that holds ``lease``, in one round trip:
        the item waits for ``wait`` until ``wake_at`` (None: no timer), gives up its lease,
        counts one suspension (not a failure) and keeps the attempt's ``execution`` record
        (result ``suspended``). Its message is hidden until ``wake_at``; engines are told on
        ``animus_work``. A wait for an event whose signal has arrived already (and was not
        taken) is woken in the same call: the item is returned ``queued``. A lost lease
        raises :class:`~animus_core.values.errors.LeaseLost` and changes nothing."""
        if wake_at is not None and wake_at.tzinfo is None:
            raise InvalidInput("wake_at must be timezone-aware")
        if (wait.until is None) != (wake_at is None):
            raise InvalidInput("a wait has a time it ends (until) exactly when it has a timer "
                               f"(wake_at): got until={wait.until!r}, wake_at={wake_at!r}")
        async with self.connection() as conn:
            row = await conn.fetchrow(
                "SELECT * FROM animus.suspend($1, $2, $3, $4, $5, $6, $7)",
                lease.work_id, lease.msg_id, lease.token, msgspec.Raw(msgspec.json.encode(wait)),
                wake_at, duration_ms, execution_json(execution))
        transition("running", "waiting")
        item = WorkItem.from_row(row)
        if item.state == State.QUEUED:  # its signal was there already: woken at once
            transition("waiting", "queued")
        return item

    async def signal(self, work_id: UUID | str, event: str, payload: Any = None) -> Signalled:
        """Send signal ``event`` (with a JSON ``payload``) to an item that has not finished:
        kept until a wait of the item takes it, audited with the sender (the session's
        database user). An item waiting for ``event`` is woken at once. A finished item
        raises :class:`~animus_core.values.errors.IllegalTransition`."""
        check_name(event, "event")
        data = None if payload is None else msgspec.Raw(json_values.encode(
            payload, "signal payload", limit=limits().outcome_bytes,
            setting="ANIMUS_MAX_OUTCOME_BYTES").encode())
        async with self.connection() as conn:
            row = await conn.fetchrow("SELECT * FROM animus.signal($1, $2, $3)",
                                      _id(work_id), event, data)
        if row["woke"]:
            transition("waiting", "queued")
        return Signalled(signal_id=row["signal_id"], woke=row["woke"])

    async def signal_many(self, signals: Iterable[tuple[UUID | str, str, Any]],
                          ) -> list[Signalled | str]:
        """Send many signals in one round trip: ``(work_id, event, payload)`` each, with the
        same meaning and audit rows as :meth:`signal` sent one after the other in the order
        given (a second signal to an item the first one woke finds it ``queued`` and is
        kept). Returns one entry per signal, in the same order: its :class:`Signalled`, or
        the text of why it was not sent (the item has finished, or does not exist), where
        :meth:`signal` would raise; the rest of the batch is sent all the same. A malformed
        event name or payload raises :class:`InvalidInput` (naming its position) and sends
        nothing."""
        ids: list[UUID] = []
        events: list[str] = []
        payloads: list[msgspec.Raw | None] = []
        for i, entry in enumerate(signals):
            if not isinstance(entry, tuple | list) or len(entry) != 3:
                raise InvalidInput(f"signal_many: signal {i} must be (work_id, event, payload), "
                                   f"got {entry!r:.100}")
            wid, event, payload = entry
            try:
                ids.append(_id(wid))
                check_name(event, "event")
                payloads.append(None if payload is None else msgspec.Raw(json_values.encode(
                    payload, "signal payload", limit=limits().outcome_bytes,
                    setting="ANIMUS_MAX_OUTCOME_BYTES").encode()))
            except InvalidInput as e:
                raise InvalidInput(f"signal_many: signal {i}: {e}") from None
            events.append(event)
        if not ids:
            return []
        async with self.connection() as conn:
            rows = await conn.fetch("SELECT * FROM animus.signal_many($1, $2, $3)",
                                    ids, events, payloads)
        out: list[Signalled | str] = [
            Signalled(signal_id=r["signal_id"], woke=r["woke"]) if r["signal_id"] is not None
            else r["error"] for r in rows]
        woke = sum(1 for r in rows if r["woke"])
        if woke:
            transition("waiting", "queued", woke)
        return out

    async def claim_resuming(
        self,
        queue: str,
        *,
        limit: int,
        lease_seconds: int,
        work_types: Sequence[str] | None = None,
        max_attempts: Mapping[str, int] | None = None,
    ) -> list[tuple[Claimed, Resume | None]]:
        """Claim and start up to ``limit`` items, as ``claim(start=True)`` does, in one round
        trip with what each attempt that resumes or retries reads before it runs: its
        :class:`Resume` (None for an item's first attempt, which has no record to read)."""
        sql, args = claim_call(queue, limit, lease_seconds, work_types, True, max_attempts)
        async with self.connection() as conn:  # one statement: atomic without BEGIN/COMMIT
            rows = await conn.fetch(_CLAIM_RESUMING.format(call=sql), *args)
        claimed = claimed_from(rows, True)  # rows sorted in the same order
        return [(c, None if r["resume_steps"] is None else Resume(
                    # rows as JSON (ids and times as text), converted to their types
                    steps=tuple(msgspec.convert(s, Step) for s in r["resume_steps"]),
                    woken_by=None if r["resume_signal"] is None
                    else msgspec.convert(r["resume_signal"], Signal)))
                for c, r in zip(claimed, rows, strict=True)]

    async def take_signal(self, lease: Lease, event: str, position: int) -> Signal | None:
        """For the running attempt that holds ``lease``: the signal ``event`` that the wait
        at step ``position`` takes, the oldest not taken yet (the first wins; later ones stay
        for later waits), or the one this position took already. None: none has arrived."""
        async with self.connection() as conn:
            row = await conn.fetchrow("SELECT * FROM animus.take_signal($1, $2, $3, $4, $5)",
                                      lease.work_id, lease.msg_id, lease.token, event, position)
        return None if row is None else Signal.from_row(row)

    async def resume_read(self, work_id: UUID | str, position: int,
                          event: str) -> tuple[list[Step], Signal | None]:
        """For an attempt that resumes from a wait for ``event`` at step ``position``: the
        item's recorded steps, by position, and the signal that wait took (the one that
        woke the item), if it took one. One query; it locks and writes nothing."""
        async with self.connection() as conn:
            rows = await conn.fetch(_RESUME, _id(work_id), position, event)
        steps = [Step.from_row(r) for r in rows if r["signal_id"] is None]
        signal = None
        if rows and rows[-1]["signal_id"] is not None:
            r = rows[-1]
            signal = Signal(id=r["signal_id"], work_id=r["work_id"], event=r["name"],
                            payload=r["result"], sent_by=r["sent_by"], sent_at=r["started_at"],
                            consumed_by_position=r["position"], consumed_at=r["finished_at"])
        return steps, signal

    async def gate_decisions(self, work_id: UUID | str, position: int,
                             role: str) -> list[Approval]:
        """The decisions on the item's approval at step ``position`` of its focus, oldest
        first, each saying whether it counts for a gate of ``role`` (one query)."""
        async with self.connection() as conn:
            rows = await conn.fetch(_GATE_DECISIONS, _id(work_id), position, role)
        return [Approval.from_row(r) for r in rows]

    async def signals(self, work_id: UUID | str) -> list[Signal]:
        """The signals sent to an item, oldest first (one query)."""
        async with self.connection() as conn:
            rows = await conn.fetch(_SIGNALS, _id(work_id))
        return [Signal.from_row(r) for r in rows]


_id = work_id
