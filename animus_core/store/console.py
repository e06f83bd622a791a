"""What the web console keeps and reads that no other command needs: its people
(``animus.console_users``, migration 0031), its overview (one query of index ranges, however
many items finished: migration 0032), the finished work per minute of its chart, and the audit
rows its live feed sends."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec

from animus_core.store.base import DbBase
from animus_core.store.read import DeadItem, WaitingItem, WaitingKind
from animus_core.values.engines import Engine
from animus_core.values.states import State

__all__ = ["Change", "ConsoleUser", "Minute", "Overview", "audit_extent", "changes_after",
           "console_password_hash", "console_users", "finished_by_minute", "latest_ticks",
           "list_console_users", "live_counts", "mcp_token_holder", "overview",
           "remove_console_user", "save_console_user", "save_mcp_token", "sign_out", "watch"]

#: the states an item is in until it finishes (counted exactly: few rows, an index)
LIVE_STATES = tuple(s.value for s in State if not s.terminal)
#: the finished states, as the overview counts them
FINISHED_STATES = tuple(s.value for s in State if s.terminal)


class ConsoleUser(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    role: str
    created_at: datetime | None = None
    created_by: str | None = None
    #: sessions signed in before this are over (migration 0033)
    signed_out_at: datetime | None = None

    def signed_in_since(self, at: float) -> bool:
        """Whether a session signed in at ``at`` (a timestamp of the database's clock) is
        still theirs: not signed out since, nor their password or role changed."""
        return self.signed_out_at is None or at > self.signed_out_at.timestamp()


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
           ON CONFLICT (name) DO UPDATE SET role = $2, password_hash = $3,
                                            signed_out_at = now(), mcp_token_sha256 = NULL
           RETURNING name, role, created_at, created_by""", name, role, password_hash)
    return ConsoleUser(**dict(row))


async def console_password_hash(db: DbBase,
                                name: str) -> tuple[ConsoleUser, str, datetime] | None:
    """The person, their password's hash, and the database's clock (the console's own
    connection reads it: no animus role may)."""
    async with db.connection() as conn:
        row = await conn.fetchrow("SELECT name, role, password_hash, signed_out_at, now() "
                                  "FROM animus.console_users WHERE name = $1", name)
    if row is None:
        return None
    return (ConsoleUser(name=row["name"], role=row["role"], signed_out_at=row["signed_out_at"]),
            row["password_hash"], row["now"])


async def console_users(db: DbBase, names: list[str]) -> dict[str, ConsoleUser]:
    """Those of ``names`` who may still sign in, with when they last signed out (one query
    for any number of them)."""
    async with db.connection() as conn:
        rows = await conn.fetch("SELECT name, role, signed_out_at FROM animus.console_users "
                                "WHERE name = ANY ($1::text[])", names)
    return {r["name"]: ConsoleUser(name=r["name"], role=r["role"],
                                   signed_out_at=r["signed_out_at"]) for r in rows}


async def sign_out(db: DbBase, name: str) -> None:
    """End every session of ``name``."""
    async with db.connection() as conn:
        await conn.execute("UPDATE animus.console_users SET signed_out_at = now() "
                           "WHERE name = $1", name)


async def save_mcp_token(db: DbBase, name: str, digest: bytes | None) -> bool:
    """Keep ``digest`` (a token's SHA-256; None: no token) as ``name``'s MCP token, in place of
    any before it; False when nobody of that name may sign in."""
    async with db.connection() as conn:
        done: str = await conn.execute("UPDATE animus.console_users SET mcp_token_sha256 = $2 "
                                       "WHERE name = $1", name, digest)
    return done != "UPDATE 0"


async def mcp_token_holder(db: DbBase, name: str) -> tuple[ConsoleUser, bytes] | None:
    """``name`` and the SHA-256 of their MCP token, if they may sign in and have one."""
    async with db.connection() as conn:
        row = await conn.fetchrow("SELECT name, role, signed_out_at, mcp_token_sha256 "
                                  "FROM animus.console_users "
                                  "WHERE name = $1 AND mcp_token_sha256 IS NOT NULL", name)
    if row is None:
        return None
    return (ConsoleUser(name=row["name"], role=row["role"], signed_out_at=row["signed_out_at"]),
            bytes(row["mcp_token_sha256"]))


async def list_console_users(db: DbBase) -> list[ConsoleUser]:
    async with db.connection() as conn:
        rows = await conn.fetch("SELECT name, role, created_at, created_by "
                                "FROM animus.console_users ORDER BY name")
    return [ConsoleUser(**dict(r)) for r in rows]


async def remove_console_user(db: DbBase, name: str) -> bool:
    async with db.connection() as conn:
        done: str = await conn.execute("DELETE FROM animus.console_users WHERE name = $1", name)
    return done != "DELETE 0"


async def watch(db: DbBase, name: str, seconds: int) -> None:
    """Have changes of work items notify ``animus_changed`` for the next ``seconds`` (0: no
    longer) on behalf of watcher ``name``: they notify only while someone watches."""
    async with db.connection() as conn:
        await conn.execute("SELECT animus.watch($1, $2)", name, seconds)


async def live_counts(db: DbBase) -> dict[str, int]:
    """How many items are in each state that is not finished (an index range, however many
    finished items there are)."""
    async with db.connection() as conn:
        rows = await conn.fetch("SELECT state::text, count(*) FROM animus.work_items "
                                "WHERE state = ANY ($1::animus.work_state[]) GROUP BY state",
                                list(LIVE_STATES))
    return {r[0]: r[1] for r in rows}


#: finished items the overview counts at the most (so that it costs the same at any rate)
FINISHED_COUNTED = 10_000


class Overview(msgspec.Struct, frozen=True, kw_only=True):
    """What the overview shows, read at ``now`` (the database's clock): the registered
    engines, the items in each live state, the waiting ones by what they wait for and the
    first of them to wake, the latest dead letters, what finished in the last hour (among
    the latest :data:`FINISHED_COUNTED`; ``finished_more``: there were more), and the audit
    log's newest and newest sealed rows."""

    now: datetime
    engines: list[Engine]
    counts: dict[str, int]
    waiting: list[WaitingKind]
    next_waking: list[WaitingItem]
    dead: list[DeadItem]
    finished: dict[str, int]
    finished_more: bool
    audit_newest: int
    audit_sealed: int


_OVERVIEW = """
SELECT jsonb_build_object(
  'now', now(),
  'engines', coalesce((
      SELECT jsonb_agg(to_jsonb(e)
                       || jsonb_build_object('lost', animus.engine_lost(e))
                       ORDER BY e.started_at, e.id)
        FROM animus.engines e), '[]'),
  'counts', coalesce((
      SELECT jsonb_object_agg(state, n) FROM (
          SELECT state::text AS state, count(*) AS n FROM animus.work_items
           WHERE state = ANY ($1::animus.work_state[]) GROUP BY state) c), '{}'),
  'waiting', coalesce((
      SELECT jsonb_agg(jsonb_build_object('kind', kind, 'n', n, 'next_wake_at', next_wake_at)
                       ORDER BY kind)
        FROM (SELECT coalesce(wait->>'kind', '?') AS kind, count(*) AS n,
                     min(wake_at) AS next_wake_at
                FROM animus.work_items WHERE state = 'waiting' GROUP BY 1) k), '[]'),
  'next_waking', coalesce((
      SELECT jsonb_agg(jsonb_build_object('id', id, 'work_type', work_type, 'wait', wait,
                                          'wake_at', wake_at, 'reason', reason)
                       ORDER BY wake_at, id)
        FROM (SELECT id, work_type, wait, wake_at, reason FROM animus.work_items
               WHERE state = 'waiting' ORDER BY wake_at, id LIMIT $2) w), '[]'),
  'dead', coalesce((
      SELECT jsonb_agg(jsonb_build_object('id', id, 'work_type', work_type, 'reason', reason,
                                          'resolved_at', resolved_at)
                       ORDER BY resolved_at DESC)
        FROM (SELECT id, work_type, reason, resolved_at FROM animus.work_items
               WHERE state = 'dead' ORDER BY resolved_at DESC LIMIT $3) d), '[]'),
  'finished', coalesce((
      SELECT jsonb_object_agg(state, n) FROM (
          SELECT state::text AS state, count(*) AS n FROM (
              -- the states spelt out, as the partial index on resolved_at names them
              SELECT state FROM animus.work_items
               WHERE state IN ('completed', 'dead', 'merged', 'cancelled')
                 AND resolved_at >= now() - interval '1 hour'
               ORDER BY resolved_at DESC LIMIT $4) f GROUP BY state) c), '{}'),
  'finished_more', false,
  'audit_newest', coalesce((SELECT max(id) FROM animus.audit_log), 0),
  'audit_sealed', coalesce((SELECT max(audit_id) FROM animus.audit_seal), 0))::text"""
_overview = msgspec.json.Decoder(Overview)


async def overview(db: DbBase, *, waking: int = 10, dead: int = 10) -> Overview:
    """The :class:`Overview`, in one query of index ranges (the reader role reads it): the
    first ``waking`` waiting items to wake and the latest ``dead`` dead letters."""
    async with db.connection() as conn:
        text = await conn.fetchval(_OVERVIEW, list(LIVE_STATES), waking, dead,
                                   FINISHED_COUNTED + 1)
    view = _overview.decode(text)
    if sum(view.finished.values()) > FINISHED_COUNTED:
        view = msgspec.structs.replace(view, finished_more=True)
    return view


class Minute(msgspec.Struct, frozen=True, kw_only=True):
    """The work that finished in one minute: all of it, and of it the dead."""

    at: datetime
    finished: int
    dead: int


async def finished_by_minute(db: DbBase, since: datetime) -> tuple[list[Minute], int]:
    """The work that finished in each minute since ``since``, oldest first (minutes with none
    left out), and the newest audit row then (both read in one snapshot): two index-only
    ranges, however many items there are before ``since``."""
    async with db.connection() as conn, conn.transaction(isolation="repeatable_read",
                                                          readonly=True):
        rows = await conn.fetch(
            """SELECT m, sum(finished)::int, sum(dead)::int FROM (
                   SELECT date_trunc('minute', resolved_at) AS m, count(*) AS finished,
                          0 AS dead
                     FROM animus.work_items
                    WHERE state IN ('completed', 'dead', 'merged', 'cancelled')
                      AND resolved_at >= $1 GROUP BY 1
                   UNION ALL
                   SELECT date_trunc('minute', resolved_at), 0, count(*)
                     FROM animus.work_items
                    WHERE state = 'dead' AND resolved_at >= $1 GROUP BY 1) x
                GROUP BY m ORDER BY m""", since)
        upto = await conn.fetchval("SELECT coalesce(max(id), 0) FROM animus.audit_log")
    return [Minute(at=r[0], finished=r[1], dead=r[2]) for r in rows], upto


async def latest_ticks(db: DbBase, names: list[str]) -> dict[str, datetime]:
    """The latest tick of each of the schedules ``names`` that has ticked (an index probe
    each)."""
    async with db.connection() as conn:
        rows = await conn.fetch(
            """SELECT n, (SELECT max(tick) FROM animus.schedule_ticks WHERE name = n)
                 FROM unnest($1::text[]) n""", names)
    return {r[0]: r[1] for r in rows if r[1] is not None}


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
