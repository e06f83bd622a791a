"""What is recorded about work besides its state: decisions on gated work, the audit trail
(history, sealing, verification), execution records, environments and model usage."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

import asyncpg
import msgspec

from animus_core.infra.witness import Checkpoint
from animus_core.store import audit
from animus_core.store.base import check_reason, transition, work_id
from animus_core.store.errors import errors
from animus_core.store.read import WorkReads
from animus_core.values.errors import InvalidInput
from animus_core.values.records import ExecutionRecord
from animus_core.values.states import State
from animus_core.values.work import WorkItem

__all__ = ["WorkRecords", "copy_executions", "execution_json", "executions_json",
           "then_record_executions"]


class WorkRecords(WorkReads):
    """Approvals, history and audit, execution records and usage."""

    # -- approvals and history ---------------------------------------------------------------

    async def decide(self, work_id: UUID | str, decision: str, reason: str) -> WorkItem:
        """Approve or reject an item awaiting approval, as the connected database user.
        The database checks the role the rule asked for, refuses the requester, and moves
        the item to queued once the quorum is reached (or to dead on a rejection).

        An item waiting for an approval inside its focus (``focus.approval``) is decided
        the same way, under the wait's step position: the rejection, or the approval that
        makes the quorum, wakes it (``waiting -> queued``) for the focus to read the
        decision."""
        wid = _id(work_id)
        check_reason(reason)
        async with self.connection() as conn:
            row = await conn.fetchrow("SELECT * FROM animus.decide($1, $2, $3)",
                                      wid, decision, reason)
        item = WorkItem.from_row(row)
        if item.state == State.QUEUED and item.wait and item.wait.get("kind") == "approval":
            transition("waiting", "queued")  # a decision woke a focus's approval
        return item

    async def approvals(self, work_id: UUID | str) -> list[dict[str, Any]]:
        """Every decision on the item, oldest first: ``approver``, ``decision``, ``reason``,
        ``at``, and ``position`` (the step position of an approval inside its focus; None
        for the gate it was submitted with)."""
        async with self.connection() as conn:
            rows = await conn.fetch(
                "SELECT approver, decision, reason, at, position FROM animus.approvals "
                "WHERE work_id = $1 ORDER BY id", _id(work_id))
        return [dict(r) for r in rows]

    async def approvers(self, work_id: UUID | str, role: str) -> list[str]:
        """Who approved the item's submit gate while holding ``animus_<role>`` (or as a
        superuser); approvals inside its focus are not the gate's."""
        async with self.connection() as conn:
            rows = await conn.fetch(
                """SELECT DISTINCT a.approver FROM animus.approvals a
                     LEFT JOIN pg_roles r ON r.rolname = a.approver
                    WHERE a.work_id = $1 AND a.decision = 'approve' AND a.position IS NULL
                      AND (r.rolsuper OR CASE WHEN EXISTS (
                               SELECT 1 FROM pg_roles WHERE rolname = 'animus_' || $2)
                           THEN pg_has_role(r.oid, 'animus_' || $2, 'MEMBER')
                           ELSE false END)""", _id(work_id), role)
        return [r[0] for r in rows]

    async def audit_tail(self, *, limit: int = 20, after: int | None = None
                         ) -> list[audit.AuditEvent]:
        """The newest audit rows of every item, oldest first: the last ``limit``, or (with
        ``after``) those after row ``after``, up to ``limit``."""
        if not 1 <= limit <= 10_000:
            raise InvalidInput(f"limit must be from 1 to 10000, got {limit}")
        async with self.connection() as conn:
            if after is None:
                rows = await conn.fetch(
                    """SELECT * FROM (SELECT a.*, s.seq IS NOT NULL AS sealed
                                        FROM animus.audit_log a
                                        LEFT JOIN animus.audit_seal s ON s.audit_id = a.id
                                       ORDER BY a.id DESC LIMIT $1) t ORDER BY id""", limit)
            else:
                rows = await conn.fetch(
                    """SELECT a.*, s.seq IS NOT NULL AS sealed FROM animus.audit_log a
                         LEFT JOIN animus.audit_seal s ON s.audit_id = a.id
                        WHERE a.id > $1 ORDER BY a.id LIMIT $2""", after, limit)
        return [audit.AuditEvent.from_row(r) for r in rows]

    async def history(self, work_id: UUID | str) -> list[audit.AuditEvent]:
        """Every audit event of one item, oldest first."""
        wid = _id(work_id)
        async with self.connection() as conn:
            rows = await conn.fetch(
                """SELECT a.*, s.seq IS NOT NULL AS sealed FROM animus.audit_log a
                     LEFT JOIN animus.audit_seal s ON s.audit_id = a.id
                    WHERE a.work_id = $1 ORDER BY a.id""",
                wid,
            )
        if not rows:
            await self.get_work_item(wid)  # raises WorkNotFound
        return [audit.AuditEvent.from_row(r) for r in rows]

    # -- execution records and usage ---------------------------------------------------------

    async def record_executions(self, executions: Sequence[ExecutionRecord]) -> None:
        """Append execution records (see :mod:`animus_core.values.records`)."""
        async with self.connection() as conn:
            await copy_executions(conn, executions)

    async def record_usage(self, work_id: UUID, usage: dict[str, Any], *,
                           conn: asyncpg.Connection | None = None) -> None:
        """Add one attempt's model usage (``{"models": {model: tokens}, "cost_usd": x}``) to
        the item's totals, failed attempts included."""
        sql = "SELECT animus.add_usage($1, $2)"
        if conn is not None:
            with errors():
                await conn.execute(sql, work_id, usage)
            return
        async with self.connection() as c:
            await c.execute(sql, work_id, usage)

    async def record_environment(self, env_hash: str, environment: dict[str, Any]) -> None:
        async with self.connection() as conn:
            await conn.execute(
                """INSERT INTO animus.environments (hash, environment) VALUES ($1, $2)
                   ON CONFLICT (hash) DO NOTHING""", env_hash, environment)

    async def record_files(self, files: dict[str, str]) -> None:
        """Keep the text of faculty files under their digests (``{"sha256:...": text}``)."""
        async with self.connection() as conn:
            await conn.execute(
                """INSERT INTO animus.faculty_files (sha256, content)
                   SELECT * FROM unnest($1::text[], $2::text[]) ON CONFLICT (sha256) DO NOTHING""",
                list(files), list(files.values()))

    async def faculty_files(self, digests: Sequence[str]) -> dict[str, str]:
        """The kept text of the faculty files with these digests (those known)."""
        async with self.connection() as conn:
            rows = await conn.fetch("SELECT sha256, content FROM animus.faculty_files "
                                    "WHERE sha256 = ANY($1::text[])", list(digests))
        return {r["sha256"]: r["content"] for r in rows}

    async def executions(self, work_id: UUID | str) -> list[ExecutionRecord]:
        """Every execution record of an item, oldest first, with its environment."""
        wid = _id(work_id)
        async with self.connection() as conn:
            rows = await conn.fetch(
                """SELECT r.*, e.environment FROM animus.execution_records r
                     LEFT JOIN animus.environments e ON e.hash = r.environment_hash
                    WHERE r.work_id = $1 ORDER BY r.id""", wid)
        return [ExecutionRecord.from_row(r) for r in rows]

    # -- the audit chain ---------------------------------------------------------------------

    async def seal_audit(self) -> int:
        """Chain every committed, unsealed audit row; return how many were sealed."""
        async with self.connection() as conn:
            return await audit.seal(conn, keys=self.audit_keys)

    async def verify_audit(self, checkpoints: Sequence[tuple[str, Checkpoint]] = ()
                           ) -> audit.Verification:
        """Seal what is pending (when this role may: a role that only reads verifies what
        is sealed, and the result counts the rows still to seal), then recompute the whole
        chain, and check that it still holds each of ``checkpoints`` (``(where,
        checkpoint)`` pairs)."""
        async with self.connection() as conn:
            if await conn.fetchval("SELECT has_table_privilege('animus.audit_seal', 'INSERT')"):
                await audit.seal(conn, keys=self.audit_keys)
            return await audit.verify(conn, keys=self.audit_keys, checkpoints=checkpoints)

    async def audit_checkpoint(self, *, seal: bool = True) -> Checkpoint:
        """A checkpoint of the audit chain's head (after sealing what is pending), signed
        with the audit key when this process holds one."""
        async with self.connection() as conn:
            if seal:
                await audit.seal(conn, keys=self.audit_keys)
            return await audit.checkpoint(conn, self.audit_keys)


_id = work_id

_EXECUTION_COLUMNS = ["work_id", "attempt", "result", "work_type", "params_hash", "faculty",
                      "faculty_hash", "engine_version", "environment_hash", "models",
                      "outcome_hash", "error", "started_at", "steps"]


def _insert_executions(param: int) -> str:
    """The INSERT of the execution records of JSON parameter ``$param``
    (:func:`executions_json`)."""
    return f"""INSERT INTO animus.execution_records ({", ".join(_EXECUTION_COLUMNS)})
    SELECT {", ".join(_EXECUTION_COLUMNS)}
      FROM json_populate_recordset(NULL::animus.execution_records, ${param}::json)"""


_INSERT_EXECUTIONS = _insert_executions(1)


def then_record_executions(moves: str, param: int) -> str:
    """One statement: ``moves`` (a SELECT of the function that ends the attempts), then
    the execution records of JSON parameter ``$param`` (:func:`executions_json`), appended
    only once it succeeded (the subquery runs first), and with it or not at all. A batch of
    short foci completes in one round trip instead of four (BEGIN, the move, the records,
    COMMIT)."""
    return f"""WITH moved AS MATERIALIZED ({moves})
    {_insert_executions(param)}
     WHERE (SELECT count(*) FROM moved) >= 0"""


def executions_json(executions: Sequence[ExecutionRecord]) -> str:
    """Execution records as the JSON parameter of :func:`_insert_executions`."""
    return msgspec.json.encode(executions).decode()


def execution_json(execution: ExecutionRecord | None) -> msgspec.Raw | None:
    """One execution record as a ``jsonb`` argument, encoded once (its fields name the
    columns of ``animus.execution_records``)."""
    return None if execution is None else msgspec.Raw(msgspec.json.encode(execution))


async def copy_executions(conn: asyncpg.Connection,
                          executions: Sequence[ExecutionRecord]) -> None:
    """Append execution records on ``conn`` (in its transaction, if one is open)."""
    if not executions:
        return
    # One statement and one JSON parameter for the batch (cheaper to build than an array
    # per column); the records' own fields name the columns.
    with errors():
        await conn.execute(_INSERT_EXECUTIONS, executions_json(executions))
