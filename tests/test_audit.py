"""The audit trail: a row for every change, append-only in the database, tamper-evident."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from animus_core import Created, Db, IllegalTransition, Merged, NewWorkItem
from animus_core.store.audit import UNSEALED_SQL, record_hash, row_hash
from animus_core.values.canonical import canonical_json
from tests.support import raw
from tests.test_canonical import json_objects


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=1, max_value=2**62), st.text(max_size=10),
       st.none() | st.text(max_size=10), json_objects, json_objects,
       st.datetimes(timezones=st.just(UTC)), st.binary(min_size=32, max_size=32))
def test_a_row_hashes_as_the_canonical_json_of_the_whole_row(
        audit_id: int, text: str, state: str | None, provenance: dict[str, Any],
        payload: dict[str, Any], at: datetime, prev: bytes) -> None:
    """The sealer writes each row's canonical text field by field, from the JSON text that
    Postgres prints; that is exactly ``sha256(prev || canonical_json(row))``."""
    row = {"id": audit_id, "work_id": uuid4(), "event": text, "from_state": state,
           "to_state": text, "provenance": provenance, "db_user": text, "at": at,
           "payload": payload}
    iso = at.isoformat(timespec="microseconds")
    expected = hashlib.sha256(prev + canonical_json({**row, "work_id": str(row["work_id"]),
                                                     "at": iso}).encode()).digest()
    as_read = (audit_id, str(row["work_id"]), text, state, text,
               json.dumps(provenance, ensure_ascii=False), text, iso,
               json.dumps(payload, ensure_ascii=False))
    assert row_hash(prev, row) == expected
    assert record_hash(prev, as_read) == expected


async def _current_user(db_url: str) -> str:
    async with raw(db_url) as conn:
        user: str = await conn.fetchval("SELECT current_user")
    return user


async def _lifecycle(db: Db) -> tuple[UUID, UUID]:
    """submit, merge, claim, start, fail, retry, claim+start, complete; returns both ids."""
    new = NewWorkItem("audited", source="tester", trigger="unit test").dedup_key("a1")
    first = await db.submit_work(new.params({"n": 1}))
    dup = await db.submit_work(new)
    assert isinstance(first, Created)
    assert isinstance(dup, Merged)
    [c1] = await db.claim()
    await db.start(c1.lease)
    await db.fail(c1.lease, "boom", duration_ms=7)
    await db.retry(first.id, reason="again")
    [c2] = await db.claim(start=True)
    await db.complete(c2.lease, {"answer": 42}, duration_ms=9)
    return first.id, dup.id


async def test_every_change_writes_an_audit_row(db, db_url):
    wid, dup_id = await _lifecycle(db)
    user = await _current_user(db_url)
    history = await db.history(wid)
    assert [(e.event, e.from_state, e.to_state) for e in history] == [
        ("submitted", None, "queued"),
        ("claimed", "queued", "claimed"),
        ("running", "claimed", "running"),
        ("failed", "running", "failed"),
        ("queued", "failed", "queued"),
        ("claimed", "queued", "claimed"),
        ("running", "claimed", "running"),
        ("completed", "running", "completed"),
    ]
    for e in history:
        assert e.work_id == wid
        assert e.db_user == user
        # Who (the submitter), why (the trigger) and which process acted (the Db actor).
        assert e.provenance == {"source": "tester", "trigger": "unit test", "actor": "test"}
    submitted, failed, retried, completed = history[0], history[3], history[4], history[7]
    assert submitted.payload["work_type"] == "audited"
    assert submitted.payload["dedup_key"] == "a1"
    assert submitted.payload["params"] == {"n": 1}
    assert failed.payload["error"] == "boom"
    assert failed.payload["duration_ms"] == 7
    assert failed.payload["attempts"] == 1
    assert retried.payload["reason"] == "again"
    assert completed.payload["outcome"] == {"answer": 42}
    assert completed.payload["attempts"] == 2
    assert [e.id for e in history] == sorted(e.id for e in history)

    merged = await db.history(dup_id)
    assert [(e.event, e.from_state, e.to_state) for e in merged] == [("merged", None, "merged")]
    assert merged[0].payload["merged_into"] == str(wid)

    # Every row waits to be sealed; sealing chains them all and the chain verifies.
    async with raw(db_url) as conn:
        total = await conn.fetchval("SELECT count(*) FROM animus.audit_log")
        waiting = await conn.fetchval(UNSEALED_SQL)
    assert total == waiting == len(history) + len(merged)
    assert await db.seal_audit() == total
    assert all(e.sealed for e in await db.history(wid))
    result = await db.verify_audit()
    assert result.ok
    assert result.checked == total
    assert result.unsealed == 0


@pytest.mark.parametrize("n", [1, 2, 40])
async def test_a_batch_is_audited_alike_by_row_or_by_statement(db, db_url, n):
    """A move of one item is audited by row triggers, a batch by statement triggers: each item
    gets the same rows with the same payloads either way, once, and the chain verifies."""
    ids = [(await db.submit_work(NewWorkItem("batched", source="s").params({"i": i}))).id
           for i in range(n)]
    claimed = await db.claim(limit=n, start=True)
    assert len(claimed) == n
    await db.complete_many([(c.lease, {"i": c.item.params["i"]}, 5) for c in claimed])
    async with raw(db_url) as conn:  # a direct update (as the owner): one `changed` row
        await conn.execute("UPDATE animus.work_items SET priority = 3 WHERE id = $1", ids[0])
    for i, wid in enumerate(ids):
        history = await db.history(wid)
        rows = [(e.event, e.from_state, e.to_state) for e in history]
        assert rows[:4] == [("submitted", None, "queued"), ("claimed", "queued", "claimed"),
                            ("running", "claimed", "running"),
                            ("completed", "running", "completed")]
        assert rows[4:] == ([("changed", "completed", "completed")] if i == 0 else [])
        claim, run, done = history[1].payload, history[2].payload, history[3].payload
        assert (claim, run) == ({"attempts": 0}, {"attempts": 1})
        assert done == {"reason": "completed", "attempts": 1, "outcome": {"i": i},
                        "duration_ms": 5}
        assert all(e.provenance == {"source": "s", "actor": "test"} for e in history[:4])
    assert (await db.history(ids[0]))[4].payload == {"columns": {"priority": {"old": 0,
                                                                             "new": 3}}}
    assert await db.seal_audit() == 4 * n + 1
    assert (await db.verify_audit()).ok


async def test_no_session_setting_skips_the_audit(db, db_url):
    """Whatever a session sets animus.audit_mode to, every move is audited once."""
    for mode in ("statement", "row", "nonsense", ""):
        created = await db.submit_work(NewWorkItem("t", source="s"))
        async with db.connection() as conn, conn.transaction():
            await conn.execute("SELECT set_config('animus.audit_mode', $1, true)", mode)
            await conn.execute("SELECT 1 FROM animus.cancel($1, 'x')", created.id)
        assert [e.event for e in await db.history(created.id)] == ["submitted", "cancelled"]


async def test_audit_rows_keep_nulls_inside_params_and_outcomes(db):
    """Absent top-level members are left out of an audit row, but params and outcomes are
    recorded exactly as given, nulls nested in them included."""
    params = {"a": None, "b": {"c": None, "d": [None, {"e": None}]}}
    created = await db.submit_work(NewWorkItem("nulls", source="t").params(params))
    [c] = await db.claim(start=True)
    await db.complete(c.lease, {"x": None, "y": {"z": None}})
    submitted, claimed, _, completed = await db.history(created.id)
    assert submitted.payload["params"] == params
    assert "dedup_key" not in submitted.payload  # no dedup key: absent, not null
    assert "trigger" not in submitted.provenance
    assert completed.payload["outcome"] == {"x": None, "y": {"z": None}}
    assert "error" not in completed.payload
    assert "reason" not in claimed.payload
    assert await db.seal_audit() >= 4
    assert (await db.verify_audit()).ok


async def test_cancel_and_dead_letter_are_audited(db):
    a = await db.submit_work(NewWorkItem("t", source="s"))
    b = await db.submit_work(NewWorkItem("t", source="s"))
    await db.cancel(a.id, "not needed")
    await db.dead_letter(b.id, "poison")
    [cancel] = (await db.history(a.id))[1:]
    assert (cancel.event, cancel.from_state, cancel.to_state) == ("cancelled", "queued", "cancelled")
    assert cancel.payload["reason"] == "not needed"
    [dead] = (await db.history(b.id))[1:]
    assert (dead.event, dead.to_state) == ("dead", "dead")
    assert dead.payload["error"] == "poison"


async def test_refused_change_writes_no_audit_row(db, db_url):
    item = await db.submit_work(NewWorkItem("t", source="s"))
    await db.cancel(item.id)
    before = len(await db.history(item.id))
    with pytest.raises(IllegalTransition, match="cancelled -> cancelled"):
        await db.cancel(item.id)
    assert len(await db.history(item.id)) == before


_REFUSED = [
    "UPDATE animus.{t} SET {col} = {col}",
    "UPDATE animus.{t} SET {col} = {col} WHERE {key} = 1",
    "DELETE FROM animus.{t}",
    "DELETE FROM animus.{t} WHERE {key} = (SELECT max({key}) FROM animus.{t})",
    "TRUNCATE animus.{t} CASCADE",
]


@pytest.mark.parametrize("table", ["audit_log", "audit_seal"])
async def test_audit_tables_are_append_only_even_for_superuser(db, db_url, table):
    await _lifecycle(db)
    await db.seal_audit()
    key, col = ("id", "event") if table == "audit_log" else ("seq", "sealed_at")
    async with raw(db_url) as conn:
        assert await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        rows_before = await conn.fetch(f"SELECT * FROM animus.{table} ORDER BY {key}")
        assert rows_before
        for statement in _REFUSED:
            sql = statement.format(t=table, col=col, key=key)
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only") as err:
                await conn.execute(sql)
            assert f"on animus.{table} is refused" in str(err.value), sql
            assert await conn.fetch(f"SELECT * FROM animus.{table} ORDER BY {key}") == rows_before
    assert (await db.verify_audit()).ok


async def _seal_and_tamper(db: Db, db_url: str, sql: str) -> int:
    """Seal the trail, then change it past the triggers as the superuser can. Returns the
    id of the row the change was aimed at (the third row of the chain)."""
    await _lifecycle(db)
    assert await db.seal_audit() > 3
    async with raw(db_url) as conn:
        target: int = await conn.fetchval(
            "SELECT audit_id FROM animus.audit_seal ORDER BY seq OFFSET 2 LIMIT 1"
        )
        await conn.execute("SET session_replication_role = replica")
        status = await conn.execute(sql, target)
        assert status.endswith(" 1"), status
    return target


async def test_tampered_payload_is_detected_at_its_row(db, db_url, animus):
    target = await _seal_and_tamper(
        db, db_url,
        """UPDATE animus.audit_log SET payload = payload || '{"reason": "nothing to see"}'
            WHERE id = $1""",
    )
    result = await db.verify_audit()
    assert not result.ok
    assert result.first_bad_id == target
    assert result.checked == 2
    assert "changed after it was sealed" in (result.problem or "")

    proc = animus("audit", "verify")
    assert proc.returncode == 1, proc
    assert f"row {target}" in proc.stdout
    assert "BROKEN" in proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("sql", "problem"),
    [
        ("UPDATE animus.audit_log SET at = at + interval '1 microsecond' WHERE id = $1",
         "changed after it was sealed"),
        ("UPDATE animus.audit_log SET db_user = 'someone_else' WHERE id = $1",
         "changed after it was sealed"),
        ("UPDATE animus.audit_seal SET hash = sha256(hash) WHERE audit_id = $1",
         "changed after it was sealed"),
        ("DELETE FROM animus.audit_log WHERE id = $1", "is missing: sealed, then deleted"),
    ],
)
async def test_other_tampering_is_detected(db, db_url, sql, problem):
    target = await _seal_and_tamper(db, db_url, sql)
    result = await db.verify_audit()
    assert not result.ok
    assert problem in (result.problem or "")
    assert result.first_bad_id == target


async def test_a_deleted_middle_row_is_named_by_its_seal(db, db_url, animus):
    """The row is gone, but its seal still says which row it sealed."""
    target = await _seal_and_tamper(db, db_url, "DELETE FROM animus.audit_log WHERE id = $1")
    proc = animus("audit", "verify")
    assert proc.returncode == 1, proc
    assert proc.stdout.strip() == (
        f"audit chain BROKEN at row {target}: audit row {target} (chain position 3) is missing: "
        "sealed, then deleted (2 rows before it verified)")


async def test_row_slipped_in_below_the_sealed_range_is_detected(db, db_url):
    """Appending is what the log is for: a row past the sealed range is sealed like any
    other. A row given an id inside the sealed range (that no transaction left as a gap)
    can only have been written around the sequence, and verify names it."""
    await _lifecycle(db)
    await db.seal_audit()
    async with raw(db_url) as conn:
        forged = await conn.fetchval(
            """INSERT INTO animus.audit_log (id, work_id, event, provenance)
               OVERRIDING SYSTEM VALUE
               VALUES (0, gen_random_uuid(), 'completed', '{}') RETURNING id"""
        )
    result = await db.verify_audit()
    assert not result.ok
    assert result.first_bad_id == forged == 0
    assert "neither sealed nor waiting" in (result.problem or "")


async def test_cli_verify_intact_and_show_history(db, animus):
    wid, _ = await _lifecycle(db)
    ok = animus("audit", "verify")
    assert ok.returncode == 0, ok.stderr
    assert "intact" in ok.stdout

    shown = animus("audit", "show", str(wid))
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.strip().splitlines()
    assert lines[0].split()[:5] == ["#", "at", "event", "from", "to"]
    events = [line.split()[3] for line in lines[1:]]
    assert events == ["submitted", "claimed", "running", "failed", "queued", "claimed",
                      "running", "completed"]
    assert "test" in lines[1]  # the actor
    assert "yes" in lines[1]  # verify sealed it

    missing = animus("audit", "show", "00000000-0000-0000-0000-000000000000")
    assert missing.returncode == 2
    assert missing.stderr.startswith("animus: error:")


# -- gaps: ids the sealer passes before their transaction ends ---------------------------------


async def _unsealed(db_url: str) -> int:
    async with raw(db_url) as conn:
        n: int = await conn.fetchval(UNSEALED_SQL)
    return n


async def test_rows_of_a_transaction_that_commits_late_are_sealed_when_it_does(db, db_url):
    """A transaction that took audit ids and commits after later ids were sealed leaves a
    gap; its rows are sealed once they appear, and the chain verifies throughout."""
    await db.submit_work(NewWorkItem("before", source="t"))
    async with raw(db_url) as slow:
        tx = slow.transaction()
        await tx.start()
        await slow.execute(
            """INSERT INTO animus.work_items (work_type, source, state)
               VALUES ('slow', 'psql', 'queued')""")
        later = await db.submit_work(NewWorkItem("later", source="t"))
        assert await db.seal_audit() == 2  # 'before' and 'later'; 'slow' is not visible
        async with raw(db_url) as conn:
            gaps = await conn.fetch("SELECT audit_id FROM animus.audit_gaps")
        assert len(gaps) == 1
        check = await db.verify_audit()
        assert check.ok, check.problem
        assert check.unsealed == 0
        await tx.commit()
    assert await _unsealed(db_url) == 1
    assert await db.seal_audit() == 1
    async with raw(db_url) as conn:
        assert await conn.fetchval("SELECT count(*) FROM animus.audit_gaps") == 0
        order = await conn.fetch(
            """SELECT a.event, a.payload->>'work_type' AS t FROM animus.audit_seal s
                 JOIN animus.audit_log a ON a.id = s.audit_id ORDER BY s.seq""")
    assert [r["t"] for r in order] == ["before", "later", "slow"]  # chained as they appeared
    check = await db.verify_audit()
    assert check.ok, check.problem
    assert check.checked == 3
    assert check.unsealed == 0
    assert all(e.sealed for e in await db.history(later.id))


async def test_ids_of_a_rolled_back_transaction_are_given_up_after_an_hour(db, db_url):
    async with raw(db_url) as conn:
        await conn.execute(
            """INSERT INTO animus.work_items (work_type, source, state)
               VALUES ('kept', 'psql', 'queued'), ('kept', 'psql', 'queued')""")
        tx = conn.transaction()
        await tx.start()
        await conn.execute(
            """INSERT INTO animus.work_items (work_type, source, state)
               VALUES ('rolled-back', 'psql', 'queued')""")
        await tx.rollback()
    await db.submit_work(NewWorkItem("after", source="t"))
    assert await db.seal_audit() == 3  # the two 'kept' rows and 'after'
    async with raw(db_url) as conn:
        [gap] = await conn.fetch("SELECT audit_id FROM animus.audit_gaps")
        assert await conn.fetchval("SELECT count(*) FROM animus.audit_log WHERE id = $1",
                                   gap["audit_id"]) == 0
    check = await db.verify_audit()
    assert check.ok, check.problem
    assert check.unsealed == 0
    # within the hour the gap is kept; after it, with every transaction since ended, it goes
    assert await db.seal_audit() == 0
    async with raw(db_url) as conn:
        assert await conn.fetchval("SELECT count(*) FROM animus.audit_gaps") == 1
        await conn.execute("UPDATE animus.audit_gaps SET seen_at = now() - interval '2 hours'")
    assert await db.seal_audit() == 0
    async with raw(db_url) as conn:
        assert await conn.fetchval("SELECT count(*) FROM animus.audit_gaps") == 0
    check = await db.verify_audit()
    assert check.ok, check.problem


async def test_the_sealer_holds_no_snapshot_while_it_hashes(db, db_url, monkeypatch):
    """A transaction open while thousands of rows were hashed held the oldest snapshot, and
    every dead row version younger than it, for that long (a queue's claims then stepped
    over every entry the claims before them had left in its index). The rows are read and
    hashed outside a transaction."""
    from animus_core.store import audit

    await db.submit_many([NewWorkItem("many", source="t").params({"i": i}) for i in range(300)])
    seen: list[Any] = []
    real = audit._chain_in_slices

    async def watched(rows: list[Any], *args: Any) -> Any:
        async with raw(db_url) as observer:
            seen.append(await observer.fetchrow(
                """SELECT state, backend_xmin, backend_xid FROM pg_stat_activity
                    WHERE datname = current_database() AND query LIKE '%audit_log a%'
                      AND pid <> pg_backend_pid()"""))
        return await real(rows, *args)

    monkeypatch.setattr(audit, "_chain_in_slices", watched)
    assert await db.seal_audit() == 300
    assert seen, "hashed through _chain_in_slices"
    assert seen[0] is not None, "the sealer's session, found by its last query"
    assert seen[0]["state"] == "idle"
    assert seen[0]["backend_xmin"] is None
    assert seen[0]["backend_xid"] is None
    check = await db.verify_audit()
    assert check.ok, check.problem


async def test_a_sealer_that_finds_the_head_moved_reads_again(db, db_url, monkeypatch):
    """Two sealers: the one that hashed from a head another has since moved reads the rows
    again, and the chain holds every row once."""
    from animus_core.store import audit

    await db.submit_many([NewWorkItem("race", source="t").params({"i": i}) for i in range(50)])
    real = audit._chain_in_slices
    calls = 0

    async def overtaken(rows: list[Any], *args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:  # while the first hashes, a second sealer seals everything
            monkeypatch.setattr(audit, "_chain_in_slices", real)
            async with raw(db_url) as other:
                assert await audit.seal(other) == 50
            monkeypatch.setattr(audit, "_chain_in_slices", overtaken)
        return await real(rows, *args)

    monkeypatch.setattr(audit, "_chain_in_slices", overtaken)
    assert await db.seal_audit() == 0  # all sealed by the other, found on reading again
    assert calls == 2
    async with raw(db_url) as conn:
        assert await conn.fetchval(
            "SELECT count(*) = count(DISTINCT audit_id) FROM animus.audit_seal")
    check = await db.verify_audit()
    assert check.ok, check.problem
    assert check.unsealed == 0
