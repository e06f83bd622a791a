"""A failed or cancelled attempt ends in one SQL function call and one transaction
(animus.fail_attempt, animus.cancel_attempt): the failure, its execution record and usage,
and the retry or dead letter that follows, audited together; a lost lease changes nothing."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import pytest

from animus_core import Claimed, Created, Db, NewWorkItem, State
from animus_core.store.db import DeadLetter, Retry
from animus_core.values.errors import IllegalTransition, InvalidInput, LeaseLost
from animus_core.values.limits import clip, limits
from animus_core.values.records import ExecutionRecord
from tests.support import raw

USAGE = {"models": {"m": {"input_tokens": 3}}, "cost_usd": 0.25}


async def running(db: Db, work_type: str = "flaky", **kw: Any) -> Claimed:
    new = NewWorkItem(work_type, source="test")
    if kw.get("max_attempts"):
        new = new.max_attempts(kw["max_attempts"])
    created = await db.submit_work(new)
    assert isinstance(created, Created)
    [claimed] = await db.claim(work_types=[work_type], lease_seconds=60, start=True)
    assert claimed.item.id == created.id
    return claimed


async def record(db: Db, claimed: Claimed, error: str | None = "boom") -> ExecutionRecord:
    await db.record_environment("env", {"python": "3"})
    return ExecutionRecord(
        work_id=claimed.item.id, attempt=claimed.item.attempts, result="failed",
        work_type=claimed.item.work_type, params_hash="p", faculty={"name": "f"},
        faculty_hash="fh", engine_version="1", environment_hash="env", models=["m"],
        outcome_hash=None, error=error, started_at=datetime.now(UTC))


async def events(db_url: str, work_id: UUID) -> list[tuple[str, str | None, Any]]:
    """The item's audit events after its claim: (event, to_state, transaction time)."""
    async with raw(db_url) as conn:
        rows = await conn.fetch(
            """SELECT event, to_state::text, at FROM animus.audit_log
                WHERE work_id = $1 AND at > (SELECT min(at) FROM animus.audit_log
                                              WHERE work_id = $1 AND to_state = 'running')
                ORDER BY id""", work_id)
    return [(r[0], r[1], r[2]) for r in rows]


async def test_a_failed_attempt_that_retries_is_one_transaction(db, db_url):
    c = await running(db)
    rec = await record(db, c)
    item = await db.fail_attempt(c.lease, "boom", then=Retry(0, "retry 2/3 after boom"),
                                 duration_ms=12, execution=rec, usage=USAGE)
    assert item.state == State.QUEUED
    assert item.reason == "retry 2/3 after boom"
    assert item.outcome.error == "boom"
    assert item.outcome.duration_ms == 12
    assert item.usage == {"models": {"m": {"input_tokens": 3}}, "cost_usd": 0.25}
    [stored] = await db.executions(c.item.id)
    assert (stored.result, stored.error, stored.attempt) == ("failed", "boom", 1)
    seen = await events(db_url, c.item.id)
    assert [e[1] for e in seen if e[1] != "running"] == ["failed", "queued"]
    assert len({e[2] for e in seen}) == 1, seen  # one transaction: one transaction time
    [again] = await db.claim(work_types=["flaky"], lease_seconds=60, start=True)
    assert again.item.id == c.item.id
    assert again.item.attempts == 2


async def test_a_failed_attempt_that_ends_dead_is_one_transaction(db, db_url):
    c = await running(db)
    item = await db.fail_attempt(c.lease, "boom", then=DeadLetter("attempts exhausted"),
                                 execution=await record(db, c))
    assert item.state == State.DEAD
    assert item.reason == "attempts exhausted"
    assert item.outcome.error == "boom"
    assert item.resolved_at is not None
    seen = await events(db_url, c.item.id)
    assert [e[1] for e in seen if e[1] != "running"] == ["failed", "dead"]
    assert len({e[2] for e in seen}) == 1
    assert await db.claim(work_types=["flaky"], lease_seconds=60) == []  # its message is gone


async def test_a_lost_lease_changes_nothing_but_keeps_the_usage(db):
    c = await running(db)
    await db.release(c.lease, "taken back")
    [other] = await db.claim(work_types=["flaky"], lease_seconds=60, start=True)
    with pytest.raises(LeaseLost):
        await db.fail_attempt(c.lease, "late", then=Retry(0), execution=await record(db, c),
                              usage=USAGE)
    with pytest.raises(LeaseLost):
        await db.cancel_attempt(c.lease, execution=await record(db, c))
    item = await db.get_work_item(c.item.id)
    assert item.state == State.RUNNING
    assert item.reason != "late"
    assert await db.executions(c.item.id) == []
    assert item.usage == USAGE  # what the lost attempt spent is kept
    await db.complete(other.lease, {"ok": True})


async def test_the_database_still_checks_the_transition(db):
    created = await db.submit_work(NewWorkItem("flaky", source="test"))
    [c] = await db.claim(work_types=["flaky"], lease_seconds=60)  # claimed, not running
    with pytest.raises(IllegalTransition):
        await db.fail_attempt(c.lease, "boom", then=Retry(0), usage=USAGE)
    item = await db.get_work_item(created.id)
    assert item.state == State.CLAIMED
    assert item.usage is None
    with pytest.raises(InvalidInput, match="retry delay"):
        await db.fail_attempt(c.lease, "boom", then=Retry(-1))


async def test_a_cancelled_attempt_ends_dead_with_the_request(db, db_url):
    c = await running(db)
    requested = await db.cancel(c.item.id, "not needed any more")
    assert requested.state == State.RUNNING
    assert requested.cancel_requested
    item = await db.cancel_attempt(c.lease, duration_ms=5, execution=await record(db, c, None))
    reason = "cancelled while running: not needed any more"
    assert item.state == State.DEAD
    assert item.reason == reason
    [stored] = await db.executions(c.item.id)
    assert stored.error == reason
    seen = await events(db_url, c.item.id)
    assert [e[1] for e in seen if e[1] != "running"][-2:] == ["failed", "dead"]


async def test_a_long_cancel_request_is_cut_as_reasons_are(db, monkeypatch):
    c = await running(db)
    await db.cancel(c.item.id, "x" * 190)
    monkeypatch.setenv("ANIMUS_MAX_REASON_CHARS", "200")
    limits.cache_clear()
    try:
        item = await db.cancel_attempt(c.lease)
    finally:
        monkeypatch.undo()
        limits.cache_clear()
    assert item.reason == clip(f"cancelled while running: {'x' * 190}", 200)
    assert item.reason.endswith("55 more characters cut]")
