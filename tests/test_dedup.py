"""Structural dedup on (work_type, dedup_key) among live items, correct under concurrency."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from animus_core import Created, Db, Merged, NewWorkItem, State
from tests.support import counts, raw

SUBMITTERS = 60


async def _live_rows(db_url: str, work_type: str, key: str) -> list[Any]:
    async with raw(db_url) as conn:
        return list(await conn.fetch(
            """SELECT id, state::text AS state FROM animus.work_items
                WHERE work_type = $1 AND dedup_key = $2
                  AND state NOT IN ('completed', 'dead', 'merged', 'cancelled')""",
            work_type, key,
        ))


async def test_concurrent_submitters_of_one_key_make_one_item(db_url):
    """60 connections submit the same (work_type, dedup_key) at once, three rounds."""
    pool = await Db.connect(db_url, min_size=SUBMITTERS, max_size=SUBMITTERS, actor="racer")
    try:
        for round_ in range(3):
            key = f"race-{round_}"
            new = NewWorkItem("race", source="racer").dedup_key(key).params({"round": round_})
            # Hold every connection first, so the submits really start together.
            start = asyncio.Event()

            async def submit(new: NewWorkItem = new, start: asyncio.Event = start) -> Any:
                async with pool.connection() as conn:
                    await start.wait()
                    async with conn.transaction():
                        return await conn.fetchrow(
                            "SELECT * FROM animus.submit('work', $1)", [new.to_json()]
                        )

            tasks = [asyncio.create_task(submit()) for _ in range(SUBMITTERS)]
            await asyncio.sleep(0.2)
            start.set()
            rows = await asyncio.gather(*tasks)

            created = [r for r in rows if r["merged_into"] is None]
            merged = [r for r in rows if r["merged_into"] is not None]
            assert len(created) == 1, [r["state"] for r in created]
            canonical = created[0]["id"]
            assert created[0]["state"] == "queued"
            assert len(merged) == SUBMITTERS - 1
            assert {r["merged_into"] for r in merged} == {canonical}
            assert {r["state"] for r in merged} == {"merged"}

            live = await _live_rows(db_url, "race", key)
            assert [r["id"] for r in live] == [canonical]
            async with raw(db_url) as conn:
                messages = await conn.fetch(
                    "SELECT message->>'id' AS id FROM pgmq.q_work WHERE message->>'id' = ANY($1)",
                    [str(r["id"]) for r in rows],
                )
                audit = await conn.fetch(
                    "SELECT event FROM animus.audit_log WHERE work_id = ANY($1)",
                    [r["id"] for r in rows],
                )
            assert [m["id"] for m in messages] == [str(canonical)]
            assert sorted(a["event"] for a in audit) == ["merged"] * (SUBMITTERS - 1) + [
                "submitted"
            ]
    finally:
        await pool.close()


async def test_concurrent_submit_through_the_api(db, db_url):
    """The same race through Db.submit_work (its own pool of 20, asyncio.gather)."""
    new = NewWorkItem("race-api", source="racer").dedup_key("k")
    results = await asyncio.gather(*(db.submit_work(new) for _ in range(SUBMITTERS)))
    created = [r for r in results if isinstance(r, Created)]
    assert len(created) == 1
    assert all(isinstance(r, Merged) and r.canonical_id == created[0].id
               for r in results if r is not created[0])
    assert len(await _live_rows(db_url, "race-api", "k")) == 1
    assert (await counts(db_url))["messages"] == 1


async def test_dedup_only_among_live_items(db):
    new = NewWorkItem("t", source="test").dedup_key("once")
    first = await db.submit_work(new)
    assert isinstance(first, Created)
    assert (await db.submit_work(new)).canonical_id == first.id

    [claimed] = await db.claim(start=True)
    assert claimed.item.id == first.id
    # Claimed and running items are live: still merged into.
    dup = await db.submit_work(new)
    assert isinstance(dup, Merged)
    assert dup.canonical_id == first.id
    await db.complete(claimed.lease, {"ok": 1})

    second = await db.submit_work(new)
    assert isinstance(second, Created)
    assert second.id != first.id
    assert second.item.state == State.QUEUED
    third = await db.submit_work(new)
    assert isinstance(third, Merged)
    assert third.canonical_id == second.id

    # Cancelled and dead items are finished too.
    await db.cancel(second.id)
    fourth = await db.submit_work(new)
    assert isinstance(fourth, Created)
    await db.dead_letter(fourth.id, "no")
    fifth = await db.submit_work(new)
    assert isinstance(fifth, Created)
    # Dedup is per work type: the same key under another type is another item.
    other = await db.submit_work(NewWorkItem("t2", source="test").dedup_key("once"))
    assert isinstance(other, Created)


async def test_batch_with_duplicates_of_each_other(db, db_url):
    live = await db.submit_work(NewWorkItem("b", source="test").dedup_key("already"))
    batch = [
        NewWorkItem("b", source="test").dedup_key("k1").params({"i": 0}),
        NewWorkItem("b", source="test").dedup_key("k1").params({"i": 1}),
        NewWorkItem("b", source="test").dedup_key("k2"),
        NewWorkItem("b", source="test"),
        NewWorkItem("b", source="test"),
        NewWorkItem("other", source="test").dedup_key("k1"),
        NewWorkItem("b", source="test").dedup_key("already"),
        NewWorkItem("b", source="test").dedup_key("k1").params({"i": 2}),
    ]
    results = await db.submit_many(batch)
    kinds = ["created" if isinstance(r, Created) else "merged" for r in results]
    assert kinds == ["created", "merged", "created", "created", "created", "created", "merged",
                     "merged"]
    k1 = results[0].id
    assert results[1].canonical_id == k1
    assert results[7].canonical_id == k1
    assert results[6].canonical_id == live.id
    # The first of the duplicates in input order is the one kept, with its params.
    assert isinstance(results[0], Created)
    assert results[0].item.params == {"i": 0}
    assert len({r.id for r in results}) == len(batch)
    assert (await counts(db_url))["messages"] == 1 + 5


async def test_empty_batch_writes_nothing(db, db_url):
    before = await counts(db_url)
    assert await db.submit_many([]) == []
    assert await counts(db_url) == before


_examples = itertools.count()
_entries = st.lists(
    st.tuples(st.sampled_from(["x", "y"]), st.one_of(st.none(), st.sampled_from("abcd"))),
    max_size=12,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(_entries, min_size=1, max_size=3))
async def test_created_count_equals_distinct_new_keys_plus_unkeyed(db, batches):
    """For random batches of (type, key-or-None): Created = distinct keys not yet live + the
    unkeyed ones; every Merged names the live item with its key."""
    n = next(_examples)  # work types of their own: earlier examples cannot interfere
    live: dict[tuple[str, str], Any] = {}
    for batch in batches:
        items = []
        for work_type, key in batch:
            item = NewWorkItem(f"p{n}{work_type}", source="prop")
            items.append(item.dedup_key(key) if key else item)
        results = await db.submit_many(items)
        assert len(results) == len(batch)

        fresh = {(t, k) for t, k in batch if k is not None and (t, k) not in live}
        unkeyed = sum(1 for _, k in batch if k is None)
        assert sum(isinstance(r, Created) for r in results) == len(fresh) + unkeyed
        for (work_type, key), result in zip(batch, results, strict=True):
            if key is None:
                assert isinstance(result, Created)
            elif isinstance(result, Created):
                assert (work_type, key) not in live
                live[(work_type, key)] = result.id
            else:
                assert result.canonical_id == live[(work_type, key)]
