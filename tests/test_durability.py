"""Nothing half-done survives a lost connection, and leases really expire."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import asyncpg
import pytest

from animus_core import Created, IllegalTransition, LeaseLost, NewWorkItem, State
from animus_core.store.db import Db
from animus_core.values.work import Lease
from tests.support import counts, raw

# How a client learns its backend was killed depends on timing; any of these will do.
_GONE = (
    asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError,
    ConnectionError, OSError,
)


def _payload(*items: NewWorkItem) -> str:
    return json.dumps([i.to_json() for i in items])


async def _wait_until_blocked(conn: Any, pid: int) -> None:
    """Wait until backend ``pid`` waits on a lock (the test's synchronisation, not a timing
    assertion: it fails only if the backend never gets there)."""
    for _ in range(500):
        waiting = await conn.fetchval(
            "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid
        )
        if waiting:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"backend {pid} never blocked")


async def _kill(conn: Any, pid: int) -> None:
    """Terminate backend ``pid`` and wait until it is gone (and its transaction with it)."""
    assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
    for _ in range(500):
        if not await conn.fetchval("SELECT EXISTS (SELECT FROM pg_stat_activity WHERE pid = $1)",
                                   pid):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"backend {pid} survived pg_terminate_backend")


async def test_connection_killed_after_submit_before_commit_leaves_nothing(db_url):
    before = await counts(db_url)
    async with raw(db_url) as killer:
        victim = await asyncpg.connect(db_url)
        pid = victim.get_server_pid()
        tx = victim.transaction()
        await tx.start()
        rows = await victim.fetch(
            "SELECT * FROM animus.submit('work', $1::jsonb)",
            _payload(NewWorkItem("d", source="t").params({"a": 1}),
                     NewWorkItem("d", source="t").dedup_key("k")),
        )
        assert len(rows) == 2
        # Inside the transaction the item, its message and its audit rows all exist.
        assert await victim.fetchval("SELECT count(*) FROM animus.audit_log") == before["audit"] + 2
        assert await victim.fetchval("SELECT count(*) FROM pgmq.q_work") == before["messages"] + 2
        await _kill(killer, pid)
        with pytest.raises(_GONE):
            await victim.fetchval("SELECT 1")
        victim.terminate()
    assert await counts(db_url) == before


async def test_connection_killed_while_submit_waits_on_a_duplicate_leaves_nothing(db_url):
    """The submit is killed in the middle of its statement: blocked on the dedup index behind
    another uncommitted submit of the same key, after inserting the rest of its batch."""
    before = await counts(db_url)
    async with raw(db_url) as holder, raw(db_url) as killer:
        hold = holder.transaction()
        await hold.start()
        await holder.fetch("SELECT * FROM animus.submit('work', $1::jsonb)",
                           _payload(NewWorkItem("d", source="t").dedup_key("same")))

        victim = await asyncpg.connect(db_url)
        pid = victim.get_server_pid()
        submit = asyncio.create_task(victim.fetch(
            "SELECT * FROM animus.submit('work', $1::jsonb)",
            _payload(NewWorkItem("d", source="t").dedup_key("other"),
                     NewWorkItem("d", source="t"),
                     NewWorkItem("d", source="t").dedup_key("same")),
        ))
        await _wait_until_blocked(killer, pid)
        await _kill(killer, pid)
        with pytest.raises(_GONE):
            await submit
        victim.terminate()
        await hold.rollback()
    assert await counts(db_url) == before


async def test_connection_killed_in_a_claim_leaves_the_item_queued(db, db_url):
    created = await db.submit_work(NewWorkItem("d", source="t"))
    before = await counts(db_url)
    async with raw(db_url) as killer:
        victim = await asyncpg.connect(db_url)
        tx = victim.transaction()
        await tx.start()
        [row] = await victim.fetch("SELECT * FROM animus.claim('work', 1, 300, NULL, true)")
        assert row["state"] == "running"
        await _kill(killer, victim.get_server_pid())
        victim.terminate()
    assert await counts(db_url) == before
    item = await db.get_work_item(created.id)
    assert (item.state, item.attempts) == (State.QUEUED, 0)
    # The message was not consumed: the next claim gets the item at once.
    [claimed] = await db.claim()
    assert claimed.item.id == created.id


async def test_stale_lease_cannot_complete_after_reclaim(db):
    created = await db.submit_work(NewWorkItem("lease", source="t"))
    assert isinstance(created, Created)
    [first] = await db.claim(lease_seconds=1, start=True)
    await asyncio.sleep(1.2)
    [second] = await db.claim(lease_seconds=30, start=True)
    assert second.item.id == created.id
    assert second.lease.token != first.lease.token
    # The expiry counted as a failed attempt, then the item was queued and claimed again.
    assert second.item.attempts == 2

    with pytest.raises(LeaseLost, match=str(created.id)):
        await db.complete(first.lease, {"by": "first"})
    with pytest.raises(LeaseLost):
        await db.fail(first.lease, "late")
    with pytest.raises(LeaseLost):
        await db.release(first.lease, "late")
    await db.complete(second.lease, {"by": "second"})
    item = await db.get_work_item(created.id)
    assert item.state == State.COMPLETED
    assert item.outcome.data == {"by": "second"}
    history = [(e.from_state, e.to_state) for e in await db.history(created.id)]
    assert history == [
        (None, "queued"), ("queued", "claimed"), ("claimed", "running"),
        ("running", "failed"), ("failed", "queued"), ("queued", "claimed"),
        ("claimed", "running"), ("running", "completed"),
    ]


async def test_expired_claim_that_never_started_is_requeued_without_an_attempt(db):
    created = await db.submit_work(NewWorkItem("lease", source="t"))
    [first] = await db.claim(lease_seconds=1)
    await asyncio.sleep(1.2)
    [second] = await db.claim(lease_seconds=30)
    assert second.item.id == created.id
    assert second.item.attempts == 0
    with pytest.raises(LeaseLost):
        await db.start(first.lease)
    await db.start(second.lease)
    assert (await db.get_work_item(created.id)).attempts == 1


async def test_one_claim_takes_fresh_and_expired_items_and_drops_stray_messages(db, db_url):
    """The claim takes plainly queued items first and does the bookkeeping for the other
    messages of the same batch: an expired lease is retried in this very claim, a message
    for an item that does not exist is archived."""
    expired = await db.submit_work(NewWorkItem("lease", source="t"))
    [old] = await db.claim(lease_seconds=1, start=True)
    fresh = await db.submit_work(NewWorkItem("lease", source="t"))
    async with raw(db_url) as conn:
        await conn.execute(
            """SELECT pgmq.send('work', jsonb_build_object('id', gen_random_uuid(),
                                                          't', 'lease', 'p', 0))""")
    await asyncio.sleep(1.2)

    claimed = await db.claim(limit=10, lease_seconds=30, start=True)
    assert {c.item.id: c.item.attempts for c in claimed} == {expired.id: 2, fresh.id: 1}
    assert all(c.item.state == State.RUNNING for c in claimed)
    again = next(c for c in claimed if c.item.id == expired.id)
    assert again.lease.token != old.lease.token
    history = [(e.from_state, e.to_state) for e in await db.history(expired.id)]
    assert history[-4:] == [("running", "failed"), ("failed", "queued"),
                            ("queued", "claimed"), ("claimed", "running")]
    assert (await counts(db_url))["messages"] == 2  # the stray message is archived
    await db.complete_many([(c.lease, None, 1) for c in claimed])
    assert (await counts(db_url))["messages"] == 0


async def test_an_item_taken_back_from_an_expired_lease_keeps_its_priority(db):
    """The claim takes plainly queued items first and expired ones after: it still returns
    them all highest priority first."""
    urgent = await db.submit_work(NewWorkItem("lease", source="t").priority(5))
    [old] = await db.claim(lease_seconds=1, start=True)
    assert old.item.id == urgent.id
    routine = await db.submit_work(NewWorkItem("lease", source="t").priority(1))
    await asyncio.sleep(1.2)
    claimed = await db.claim(limit=10, lease_seconds=30, start=True)
    assert [c.item.id for c in claimed] == [urgent.id, routine.id]


async def test_a_message_whose_item_left_the_queue_by_hand_is_archived(db, db_url):
    """An item never claimed (no lease recorded) that an operator moved out of `queued` by
    hand leaves its message behind; the next claim that reads it archives it."""
    created = await db.submit_work(NewWorkItem("lease", source="t"))
    async with raw(db_url) as conn:
        await conn.execute(
            """UPDATE animus.work_items SET state = 'dead', reason = 'by hand',
                      resolved_at = now() WHERE id = $1""", created.id)
    assert (await counts(db_url))["messages"] == 1
    assert await db.claim(limit=10) == []
    assert (await counts(db_url))["messages"] == 0


async def test_completing_with_a_lost_lease_says_so_whatever_the_item_became(db):
    created = await db.submit_work(NewWorkItem("lease", source="t"))
    [first] = await db.claim(lease_seconds=1, start=True)
    await asyncio.sleep(1.2)
    [second] = await db.claim(lease_seconds=30)  # claimed again, not started
    assert second.item.state == State.CLAIMED
    with pytest.raises(LeaseLost, match=str(created.id)):
        await db.complete(first.lease, {"by": "first"})


async def test_create_queue_leaves_an_existing_queue_alone(db, db_url):
    """Engines call create_queue at every start: on a queue that exists it must not rebuild
    or drop indexes (an exclusive lock that would wait behind any reader)."""
    async with raw(db_url) as reader, raw(db_url) as other:
        async with reader.transaction():
            await reader.fetchval("SELECT count(*) FROM pgmq.q_work")
            await other.execute("SET lock_timeout = '1s'")
            await other.execute("SELECT animus.create_queue('work')")
        indexes = {r[0] for r in await other.fetch(
            "SELECT indexname FROM pg_indexes WHERE schemaname = 'pgmq' AND tablename = 'q_work'")}
    assert indexes == {"q_work_pkey", "q_work_ready"}


async def test_queue_tables_keep_the_ready_index(db, db_url):
    """A queue's messages are indexed by (priority DESC, vt, msg_id), the order a claim takes
    them in, so that a claim walks from the first visible message (claimed and timer-waiting
    messages sort after them); pages are left half empty for the rewrites of vt."""
    async with raw(db_url) as conn:
        indexes = {r[0]: r[1] for r in await conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes "
            "WHERE schemaname = 'pgmq' AND tablename = 'q_work'")}
        options = await conn.fetchval(
            "SELECT reloptions FROM pg_class WHERE oid = 'pgmq.q_work'::regclass")
    assert set(indexes) == {"q_work_pkey", "q_work_ready"}
    assert "(((message ->> 'p'::text))::integer) DESC, vt, msg_id" in indexes["q_work_ready"]
    assert "fillfactor=50" in options


async def test_extended_lease_is_not_taken(db):
    await db.submit_work(NewWorkItem("lease", source="t"))
    [held] = await db.claim(lease_seconds=1, start=True)
    await db.extend_lease([held.lease], 30)
    await asyncio.sleep(1.2)
    assert await db.claim(lease_seconds=30) == []
    await db.complete(held.lease, None)
    assert (await db.get_work_item(held.item.id)).state == State.COMPLETED


async def test_a_lease_extension_and_completions_of_the_same_items_do_not_deadlock(db):
    """An engine's lease keeper extends every lease it holds while its completer completes
    some of the same items, in the order their foci finished: both lock the items in id
    order, so neither waits for the other in a circle (a deadlock aborted one of them)."""
    n = 600
    await db.submit_many([NewWorkItem("lease", source="t").params({"i": i}) for i in range(n)])
    leases: list[Lease] = []
    while len(leases) < n:
        leases += [c.lease for c in await db.claim(limit=300, lease_seconds=60, start=True)]
    random.Random(7).shuffle(leases)  # finished in no particular order
    done = asyncio.Event()
    extensions = 0

    async def keep_extending() -> None:
        nonlocal extensions
        while not done.is_set():
            assert await db.extend_lease(leases, 60) == []
            extensions += 1

    async def complete_in_batches() -> None:
        try:
            for i in range(0, n, 30):
                await db.complete_many([(lease, None, 1) for lease in leases[i:i + 30]])
        finally:
            done.set()

    await asyncio.gather(keep_extending(), complete_in_batches())
    assert extensions > 0
    async with db.connection() as conn:
        assert await conn.fetchval(
            "SELECT count(*) FROM animus.work_items WHERE state = 'completed'") == n


async def test_running_item_whose_lease_expires_is_retried_then_dead_lettered(db, db_url):
    created = await db.submit_work(NewWorkItem("lease", source="t").max_attempts(2))
    [c1] = await db.claim(lease_seconds=1, start=True)
    assert c1.item.attempts == 1
    await asyncio.sleep(1.2)
    [c2] = await db.claim(lease_seconds=1, start=True)  # expiry 1: failed, then queued
    assert c2.item.id == created.id
    assert c2.item.attempts == 2
    await asyncio.sleep(1.2)
    assert await db.claim(lease_seconds=1, start=True) == []  # expiry 2: attempts exhausted

    item = await db.get_work_item(created.id)
    assert item.state == State.DEAD
    assert item.attempts == 2
    assert item.resolved_at is not None
    assert "attempts exhausted (2/2)" in (item.reason or "")
    assert "lease expired" in (item.outcome.error or "")
    history = [(e.from_state, e.to_state) for e in await db.history(created.id)]
    assert history == [
        (None, "queued"), ("queued", "claimed"), ("claimed", "running"),
        ("running", "failed"), ("failed", "queued"), ("queued", "claimed"),
        ("claimed", "running"), ("running", "failed"), ("failed", "dead"),
    ]
    # Its message is archived: nothing is left to claim, and the dead letter stays dead.
    assert (await counts(db_url))["messages"] == 0
    with pytest.raises(LeaseLost):
        await db.fail(c1.lease, "late")
    with pytest.raises(IllegalTransition):
        await db.complete(c2.lease, None)


@pytest.mark.parametrize(("configured", "used"), [
    ("off", "local"), ("local", "local"), ("on", "on"), ("remote_apply", "remote_apply")])
async def test_animus_sessions_commit_durably_whatever_the_database_says(db_url, configured,
                                                                        used):
    """A claim whose commit a crash of Postgres could lose would hand its lease token out
    again (the message's read count goes back) while the first engine still runs the focus:
    animus's sessions raise ``synchronous_commit = off`` to ``local``, and keep the rest."""
    async with raw(db_url) as conn:
        name = await conn.fetchval("SELECT current_database()")
        await conn.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = {configured}')
    db = await Db.connect(db_url, min_size=1, max_size=1)
    try:
        async with db.connection() as conn:
            assert await conn.fetchval("SHOW synchronous_commit") == used
    finally:
        await db.close()
