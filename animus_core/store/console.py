"""What the web console keeps and reads that no other command needs: its people
(``animus.console_users``, migration 0031), the live counts of its overview, and the audit
rows its live feed sends."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec

from animus_core.store.base import DbBase
from animus_core.values.states import State

__all__ = ["Change", "ConsoleUser", "audit_extent", "changes_after", "console_password_hash",
           "finished_since", "list_console_users", "live_counts", "remove_console_user",
           "save_console_user"]

#: the states an item is in until it finishes (counted exactly: few rows, an index)
LIVE_STATES = tuple(s.value for s in State if not s.terminal)
#: the finished states, as :func:`finished_since` counts them
FINISHED_STATES = tuple(s.value for s in State if s.terminal)


class ConsoleUser(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    role: str
    created_at: datetime | None = None
    created_by: str | None = None


class Change(msgspec.Struct, frozen=True, kw_only=True):
    """An audit row as the live feed sends it, with the item's state now."""

    id: int
    work_id: UUID
    event: str
    from_state: str | None
    to_state: str | None
    db_user: str
    at: datetime
    state: str
    work_type: str
    reason: str | None


async def save_console_user(conn: Any, name: str, role: str, password_hash: str) -> ConsoleUser:
    row = await conn.fetchrow(
        """INSERT INTO animus.console_users (name, role, password_hash) VALUES ($1, $2, $3)
           ON CONFLICT (name) DO UPDATE SET role = $2, password_hash = $3
           RETURNING name, role, created_at, created_by""", name, role, password_hash)
    return ConsoleUser(**dict(row))


async def console_password_hash(db: DbBase, name: str) -> tuple[ConsoleUser, str] | None:
    """The person and their password's hash (the console's own connection reads it: no
    animus role may)."""
    async with db.connection() as conn:
        row = await conn.fetchrow("SELECT name, role, password_hash FROM animus.console_users "
                                  "WHERE name = $1", name)
    if row is None:
        return None
    return ConsoleUser(name=row["name"], role=row["role"]), row["password_hash"]


async def list_console_users(db: DbBase) -> list[ConsoleUser]:
    async with db.connection() as conn:
        rows = await conn.fetch("SELECT name, role, created_at, created_by "
                                "FROM animus.console_users ORDER BY name")
    return [ConsoleUser(**dict(r)) for r in rows]


async def remove_console_user(db: DbBase, name: str) -> bool:
    async with db.connection() as conn:
        done: str = await conn.execute("DELETE FROM animus.console_users WHERE name = $1", name)
    return done != "DELETE 0"


async def live_counts(db: DbBase) -> dict[str, int]:
    """How many items are in each state that is not finished (an index range, however many
    finished items there are)."""
    async with db.connection() as conn:
        rows = await conn.fetch("SELECT state::text, count(*) FROM animus.work_items "
                                "WHERE state = ANY ($1::animus.work_state[]) GROUP BY state",
                                list(LIVE_STATES))
    return {r[0]: r[1] for r in rows}


#: finished items counted at the most by :func:`finished_since`
FINISHED_COUNTED = 10_000


async def finished_since(db: DbBase, since: datetime) -> tuple[dict[str, int], bool]:
    """How many items finished (completed, dead, merged, cancelled) since ``since``, by
    state, among the latest :data:`FINISHED_COUNTED` to finish; and whether there were more
    (so that the count costs the same at any rate of work)."""
    async with db.connection() as conn:
        rows = await conn.fetch(
            # the states spelt out, as the partial index on resolved_at names them
            """SELECT state::text, count(*) FROM (
                   SELECT state FROM animus.work_items
                    WHERE state IN ('completed', 'dead', 'merged', 'cancelled')
                      AND resolved_at >= $1
                    ORDER BY resolved_at DESC LIMIT $2) f GROUP BY state""",
            since, FINISHED_COUNTED + 1)
    counts = {r[0]: r[1] for r in rows}
    return counts, sum(counts.values()) > FINISHED_COUNTED


async def audit_extent(db: DbBase) -> tuple[int, int]:
    """The newest audit row's id, and the newest sealed one's (0: none)."""
    async with db.connection() as conn:
        row = await conn.fetchrow(
            "SELECT coalesce((SELECT max(id) FROM animus.audit_log), 0), "
            "coalesce((SELECT max(audit_id) FROM animus.audit_seal), 0)")
    return row[0], row[1]


async def changes_after(db: DbBase, after: int, limit: int = 2000) -> list[Change]:
    """The audit rows after row ``after``, oldest first, each with its item as it is now."""
    async with db.connection() as conn:
        rows = await conn.fetch(
            """SELECT a.id, a.work_id, a.event, a.from_state, a.to_state, a.db_user, a.at,
                      w.state::text AS state, w.work_type, w.reason
                 FROM animus.audit_log a JOIN animus.work_items w ON w.id = a.work_id
                WHERE a.id > $1 ORDER BY a.id LIMIT $2""", after, limit)
    return [Change(**dict(r)) for r in rows]
