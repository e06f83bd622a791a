"""Suspension in the store (0017_waiting.sql): a running attempt suspends (running ->
waiting) and holds no lease while it waits; its timer is its queue message's visibility,
and the claim that finds the message visible wakes the item and claims it in one call; a
signal wakes an item waiting for it at once, and is kept when nothing waits for it yet.
Suspensions count as activations, not failures."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from animus_core import State
from animus_core.store.db import Retry, Signalled
from animus_core.values.errors import IllegalTransition, InvalidInput, LeaseLost
from animus_core.values.records import ExecutionRecord
from animus_core.values.steps import StepRecord
from animus_core.values.waits import Wait
from animus_core.values.work import Claimed, Lease, WorkNotification
from tests.support import raw
from tests.test_failure import running


def suspended_record(c: Claimed) -> ExecutionRecord:
    return ExecutionRecord(
        work_id=c.item.id, attempt=c.item.attempts, result="suspended",
        work_type=c.item.work_type, params_hash="p", faculty={"name": "f"},
        faculty_hash="fh", engine_version="1", environment_hash="env", models=[],
        outcome_hash=None, error=None, started_at=datetime.now(UTC))


async def messages(db_url: str, queue: str = "work") -> list[tuple[int, datetime]]:
    async with raw(db_url) as conn:
        rows = await conn.fetch(f'SELECT msg_id, vt FROM pgmq."q_{queue}" ORDER BY msg_id')
    return [(r[0], r[1]) for r in rows]


async def test_a_sleep_hides_the_item_until_its_timer_and_the_claim_wakes_it(db, db_url):
    c = await running(db, "sleeper")
    await db.record_environment("env", {"python": "3"})
    wake_at = datetime.now(UTC) + timedelta(seconds=1)
    wait = Wait.sleep(3, wake_at)
    item = await db.suspend(c.lease, wait, wake_at=wake_at, duration_ms=7,
                            execution=suspended_record(c))
    assert (item.state, item.suspensions, item.attempts) == (State.WAITING, 1, 1)
    assert item.wait == {"kind": "sleep", "position": 3, "until": wake_at.isoformat()}
    assert item.wake_at == wake_at
    assert item.reason == f"sleeping until {wake_at.isoformat()}"
    [(_, vt)] = await messages(db_url)
    assert vt == wake_at  # the timer is the message's visibility
    assert await db.claim(work_types=["sleeper"], lease_seconds=60, start=True) == []
    [execution] = await db.executions(c.item.id)
    assert (execution.result, execution.attempt) == ("suspended", 1)

    await asyncio.sleep(max(0.0, (wake_at - datetime.now(UTC)).total_seconds()) + 0.05)
    [again] = await db.claim(work_types=["sleeper"], lease_seconds=60, start=True)
    assert again.item.id == c.item.id
    assert (again.item.state, again.item.attempts, again.item.suspensions) == (
        State.RUNNING, 2, 1)
    assert again.item.wake_at is None
    assert again.item.wait == item.wait  # kept for the resumed attempt
    assert again.item.outcome.error is None  # a suspension is no failure
    history = await db.history(c.item.id)
    assert [(e.event, e.from_state, e.to_state) for e in history[-4:]] == [
        ("suspended", "running", "waiting"), ("woken", "waiting", "queued"),
        ("claimed", "queued", "claimed"), ("running", "claimed", "running")]
    suspended, woken = history[-4], history[-3]
    assert suspended.payload["wait"] == item.wait
    assert suspended.payload["suspensions"] == 1
    assert suspended.payload["duration_ms"] == 7
    assert woken.payload["reason"] == f"woken: sleep until {wake_at.isoformat()} ended"
    await db.complete(again.lease, {"slept": True})


async def test_a_signal_wakes_a_waiting_item_at_once_and_engines_are_told(db):
    c = await running(db, "waiter")
    heard: list[WorkNotification] = []
    got = asyncio.Event()

    def on_work(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
        heard.append(msgspec.json.decode(payload, type=WorkNotification))
        got.set()

    listener = await db.listen({"animus_work": on_work})
    try:
        until = datetime.now(UTC) + timedelta(hours=1)
        item = await db.suspend(c.lease, Wait.for_event(2, "approved", until), wake_at=until)
        assert item.reason == f"waiting for 'approved' until {until.isoformat()}"
        await asyncio.wait_for(got.wait(), 5)
        assert heard[-1] == WorkNotification(queue="work", work_types=["waiter"],
                                             wake_at=until)
        got.clear()
        # another event does not wake it
        assert not (await db.signal(c.item.id, "rejected")).woke
        assert (await db.get_work_item(c.item.id)).state == State.WAITING
        sent = await db.signal(c.item.id, "approved", {"by": "ann"})
        assert sent.woke
        await asyncio.wait_for(got.wait(), 5)
        assert heard[-1].work_types == ["waiter"]
        assert heard[-1].wake_at is None
    finally:
        await listener.close()
    woken = await db.get_work_item(c.item.id)
    assert (woken.state, woken.wake_at, woken.reason) == (
        State.QUEUED, None, "woken: signal 'approved' arrived")
    [again] = await db.claim(work_types=["waiter"], lease_seconds=60, start=True)
    signal = await db.take_signal(again.lease, "approved", 2)
    assert signal is not None
    assert (signal.id, signal.payload, signal.consumed_by_position) == (
        sent.signal_id, {"by": "ann"}, 2)
    history = await db.history(c.item.id)
    signals = [e for e in history if e.event == "signal"]
    assert [e.payload["event"] for e in signals] == ["rejected", "approved"]
    assert all(e.db_user == e.payload["sent_by"] for e in signals)
    assert [e.event for e in history].index("woken") > [e.event for e in history].index("signal")


async def test_a_wait_without_a_timer_leaves_the_queue_and_its_wake_up_sends_a_message(
        db, db_url):
    c = await running(db, "patient")
    assert [m for m, _ in await messages(db_url)] == [c.lease.msg_id]
    item = await db.suspend(c.lease, Wait.for_event(1, "go"), wake_at=None)
    assert item.state == State.WAITING
    assert await messages(db_url) == []  # no claim walks past it while it waits
    assert await db.claim(work_types=["patient"], lease_seconds=60, start=True) == []
    assert (await db.signal(c.item.id, "go")).woke
    [(msg_id, vt)] = await messages(db_url)
    assert msg_id != c.lease.msg_id
    assert vt <= datetime.now(UTC)
    [again] = await db.claim(work_types=["patient"], lease_seconds=60, start=True)
    assert (again.item.id, again.lease.msg_id) == (c.item.id, msg_id)
    await db.complete(again.lease, None)
    assert (await db.get_work_item(c.item.id)).state == State.COMPLETED


async def test_a_signal_that_arrives_before_the_wait_is_kept(db):
    c = await running(db, "early")
    assert not (await db.signal(c.item.id, "go", [1, 2])).woke  # running: nothing waits yet
    signal = await db.take_signal(c.lease, "go", 1)
    assert signal is not None
    assert signal.payload == [1, 2]
    # A signal sent after the attempt last looked for it, before it suspends: the suspension
    # wakes at once rather than wait for a signal that came already.
    await db.signal(c.item.id, "go", "later")
    item = await db.suspend(c.lease, Wait.for_event(2, "go"), wake_at=None)
    assert (item.state, item.reason) == (State.QUEUED, "woken: signal 'go' had arrived")
    [again] = await db.claim(work_types=["early"], lease_seconds=60, start=True)
    assert (await db.take_signal(again.lease, "go", 1)).payload == [1, 2]
    assert (await db.take_signal(again.lease, "go", 2)).payload == "later"


async def test_the_first_signal_wins_and_the_next_stays_for_a_later_wait(db):
    c = await running(db, "two")
    first = await db.signal(c.item.id, "go", "first")
    second = await db.signal(c.item.id, "go", "second")
    taken = await db.take_signal(c.lease, "go", 1)
    assert taken is not None
    assert (taken.id, taken.payload) == (first.signal_id, "first")
    # the same wait asking again (an attempt that did not live to record it) gets the same
    again = await db.take_signal(c.lease, "go", 1)
    assert again is not None
    assert again.id == first.signal_id
    later = await db.take_signal(c.lease, "go", 2)
    assert later is not None
    assert (later.id, later.payload) == (second.signal_id, "second")
    assert await db.take_signal(c.lease, "go", 3) is None
    assert [(s.event, s.consumed_by_position) for s in await db.signals(c.item.id)] == [
        ("go", 1), ("go", 2)]


async def test_the_signal_that_wakes_a_wait_is_taken_by_it_as_it_wakes(db):
    """Woken by animus.signal, animus.signal_many, or a suspension that finds its signal:
    the wait's position holds the signal at once, and the attempt that resumes reads it with
    its steps (Db.resume_read: one query, nothing locked)."""
    waiting = []
    for name in ("one", "many", "early"):
        c = await running(db, name)
        waiting.append(c)
    one, many, early = waiting
    for c in (one, many):
        await db.suspend(c.lease, Wait.for_event(3, "go"), wake_at=None)
    kept = await db.signal(early.item.id, "go", "early")  # running: kept, not taken
    assert [s.consumed_by_position for s in await db.signals(early.item.id)] == [None]
    woken = await db.suspend(early.lease, Wait.for_event(2, "go"), wake_at=None)
    assert woken.state == State.QUEUED

    sent = await db.signal(one.item.id, "go", {"n": 1})
    [answer] = await db.signal_many([(many.item.id, "go", {"n": 2})])
    assert isinstance(answer, Signalled)
    assert sent.woke
    assert answer.woke
    for c, position, signal_id, payload in ((one, 3, sent.signal_id, {"n": 1}),
                                             (many, 3, answer.signal_id, {"n": 2}),
                                             (early, 2, kept.signal_id, "early")):
        [signal] = await db.signals(c.item.id)
        assert (signal.id, signal.consumed_by_position) == (signal_id, position)
        assert signal.consumed_at is not None
        steps, taken = await db.resume_read(c.item.id, position, "go")
        assert steps == []
        assert taken is not None
        assert (taken.id, taken.payload, taken.sent_by) == (signal_id, payload,
                                                            signal.sent_by)
        # another position or event: no signal
        assert (await db.resume_read(c.item.id, position + 1, "go"))[1] is None
        assert (await db.resume_read(c.item.id, position, "stop"))[1] is None
    # a second signal of the event to a woken (queued) item is kept for a later wait
    again = await db.signal(one.item.id, "go", "later")
    assert not again.woke
    assert [s.consumed_by_position for s in await db.signals(one.item.id)] == [3, None]


async def test_steps_recorded_together_are_all_recorded_or_none(db):
    a, b = await running(db, "rs-a"), await running(db, "rs-b")
    now = datetime.now(UTC)

    def rec(position: int, result: Any) -> StepRecord:
        return StepRecord(position=position, name=f"s{position}",
                          result=msgspec.Raw(msgspec.json.encode(result)),
                          result_hash=f"sha256:{position}", started_at=now, duration_ms=1)

    await db.record_step(a.lease, 2, "s2", msgspec.Raw(b"2"), result_hash="sha256:2",
                         started_at=now, duration_ms=0)
    stale = Lease(work_id=b.lease.work_id, queue=b.lease.queue, msg_id=b.lease.msg_id,
                  token=b.lease.token + 1)
    with pytest.raises(LeaseLost):
        await db.record_steps([(a.lease, rec(1, "a1")), (stale, rec(1, "b1"))])
    with pytest.raises(IllegalTransition, match=r"step 2 of work item .* is recorded already"):
        await db.record_steps([(b.lease, rec(1, "b1")), (a.lease, rec(2, "again"))])
    assert [s.position for s in await db.steps(a.item.id)] == [2]
    assert await db.steps(b.item.id) == []
    await db.record_steps([(a.lease, rec(1, "a1")), (b.lease, rec(1, [1, 2])),
                           (a.lease, rec(3, {"x": None}))])
    assert [(s.position, s.result, s.attempt) for s in await db.steps(a.item.id)] == [
        (1, "a1", 1), (2, 2, 1), (3, {"x": None}, 1)]
    assert [(s.position, s.result) for s in await db.steps(b.item.id)] == [(1, [1, 2])]
    audited = [e.payload for e in await db.history(a.item.id) if e.event == "step"]
    assert [(p["position"], p["name"], p["result_hash"]) for p in audited] == [
        (2, "s2", "sha256:2"), (1, "s1", "sha256:1"), (3, "s3", "sha256:3")]
    # and with a batch of completions, in its transaction
    await db.complete_many([(b.lease, "done", 1)], steps=[(b.lease, rec(2, "b2"))])
    assert [s.position for s in await db.steps(b.item.id)] == [1, 2]
    assert (await db.get_work_item(b.item.id)).state == State.COMPLETED
    # a step of an attempt that is over: neither is recorded
    with pytest.raises(IllegalTransition, match="is completed: only a running attempt"):
        await db.complete_many([(a.lease, "done", 1)], steps=[(b.lease, rec(3, "late"))])
    assert (await db.get_work_item(a.item.id)).state == State.RUNNING


async def test_a_finished_item_takes_no_signals(db):
    c = await running(db, "done")
    await db.complete(c.lease, None)
    with pytest.raises(IllegalTransition,
                       match=f"work item {c.item.id} is completed: a finished item takes no "
                             "signals"):
        await db.signal(c.item.id, "go")
    assert await db.signals(c.item.id) == []
    with pytest.raises(InvalidInput):
        await db.signal(c.item.id, "not a name!")


async def test_a_lost_lease_cannot_suspend_nor_take_signals(db):
    c = await running(db, "lost")
    stale = Lease(work_id=c.lease.work_id, queue=c.lease.queue, msg_id=c.lease.msg_id,
                  token=c.lease.token + 1)
    until = datetime.now(UTC) + timedelta(minutes=5)
    with pytest.raises(LeaseLost):
        await db.suspend(stale, Wait.sleep(1, until), wake_at=until)
    # with no signal to take, the answer is "none" without a look at the lease (the
    # suspension that follows checks it); a signal there is taken only under the lease
    assert await db.take_signal(stale, "go", 1) is None
    await db.signal(c.item.id, "go", 1)
    with pytest.raises(LeaseLost):
        await db.take_signal(stale, "go", 1)
    assert (await db.get_work_item(c.item.id)).state == State.RUNNING
    assert (await db.take_signal(c.lease, "go", 1)).payload == 1
    await db.suspend(c.lease, Wait.sleep(1, until), wake_at=until)
    # the suspended attempt holds no lease: it can neither finish nor suspend again
    with pytest.raises(LeaseLost):
        await db.complete(c.lease, None)
    with pytest.raises(LeaseLost):
        await db.suspend(c.lease, Wait.sleep(1, until), wake_at=until)
    # and extending its lease does not move the timer
    assert await db.extend_lease([c.lease], 1) == [c.lease]
    item = await db.get_work_item(c.item.id)
    assert (item.state, item.wake_at) == (State.WAITING, until)
    with pytest.raises(InvalidInput):
        Wait(kind="sleep", position=1)
    with pytest.raises(InvalidInput, match="exactly when it has a timer"):
        await db.suspend(c.lease, Wait.sleep(1, until), wake_at=None)


async def test_cancel_or_dead_letter_a_waiting_item(db, db_url):
    c = await running(db, "bored")
    await db.suspend(c.lease, Wait.for_event(1, "never"), wake_at=None)
    cancelled = await db.cancel(c.item.id, "not needed any more")
    assert (cancelled.state, cancelled.reason, cancelled.wake_at) == (
        State.CANCELLED, "not needed any more", None)
    assert await messages(db_url) == []
    assert [(e.event, e.from_state) for e in (await db.history(c.item.id))[-1:]] == [
        ("cancelled", "waiting")]
    d = await running(db, "bored")
    until = datetime.now(UTC) + timedelta(hours=1)
    await db.suspend(d.lease, Wait.sleep(1, until), wake_at=until)
    dead = await db.dead_letter(d.item.id, "operator gave up")
    assert (dead.state, dead.wake_at) == (State.DEAD, None)
    assert await messages(db_url) == []


async def test_an_item_woken_from_a_wait_and_ended_before_a_claim_leaves_no_message(
        db, db_url):
    """A wait without a timer gives up its message and a wake-up sends a new one: ending the
    woken item before an engine claims it (cancel, dead letter) removes that new message,
    not the one it gave up (it stayed in the queue, counted in its depth)."""
    early = await running(db, "woken")  # woken by the suspension: the signal came first
    await db.signal(early.item.id, "go")
    woken = await db.suspend(early.lease, Wait.for_event(1, "go"), wake_at=None)
    assert woken.state == State.QUEUED
    assert len(await messages(db_url)) == 1
    await db.cancel(early.item.id, "not needed")
    assert await messages(db_url) == []

    late = await running(db, "woken")  # woken by a signal while it waits
    await db.suspend(late.lease, Wait.for_event(1, "go"), wake_at=None)
    assert (await db.signal_many([(late.item.id, "go", None)]))[0].woke
    assert len(await messages(db_url)) == 1
    await db.dead_letter(late.item.id, "given up")
    assert await messages(db_url) == []


async def test_a_focus_that_suspends_many_times_is_not_dead_lettered_for_it(db):
    """Attempts count activations; the retry limit counts attempts - suspensions."""
    c = await running(db, "napper", max_attempts=2)
    for _ in range(4):
        past = datetime.now(UTC) - timedelta(seconds=1)
        await db.suspend(c.lease, Wait.sleep(1, past), wake_at=past)
        [c] = await db.claim(work_types=["napper"], lease_seconds=1, start=True)
    assert (c.item.attempts, c.item.suspensions) == (5, 4)
    # the lease runs out while running: a lost attempt, the first failure of two allowed
    await asyncio.sleep(1.1)
    [c] = await db.claim(work_types=["napper"], lease_seconds=60, start=True)
    assert (c.item.state, c.item.attempts) == (State.RUNNING, 6)
    history = await db.history(c.item.id)
    assert any(e.payload.get("reason") == "retry after: lease expired while running "
               "(engine lost)" for e in history)
    item = await db.fail_attempt(c.lease, "boom", then=Retry(30))
    assert (item.state, item.reason) == (State.QUEUED, "retry 3/2")  # 6 - 4 + 1
    await db.dead_letter(item.id, "enough")


async def test_a_lease_extension_racing_a_suspension_leaves_the_waiting_item_hidden(db, db_url):
    """The lease keeper extends a focus's lease while that focus suspends: the extension
    must not overwrite the suspension's timer (its message's visibility), or the waiting
    item wakes before it (or, for a wait without a timer, a message comes back) once the
    extended lease runs out."""
    c = await running(db, "racer")
    until = datetime.now(UTC) + timedelta(days=1)
    wait = msgspec.json.encode(Wait.for_event(1, "go", until)).decode()
    async with raw(db_url) as conn:
        tx = conn.transaction()
        await tx.start()
        await conn.fetch("SELECT * FROM animus.suspend($1, $2, $3, $4::text::jsonb, $5, NULL, "
                         "NULL)", c.lease.work_id, c.lease.msg_id, c.lease.token, wait, until)
        extending = asyncio.create_task(db.extend_lease([c.lease], 60))
        await asyncio.sleep(0.5)  # the extension reaches the rows the suspension holds
        await tx.commit()
    assert await extending == [c.lease]  # the item has no lease any more
    async with raw(db_url) as conn:
        assert await conn.fetchval("SELECT vt FROM pgmq.q_work WHERE msg_id = $1",
                                   c.lease.msg_id) == until
    assert (await db.get_work_item(c.item.id)).state == State.WAITING


async def test_engines_read_the_next_timer_and_whether_one_ran_out_already(db):
    from animus_core.runtime.timers import WakeTimers
    from animus_core.store.read import next_wakes

    now = datetime.now(UTC)
    soon, later, past = (now + timedelta(hours=1), now + timedelta(hours=2),
                         now - timedelta(seconds=1))
    for work_type, until in (("timed", later), ("timed", soon), ("overdue", past)):
        c = await running(db, work_type)
        await db.suspend(c.lease, Wait.sleep(1, until), wake_at=until)
    untimed = await running(db, "untimed")
    await db.suspend(untimed.lease, Wait.for_event(1, "go"), wake_at=None)
    wakes = await next_wakes(db, ["work"], ["timed", "overdue", "untimed", "none"])
    assert wakes == {"timed": (soon, False), "overdue": (None, True)}

    woken: list[list[str]] = []
    timers = WakeTimers(db, ["work"], lambda: ["timed", "overdue"], woken.append)
    timers.refresh()
    for _ in range(100):
        if woken:
            break
        await asyncio.sleep(0.02)
    # the overdue one wakes the engine at once, and the next timer of the other is armed
    assert woken == [["overdue"]]
    assert timers._armed["timed"][0] == soon
    timers.close()
