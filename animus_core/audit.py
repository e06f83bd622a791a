"""The hash-chained audit trail: sealing rows after commit, and verifying the chain.

Writers never wait on the chain: each state change writes its ``audit_log`` row in its own
transaction. A sealer, one at a time under an advisory lock, appends ``audit_seal`` rows
(``hash = sha256(prev_hash || canonical(row))``) for committed rows past the highest id it
has sealed. An id it passes that is not visible yet is a *gap* (``audit_gaps``): a
transaction still running, whose rows are sealed when they appear, or one that rolled back,
given up once every transaction that could have taken the id has ended and an hour has
passed. Verification recomputes every hash from the rows as they are now and names the first
one that does not match.

Hashing never fails on a row the database accepted. A JSON column that RFC 8785 cannot write
(an integer beyond a double, written by hand with SQL or before animus refused such values
at the edge) is hashed over Postgres's own text of it instead, behind a NUL character that no
canonical text contains; the sealer logs such a row and verification reports it as a
finding, so it stays tamper-evident without stopping the chain.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import msgspec

from animus_core.canonical import canonical_json, canonical_string, canonical_text

__all__ = [
    "GENESIS", "UNSEALED_SQL", "AuditEvent", "Verification", "record_hash", "row_hash", "seal",
    "verify",
]

_log = logging.getLogger("animus.audit")
GENESIS = b"\x00" * 32
_MAX_FINDINGS = 20  # listed by verify; the count covers all of them
_SEAL_LOCK = "SELECT pg_try_advisory_xact_lock(hashtext('animus.audit_seal'))"


class AuditEvent(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    work_id: UUID
    event: str
    from_state: str | None
    to_state: str | None
    provenance: dict[str, Any]
    db_user: str
    at: datetime
    payload: dict[str, Any]
    sealed: bool = False

    @classmethod
    def from_row(cls, row: Any) -> AuditEvent:
        return cls(
            id=row["id"], work_id=row["work_id"], event=row["event"],
            from_state=row["from_state"], to_state=row["to_state"],
            provenance=row["provenance"], db_user=row["db_user"], at=row["at"],
            payload=row["payload"], sealed=bool(row.get("sealed", False)),
        )


class Verification(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    checked: int
    unsealed: int
    first_bad_id: int | None = None
    problem: str | None = None
    #: rows hashed over Postgres's text of a JSON column outside the value model (see above)
    findings: list[str] = []
    findings_total: int = 0


# What the sealer and the verifier read of each row, in the order _hash takes it: work_id and
# at already as the text the hash covers, provenance and payload as JSON text (Postgres
# formats them faster than Python decodes and re-formats them).
_HASHED_COLUMNS = """a.id, a.work_id::text AS work_id, a.event, a.from_state::text,
    a.to_state::text, a.provenance::text AS provenance, a.db_user,
    to_char(a.at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"') AS at,
    a.payload::text AS payload"""


def row_hash(prev: bytes, row: Any) -> bytes:
    """``sha256(prev || canonical(row))``; ``at`` as a datetime or its UTC ISO text
    (``2026-01-02T03:04:05.000006+00:00``), ``work_id`` as a UUID or its text."""
    return _hash(prev, row["id"], row["work_id"], row["event"], row["from_state"],
                 row["to_state"], canonical_json(row["provenance"]), row["db_user"], row["at"],
                 canonical_json(row["payload"]))


def record_hash(prev: bytes, record: Any) -> bytes:
    """:func:`row_hash` of a row read as ``_HASHED_COLUMNS`` (JSON as text), in that order."""
    return _record_hash(prev, record)[0]


def _record_hash(prev: bytes, record: Any) -> tuple[bytes, str | None]:
    """The hash of a row read as ``_HASHED_COLUMNS``, and what kept a JSON column from its
    canonical text (``None`` for a row inside the value model)."""
    id_, work_id, event, from_state, to_state, provenance, db_user, at, payload = record
    provenance, bad_provenance = _json_text(provenance)
    payload, bad_payload = _json_text(payload)
    problem = "; ".join(f"{column}: {bad}" for column, bad in
                        (("provenance", bad_provenance), ("payload", bad_payload)) if bad)
    return (_hash(prev, id_, work_id, event, from_state, to_state, provenance, db_user, at,
                  payload), problem or None)


def _json_text(text: str) -> tuple[str, str | None]:
    try:
        return canonical_text(text), None
    except RecursionError:
        reason = "nested too deeply to decode"
    except ValueError as e:
        reason = str(e).replace("Number out of range", "a number beyond the range of a double")
    except Exception as e:  # whatever Postgres stored must still be hashed
        reason = type(e).__name__
    return "\x00" + text, f"{reason}; hashed as stored"


def _hash(prev: bytes, id_: int, work_id: UUID | str, event: str, from_state: str | None,
          to_state: str | None, provenance: str, db_user: str, at: datetime | str,
          payload: str) -> bytes:
    # canonical_json of the row as one object, written out with its keys in canonical order
    # (provenance and payload arrive as canonical text)
    body = "".join((
        '{"at":', canonical_string(
            at if isinstance(at, str) else at.astimezone(UTC).isoformat(timespec="microseconds")),
        ',"db_user":', canonical_string(db_user),
        ',"event":', canonical_string(event),
        ',"from_state":', "null" if from_state is None else canonical_string(from_state),
        ',"id":', str(id_) if abs(id_) < 2**53 else canonical_json(id_),
        ',"payload":', payload,
        ',"provenance":', provenance,
        ',"to_state":', "null" if to_state is None else canonical_string(to_state),
        ',"work_id":', canonical_string(str(work_id)),
        "}",
    ))
    return hashlib.sha256(prev + body.encode("utf-8")).digest()


# Rows waiting for a seal: past the highest sealed id, or in a gap that has since filled.
UNSEALED_SQL = """
    SELECT (SELECT count(*) FROM animus.audit_log
             WHERE id > (SELECT coalesce(max(audit_id), 0) FROM animus.audit_seal))
         + (SELECT count(*) FROM animus.audit_gaps g
             WHERE EXISTS (SELECT 1 FROM animus.audit_log a WHERE a.id = g.audit_id))"""
# A gap is given up when every transaction that could have taken its id has ended (its
# horizon is below the oldest running transaction) and it is an hour old.
_PRUNE_GAPS = """
    DELETE FROM animus.audit_gaps
     WHERE seen_at < now() - interval '1 hour'
       AND horizon <= pg_snapshot_xmin(pg_current_snapshot())"""


async def seal(conn: Any, batch: int = 10_000) -> int:
    """Seal committed unsealed rows; return how many. Returns 0 if another sealer is busy."""
    total = 0
    while True:
        async with conn.transaction():
            if not await conn.fetchval(_SEAL_LOCK):
                return total
            last = await conn.fetchrow(
                """SELECT seq, hash, (SELECT max(audit_id) FROM animus.audit_seal) AS high
                     FROM animus.audit_seal ORDER BY seq DESC LIMIT 1""")
            seq, prev, high = ((last["seq"], bytes(last["hash"]), last["high"]) if last
                               else (0, GENESIS, 0))
            filled = await conn.fetch(
                f"""SELECT {_HASHED_COLUMNS} FROM animus.audit_gaps g
                      JOIN animus.audit_log a ON a.id = g.audit_id ORDER BY a.id""")
            fresh = await conn.fetch(
                f"""SELECT {_HASHED_COLUMNS} FROM animus.audit_log a
                     WHERE a.id > $1 ORDER BY a.id LIMIT $2""", high, batch)
            rows = [*filled, *fresh]
            if rows:
                # hashing is CPU work: off the event loop, so an engine keeps serving meanwhile
                records = await asyncio.to_thread(_chain, rows, seq, prev)
                await conn.copy_records_to_table(
                    "audit_seal", schema_name="animus", records=records,
                    columns=["seq", "audit_id", "prev_hash", "hash"],
                )
            if filled:
                await conn.execute(
                    "DELETE FROM animus.audit_gaps WHERE audit_id = ANY($1::bigint[])",
                    [r["id"] for r in filled])
            if fresh:
                seen = {r["id"] for r in fresh}
                gaps = [i for i in range(high + 1, fresh[-1]["id"]) if i not in seen]
                if gaps:
                    await conn.execute(
                        """INSERT INTO animus.audit_gaps (audit_id)
                           SELECT unnest($1::bigint[])""", gaps)
            await conn.execute(_PRUNE_GAPS)
            total += len(rows)
            if len(fresh) < batch:
                return total


def _chain(rows: list[Any], seq: int, prev: bytes) -> list[tuple[int, int, bytes, bytes]]:
    records = []
    for row in rows:
        seq += 1
        h, problem = _record_hash(prev, row)
        if problem:
            _log.warning("audit row %s holds JSON outside the value model (%s); it is sealed "
                         "over the text Postgres stores", row["id"], problem)
        records.append((seq, row["id"], prev, h))
        prev = h
    return records


async def verify(conn: Any, page: int = 20_000) -> Verification:
    """Recompute the whole chain from the stored rows."""
    prev, expected_seq, checked = GENESIS, 1, 0
    findings: list[str] = []
    total = 0
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        while True:
            rows = await conn.fetch(
                f"""SELECT s.seq, s.prev_hash, s.hash, {_HASHED_COLUMNS}
                     FROM animus.audit_seal s LEFT JOIN animus.audit_log a ON a.id = s.audit_id
                    WHERE s.seq >= $1 ORDER BY s.seq LIMIT $2""",
                expected_seq, page,
            )
            for r in rows:
                where = f"audit row {r['id']} (chain position {r['seq']})"
                if r["seq"] != expected_seq:
                    return _bad(checked, r["id"], f"chain position {expected_seq} is missing")
                if r["id"] is None:
                    return _bad(checked, None, f"chain position {r['seq']} seals a missing row")
                if bytes(r["prev_hash"]) != prev:
                    return _bad(checked, r["id"], f"{where} does not link to the row before it")
                digest, problem = _record_hash(prev, r[3:])
                if digest != bytes(r["hash"]):
                    return _bad(checked, r["id"], f"{where} was changed after it was sealed")
                if problem:
                    total += 1
                    if len(findings) < _MAX_FINDINGS:
                        findings.append(f"audit row {r['id']}: {problem}")
                prev, expected_seq, checked = bytes(r["hash"]), expected_seq + 1, checked + 1
            if len(rows) < page:
                break
        orphans = await conn.fetchval(
            """SELECT min(a.id) FROM animus.audit_log a
                WHERE a.id < (SELECT max(audit_id) FROM animus.audit_seal)
                  AND NOT EXISTS (SELECT 1 FROM animus.audit_seal s WHERE s.audit_id = a.id)
                  AND NOT EXISTS (SELECT 1 FROM animus.audit_gaps g WHERE g.audit_id = a.id)"""
        )
        if orphans is not None:
            return _bad(checked, orphans, f"audit row {orphans} is neither sealed nor waiting to be")
        unsealed = await conn.fetchval(UNSEALED_SQL)
    return Verification(ok=True, checked=checked, unsealed=unsealed, findings=findings,
                        findings_total=total)


def _bad(checked: int, row_id: int | None, problem: str) -> Verification:
    return Verification(ok=False, checked=checked, unsealed=0, first_bad_id=row_id, problem=problem)
