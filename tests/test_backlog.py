"""A claim or a completion reads the items it moves, however long the backlog behind them.

Postgres plans the engine's statements once and keeps the plan, from statistics taken when
the backlog was short. Statements that reach items by id must not also reach them through
the index on ``state``: a plan that does reads the index entry of every queued item in
every claim, and a claim of 4 items costs as much as a claim of the whole backlog.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import msgspec
import pytest

from animus_core import NewWorkItem
from animus_core.store.db import Db
from animus_core.store.waits import Signalled
from animus_core.values.work import Claimed, WorkItem
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



async def _key_reads(db: Db, *indexes: str, control: Db | None = None) -> int:
    """Entries of these indexes read so far, ``control``'s reads included (a session's
    statistics reach the shared ones when it is idle)."""
    if control is not None:
        async with control.connection() as conn:
            await conn.execute("SELECT pg_stat_force_next_flush()")
        async with control.connection() as conn:
            await conn.execute("SELECT 1")
    names = ", ".join(f"'{i}'" for i in indexes)
    return await _statistic(db, "SELECT sum(idx_tup_read)::bigint FROM pg_stat_user_indexes "
                                f"WHERE indexrelname IN ({names})")


async def _submit_backlog(db: Db, work_type: str = "t") -> None:
    """``BACKLOG`` items of ``work_type`` queued, a thousand a call."""
    for start in range(0, BACKLOG, 1_000):
        await db.submit_many([NewWorkItem(work_type).params({"i": i})
                              for i in range(start, start + 1_000)])


async def _submit_backlog_with_steps(db: Db, db_url: str) -> None:
    """``BACKLOG`` items of type ``u`` queued, each with a recorded step."""
    await _submit_backlog(db, "u")
    async with raw(db_url) as conn:
        await conn.execute(
            """INSERT INTO animus.steps (work_id, position, name, attempt, result_hash,
                                        started_at, duration_ms)
               SELECT id, 1, 'step', 1, 'sha256:0', now(), 0 FROM animus.work_items
                WHERE work_type = 'u'""")


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
    await _submit_backlog(db)
    return db


async def test_claims_and_completions_do_not_read_the_backlog(db_url):
    db = await _backlog_after_statistics_of_a_short_one(db_url)
    try:
        for _ in range(3):
            before = await _key_reads(db, "work_items_state")
            claimed = await db.claim(limit=4, lease_seconds=60, start=True)
            after_claim = await _key_reads(db, "work_items_state")
            await db.complete_many([(c.lease, None, 1) for c in claimed])
            after_complete = await _key_reads(db, "work_items_state")
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
        before = await _key_reads(db, "work_items_state")
        again = await db.claim(limit=4, lease_seconds=60, start=True)
        reads = await _key_reads(db, "work_items_state") - before
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
        await _submit_backlog(db)
        before = await _scanned(db)
        claimed = await db.claim(limit=4, lease_seconds=60, start=True)
        await db.complete_many([(c.lease, None, 1) for c in claimed])
        scanned = await _scanned(db) - before
        assert len(claimed) == 4
        assert scanned < 50, f"a claim and a completion of 4 read {scanned} rows whole"
    finally:
        await db.close()



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
        await _submit_backlog(db)
        before = await _key_reads(db, "q_work_pkey")
        claimed = await db.claim(limit=4, lease_seconds=60, start=True)
        reads = await _key_reads(db, "q_work_pkey") - before
        assert len(claimed) == 4
        assert reads < 50, f"a claim of 4 read {reads} entries of the queue's primary key"
    finally:
        await db.close()


async def _steps_scanned(db: Db) -> int:
    """Rows of ``animus.steps`` read by sequential scans so far."""
    return await _statistic(db, "SELECT seq_tup_read FROM pg_stat_user_tables "
                                "WHERE (schemaname, relname) = ('animus', 'steps')")


async def _resume_after_planning_on_empty_steps(db_url: str, settings: dict[str, str] | None
                                                ) -> int:
    """Rows of ``steps`` read whole by the claim that resumes an item, on a store whose
    session (with ``settings``) planned that claim while ``steps`` was empty, with 3,000 rows
    in it by the time it runs."""
    from animus_core.values.waits import Wait

    db = await Db.connect(db_url, max_size=1, actor="test")
    control = await db.reserve(1, settings=settings)
    try:
        await db.submit_many([NewWorkItem("t")])
        [(claimed, _)] = await control.claim_resuming("work", limit=1, lease_seconds=60,
                                                      work_types=["t"])
        await control.suspend(claimed.lease, Wait.for_event(1, "go"), wake_at=None)
        async with raw(db_url) as conn:
            await conn.execute("VACUUM ANALYZE animus.steps")
            await conn.execute("VACUUM ANALYZE animus.signals")
        for _ in range(6):
            assert await control.claim_resuming("work", limit=1, lease_seconds=60,
                                                work_types=["t"]) == []
        await _submit_backlog_with_steps(db, db_url)
        await db.signal(claimed.item.id, "go", {"ok": True})
        before = await _steps_scanned(db)
        [(again, resume)] = await control.claim_resuming("work", limit=1, lease_seconds=60,
                                                         work_types=["t"])
        assert again.item.id == claimed.item.id
        assert resume is not None
        assert resume.woken_by is not None
        async with control.connection() as conn:  # its statistics, flushed when it idles
            await conn.execute("SELECT pg_stat_force_next_flush()")
        async with control.connection() as conn:
            await conn.execute("SELECT 1")
        return await _steps_scanned(db) - before
    finally:
        if control is not db:
            await control.close()
        await db.close()


async def test_the_engines_resuming_claims_do_not_read_the_steps_whole(db_url):
    """The engine's own connections (claims, completions, leases, seals) plan without
    sequential scans: a plan kept from when steps was empty would read every step of every
    item for each item a claim resumes."""
    from animus_core.runtime.engine import CONTROL_SETTINGS

    scanned = await _resume_after_planning_on_empty_steps(
        db_url, {**CONTROL_SETTINGS, "plan_cache_mode": "force_generic_plan"})
    assert scanned < 50, f"resuming one item read {scanned} rows of steps whole"


async def test_without_those_settings_the_same_claim_reads_them_whole(db_url):
    """The control: the hazard the setting removes. Postgres keeps a generic plan of a
    prepared statement once it costs no more than the custom ones (as it did for the engine's
    claim in a wake of 10,000: 48 million rows of steps and 80 million of signals read whole);
    here it is made to keep it from the first execution."""
    scanned = await _resume_after_planning_on_empty_steps(
        db_url, {"plan_cache_mode": "force_generic_plan"})
    assert scanned >= BACKLOG




async def test_claims_and_completions_planned_while_the_items_were_few_look_them_up(db_url):
    """Statistics taken while work_items held one row (a new database, or one whose finished
    items retention purged): the plans of the claim, the lease extension and the completion
    made then are kept. They must reach their items by id, not read the table's whole primary key and
    compare each entry with every item moved."""
    from animus_core.runtime.engine import CONTROL_SETTINGS

    db = await Db.connect(db_url, max_size=1, actor="test")
    control = await db.reserve(1, settings={**CONTROL_SETTINGS,
                                            "plan_cache_mode": "force_generic_plan"})
    try:
        await db.submit_many([NewWorkItem("t").params({"i": -1})])
        async with raw(db_url) as conn:
            await conn.execute("VACUUM ANALYZE animus.work_items")
        first = await control.claim(limit=1, lease_seconds=60, start=True)  # planned now
        assert await control.extend_lease([c.lease for c in first], 60) == []
        await control.complete_many([(c.lease, None, 1) for c in first])
        await _submit_backlog(db)
        for _ in range(2):
            before = await _key_reads(db, "work_items_pkey", control=control)
            claimed = await control.claim(limit=4, lease_seconds=60, start=True)
            after_claim = await _key_reads(db, "work_items_pkey", control=control)
            lost = await control.extend_lease([c.lease for c in claimed], 60)
            after_extend = await _key_reads(db, "work_items_pkey", control=control)
            await control.complete_many([(c.lease, None, 1) for c in claimed])
            after_complete = await _key_reads(db, "work_items_pkey", control=control)
            assert len(claimed) == 4
            assert lost == []
            reads = (after_claim - before, after_extend - after_claim,
                     after_complete - after_extend)
            assert max(reads) < 50, (
                f"entries of work_items_pkey read by a claim, a lease extension and a "
                f"completion of 4 items: {reads}")
    finally:
        await control.close()
        await db.close()



async def test_an_items_signal_is_found_by_its_item_whatever_the_statistics_said(db_url):
    """The first signal of an item for an event is the one of lowest id. Planned while
    ``signals`` held one row, a plan that walks the table's primary key in id order until it
    meets one of the item's reads most of the table for each: in a wake of 10,000 items,
    13 million entries. Suspending on a signal that is there already, taking it, and the
    claim that resumes the item all find it through the item."""
    from animus_core.runtime.engine import CONTROL_SETTINGS
    from animus_core.values.waits import Wait

    db = await Db.connect(db_url, max_size=1, actor="test")
    control = await db.reserve(1, settings={**CONTROL_SETTINGS,
                                            "plan_cache_mode": "force_generic_plan"})
    try:
        async def suspended_with_a_signal_there(position: int) -> tuple[Claimed, WorkItem]:
            [(claimed, _)] = await control.claim_resuming("work", limit=1, lease_seconds=60,
                                                          work_types=["t"])
            await db.signal(claimed.item.id, "go", {"n": position})
            item = await control.suspend(claimed.lease, Wait.for_event(position, "go"),
                                         wake_at=None)
            return claimed, item

        await db.submit_many([NewWorkItem("t")])
        await db.signal((await db.list_work(limit=1))[0].id, "early", None)
        async with raw(db_url) as conn:
            await conn.execute("VACUUM ANALYZE animus.signals")
        await suspended_with_a_signal_there(1)  # planned now
        [(again, _)] = await control.claim_resuming("work", limit=1, lease_seconds=60,
                                                    work_types=["t"])
        await db.signal(again.item.id, "other", None)
        await control.take_signal(again.lease, "other", 2)
        await control.complete_many([(again.lease, None, 1)])

        await _submit_backlog(db, "u")
        async with raw(db_url) as conn:
            await conn.execute("""INSERT INTO animus.signals (work_id, event)
                                  SELECT id, 'go' FROM animus.work_items
                                   WHERE work_type = 'u'""")
        await db.submit_many([NewWorkItem("t")])
        before = await _key_reads(db, "signals_pkey", control=control)
        claimed, item = await suspended_with_a_signal_there(1)
        after_suspend = await _key_reads(db, "signals_pkey", control=control)
        [(again, resume)] = await control.claim_resuming("work", limit=1, lease_seconds=60,
                                                         work_types=["t"])
        await db.signal(again.item.id, "other", None)
        after_claim = await _key_reads(db, "signals_pkey", control=control)
        taken = await control.take_signal(again.lease, "other", 2)
        after_take = await _key_reads(db, "signals_pkey", control=control)
        assert item.state == "queued"
        assert again.item.id == claimed.item.id
        assert resume is not None
        assert resume.woken_by is not None
        assert resume.woken_by.payload == {"n": 1}
        assert taken is not None
        assert taken.event == "other"
        reads = (after_suspend - before, after_claim - after_suspend, after_take - after_claim)
        assert max(reads) < 50, f"signals_pkey entries read (suspend, claim, take): {reads}"
    finally:
        await control.close()
        await db.close()


async def test_batches_of_signals_and_steps_find_their_items_by_id(db_url):
    """A session that keeps the plans of a batch of signals and a batch of steps (as
    Postgres does once a generic plan costs no more than the custom ones), made while
    work_items and steps held a row or two: they find their items (and the steps recorded
    already) by id, not by reading the tables' primary keys whole."""
    from animus_core.runtime.engine import CONTROL_SETTINGS
    from animus_core.values.steps import StepRecord
    from animus_core.values.waits import Wait

    db = await Db.connect(db_url, max_size=1, actor="test")
    control = await db.reserve(1, settings={**CONTROL_SETTINGS,
                                            "plan_cache_mode": "force_generic_plan"})

    async def one_of_each(kind: str) -> tuple[list[Signalled | str], tuple[int, int]]:
        """A batch of signals (that wakes an item), then a batch of steps: what they read."""
        await db.submit_many([NewWorkItem(kind), NewWorkItem(kind)])
        [(waiting, _), (running, _)] = await db.claim_resuming(
            "work", limit=2, lease_seconds=60, work_types=[kind])
        await db.suspend(waiting.lease, Wait.for_event(1, "go"), wake_at=None)
        before = await _key_reads(db, "work_items_pkey", "steps_pkey", control=control)
        sent = await control.signal_many([(waiting.item.id, "go", None),
                                          (waiting.item.id, "go", {"n": 2}),
                                          (running.item.id, "late", None)])
        after_signals = await _key_reads(db, "work_items_pkey", "steps_pkey", control=control)
        await control.record_steps([(running.lease, StepRecord(
            position=1, name="first", result=msgspec.Raw(b"{}"), result_hash="sha256:0",
            started_at=datetime.now(UTC), duration_ms=0))])
        after_steps = await _key_reads(db, "work_items_pkey", "steps_pkey", control=control)
        assert (await db.get_work_item(waiting.item.id)).state == "queued"
        assert [s.position for s in await db.steps(running.item.id)] == [1]
        return sent, (after_signals - before, after_steps - after_signals)

    try:
        await db.submit_many([NewWorkItem("t")])
        async with raw(db_url) as conn:
            await conn.execute("VACUUM ANALYZE animus.work_items")
            await conn.execute("VACUUM ANALYZE animus.steps")
        await one_of_each("t")  # planned now
        await _submit_backlog_with_steps(db, db_url)
        sent, read = await one_of_each("v")
        assert [s.woke for s in sent if not isinstance(s, str)] == [True, False, False]
        assert max(read) < 50, f"index entries read by 3 signals and by 1 step: {read}"
    finally:
        await control.close()
        await db.close()


@pytest.mark.parametrize(("change", "claimed_state"), [
    ("priority = priority + 1", "running"),  # a change of the item: claimed as it is now
    ("state = 'cancelled', reason = 'cancelled', resolved_at = now()", "cancelled"),
])
async def test_a_claim_that_waits_for_a_changed_item_takes_it_as_it_is_now(
        db_url, change, claimed_state):
    """The claim finds each item by id, then updates the row it found by its address. An
    item changed by a transaction that commits while the claim waits for its row is taken
    in its newest version: claimed if it is still queued, left alone if it is not."""
    db = await Db.connect(db_url, max_size=2, actor="test")
    try:
        [item] = await db.submit_many([NewWorkItem("t")])
        async with raw(db_url) as conn:
            async with conn.transaction():
                await conn.execute(f"UPDATE animus.work_items SET {change} WHERE id = $1",
                                   item.id)
                claim = asyncio.create_task(db.claim(limit=1, lease_seconds=60, start=True))
                await asyncio.sleep(0.3)  # the claim waits for the row
                assert not claim.done()
            claimed = await claim
        after = await db.get_work_item(item.id)
        assert after.state == claimed_state
        assert len(claimed) == (1 if claimed_state == "running" else 0)
    finally:
        await db.close()


async def test_taking_back_leases_planned_while_the_items_were_few_reads_only_them(db_url):
    """A claim that finds messages whose leases expired (an engine was lost) takes their
    items back; planned while work_items held a row, it reads them by id."""
    from animus_core.runtime.engine import CONTROL_SETTINGS

    db = await Db.connect(db_url, max_size=1, actor="test")
    control = await db.reserve(1, settings={**CONTROL_SETTINGS,
                                            "plan_cache_mode": "force_generic_plan"})

    async def expire(claimed: list[Claimed]) -> None:
        async with raw(db_url) as conn:  # the engine that held them is gone
            await conn.execute("UPDATE pgmq.q_work SET vt = now() - interval '1 second' "
                               "WHERE msg_id = ANY ($1)", [c.lease.msg_id for c in claimed])

    try:
        await db.submit_many([NewWorkItem("t")])
        async with raw(db_url) as conn:
            await conn.execute("VACUUM ANALYZE animus.work_items")
        await expire(await control.claim(limit=1, lease_seconds=60, start=True))
        assert len(await control.claim(limit=1, lease_seconds=60, start=True)) == 1  # planned
        await _submit_backlog(db)
        claimed = await control.claim(limit=4, lease_seconds=60, start=True)
        await expire(claimed)
        before = await _key_reads(db, "work_items_pkey", control=control)
        again = await control.claim(limit=4, lease_seconds=60, start=True)
        reads = await _key_reads(db, "work_items_pkey", control=control) - before
        assert {c.item.id for c in again} == {c.item.id for c in claimed}
        assert all(c.item.attempts == 2 for c in again)
        # each item is looked up a dozen times (which messages are left over, the moves
        # of the bookkeeping, the claim again): not once per item of the table
        assert reads < 100, f"taking back 4 expired leases read {reads} entries of the key"
    finally:
        await control.close()
        await db.close()
