"""The hash-chained audit trail: sealing rows after commit, and verifying the chain.

Writers never wait on the chain: each state change writes its ``audit_log`` row in its own
transaction. A sealer, one at a time under an advisory lock, appends ``audit_seal`` rows
(``hash = sha256(prev_hash || canonical(row))``, or with an audit key
``HMAC-SHA256(key, prev_hash || canonical(row))``, see :mod:`animus_core.infra.witness`) for
committed rows past the highest id it has sealed. An id it passes that is not visible yet is
a *gap* (``audit_gaps``): a transaction still running, whose rows are sealed when they
appear, or one that rolled back, given up once every transaction that could have taken the
id has ended and an hour has passed. Verification recomputes every hash from the rows as they
are now and names the first one that does not match; against checkpoints, it also checks
that the chain still holds each checkpoint's head.

Keys only go forward: once a seal is keyed, a process without a key does not extend the
chain (a keyless seal after a keyed one is what a forger without the key would write), and
verification refuses one.

Hashing never fails on a row the database accepted. A JSON column that RFC 8785 cannot write
(an integer beyond a double, written by hand with SQL or before animus refused such values
at the edge) is hashed over Postgres's own text of it instead, behind a NUL character that no
canonical text contains; the sealer logs such a row and verification reports it as a
finding, so it stays tamper-evident without stopping the chain.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import msgspec

from animus_core.infra.witness import NO_KEYS, AuditKeys, Checkpoint, new_checkpoint, signature_ok
from animus_core.values.canonical import canonical_json, canonical_string, canonical_text

__all__ = [
    "GENESIS", "UNSEALED_SQL", "AuditEvent", "Verification", "checkpoint", "database_name",
    "record_hash", "row_hash", "seal", "verify",
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
    #: of ``checked``: rows whose keyed seal was recomputed with a key this process holds,
    #: rows sealed with a key it does not hold (their links checked, not their contents),
    #: and rows sealed without a key
    authenticated: int = 0
    unauthenticated: int = 0
    unkeyed: int = 0
    #: the keys (by :func:`~animus_core.infra.witness.key_id`) that sealed the chain, in order
    key_ids: list[str] = []
    #: checkpoints the chain still matches; of them, how many carried a signature by a key
    #: this process does not hold (not checked)
    checkpoints: int = 0
    signatures_unchecked: int = 0
    #: the newest checkpoint matched: its position and time
    newest_checkpoint: str | None = None
    head_seq: int = 0
    #: set when rows wait to be sealed by a key this process does not hold
    waiting_for_key: str | None = None


# What the sealer and the verifier read of each row, in the order _hash takes it: work_id and
# at already as the text the hash covers, provenance and payload as JSON text (Postgres
# formats them faster than Python decodes and re-formats them).
_HASHED_COLUMNS = """a.id, a.work_id::text AS work_id, a.event, a.from_state::text,
    a.to_state::text, a.provenance::text AS provenance, a.db_user,
    to_char(a.at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"') AS at,
    a.payload::text AS payload"""


def row_hash(prev: bytes, row: Any, key: bytes | None = None) -> bytes:
    """``sha256(prev || canonical(row))``, or with ``key`` ``HMAC-SHA256(key, ...)``; ``at``
    as a datetime or its UTC ISO text (``2026-01-02T03:04:05.000006+00:00``), ``work_id`` as
    a UUID or its text."""
    return _hash(prev, key, row["id"], row["work_id"], row["event"], row["from_state"],
                 row["to_state"], canonical_json(row["provenance"]), row["db_user"], row["at"],
                 canonical_json(row["payload"]))


def record_hash(prev: bytes, record: Any, key: bytes | None = None) -> bytes:
    """:func:`row_hash` of a row read as ``_HASHED_COLUMNS`` (JSON as text), in that order."""
    return _record_hash(prev, record, key)[0]


def _record_hash(prev: bytes, record: Any, key: bytes | None = None) -> tuple[bytes, str | None]:
    """The hash of a row read as ``_HASHED_COLUMNS``, and what kept a JSON column from its
    canonical text (``None`` for a row inside the value model)."""
    id_, work_id, event, from_state, to_state, provenance, db_user, at, payload = record
    provenance, bad_provenance = _json_text(provenance)
    payload, bad_payload = _json_text(payload)
    problem = "; ".join(f"{column}: {bad}" for column, bad in
                        (("provenance", bad_provenance), ("payload", bad_payload)) if bad)
    return (_hash(prev, key, id_, work_id, event, from_state, to_state, provenance, db_user, at,
                  payload), problem or None)


#: the canonical text of the JSON texts hashed lately: most audit rows repeat a handful of
#: payloads (``{"attempts": 1}``) and one provenance per writer, so the sealer decodes and
#: re-encodes each of them once, not once per row
_CANONICAL: dict[str, tuple[str, str | None]] = {}
_CANONICAL_MOST = 4096
_CANONICAL_LONGEST = 512  # characters: longer texts are rarely repeated, and not kept


def _json_text(text: str) -> tuple[str, str | None]:
    """The canonical text of a JSON column as Postgres prints it, and what kept it from
    one (``None`` for a value inside the value model)."""
    known = _CANONICAL.get(text)
    if known is not None:
        return known
    found = _canonical_text(text)
    if len(text) <= _CANONICAL_LONGEST:
        if len(_CANONICAL) >= _CANONICAL_MOST:
            _CANONICAL.clear()
        _CANONICAL[text] = found
    return found


def _canonical_text(text: str) -> tuple[str, str | None]:
    try:
        return canonical_text(text), None
    except RecursionError:
        reason = "nested too deeply to decode"
    except ValueError as e:
        reason = str(e).replace("Number out of range", "a number beyond the range of a double")
    except Exception as e:  # whatever Postgres stored must still be hashed
        reason = type(e).__name__
    return "\x00" + text, f"{reason}; hashed as stored"


def _hash(prev: bytes, key: bytes | None, id_: int, work_id: UUID | str, event: str,
          from_state: str | None, to_state: str | None, provenance: str, db_user: str,
          at: datetime | str, payload: str) -> bytes:
    # canonical_json of the row as one object, written out with its keys in canonical order
    # (provenance and payload arrive as canonical text)
    if not isinstance(at, str):
        at = at.astimezone(UTC).isoformat(timespec="microseconds")
    body = (f'{{"at":{canonical_string(at)},"db_user":{canonical_string(db_user)},'
            f'"event":{canonical_string(event)},'
            f'"from_state":{"null" if from_state is None else canonical_string(from_state)},'
            f'"id":{id_ if abs(id_) < 2**53 else canonical_json(id_)},"payload":{payload},'
            f'"provenance":{provenance},'
            f'"to_state":{"null" if to_state is None else canonical_string(to_state)},'
            f'"work_id":{canonical_string(str(work_id))}}}').encode()
    if key is None:
        return hashlib.sha256(prev + body).digest()
    return hmac.digest(key, prev + body, "sha256")


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


_HEAD = """SELECT seq, hash, key_id, (SELECT max(audit_id) FROM animus.audit_seal) AS high
             FROM animus.audit_seal ORDER BY seq DESC LIMIT 1"""


async def seal(conn: Any, batch: int = 10_000, *, keys: AuditKeys = NO_KEYS) -> int:
    """Seal committed unsealed rows (with the sealing key of ``keys``, if any); return how
    many. Returns 0 if another sealer is busy, or if the chain is keyed and ``keys`` is
    empty (logged once per process).

    The rows are read and hashed outside a transaction, and the seals written in a short one
    that first checks that the chain's head is still the one they were hashed from (else
    another sealer went first: read again). A transaction open while thousands of rows are
    hashed held the oldest snapshot all that time (an idle transaction keeps its xmin), and
    with it every dead row version younger than it, which vacuum and index scans could then
    not remove."""
    key = keys.sealing
    kid = keys.sealing_id
    total = 0
    while True:
        last = await conn.fetchrow(_HEAD)
        seq, prev, high = ((last["seq"], bytes(last["hash"]), last["high"]) if last
                           else (0, GENESIS, 0))
        if last is not None and last["key_id"] is not None and key is None:
            _refuse_once(last["key_id"])
            return total
        filled = await conn.fetch(
            f"""SELECT {_HASHED_COLUMNS} FROM animus.audit_gaps g
                  JOIN animus.audit_log a ON a.id = g.audit_id ORDER BY a.id""")
        fresh = await conn.fetch(
            f"""SELECT {_HASHED_COLUMNS} FROM animus.audit_log a
                 WHERE a.id > $1 ORDER BY a.id LIMIT $2""", high, batch)
        rows = [*filled, *fresh]
        records = await _chain_in_slices(rows, seq, prev, key, kid)
        async with conn.transaction():
            if not await conn.fetchval(_SEAL_LOCK):
                return total
            now = await conn.fetchrow(_HEAD)
            if (now is None) != (last is None) or (
                    now is not None and (now["seq"], bytes(now["hash"])) != (seq, prev)):
                continue  # another sealer moved the head since: read again
            if records:
                await conn.copy_records_to_table(
                    "audit_seal", schema_name="animus", records=records,
                    columns=["seq", "audit_id", "prev_hash", "hash", "key_id"],
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


_refused: set[str] = set()


def _refuse_once(kid: str) -> None:
    if kid not in _refused:
        _refused.add(kid)
        _log.error("audit rows stay unsealed: the chain is sealed with key %s and this process "
                   "holds no audit key (set ANIMUS_AUDIT_KEY or ANIMUS_AUDIT_KEY_FILE); a process "
                   "that holds it seals them", kid)


#: rows hashed between two turns of the event loop (about a millisecond of work)
SLICE = 64


async def _chain_in_slices(rows: list[Any], seq: int, prev: bytes, key: bytes | None,
                           kid: str | None) -> list[tuple[int, int, bytes, bytes, str | None]]:
    """:func:`_chain` on the event loop, a slice at a time, so that an engine keeps serving
    meanwhile. Not in a worker thread: pure Python work there holds the interpreter lock
    against the loop, and each time the loop lets go of it for a system call (every socket
    read and write) it may wait a switch interval (5 ms) to have it back."""
    records: list[tuple[int, int, bytes, bytes, str | None]] = []
    for start in range(0, len(rows), SLICE):  # none for no rows
        if start:
            await asyncio.sleep(0)
        part = _chain(rows[start:start + SLICE], seq, prev, key, kid)
        records += part
        seq, prev = part[-1][0], part[-1][3]
    return records


def _chain(rows: list[Any], seq: int, prev: bytes, key: bytes | None, kid: str | None
           ) -> list[tuple[int, int, bytes, bytes, str | None]]:
    records = []
    for row in rows:
        seq += 1
        h, problem = _record_hash(prev, row, key)
        if problem:
            _log.warning("audit row %s holds JSON outside the value model (%s); it is sealed "
                         "over the text Postgres stores", row["id"], problem)
        records.append((seq, row["id"], prev, h, kid))
        prev = h
    return records


class _Walk:
    """What verification has seen so far of the chain, in order."""

    def __init__(self, keys: AuditKeys, checkpoints: Sequence[tuple[str, Checkpoint]],
                 database: str) -> None:
        self.keys = keys
        self.database = database
        self.prev, self.seq, self.checked = GENESIS, 0, 0
        self.findings: list[str] = []
        self.findings_total = 0
        self.counts = {"authenticated": 0, "unauthenticated": 0, "unkeyed": 0}
        self.key_ids: list[str] = []
        self.first_keyed: int | None = None
        self.wanted: dict[int, list[tuple[str, Checkpoint]]] = {}
        # a checkpoint of the empty chain holds for every chain
        self.matched = [(where, cp) for where, cp in checkpoints if cp.seq == 0]
        for where, cp in checkpoints:
            if cp.seq > 0:
                self.wanted.setdefault(cp.seq, []).append((where, cp))

    def step(self, r: Any) -> str | None:
        """Check one seal and its row; the problem, if any."""
        sealed_id, seq = r["sealed_id"], r["seq"]
        where = f"audit row {sealed_id} (chain position {seq})"
        if seq != self.seq + 1:
            return f"chain position {self.seq + 1} is missing"
        if r["id"] is None:
            return f"{where} is missing: sealed, then deleted"
        if bytes(r["prev_hash"]) != self.prev:
            return f"{where} does not link to the row before it"
        kid = r["key_id"]
        if kid is None:
            if self.first_keyed is not None:
                return (f"{where} is sealed without a key after chain position "
                        f"{self.first_keyed} was sealed with key {self.key_ids[0]}: the chain "
                        "never goes back to no key, so this seal was made by someone without it")
            digest, problem = _record_hash(self.prev, r[5:])
            kind = "unkeyed"
        else:
            if self.first_keyed is None:
                self.first_keyed = seq
            if kid not in self.key_ids:
                self.key_ids.append(kid)
            key = self.keys.get(kid)
            if key is None and self.keys:
                return (f"{where} is sealed with key {kid}, which is not among the keys given "
                        "(ANIMUS_AUDIT_KEY or ANIMUS_AUDIT_KEY_FILE): give every key the chain "
                        "was sealed with")
            digest, problem = _record_hash(self.prev, r[5:], key)
            kind = "authenticated" if key is not None else "unauthenticated"
        if kind != "unauthenticated" and digest != bytes(r["hash"]):
            if kid is None:
                return f"{where} was changed after it was sealed"
            return (f"{where} does not match its keyed seal: it, or a row before it, was "
                    "changed after it was sealed")
        if problem:
            self.findings_total += 1
            if len(self.findings) < _MAX_FINDINGS:
                self.findings.append(f"audit row {sealed_id}: {problem}")
        self.counts[kind] += 1
        self.prev, self.seq, self.checked = bytes(r["hash"]), seq, self.checked + 1
        for cp_where, cp in self.wanted.pop(seq, ()):
            if cp.hash != self.prev.hex() or cp.audit_id != sealed_id:
                last = self.matched[-1][1] if self.matched else None
                since = (f" after position {last.seq}, which still matches the checkpoint of "
                         f"{last.at}" if last is not None and last.seq > 0 else "")
                return (f"chain position {seq} (audit row {sealed_id}) no longer has the hash "
                        f"the checkpoint of {cp.at} ({cp_where}) recorded: rows at or before "
                        f"it were changed, deleted or replaced{since}{self._elsewhere(cp)}")
            self.matched.append((cp_where, cp))
        return None

    def shrunk(self) -> tuple[Checkpoint, str] | None:
        """The newest checkpoint past the end of the chain, and what that means."""
        beyond = [(cp, where) for cps in self.wanted.values() for where, cp in cps]
        if not beyond:
            return None
        cp, where = max(beyond, key=lambda b: b[0].seq)
        end = (f"the chain is empty, but the checkpoint of {cp.at} ({where}) recorded position "
               f"{cp.seq}: the audit trail was emptied" if self.seq == 0 else
               f"the chain has shrunk: it ends at position {self.seq}, but the checkpoint of "
               f"{cp.at} ({where}) recorded position {cp.seq}: the rows after position "
               f"{self.seq} were deleted with their seals")
        return cp, end + self._elsewhere(cp)

    def _elsewhere(self, cp: Checkpoint) -> str:
        """A note when the checkpoint names another database (a restore into another
        cluster, or the wrong file)."""
        if cp.database == self.database:
            return ""
        return f" (the checkpoint is of {cp.database}, and this database is {self.database})"


async def verify(conn: Any, page: int = 20_000, *, keys: AuditKeys = NO_KEYS,
                 checkpoints: Sequence[tuple[str, Checkpoint]] = ()) -> Verification:
    """Recompute the whole chain from the stored rows (keyed seals with ``keys``), and check
    that it still holds the head of each checkpoint (``(where, checkpoint)`` pairs)."""
    unchecked = 0
    for where, cp in checkpoints:
        signed = signature_ok(cp, keys)
        if signed is False:
            return _bad(0, cp.audit_id, f"the checkpoint on {where} does not carry a valid "
                                        f"signature of key {cp.key_id}: it was changed after "
                                        "it was written, or forged")
        if signed is None and cp.mac is not None:
            unchecked += 1
    walk = _Walk(keys, checkpoints, await database_name(conn) if checkpoints else "")
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        while True:
            rows = await conn.fetch(
                f"""SELECT s.seq, s.audit_id AS sealed_id, s.prev_hash, s.hash, s.key_id,
                           {_HASHED_COLUMNS}
                     FROM animus.audit_seal s LEFT JOIN animus.audit_log a ON a.id = s.audit_id
                    WHERE s.seq > $1 ORDER BY s.seq LIMIT $2""",
                walk.seq, page,
            )
            for r in rows:
                problem = walk.step(r)
                if problem is not None:
                    return _bad(walk.checked, r["sealed_id"], problem)
            if len(rows) < page:
                break
        orphans = await conn.fetchval(
            """SELECT min(a.id) FROM animus.audit_log a
                WHERE a.id < (SELECT max(audit_id) FROM animus.audit_seal)
                  AND NOT EXISTS (SELECT 1 FROM animus.audit_seal s WHERE s.audit_id = a.id)
                  AND NOT EXISTS (SELECT 1 FROM animus.audit_gaps g WHERE g.audit_id = a.id)"""
        )
        if orphans is not None:
            return _bad(walk.checked, orphans,
                        f"audit row {orphans} is neither sealed nor waiting to be")
        shrunk = walk.shrunk()
        if shrunk is not None:
            return _bad(walk.checked, shrunk[0].audit_id, shrunk[1])
        if keys and walk.checked and walk.first_keyed is None:
            return _bad(walk.checked, None, (
                f"no row is sealed with a key, though this process holds one (key "
                f"{keys.sealing_id}): the engines that seal the rows run without it (give them "
                "ANIMUS_AUDIT_KEY or ANIMUS_AUDIT_KEY_FILE), or the rows sealed with it were "
                "deleted and the rest resealed without it, or no audit row was written since "
                "the key was set (the next one will be sealed with it)"))
        unsealed = await conn.fetchval(UNSEALED_SQL)
    waiting = walk.key_ids[-1] if unsealed and walk.key_ids and not keys else None
    newest = walk.matched[-1][1] if walk.matched else None
    return Verification(
        ok=True, checked=walk.checked, unsealed=unsealed, findings=walk.findings,
        findings_total=walk.findings_total, key_ids=walk.key_ids,
        checkpoints=len(walk.matched), signatures_unchecked=unchecked,
        newest_checkpoint=(f"position {newest.seq} at {newest.at}" if newest else None),
        head_seq=walk.seq, waiting_for_key=waiting, authenticated=walk.counts["authenticated"],
        unauthenticated=walk.counts["unauthenticated"], unkeyed=walk.counts["unkeyed"])


def _bad(checked: int, row_id: int | None, problem: str) -> Verification:
    return Verification(ok=False, checked=checked, unsealed=0, first_bad_id=row_id, problem=problem)


async def database_name(conn: Any) -> str:
    """The database and the cluster it lives in (Postgres's system identifier): checkpoints
    of different databases must not mix."""
    name: str = await conn.fetchval("SELECT current_database()")
    try:
        system = await conn.fetchval("SELECT system_identifier FROM pg_control_system()")
    except Exception:  # a server that hides it: the name alone
        return name
    return f"{name}@{system}"


async def checkpoint(conn: Any, keys: AuditKeys = NO_KEYS) -> Checkpoint:
    """A checkpoint of the chain's head now (signed with the sealing key of ``keys``)."""
    row = await conn.fetchrow(
        "SELECT seq, audit_id, hash FROM animus.audit_seal ORDER BY seq DESC LIMIT 1")
    database = await database_name(conn)
    if row is None:
        return new_checkpoint(database, 0, None, GENESIS, keys)
    return new_checkpoint(database, row["seq"], row["audit_id"], bytes(row["hash"]), keys)
