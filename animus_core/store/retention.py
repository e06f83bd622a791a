"""Retention: delete old finished work and old archived queue messages, never audit rows.

``purge`` deletes work items that finished (completed, dead, merged, cancelled) before a
cutoff, the schedule ticks that point at them, and pgmq archive rows (``a_<queue>``)
archived before the cutoff, in batches of their own transactions so a large purge never
holds long locks.

A finished item that other work still points at (a newer child's ``parent_id``, a merged
duplicate's ``merged_into``, a replay's ``replay_of``) is kept until that work is purged
too: those columns are the other item's lineage, not ours to erase. An item that a row of
another table points at with a foreign key (an approval decision, which is append-only) is
kept for good. Batches go newest first, so an item and the old items that point at it go
in the same batch or in order.

The audit trail is append-only (the database refuses UPDATE, DELETE and TRUNCATE on it), so
the audit rows of purged items stay, and ``animus audit verify`` still checks them. With an
export directory, those rows are first written out as JSON lines with their chain position
and hashes, so they can be archived and checked (:func:`animus_core.store.audit.row_hash`) apart
from the database.
"""

from __future__ import annotations

import hashlib
import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import msgspec

from animus_core.infra.witness import AuditKeys
from animus_core.store import audit
from animus_core.store.db import Db
from animus_core.values.errors import DatabaseError, InvalidInput

__all__ = ["PurgeReport", "parse_age", "purge"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

# Finished items resolved before $1 that nothing outside that set points at, directly or
# through a chain of items in the set. {refs}: (dst, src) pairs of work_items pointing at
# work_items; {pinned}: ids that rows of other tables point at (approvals, ...), which can
# never be deleted while those append-only rows exist.
_PURGE_SET = """
CREATE TEMP TABLE animus_purge AS
WITH RECURSIVE cand AS (
    SELECT id, state, created_at FROM animus.work_items
     WHERE state IN ('completed', 'dead', 'merged', 'cancelled') AND resolved_at < $1
), refs (dst, src) AS (
    {refs}
), pinned (dst) AS (
    {pinned}
), blocked (id) AS (
    SELECT r.dst FROM refs r JOIN cand c ON c.id = r.dst
     WHERE NOT EXISTS (SELECT 1 FROM cand k WHERE k.id = r.src)
    UNION
    SELECT p.dst FROM pinned p JOIN cand c ON c.id = p.dst
    UNION
    SELECT r.dst FROM blocked b JOIN refs r ON r.src = b.id JOIN cand c ON c.id = r.dst
)
SELECT c.* FROM cand c WHERE NOT EXISTS (SELECT 1 FROM blocked b WHERE b.id = c.id)
"""

# Every single-column foreign key that points at work_items, found in the catalog so that a
# table added later (with a foreign key) keeps its items instead of breaking the purge.
_FOREIGN_KEYS = """
SELECT c.conrelid::regclass::text AS tbl, a.attname AS col
  FROM pg_constraint c
  JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
 WHERE c.contype = 'f' AND c.confrelid = 'animus.work_items'::regclass
   AND cardinality(c.conkey) = 1
 ORDER BY 1, 2
"""
_NONE = "SELECT NULL::uuid, NULL::uuid WHERE false"


class PurgeReport(msgspec.Struct, frozen=True, kw_only=True):
    cutoff: datetime
    dry_run: bool
    items: dict[str, int]             # finished items deleted (or to delete), by state
    kept_referenced: int              # old finished items kept: other rows point at them
    schedule_ticks: int               # tick rows of those items
    archived_messages: dict[str, int]  # pgmq archive rows, by queue
    audit_rows: int                   # audit rows of those items: always kept
    audit_export: str | None = None   # the JSON-lines file they were exported to
    audit_export_sha256: str | None = None

    @property
    def total_items(self) -> int:
        return sum(self.items.values())


def parse_age(text: str) -> timedelta:
    """``30d``, ``12h``, ``2w``, ``90m``, ``45s``: how old finished work must be to go."""
    m = re.fullmatch(r"\s*(\d+)\s*([smhdw])\s*", text)
    if not m or int(m[1]) <= 0:
        raise InvalidInput(f"--older-than {text!r}: use a positive age such as 30d, 12h, 2w")
    return timedelta(seconds=int(m[1]) * _UNITS[m[2]])


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def _build_set(conn: asyncpg.Connection, cutoff: datetime) -> None:
    refs, pinned = [], []
    for fk in await conn.fetch(_FOREIGN_KEYS):
        col = _ident(fk["col"])
        if fk["tbl"] == "animus.work_items":
            refs.append(f"SELECT {col}, id FROM animus.work_items WHERE {col} IS NOT NULL")
        elif fk["tbl"] not in ("animus.schedule_ticks", "animus.steps", "animus.signals"):
            # ticks are deleted with their items, steps and signals by their foreign key's cascade
            pinned.append(f"SELECT {col} FROM {fk['tbl']} WHERE {col} IS NOT NULL")
    await conn.execute("DROP TABLE IF EXISTS pg_temp.animus_purge")
    await conn.execute(_PURGE_SET.format(
        refs="\n    UNION ALL\n    ".join(refs) or _NONE,
        pinned="\n    UNION ALL\n    ".join(pinned) or "SELECT NULL::uuid WHERE false",
    ), cutoff)
    await conn.execute("CREATE INDEX ON pg_temp.animus_purge (created_at DESC, id DESC)")
    await conn.execute("CREATE UNIQUE INDEX ON pg_temp.animus_purge (id)")
    await conn.execute("ANALYZE pg_temp.animus_purge")


def _export_line(row: Any) -> bytes:
    at: datetime = row["at"]
    record = {
        "id": row["id"], "work_id": str(row["work_id"]), "event": row["event"],
        "from_state": row["from_state"], "to_state": row["to_state"],
        "provenance": row["provenance"], "db_user": row["db_user"],
        # exactly as the chain hashes it (audit.row_hash)
        "at": at.astimezone(UTC).isoformat(timespec="microseconds"),
        "payload": row["payload"],
        "seal": None if row["seq"] is None else {
            "seq": row["seq"], "prev_hash": bytes(row["prev_hash"]).hex(),
            "hash": bytes(row["hash"]).hex(), "key_id": row["key_id"],
            "sealed_at": row["sealed_at"].astimezone(UTC).isoformat(timespec="microseconds"),
        },
    }
    return msgspec.json.encode(record) + b"\n"


def _export_name(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    final = directory / f"audit-export-{stamp}.jsonl"
    n = 1
    while final.exists():
        final = directory / f"audit-export-{stamp}-{n}.jsonl"
        n += 1
    return final


async def _export_audit(conn: asyncpg.Connection, directory: Path, keys: AuditKeys
                        ) -> tuple[Path, str, int]:
    """Write the audit rows of the items in the purge set to a new JSON-lines file (written
    to a temporary name, synced, then renamed: a file with the final name is complete)."""
    await audit.seal(conn, keys=keys)  # so that every exported row carries its hashes
    final = _export_name(directory)
    tmp = directory / f".{final.name}.partial"
    digest = hashlib.sha256()
    count = 0
    try:
        with tmp.open("wb") as f:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                async for row in conn.cursor(
                    """SELECT a.id, a.work_id, a.event, a.from_state::text, a.to_state::text,
                              a.provenance, a.db_user, a.at, a.payload,
                              s.seq, s.prev_hash, s.hash, s.key_id, s.sealed_at
                         FROM animus.audit_log a
                         LEFT JOIN animus.audit_seal s ON s.audit_id = a.id
                        WHERE a.work_id IN (SELECT id FROM pg_temp.animus_purge)
                        ORDER BY a.id""",
                    prefetch=2000,
                ):
                    line = _export_line(row)
                    digest.update(line)
                    f.write(line)
                    count += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final, digest.hexdigest(), count


async def purge(db: Db, *, older_than: timedelta, dry_run: bool = False,
                audit_export: Path | None = None, batch_size: int = 1000) -> PurgeReport:
    """Delete finished work resolved more than ``older_than`` ago and pgmq archive rows
    archived before then; with ``dry_run``, only count. See the module docstring."""
    if batch_size < 1:
        raise InvalidInput(f"batch size must be at least 1, got {batch_size}")
    async with db.connection() as conn:
        cutoff: datetime = await conn.fetchval("SELECT now() - $1::interval", older_than)
        try:
            await _build_set(conn, cutoff)
            by_state = {r["state"]: r["n"] for r in await conn.fetch(
                "SELECT state::text, count(*) AS n FROM pg_temp.animus_purge GROUP BY 1 ORDER BY 1")}
            kept = await conn.fetchval(
                """SELECT count(*) FROM animus.work_items
                    WHERE state IN ('completed', 'dead', 'merged', 'cancelled')
                      AND resolved_at < $1""", cutoff) - sum(by_state.values())
            audit_rows = await conn.fetchval(
                """SELECT count(*) FROM animus.audit_log
                    WHERE work_id IN (SELECT id FROM pg_temp.animus_purge)""")
            queues = [r[0] for r in await conn.fetch(
                "SELECT queue_name FROM pgmq.meta ORDER BY queue_name")]
            archived = {q: await conn.fetchval(
                f"SELECT count(*) FROM pgmq.{_ident('a_' + q)} WHERE archived_at < $1", cutoff)
                for q in queues}
            ticks = await conn.fetchval(
                """SELECT count(*) FROM animus.schedule_ticks
                    WHERE work_id IN (SELECT id FROM pg_temp.animus_purge)""")
            export: tuple[Path, str, int] | None = None
            if not dry_run:
                if audit_export is not None and audit_rows:
                    export = await _export_audit(conn, audit_export, db.audit_keys)
                by_state, ticks = await _delete_items(conn, cutoff, batch_size)
                archived = {q: await _delete_archived(conn, q, cutoff, batch_size)
                            for q in queues}
        finally:
            await conn.execute("DROP TABLE IF EXISTS pg_temp.animus_purge")
    return PurgeReport(
        cutoff=cutoff, dry_run=dry_run, items=by_state, kept_referenced=kept,
        schedule_ticks=ticks, archived_messages=archived, audit_rows=audit_rows,
        audit_export=str(export[0]) if export else None,
        audit_export_sha256=export[1] if export else None,
    )


async def _delete_items(conn: asyncpg.Connection, cutoff: datetime,
                        batch_size: int) -> tuple[dict[str, int], int]:
    """Delete the purge set in batches, newest first; return (items by state, ticks)."""
    deleted: dict[str, int] = {}
    ticks = rebuilds = 0
    while True:
        try:
            async with conn.transaction():
                ids = [r[0] for r in await conn.fetch(
                    "SELECT id FROM pg_temp.animus_purge ORDER BY created_at DESC, id DESC LIMIT $1",
                    batch_size)]
                if not ids:
                    return deleted, ticks
                # A schedule tick only guards against firing that tick twice; a tick old
                # enough for its item to be purged never fires again.
                gone_ticks = await conn.fetchval(
                    """WITH t AS (DELETE FROM animus.schedule_ticks
                                   WHERE work_id = ANY ($1::uuid[]) RETURNING 1)
                       SELECT count(*) FROM t""", ids)
                rows = await conn.fetch(
                    """DELETE FROM animus.work_items
                        WHERE id = ANY ($1::uuid[]) AND resolved_at < $2
                          AND state IN ('completed', 'dead', 'merged', 'cancelled')
                    RETURNING state::text""", ids, cutoff)
                await conn.execute(
                    "DELETE FROM pg_temp.animus_purge WHERE id = ANY ($1::uuid[])", ids)
        except asyncpg.ForeignKeyViolationError as e:
            # New work came to point at an item of the set (a replay of an old dead item,
            # say) after the set was computed: compute it again without that item.
            rebuilds += 1
            if rebuilds > 3:
                raise DatabaseError(f"purge kept colliding with new references: {e}") from e
            await _build_set(conn, cutoff)
            continue
        ticks += gone_ticks
        for r in rows:
            deleted[r[0]] = deleted.get(r[0], 0) + 1


async def _delete_archived(conn: asyncpg.Connection, queue: str, cutoff: datetime,
                           batch_size: int) -> int:
    table = f"pgmq.{_ident('a_' + queue)}"
    total = 0
    while True:
        n = await conn.fetchval(
            f"""WITH gone AS (
                    DELETE FROM {table} WHERE msg_id IN (
                        SELECT msg_id FROM {table} WHERE archived_at < $1
                         ORDER BY archived_at LIMIT $2)
                    RETURNING 1)
                SELECT count(*) FROM gone""", cutoff, batch_size)
        total += int(n)
        if n < batch_size:
            return total
