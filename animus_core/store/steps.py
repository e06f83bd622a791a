"""Durable steps in the store: recording one (by the holder of the item's lease) and reading
an item's steps. See ``0015_steps.sql``; the focus side is
:mod:`animus_core.faculties.steps`."""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

import msgspec

from animus_core.store.base import work_id
from animus_core.store.moves import WorkMoves
from animus_core.values.steps import Step
from animus_core.values.work import Lease

__all__ = ["WorkSteps"]

_STEPS = """
    SELECT work_id, position, name, attempt, result, result_hash, started_at, finished_at,
           duration_ms, copied_from
      FROM animus.steps WHERE work_id = $1 ORDER BY position"""


class WorkSteps(WorkMoves):
    """Recording and reading durable steps."""

    async def record_step(self, lease: Lease, position: int, name: str, result: msgspec.Raw,
                          *, result_hash: str, started_at: datetime,
                          duration_ms: int) -> None:
        """Record step ``position`` (``name``) of the running attempt that holds ``lease``,
        with its ``result`` (JSON text that :func:`animus_core.values.json_values.encode`
        made) and the result's hash, and its audit row: one round trip, one transaction.
        A lost lease raises :class:`~animus_core.values.errors.LeaseLost` and records
        nothing; a position recorded already raises
        :class:`~animus_core.values.errors.IllegalTransition`."""
        async with self.connection() as conn:
            await conn.execute(
                "SELECT animus.record_step($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                lease.work_id, lease.msg_id, lease.token, position, name, result,
                result_hash, started_at, duration_ms)

    async def steps(self, work_id: UUID | str) -> list[Step]:
        """The recorded steps of an item, by position (one query)."""
        async with self.connection() as conn:
            rows = await conn.fetch(_STEPS, _id(work_id))
        return [Step.from_row(r) for r in rows]


_id = work_id
