"""A claim or a completion reads the items it moves, however long the backlog behind them.

Postgres plans the engine's statements once and keeps the plan, from statistics taken when
the backlog was short. Statements that reach items by id must not also reach them through
the index on ``state``: a plan that does reads the index entry of every queued item in
every claim, and a claim of 4 items costs as much as a claim of the whole backlog.
"""

from __future__ import annotations

from animus_core import NewWorkItem
from animus_core.store.db import Db
from tests.support import raw

BACKLOG = 3_000


async def _statistic(db: Db, sql: str) -> int:
    """A figure of Postgres's statistics (``sql``) once this connection's are flushed."""
    async with db.connection() as conn:
        await conn.execute("SELECT pg_stat_force_next_flush()")
    async with db.connection() as conn:
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        value: int = await conn.fetchval(sql)
        return value


async def _state_index_reads(db: Db) -> int:
    """Index entries of ``work_items_state`` read so far."""
    return await _statistic(db, "SELECT idx_tup_read FROM pg_stat_user_indexes "
                                "WHERE indexrelname = 'work_items_state'")


async def _backlog_after_statistics_of_a_short_one(db_url: str) -> Db:
    """A store on one fresh connection, over a backlog of ``BACKLOG`` queued items, with
    statistics taken when every item was finished (so the planner believes queued and
    running items are rare, as it does in a long-lived database before a burst)."""
    warm = await Db.connect(db_url, max_size=1, actor="test")
    await warm.submit_many([NewWorkItem("t").params({"i": i}) for i in range(500)])
    done = await warm.claim(limit=500, lease_seconds=60, start=True)
    await warm.complete_many([(c.lease, None, 1) for c in done])
    await warm.close()
    async with raw(db_url) as conn:
        await conn.execute("ANALYZE animus.work_items")
    db = await Db.connect(db_url, max_size=1, actor="test")
    for start in range(0, BACKLOG, 1_000):
        await db.submit_many([NewWorkItem("t").params({"i": i})
                              for i in range(start, start + 1_000)])
    return db


async def test_claims_and_completions_do_not_read_the_backlog(db_url):
    db = await _backlog_after_statistics_of_a_short_one(db_url)
    try:
        for _ in range(3):
            before = await _state_index_reads(db)
            claimed = await db.claim(limit=4, lease_seconds=60, start=True)
            after_claim = await _state_index_reads(db)
            await db.complete_many([(c.lease, None, 1) for c in claimed])
            after_complete = await _state_index_reads(db)
            assert len(claimed) == 4
            assert after_claim - before < 50, f"a claim of 4 read {after_claim - before} entries"
            assert after_complete - after_claim < 50, (
                f"a completion of 4 read {after_complete - after_claim} entries")
    finally:
        await db.close()


async def test_taking_back_expired_leases_does_not_read_the_backlog(db_url):
    db = await _backlog_after_statistics_of_a_short_one(db_url)
    try:
        claimed = await db.claim(limit=4, lease_seconds=60, start=True)
        async with raw(db_url) as conn:  # the engine that held them is gone
            await conn.execute("UPDATE pgmq.q_work SET vt = now() - interval '1 second' "
                               "WHERE msg_id = ANY ($1)", [c.lease.msg_id for c in claimed])
        before = await _state_index_reads(db)
        again = await db.claim(limit=4, lease_seconds=60, start=True)
        reads = await _state_index_reads(db) - before
        assert {c.item.id for c in again} == {c.item.id for c in claimed}
        assert all(c.item.attempts == 2 for c in again)
        assert reads < 50, f"taking back 4 expired leases read {reads} entries"
    finally:
        await db.close()


async def _scanned(db: Db) -> int:
    """Rows of ``work_items`` and of the queue's table read by sequential scans so far."""
    return await _statistic(db, "SELECT sum(seq_tup_read) FROM pg_stat_user_tables WHERE "
                                "(schemaname, relname) IN (('animus', 'work_items'), "
                                "('pgmq', 'q_work'))")


async def test_plans_kept_from_when_the_table_was_small_do_not_scan_it_once_it_grew(db_url):
    """The engine's functions keep one plan per session. Made while work_items held a few
    rows, a plan that reads the table whole would read it whole in every claim and completion
    once it holds many: their items are found through indexes whatever the table's size."""
    db = await Db.connect(db_url, max_size=1, actor="test")
    try:
        await db.submit_many([NewWorkItem("t").params({"i": -1})])
        first = await db.claim(limit=1, lease_seconds=60, start=True)  # plans made now
        await db.complete_many([(c.lease, None, 1) for c in first])
        for start in range(0, BACKLOG, 1_000):
            await db.submit_many([NewWorkItem("t").params({"i": i})
                                  for i in range(start, start + 1_000)])
        before = await _scanned(db)
        claimed = await db.claim(limit=4, lease_seconds=60, start=True)
        await db.complete_many([(c.lease, None, 1) for c in claimed])
        scanned = await _scanned(db) - before
        assert len(claimed) == 4
        assert scanned < 50, f"a claim and a completion of 4 read {scanned} rows whole"
    finally:
        await db.close()


async def _queue_key_reads(db: Db) -> int:
    """Index entries of the queue table's primary key read so far."""
    return await _statistic(db, "SELECT idx_tup_read FROM pg_stat_user_indexes "
                                "WHERE indexrelname = 'q_work_pkey'")


async def test_a_claim_planned_while_the_queue_was_empty_looks_its_messages_up(db_url):
    """A drained queue, vacuumed: its statistics say it is empty, and the claim's plan made
    then is kept. Its update must find the messages it leases by id: a plan that joins them
    with the whole queue read every message of a backlog in every claim."""
    db = await Db.connect(db_url, max_size=1, actor="test")
    try:
        await db.submit_many([NewWorkItem("t").params({"i": -1})])
        first = await db.claim(limit=1, lease_seconds=60, start=True)
        await db.complete_many([(c.lease, None, 1) for c in first])
        async with raw(db_url) as conn:
            await conn.execute("VACUUM ANALYZE pgmq.q_work")
        assert await db.claim(limit=4, lease_seconds=60, start=True) == []  # planned now
        for start in range(0, BACKLOG, 1_000):
            await db.submit_many([NewWorkItem("t").params({"i": i})
                                  for i in range(start, start + 1_000)])
        before = await _queue_key_reads(db)
        claimed = await db.claim(limit=4, lease_seconds=60, start=True)
        reads = await _queue_key_reads(db) - before
        assert len(claimed) == 4
        assert reads < 50, f"a claim of 4 read {reads} entries of the queue's primary key"
    finally:
        await db.close()
