"""Durable steps in the store: recording them (by the holder of the item's lease) and reading
an item's steps. See ``0015_steps.sql`` and ``0025_resume_in_one_read.sql``; the focus side
is :mod:`animus_core.faculties.steps`."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
import msgspec

from animus_core.store.base import work_id
from animus_core.store.errors import errors
from animus_core.store.records import WorkRecords
from animus_core.values.steps import Step, StepRecord
from animus_core.values.work import Lease

__all__ = ["WorkSteps"]

_RECORD = "SELECT animus.record_step($1, $2, $3, $4, $5, $6, $7, $8, $9)"
_RECORD_MANY = ("SELECT animus.record_steps($1, $2, $3, $4, $5, $6::text[]::jsonb[], $7, $8, "
                "$9)")
_STEPS = """
    SELECT work_id, position, name, attempt, result, result_hash, started_at, finished_at,
           duration_ms, copied_from
      FROM animus.steps WHERE work_id = $1 ORDER BY position"""


class WorkSteps(WorkRecords):
    """Recording and reading durable steps."""

    async def record_step(self, lease: Lease, position: int, name: str, result: msgspec.Raw,
                          *, result_hash: str, started_at: datetime, duration_ms: int,
                          usage: dict[str, Any] | None = None) -> None:
        """Record step ``position`` (``name``) of the running attempt that holds ``lease``,
        with its ``result`` (JSON text that :func:`animus_core.values.json_values.encode`
        made) and the result's hash, and its audit row: one round trip, one transaction.
        With ``usage`` (a model call's, as :meth:`record_usage` takes it), the same
        transaction adds it to the item's totals: the call is charged exactly when its
        result is kept. A lost lease raises :class:`~animus_core.values.errors.LeaseLost`
        and records nothing; a position recorded already raises
        :class:`~animus_core.values.errors.IllegalTransition`."""
        args = (lease.work_id, lease.msg_id, lease.token, position, name, result, result_hash,
                started_at, duration_ms)
        async with self.connection() as conn:
            if usage is None:
                await conn.execute(_RECORD, *args)
                return
            async with conn.transaction():
                await conn.execute(_RECORD, *args)
                await conn.execute("SELECT animus.add_usage($1, $2)", lease.work_id, usage)

    async def record_steps(self, steps: Sequence[tuple[Lease, StepRecord]], *,
                           conn: asyncpg.Connection | None = None) -> None:
        """Record many steps, of one attempt or of several, each as :meth:`record_step` would
        (lease held, item running, position not recorded yet), in one round trip: all or
        none. With ``conn``, they join that connection's open transaction."""
        if not steps:
            return
        args = ([lease.work_id for lease, _ in steps], [lease.msg_id for lease, _ in steps],
                [lease.token for lease, _ in steps], [r.position for _, r in steps],
                [r.name for _, r in steps],
                # as text: in a jsonb[] argument asyncpg would take a list result for a
                # nested array dimension
                [bytes(r.result).decode() for _, r in steps],
                [r.result_hash for _, r in steps], [r.started_at for _, r in steps],
                [r.duration_ms for _, r in steps])
        if conn is not None:
            with errors():
                await conn.execute(_RECORD_MANY, *args)
            return
        async with self.connection() as c:
            await c.execute(_RECORD_MANY, *args)

    async def steps(self, work_id: UUID | str) -> list[Step]:
        """The recorded steps of an item, by position (one query)."""
        async with self.connection() as conn:
            rows = await conn.fetch(_STEPS, _id(work_id))
        return [Step.from_row(r) for r in rows]


_id = work_id
