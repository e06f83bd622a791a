"""Child work a focus waits for, in the store: submitting the children and recording their
ids as a step in one transaction, and reading how they ended. The parent is woken by the
database when its last child finishes (``0020_children.sql``); the focus side is
:mod:`animus_core.faculties.children`. See docs/concepts.md, Waiting."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
import msgspec

from animus_core.store.base import check_queue
from animus_core.store.waits import WorkWaits
from animus_core.values import json_values
from animus_core.values.canonical import canonical_hash
from animus_core.values.children import ChildResult
from animus_core.values.errors import WorkNotFound
from animus_core.values.work import Lease, NewWorkItem, SubmitResult

__all__ = ["WorkChildren"]

_FINISHED = ("completed", "dead", "cancelled")

# each child as it ended: a merged child follows the item it was merged into
_CHILDREN = """
    SELECT k.ord, w.id, w.work_type, w.merged_into,
           coalesce(c.state, w.state)::text AS state,
           coalesce(c.outcome_data, w.outcome_data) AS outcome_data,
           CASE WHEN c.id IS NULL THEN w.outcome_error ELSE c.outcome_error END
               AS outcome_error,
           CASE WHEN c.id IS NULL THEN w.reason ELSE c.reason END AS reason
      FROM unnest($1::uuid[]) WITH ORDINALITY AS k(id, ord)
      LEFT JOIN animus.work_items w ON w.id = k.id
      LEFT JOIN animus.work_items c ON c.id = w.merged_into
     ORDER BY k.ord"""


class WorkChildren(WorkWaits):
    """Child work that a focus submits and waits for."""

    async def submit_children(self, lease: Lease, position: int, name: str,
                              items: Sequence[NewWorkItem], *, queue: str,
                              started_at: datetime) -> list[SubmitResult]:
        """Submit ``items`` (built as they are to start: the rules were applied, the parent
        set) and record step ``position`` (``name``) of the running attempt that holds
        ``lease``, its result the children's ids (``{"children": [id, ...]}``), in one
        transaction: the children are submitted exactly when the step is recorded. A lost
        lease raises :class:`~animus_core.values.errors.LeaseLost` and submits nothing."""
        check_queue(queue)
        async with self.connection() as conn, conn.transaction():
            results = await self._submit([i.to_json() for i in items], queue, conn=conn)
            value = {"children": [str(r.id) for r in results]}
            text = json_values.encode(value, f"step {position} {name!r} result")
            await conn.execute(
                "SELECT animus.record_step($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                lease.work_id, lease.msg_id, lease.token, position, name,
                msgspec.Raw(text.encode()), canonical_hash(value, nfc=True), started_at, 0)
        return results

    async def _submit(self, payload: list[dict[str, Any]], queue: str,
                      conn: asyncpg.Connection | None = None) -> list[SubmitResult]:
        raise NotImplementedError("submitted by animus_core.store.db.Db")

    async def children_results(self, ids: Sequence[UUID | str]) -> list[ChildResult | None]:
        """How each child in ``ids`` ended, in order: None for one that has not finished (a
        merged child follows the item it was merged into). One query.
        :class:`~animus_core.values.errors.WorkNotFound` for an id that is not (or no longer)
        a work item."""
        async with self.connection() as conn:
            rows = await conn.fetch(_CHILDREN, [UUID(str(i)) for i in ids])
        out: list[ChildResult | None] = []
        for row, given in zip(rows, ids, strict=True):
            if row["id"] is None:
                raise WorkNotFound(f"child work item {given} is not in the database (purged?): "
                                   "how it ended is not known")
            out.append(ChildResult.from_row(row) if row["state"] in _FINISHED else None)
        return out
