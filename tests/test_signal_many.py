"""Many signals in one call (0023_signal_many.sql, ``Db.signal_many``): each signal of a batch
does what ``Db.signal`` would do sent one after the other in the batch's order (the same
answers, item states, signals and audit rows), a finished or missing item is reported in its
place and the rest of the batch is sent, and the engines are told once per queue and work
type."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from animus_core import Created, NewWorkItem, State
from animus_core.store.db import Db, Signalled
from animus_core.values.errors import IllegalTransition, InvalidInput, WorkNotFound
from animus_core.values.waits import Wait
from animus_core.values.work import WorkNotification
from tests.support import raw

#: how an item is set up before the signals arrive
KINDS = ("wait a", "wait b", "wait a with a timer", "sleep", "running", "queued", "completed",
         "missing")
_examples = itertools.count()


async def make(db: Db, kind: str, work_type: str, later: datetime | None = None) -> UUID:
    """One item of its own work type, in the state ``kind`` names (a timer runs out at
    ``later``, by default an hour from now)."""
    if kind == "missing":
        return uuid4()
    created = await db.submit_work(NewWorkItem(work_type, source="test"))
    assert isinstance(created, Created)
    if kind == "queued":
        return created.id
    [c] = await db.claim(work_types=[work_type], lease_seconds=300, start=True)
    later = later or datetime.now(UTC) + timedelta(hours=1)
    if kind == "completed":
        await db.complete(c.lease, None)
    elif kind == "sleep":
        await db.suspend(c.lease, Wait.sleep(1, later), wake_at=later)
    elif kind == "wait a with a timer":
        await db.suspend(c.lease, Wait.for_event(1, "a", later), wake_at=later)
    elif kind.startswith("wait "):
        await db.suspend(c.lease, Wait.for_event(1, kind[-1]), wake_at=None)
    return created.id


async def one_by_one(db: Db, signals: list[tuple[UUID, str, Any]]) -> list[Signalled | str]:
    """What ``Db.signal`` answers, sent one after the other (an error as its text)."""
    out: list[Signalled | str] = []
    for wid, event, payload in signals:
        try:
            out.append(await db.signal(wid, event, payload))
        except (IllegalTransition, WorkNotFound) as e:
            out.append(str(e))
    return out


async def trail(db: Db, db_url: str, wid: UUID) -> dict[str, Any]:
    """Everything a signal may change about an item, with ids made relative: the item, its
    signals, its audit rows after its setup, and whether its message is visible now."""
    try:
        item = await db.get_work_item(wid)
    except WorkNotFound:
        return {"missing": True}
    signals = await db.signals(wid)
    rank = {s.id: i for i, s in enumerate(signals)}
    history = await db.history(wid)
    async with raw(db_url) as conn:
        visible = await conn.fetchval(
            "SELECT count(*) FROM pgmq.q_work WHERE message->>'id' = $1 "
            "AND vt <= clock_timestamp()", str(wid))
    rows = []
    for e in history:
        payload = {k: v for k, v in (e.payload or {}).items() if k != "work_type"}
        if "signal" in payload:
            payload["signal"] = rank[payload["signal"]]
        rows.append((e.event, e.from_state, e.to_state, e.db_user, payload))
    return {"state": item.state, "reason": item.reason, "wake_at": item.wake_at is None,
            "signals": [(s.event, s.payload, s.consumed_by_position, s.sent_by)
                        for s in signals],
            "audit": rows, "visible": visible}


def same_answer(a: Signalled | str, b: Signalled | str, ids: dict[UUID, UUID]) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        if not (isinstance(a, str) and isinstance(b, str)):
            return False
        for x, y in ids.items():
            a = a.replace(str(x), str(y))
        return a == b
    return a.woke == b.woke


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=5),
       picks=st.lists(st.tuples(st.integers(0, 4), st.sampled_from(["a", "b"]),
                                st.one_of(st.none(), st.integers(0, 9))),
                      min_size=1, max_size=8))
async def test_a_batch_does_what_its_signals_sent_one_by_one_would(db, db_url, kinds, picks):
    n = next(_examples)  # work types of their own: earlier examples cannot interfere
    later = datetime.now(UTC) + timedelta(hours=1)  # the same timers for both
    seq = [await make(db, k, f"sm{n}s{i}", later) for i, k in enumerate(kinds)]
    bat = [await make(db, k, f"sm{n}b{i}", later) for i, k in enumerate(kinds)]
    chosen = [(i % len(kinds), event, payload) for i, event, payload in picks]

    expected = await one_by_one(db, [(seq[i], e, p) for i, e, p in chosen])
    got = await db.signal_many([(bat[i], e, p) for i, e, p in chosen])

    assert len(got) == len(chosen)
    ids = dict(zip(bat, seq, strict=True))
    assert all(same_answer(g, x, ids) for g, x in zip(got, expected, strict=True)), (got, expected)
    for s, b in zip(seq, bat, strict=True):
        assert await trail(db, db_url, b) == await trail(db, db_url, s)


async def test_finished_and_missing_items_are_reported_and_the_rest_is_sent(db):
    done = await make(db, "completed", "fin-done")
    waiting = await make(db, "wait a", "fin-waiting")
    running = await make(db, "running", "fin-running")
    nobody = uuid4()
    got = await db.signal_many([(done, "a", 1), (waiting, "a", {"n": 2}), (nobody, "a", None),
                                (running, "go", [3])])
    assert got[0] == f"work item {done} is completed: a finished item takes no signals"
    assert got[2] == f"no work item with id {nobody}"
    assert isinstance(got[1], Signalled)
    assert got[1].woke
    assert isinstance(got[3], Signalled)
    assert not got[3].woke
    assert (await db.get_work_item(waiting)).state == State.QUEUED
    assert [s.payload for s in await db.signals(waiting)] == [{"n": 2}]
    assert [s.payload for s in await db.signals(running)] == [[3]]
    assert await db.signals(done) == []
    assert "signal" not in [e.event for e in await db.history(done)]


async def test_each_signal_is_audited_with_its_sender_and_before_the_wake_it_causes(db):
    wid = await make(db, "wait a", "audited")
    first, second = await db.signal_many([(wid, "a", "one"), (wid, "a", "two")])
    assert isinstance(first, Signalled)
    assert isinstance(second, Signalled)
    assert (first.woke, second.woke) == (True, False)
    history = await db.history(wid)
    tail = [(e.event, e.from_state, e.to_state) for e in history[-3:]]
    assert tail == [("signal", "waiting", "waiting"), ("woken", "waiting", "queued"),
                    ("signal", "queued", "queued")]
    user = history[-1].db_user
    assert [e.payload for e in history if e.event == "signal"] == [
        {"signal": first.signal_id, "event": "a", "sent_by": user},
        {"signal": second.signal_id, "event": "a", "sent_by": user}]
    assert history[-2].payload["reason"] == "woken: signal 'a' arrived"
    assert all(s.sent_by == user for s in await db.signals(wid))


async def test_engines_are_told_once_per_queue_and_work_type(db, db_url):
    ids = [await make(db, "wait a", t) for t in ["told-x"] * 3 + ["told-y"] * 2]
    notes: list[WorkNotification] = []
    got = asyncio.Event()

    def heard(_c: object, _pid: int, _channel: str, payload: str) -> None:
        notes.append(msgspec.json.decode(payload, type=WorkNotification))
        got.set()

    conn = await asyncpg.connect(db_url)
    try:
        await conn.add_listener("animus_work", heard)
        answers = await db.signal_many([(i, "a", None) for i in ids])
        assert all(isinstance(a, Signalled) and a.woke for a in answers)
        await asyncio.wait_for(got.wait(), 5)
        await conn.execute("SELECT 1")  # a round trip: any later notification has arrived
    finally:
        await conn.close()
    assert sorted((n.queue, tuple(n.work_types)) for n in notes) == [
        ("work", ("told-x",)), ("work", ("told-y",))]
    claimed = await db.claim(work_types=["told-x", "told-y"], limit=10, lease_seconds=60,
                           start=True)
    assert sorted(c.item.id for c in claimed) == sorted(ids)


async def test_batches_over_the_same_items_in_opposite_orders_do_not_deadlock(db):
    ids = [await make(db, "running", f"both-{i}") for i in range(6)]
    forward = [(i, "x", n) for n, i in enumerate(ids)]
    got = await asyncio.gather(db.signal_many(forward), db.signal_many(forward[::-1]))
    assert all(isinstance(a, Signalled) for batch in got for a in batch)
    for i in ids:
        assert len(await db.signals(i)) == 2


async def test_bad_input_names_its_place_and_sends_nothing(db):
    wid = await make(db, "wait a", "bad-input")
    with pytest.raises(InvalidInput, match=r"signal_many: signal 1: event 'not ok' is not a "
                                           r"valid name"):
        await db.signal_many([(wid, "a", None), (wid, "not ok", None)])
    with pytest.raises(InvalidInput, match=r"signal_many: signal 0: id 'nope' is not a work "
                                           r"item id"):
        await db.signal_many([("nope", "a", None)])
    with pytest.raises(InvalidInput, match=r"signal 0 must be \(work_id, event, payload\)"):
        await db.signal_many([(wid, "a")])
    assert await db.signals(wid) == []
    assert await db.signal_many([]) == []
