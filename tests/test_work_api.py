"""The Python work API (docs/python-api.md): reading, claiming, retrying, cancelling, replaying,
and refusing bad input before anything is written."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from animus_core import (
    Created,
    Db,
    IllegalTransition,
    InvalidInput,
    Merged,
    NewWorkItem,
    State,
    WorkNotFound,
)
from tests.support import counts, raw, shared_database


def new(work_type: str = "t", **params: Any) -> NewWorkItem:
    return NewWorkItem(work_type, source="test").params(params)


async def _running(db: Db, work_type: str = "t") -> Any:
    [claimed] = await db.claim(start=True, work_types=[work_type])
    return claimed


# -- reading ---------------------------------------------------------------------------------------


async def test_contract_shape_of_a_submission(db):
    result = await db.submit_work(
        NewWorkItem("transform", source="user").dedup_key("task-123").params({"content": "hello world"})
    )
    assert isinstance(result, Created)
    item = result.item
    assert (item.work_type, item.dedup_key, item.params) == ("transform", "task-123",
                                                             {"content": "hello world"})
    assert (item.provenance.source, item.provenance.trigger) == ("user", None)
    assert (item.state, item.priority, item.attempts, item.max_attempts) == (State.QUEUED, 0, 0, 3)
    assert item.parent_id is None
    assert item.merged_into is None
    assert item.resolved_at is None
    assert item.outcome.data is None
    assert item.outcome.error is None
    assert await db.get_work_item(item.id) == item
    assert await db.get_work_item(str(item.id)) == item


async def test_list_work_filters(db, db_url):
    a1 = (await db.submit_work(new("a", n=1))).id
    a2 = (await db.submit_work(new("a", n=2))).id
    b1 = (await db.submit_work(new("b", n=3))).id
    async with raw(db_url) as conn:
        since = await conn.fetchval("SELECT clock_timestamp()")
    child = (await db.submit_work(new("c").parent(a1))).id
    other_child = (await db.submit_work(new("a").parent(b1))).id
    await db.cancel(a2)
    claimed = await _running(db, "b")
    assert claimed.item.id == b1

    def ids(items: list[Any]) -> list[Any]:
        return [i.id for i in items]

    everything = await db.list_work()
    assert ids(everything) == [other_child, child, b1, a2, a1]  # newest first
    assert ids(await db.list_work(state="queued")) == [other_child, child, a1]
    assert ids(await db.list_work(state=State.CANCELLED)) == [a2]
    assert ids(await db.list_work(state=["running", State.CANCELLED])) == [b1, a2]
    assert ids(await db.list_work(work_type="a")) == [other_child, a2, a1]
    assert ids(await db.list_work(work_type="a", state="queued")) == [other_child, a1]
    assert ids(await db.list_work(parent_id=a1)) == [child]
    assert ids(await db.list_work(parent_id=str(b1))) == [other_child]
    assert ids(await db.list_work(created_since=since)) == [other_child, child]
    assert ids(await db.list_work(work_type="nothing-of-this-type")) == []
    assert ids(await db.list_work(limit=2)) == [other_child, child]
    with pytest.raises(InvalidInput, match="unknown state"):
        await db.list_work(state="finished")
    with pytest.raises(InvalidInput, match="limit"):
        await db.list_work(limit=0)


async def test_list_work_pages_with_before(db):
    # Single submits (each its own created_at) and a batch (one created_at shared by all,
    # so the id breaks the tie).
    for i in range(4):
        await db.submit_work(new(i=i))
    await db.submit_many([new(batch=i) for i in range(5)])
    for i in range(2):
        await db.submit_work(new(i=10 + i))
    everything = [i.id for i in await db.list_work(limit=1000)]
    assert len(everything) == len(set(everything)) == 11

    pages: list[list[Any]] = []
    before = None
    while True:
        page = await db.list_work(limit=3, before=before)
        if not page:
            break
        pages.append([i.id for i in page])
        before = page[-1].id
    assert [len(p) for p in pages] == [3, 3, 3, 2]
    assert [i for p in pages for i in p] == everything
    with pytest.raises(WorkNotFound):
        await db.list_work(before="00000000-0000-0000-0000-000000000000")


# -- claiming --------------------------------------------------------------------------------------


async def test_claim_takes_higher_priority_first(db):
    ids: dict[int, list[Any]] = {}
    for p in (0, 5, -3, 10, 5):
        result = await db.submit_work(new(p=p).priority(p))
        ids.setdefault(p, []).append(result.id)
    order = []
    for _ in range(5):
        [c] = await db.claim()
        order.append(c.item.priority)
    assert order == [10, 5, 5, 0, -3]
    assert await db.claim() == []


async def test_claim_batch_in_priority_order_and_fifo_within_a_priority(db):
    low = [(await db.submit_work(new(i=i))).id for i in range(3)]
    high = (await db.submit_work(new().priority(7))).id
    claimed = await db.claim(limit=10)
    assert [c.item.id for c in claimed] == [high, *low]
    assert all(c.item.state == State.CLAIMED for c in claimed)


async def test_a_claim_reads_only_the_messages_it_takes(db, db_url):
    """With a backlog, and messages claimed and not yet finished (or waiting on a timer), a
    claim of a few walks the queue's index from the first visible message and stops: it
    neither reads and sorts every visible message (the planner guessed the work-type filter
    kept 0.5% of them: 14 ms a claim at 12,000 messages) nor steps over the invisible ones
    at the head of the index (a walk of the old (priority, msg_id) index did)."""
    await db.submit_many([new(i=i) for i in range(3000)])
    held = await db.claim(limit=200, lease_seconds=600)
    assert len(held) == 200
    async with raw(db_url) as conn:
        await conn.execute("VACUUM ANALYZE pgmq.q_work")
        async with conn.transaction():
            claimed = await conn.fetch(
                "SELECT id FROM animus.claim('work', 5, 30, ARRAY['t', 'other'], true)")
            scans = await conn.fetchrow(
                "SELECT seq_scan, idx_scan, idx_tup_fetch FROM pg_stat_xact_user_tables "
                "WHERE schemaname = 'pgmq' AND relname = 'q_work'")
    assert len(claimed) == 5
    assert not {c["id"] for c in claimed} & {h.item.id for h in held}
    assert scans["seq_scan"] == 0
    assert scans["idx_tup_fetch"] <= 20, scans  # the 5 taken, their updates' lookups


async def test_each_queue_has_functions_for_its_claims_and_completions(db, db_url):
    """A queue's claims, completions, waits and wakes run static SQL in functions made with
    the queue (so that a session plans them once); a completed item's message moves to the queue's
    archive whole, as pgmq.archive moves it."""
    await db.create_queue("side")
    await db.submit_work(new(x=1), queue="side")
    [taken] = await db.claim("side", start=True)
    columns = "msg_id, read_ct, enqueued_at, last_read_at, vt, message, headers"
    async with raw(db_url) as conn:
        queued = await conn.fetchrow(f"SELECT {columns} FROM pgmq.q_side")
        await db.complete(taken.lease, {"ok": True})
        archived = await conn.fetchrow(f"SELECT {columns} FROM pgmq.a_side")
        left = await conn.fetchval("SELECT count(*) FROM pgmq.q_side")
        functions = {r[0]: r[1] for r in await conn.fetch(
            "SELECT proname, has_function_privilege('public', oid, 'EXECUTE') FROM pg_proc "
            "WHERE pronamespace = 'animus'::regnamespace AND proname LIKE 'q\\_side\\_%'")}
    assert dict(archived) == dict(queued)
    assert left == 0
    assert functions == {"q_side_claim": False, "q_side_archive": False,
                         "q_side_set_vt": False, "q_side_send": False}


async def test_claim_filters_by_work_type(db):
    a = (await db.submit_work(new("a"))).id
    b = (await db.submit_work(new("b").priority(1))).id
    c = (await db.submit_work(new("c"))).id
    assert [x.item.id for x in await db.claim(work_types=["c"], limit=5)] == [c]
    assert await db.claim(work_types=["c", "zzz"]) == []
    assert [x.item.id for x in await db.claim(work_types=["a", "b"], limit=5)] == [b, a]


async def test_claim_with_start_counts_an_attempt(db):
    await db.submit_work(new())
    [c] = await db.claim(start=True)
    assert (c.item.state, c.item.attempts) == (State.RUNNING, 1)
    with pytest.raises(IllegalTransition, match="running -> running"):
        await db.start(c.lease)


# -- retry, cancel, replay -------------------------------------------------------------------------


async def test_retry_with_delay_is_invisible_until_the_delay_passes(db):
    wid = (await db.submit_work(new())).id
    first = await _running(db)
    await db.fail(first.lease, "flaky")
    delay = 0.7
    asked = time.monotonic()
    item = await db.retry(wid, delay=delay)
    assert item.state == State.QUEUED
    assert item.reason == "retry 2/3"
    # Claim until it comes back: never before the delay has passed (however slow this
    # machine is, an early claim is a failure), and soon after it.
    for _ in range(20):
        claimed = await db.claim(start=True)
        if claimed:
            assert time.monotonic() - asked >= delay
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the retried item never became visible again")
    [again] = claimed
    assert again.item.id == wid
    assert again.item.attempts == 2


async def test_retry_without_delay_is_visible_at_once(db):
    wid = (await db.submit_work(new())).id
    c = await _running(db)
    await db.fail(c.lease, "flaky")
    with pytest.raises(IllegalTransition, match="failed -> completed"):
        await db.complete(c.lease, None)
    await db.retry(wid, reason="try again")
    [again] = await db.claim()
    assert again.item.id == wid
    assert again.item.reason is None
    history = await db.history(wid)
    assert history[-2].payload["reason"] == "try again"


async def test_retry_refuses_anything_but_failed(db):
    wid = (await db.submit_work(new())).id
    with pytest.raises(IllegalTransition, match="queued -> queued"):
        await db.retry(wid)
    [c] = await db.claim(start=True)
    with pytest.raises(IllegalTransition, match="only failed items retry"):
        await db.retry(wid)
    await db.complete(c.lease, None)
    with pytest.raises(IllegalTransition, match="completed -> queued"):
        await db.retry(wid)
    with pytest.raises(InvalidInput, match="delay"):
        await db.retry(wid, delay=-1)


@pytest.mark.parametrize("claimed_first", [False, True])
async def test_cancel_archives_the_message(db, db_url, claimed_first):
    wid = (await db.submit_work(new())).id
    if claimed_first:  # the item knows its message id once claimed
        [c] = await db.claim()
        await db.release(c.lease, "not now")
    item = await db.cancel(wid, "changed my mind")
    assert item.state == State.CANCELLED
    assert item.reason == "changed my mind"
    assert item.resolved_at is not None
    assert await db.claim() == []
    after = await counts(db_url)
    assert (after["messages"], after["archived"]) == (0, 1)
    with pytest.raises(IllegalTransition, match="cancelled -> cancelled"):
        await db.cancel(wid)


async def test_cancel_of_claimed_or_running_work_is_a_request(db):
    await db.submit_work(new())
    [c] = await db.claim()
    claimed = await db.cancel(c.item.id, "not needed")
    assert claimed.state == State.CLAIMED
    assert claimed.cancel_requested == "not needed"
    await db.start(c.lease)
    running = await db.cancel(c.item.id, "really not needed")
    assert running.state == State.RUNNING
    assert running.cancel_requested == "really not needed"
    assert await db.cancel_requests([c.item.id]) == [c.item.id]
    events = [e.event for e in await db.history(c.item.id)]
    assert events.count("cancel_requested") == 2
    await db.complete(c.lease, None)  # the state machine still decides what may follow
    with pytest.raises(IllegalTransition) as refused:
        await db.cancel(c.item.id)
    assert str(refused.value) == (f"work item {c.item.id} is already completed: there is "
                                  "nothing to cancel (no transition completed -> cancelled)")


async def test_dead_letter_from_running_goes_through_failed(db, db_url):
    wid = (await db.submit_work(new())).id
    await _running(db)
    dead = await db.dead_letter(wid, "poison pill")
    assert dead.state == State.DEAD
    assert dead.outcome.error == "poison pill"
    assert [e.to_state for e in await db.history(wid)][-2:] == ["failed", "dead"]
    assert (await counts(db_url))["messages"] == 0


async def test_replay_of_a_dead_item(db):
    parent = (await db.submit_work(new("p"))).id
    original = await db.submit_work(
        new("r", x=[1, 2]).dedup_key("rk").priority(4).max_attempts(5).parent(parent)
    )
    await db.dead_letter(original.id, "gave up")
    replayed = await db.replay(original.id)
    assert isinstance(replayed, Created)
    item = replayed.item
    assert item.id != original.id
    assert item.replay_of == original.id
    assert item.state == State.QUEUED
    assert item.attempts == 0
    assert (item.work_type, item.params, item.dedup_key) == ("r", {"x": [1, 2]}, "rk")
    assert (item.priority, item.max_attempts, item.parent_id) == (4, 5, parent)
    assert item.provenance.source == "replay"
    assert item.provenance.trigger == f"replay of {original.id}"
    assert (await db.get_work_item(original.id)).state == State.DEAD  # the original stays

    # A second replay while the first is live is a duplicate of it.
    again = await db.replay(original.id, source="me")
    assert isinstance(again, Merged)
    assert again.canonical_id == item.id
    with pytest.raises(IllegalTransition, match="only dead items"):
        await db.replay(item.id)


# -- bad input -------------------------------------------------------------------------------------

_BAD_BUILDS: list[tuple[str, Callable[[], Any], str]] = [
    ("empty work type", lambda: NewWorkItem(""), "work type"),
    ("work type with spaces", lambda: NewWorkItem("two words"), "work type"),
    ("non-string work type", lambda: NewWorkItem(7), "work type"),  # type: ignore[arg-type]
    ("empty source", lambda: NewWorkItem("t", source=" "), "source"),
    ("params a list", lambda: new().params([1, 2]), "params must be a JSON object"),  # type: ignore[arg-type]
    ("params a string", lambda: new().params("{}"), "params must be a JSON object"),  # type: ignore[arg-type]
    ("params None", lambda: new().params(None), "params must be a JSON object"),  # type: ignore[arg-type]
    ("NaN in params", lambda: new(x=float("nan")), "params.x"),
    ("inf in params", lambda: new(x=float("inf")), "inf"),
    ("-inf nested in params", lambda: new(x={"y": [1, float("-inf")]}), "params.x.y[1]"),
    ("object in params", lambda: new(x=object()), "params"),
    ("bool priority", lambda: new().priority(True), "priority"),
    ("float priority", lambda: new().priority(1.5), "priority"),  # type: ignore[arg-type]
    ("huge priority", lambda: new().priority(2**31), "priority"),
    ("empty dedup key", lambda: new().dedup_key(""), "dedup key"),
    ("zero max attempts", lambda: new().max_attempts(0), "max_attempts"),
    ("bad parent id", lambda: new().parent("not-a-uuid"), "UUID"),
    ("bad replay id", lambda: new().replay_of("123"), "UUID"),
]


@pytest.mark.parametrize(
    ("build", "words"), [(b, w) for _, b, w in _BAD_BUILDS], ids=[n for n, _, _ in _BAD_BUILDS]
)
def test_bad_submission_is_refused_where_it_is_built(build, words):
    with pytest.raises(InvalidInput) as err:
        build()
    assert words in str(err.value)


@pytest.fixture(scope="module")
async def one_db(server_url: str, template_url: str) -> AsyncIterator[tuple[Db, str]]:
    """One database for all the bad-input cases: each checks it wrote nothing."""
    async with shared_database(server_url) as url:
        db = await Db.connect(url, max_size=2, actor="test")
        try:
            await db.submit_work(new())  # something to claim, so a refused claim would show
            yield db, url
        finally:
            await db.close()


_BAD_CALLS: list[tuple[str, Callable[[Db], Awaitable[Any]], str]] = [
    ("unknown queue", lambda db: db.submit_work(new(), queue="nosuch"), "nosuch"),
    ("bad queue name", lambda db: db.submit_work(new(), queue="no such"), "queue name"),
    ("unknown queue in a batch", lambda db: db.submit_many([new(), new()], queue="nosuch"),
     "nosuch"),
    ("NUL in params", lambda db: db.submit_work(new(x="a\x00b")), "params"),
    ("NUL in a key", lambda db: db.submit_work(new().params({"k\x00": 1})), "params"),
    ("claim from unknown queue", lambda db: db.claim("nosuch"), "nosuch"),
    ("claim limit 0", lambda db: db.claim(limit=0), "limit"),
    ("claim lease 0", lambda db: db.claim(lease_seconds=0), "lease"),
    ("get bad id", lambda db: db.get_work_item("not-a-uuid"), "UUID"),
    ("cancel bad id", lambda db: db.cancel("x"), "UUID"),
    ("retry bad id", lambda db: db.retry("x"), "UUID"),
    ("dead-letter bad id", lambda db: db.dead_letter("x", "r"), "UUID"),
    ("replay bad id", lambda db: db.replay("x"), "UUID"),
    ("history bad id", lambda db: db.history("x"), "UUID"),
    ("list bad parent", lambda db: db.list_work(parent_id="x"), "UUID"),
    ("list bad before", lambda db: db.list_work(before="x"), "UUID"),
    ("create bad queue", lambda db: db.create_queue("a;drop"), "queue name"),
]


@pytest.mark.parametrize(
    ("call", "words"), [(c, w) for _, c, w in _BAD_CALLS], ids=[n for n, _, _ in _BAD_CALLS]
)
async def test_bad_input_raises_invalid_input_and_writes_nothing(one_db, call, words):
    db, db_url = one_db
    before = await counts(db_url)
    with pytest.raises(InvalidInput) as err:
        await call(db)
    assert words in str(err.value)
    assert "\n" not in str(err.value)
    assert await counts(db_url) == before


async def test_unknown_ids_raise_work_not_found(db):
    missing = "00000000-0000-0000-0000-000000000001"
    for call in (db.get_work_item(missing), db.cancel(missing), db.retry(missing),
                 db.dead_letter(missing, "r"), db.replay(missing), db.history(missing)):
        with pytest.raises(WorkNotFound, match=missing):
            await call


async def test_completion_data_that_is_not_json_is_refused(db):
    await db.submit_work(new())
    c = await _running(db)
    for bad in ({"x": float("nan")}, {"x": "\x00"}, {1, 2}):
        with pytest.raises(InvalidInput):
            await db.complete(c.lease, bad)
    assert (await db.get_work_item(c.item.id)).state == State.RUNNING
    await db.complete(c.lease, [1, "two", {"3": None}])
    assert (await db.get_work_item(c.item.id)).outcome.data == [1, "two", {"3": None}]


async def test_complete_many_keeps_each_outcome_whole(db):
    await db.submit_many([new(i=i) for i in range(3)])
    claimed = await db.claim(limit=3, start=True)
    outcomes: list[Any] = [[1, 2, 3], None, {"a": [1, [2]], "b": "x"}]
    await db.complete_many(
        [(c.lease, data, 10 + i) for i, (c, data) in enumerate(zip(claimed, outcomes, strict=True))]
    )
    for i, (c, data) in enumerate(zip(claimed, outcomes, strict=True)):
        item = await db.get_work_item(c.item.id)
        assert item.state == State.COMPLETED
        assert item.outcome.data == data
        assert item.outcome.duration_ms == 10 + i


async def test_complete_many_is_all_or_nothing(db):
    await db.submit_many([new(i=i) for i in range(2)])
    a, b = await db.claim(limit=2, start=True)
    await db.fail(b.lease, "no")
    with pytest.raises(IllegalTransition, match="failed -> completed"):
        await db.complete_many([(a.lease, {"ok": 1}, None), (b.lease, {"ok": 2}, None)])
    assert (await db.get_work_item(a.item.id)).state == State.RUNNING
    await db.complete_many([(a.lease, {"ok": 1}, None)])
    assert (await db.get_work_item(a.item.id)).state == State.COMPLETED


async def test_unknown_parent_raises_work_not_found_and_writes_nothing(db, db_url):
    missing = "00000000-0000-0000-0000-0000000000aa"
    before = await counts(db_url)
    with pytest.raises(WorkNotFound, match=f"parent work item does not exist.*{missing}"):
        await db.submit_many([new(), new().parent(missing)])
    assert await counts(db_url) == before
