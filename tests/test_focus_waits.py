"""Waiting inside a focus (docs/concepts.md, Waiting): ``focus.sleep``, ``sleep_until`` and
``wait_for`` suspend the focus (running -> waiting, no slot, no lease), its timer or a signal
wakes it, and the attempt that resumes replays the steps before the wait and records the
wait as a step. Real engine, real Postgres; the fallback poll is set to a minute so that
only the engine's timers and notifications can wake anything in time."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from animus_core import Faculty, Focus, NewWorkItem, State
from animus_core.store.db import Db
from animus_core.testing import OPTIONS, run_faculties
from animus_core.values.canonical import canonical_hash
from animus_core.values.errors import IllegalTransition, WaitTimedOut
from tests.engine_helpers import wait_until
from tests.test_steps import Tally

NO_POLL = dataclasses.replace(OPTIONS, poll_interval=60.0)


class Waits(Faculty):
    """Runs ``params["script"]``: a list of ``["step", NAME]``, ``["sleep", SECONDS]``,
    ``["until", ISO]``, ``["wait", EVENT, TIMEOUT]`` or ``["wait?", EVENT, TIMEOUT]`` (the
    timeout caught); returns what each gave."""

    name = "waits"
    accepts = ("waits",)
    retry_base = 0.0
    retry_max = 0.0

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.attempts: list[int] = []

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        self.attempts.append(focus.attempt)
        out: list[Any] = []
        for op, *args in focus.params["script"]:
            if op == "step":
                out.append(await focus.step(args[0], self.tally.hit, args[0]))
            elif op == "sleep":
                await focus.sleep(args[0])
                out.append("slept")
            elif op == "until":
                await focus.sleep_until(datetime.fromisoformat(args[0]))
                out.append("slept")
            elif op == "wait":
                out.append(await focus.wait_for(args[0], timeout=args[1]))
            elif op == "wait?":
                try:
                    out.append(await focus.wait_for(args[0], timeout=args[1]))
                except WaitTimedOut as e:
                    out.append({"timed_out": e.event})
        return out


def script(*ops: list[Any]) -> NewWorkItem:
    return NewWorkItem("waits", source="test").params({"script": list(ops)})


async def until_state(db: Any, work_id: Any, state: State) -> Any:
    async def reached() -> Any:
        item = await db.get_work_item(work_id)
        return item if item.state == state else None
    return await wait_until(reached, 20)


async def test_a_sleep_suspends_resumes_on_its_timer_and_runs_each_step_once(db_url, tmp_path):
    tally = Tally(tmp_path)
    fac = Waits(tally)
    async with run_faculties([fac], home=tmp_path, database_url=db_url,
                             options=NO_POLL) as animus:
        submitted = datetime.now(UTC)
        item = await animus.run(script(["step", "a"], ["sleep", 0.4], ["step", "b"]))
        steps = await animus.db.steps(item.id)
        records = await animus.db.executions(item.id)
        history = await animus.db.history(item.id)
    assert item.state == State.COMPLETED
    assert item.outcome.data == [1, "slept", 1]
    assert (tally.runs("a"), tally.runs("b")) == (1, 1)
    assert [(s.position, s.name, s.attempt) for s in steps] == [
        (1, "a", 1), (2, "sleep", 2), (3, "b", 2)]
    assert datetime.fromisoformat(steps[1].result["until"]) >= submitted + timedelta(seconds=0.4)
    assert (item.attempts, item.suspensions) == (2, 1)
    assert [(r.attempt, r.result) for r in records] == [(1, "suspended"), (2, "completed")]
    assert records[1].steps == {"ran": [{"position": 2, "name": "sleep"},
                                        {"position": 3, "name": "b"}],
                                "replayed": [{"position": 1, "name": "a"}]}
    events = [e.event for e in history]
    assert events.index("suspended") < events.index("woken") < events.index("completed")
    assert fac.attempts == [1, 2]


async def test_a_sleep_until_a_past_moment_does_not_suspend(db_url, tmp_path):
    fac = Waits(Tally(tmp_path))
    past = (datetime.now(UTC) - timedelta(seconds=5)).isoformat()
    async with run_faculties([fac], home=tmp_path, database_url=db_url) as animus:
        item = await animus.run(script(["until", past], ["sleep", 0]))
        steps = await animus.db.steps(item.id)
    assert item.state == State.COMPLETED
    assert (item.suspensions, fac.attempts) == (0, [1])
    assert [s.name for s in steps] == ["sleep", "sleep"]


async def test_a_waiting_item_holds_no_slot(db_url, tmp_path):
    class One(Waits):
        max_concurrent = 1

    fac = One(Tally(tmp_path))
    async with run_faculties([fac], home=tmp_path, database_url=db_url,
                             options=NO_POLL) as animus:
        waiting = await animus.submit(script(["wait", "go", None]))
        await until_state(animus.db, waiting.id, State.WAITING)
        assert animus.engine.inflight == {}
        other = await animus.run(script(["step", "x"]))  # the one slot is free
        assert other.state == State.COMPLETED
        signalled = await animus.db.signal(waiting.id, "go", {"n": 1})
        assert signalled.woke
        done = await animus.animus.wait_finished(waiting.id, 20)
    assert done.state == State.COMPLETED
    assert done.outcome.data == [{"n": 1}]


async def test_a_signal_sent_before_the_wait_is_kept_and_taken_without_suspending(
        db_url, tmp_path):
    fac = Waits(Tally(tmp_path))
    gate = asyncio.Event()

    class Late(Waits):
        async def orient(self, focus: Focus) -> Any:
            await gate.wait()  # the signal is sent while the focus runs, before its wait
            return None

    late = Late(Tally(tmp_path))
    async with run_faculties([late], home=tmp_path, database_url=db_url) as animus:
        sent = await animus.submit(script(["wait", "go", 30]))
        await until_state(animus.db, sent.id, State.RUNNING)
        assert not (await animus.db.signal(sent.id, "go", "early")).woke
        gate.set()
        item = await animus.animus.wait_finished(sent.id, 20)
        steps = await animus.db.steps(item.id)
        [signal] = await animus.db.signals(item.id)
    assert item.state == State.COMPLETED
    assert item.outcome.data == ["early"]
    assert (item.suspensions, late.attempts) == (0, [1])
    assert steps[0].name == "wait for go"
    assert steps[0].result == {"event": "go", "signal": signal.id, "sent_by": signal.sent_by,
                               "payload": "early"}
    assert signal.consumed_by_position == 1
    assert fac.attempts == []


async def test_a_resumed_wait_is_read_with_the_steps_and_recorded_with_the_next_write(
        db_url, tmp_path, monkeypatch):
    """The attempt a signal or a timer resumes neither reads its steps, nor takes the
    signal, nor records the wait's step in a round trip of its own: the engine's claim read
    the steps and the signal with the item, and the step goes with the attempt's next write
    (the completion's batch, its next step, or its failure); a retry after that failure
    replays the wait."""
    calls: list[str] = []
    for method in ("take_signal", "record_step", "record_steps", "steps", "resume_read"):
        real = getattr(Db, method)

        def counted(self: Db, *args: Any, _real: Any = real, _name: str = method,
                    **kwargs: Any) -> Any:
            # complete_many records the steps on its own connection, in its transaction
            calls.append(_name + (" with the completion" if kwargs.get("conn") else ""))
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(Db, method, counted)

    tally = Tally(tmp_path)

    class FailsOnce(Waits):
        async def engage(self, focus: Focus, oriented: Any) -> Any:
            out = await super().engage(focus, oriented)
            if focus.params.get("fail") and tally.hit("fail") == 1:
                raise RuntimeError("failing once after the wait")
            return out

    fac = FailsOnce(tally)
    async with run_faculties([fac], home=tmp_path, database_url=db_url,
                             options=NO_POLL) as animus:
        db = animus.db
        # woken by a signal; completes
        sent = await animus.submit(script(["wait", "go", None]))
        await until_state(db, sent.id, State.WAITING)
        assert calls == ["take_signal"]  # a first attempt reads no steps
        calls.clear()
        await db.signal(sent.id, "go", {"n": 1})
        done = await animus.animus.wait_finished(sent.id, 20)
        assert calls == ["record_steps with the completion"]
        calls.clear()
        # woken by its timer; a step follows the sleep, in the same write
        slept = await animus.run(script(["sleep", 0.2], ["step", "after"]))
        assert calls == ["record_steps"]
        calls.clear()
        # woken by a signal, then fails: the wait's step is recorded with the failure, and
        # the retry replays it
        failing = await animus.submit(script(["wait", "go", None]).params(
            {"script": [["wait", "go", None]], "fail": True}))
        await until_state(db, failing.id, State.WAITING)
        await db.signal(failing.id, "go", "x")
        retried = await animus.animus.wait_finished(failing.id, 20)
        steps = {i: await db.steps(i) for i in (sent.id, slept.id, failing.id)}
        [signal] = await db.signals(sent.id)
        records = await db.executions(failing.id)
    assert done.state == slept.state == retried.state == State.COMPLETED
    assert done.outcome.data == [{"n": 1}]
    assert [(s.position, s.name, s.attempt) for s in steps[sent.id]] == [(1, "wait for go", 2)]
    assert steps[sent.id][0].result == {"event": "go", "signal": signal.id,
                                        "sent_by": signal.sent_by, "payload": {"n": 1}}
    assert steps[sent.id][0].result_hash == canonical_hash(steps[sent.id][0].result, nfc=True)
    assert [(s.position, s.name) for s in steps[slept.id]] == [(1, "sleep"), (2, "after")]
    assert [(s.position, s.name, s.attempt) for s in steps[failing.id]] == [
        (1, "wait for go", 2)]
    assert retried.outcome.data == ["x"]
    assert [(r.attempt, r.result, r.steps) for r in records] == [
        (1, "suspended", {"ran": [], "replayed": []}),
        (2, "failed", {"ran": [{"position": 1, "name": "wait for go"}], "replayed": []}),
        (3, "completed", {"ran": [], "replayed": [{"position": 1, "name": "wait for go"}]})]


async def test_two_signals_racing_the_first_wins_and_the_second_waits_for_the_next_wait(
        db_url, tmp_path):
    fac = Waits(Tally(tmp_path))
    async with run_faculties([fac], home=tmp_path, database_url=db_url,
                             options=NO_POLL) as animus:
        sent = await animus.submit(script(["wait", "go", None], ["step", "between"],
                                          ["wait", "go", None]))
        await until_state(animus.db, sent.id, State.WAITING)
        first, second = await asyncio.gather(animus.db.signal(sent.id, "go", "one"),
                                             animus.db.signal(sent.id, "go", "two"))
        assert [first.woke, second.woke].count(True) == 1  # only one woke it
        item = await animus.animus.wait_finished(sent.id, 20)
        signals = await animus.db.signals(item.id)
    assert item.state == State.COMPLETED
    by_id = sorted(signals, key=lambda s: s.id)
    assert item.outcome.data == [by_id[0].payload, 1, by_id[1].payload]
    assert [s.consumed_by_position for s in by_id] == [1, 3]


async def test_a_wait_that_times_out_raises_wait_timed_out_which_the_faculty_may_catch(
        db_url, tmp_path):
    fac = Waits(Tally(tmp_path))
    async with run_faculties([fac], home=tmp_path, database_url=db_url,
                             options=NO_POLL) as animus:
        caught = await animus.run(script(["wait?", "go", 0.3], ["step", "after"]))
        uncaught = await animus.run(script(["wait", "go", 0.3], ["step", "never"]))
        steps = await animus.db.steps(caught.id)
    assert caught.state == State.COMPLETED
    assert caught.outcome.data == [{"timed_out": "go"}, 1]
    assert steps[0].result["timed_out"] is True
    assert uncaught.state == State.DEAD  # a retry would replay the same timeout
    assert uncaught.attempts - uncaught.suspensions == 1
    assert "wait for signal 'go' timed out at" in (uncaught.reason or "")
    assert Tally(tmp_path).runs("never") == 0


async def test_cancel_of_a_waiting_item_ends_it_and_a_later_signal_is_refused(db_url, tmp_path):
    fac = Waits(Tally(tmp_path))
    async with run_faculties([fac], home=tmp_path, database_url=db_url,
                             options=NO_POLL) as animus:
        sent = await animus.submit(script(["wait", "go", None], ["step", "never"]))
        await until_state(animus.db, sent.id, State.WAITING)
        await animus.db.cancel(sent.id, "not needed")
        item = await animus.db.get_work_item(sent.id)
        with pytest.raises(IllegalTransition, match="a finished item takes no signals"):
            await animus.db.signal(sent.id, "go")
    assert item.state == State.CANCELLED
    assert Tally(tmp_path).runs("never") == 0


async def test_an_engine_started_after_the_suspension_arms_its_timer_from_the_database(
        db_url, tmp_path):
    fac = Waits(Tally(tmp_path))
    async with run_faculties([fac], home=tmp_path, database_url=db_url,
                             options=NO_POLL) as animus:
        sent = await animus.submit(script(["sleep", 2], ["step", "after"]))
        await until_state(animus.db, sent.id, State.WAITING)
    # stopped while the item sleeps: the next engine learns the timer at start-up
    async with run_faculties([fac], home=tmp_path, database_url=db_url,
                             options=NO_POLL) as animus:
        item = await animus.animus.wait_finished(sent.id, 20)
    assert item.state == State.COMPLETED
    assert Tally(tmp_path).runs("after") == 1


async def test_bad_waits_are_refused_with_what_to_do(db_url, tmp_path):
    class Bad(Faculty):
        name = "bad"
        accepts = ("bad",)

        async def engage(self, focus: Focus, oriented: Any) -> Any:
            kind = focus.params["kind"]
            if kind == "naive":
                await focus.sleep_until(datetime.now())
            elif kind == "timeout":
                await focus.wait_for("go", timeout=-1)
            else:
                await focus.wait_for("", timeout=1)
            return None

    async with run_faculties([Bad()], home=tmp_path, database_url=db_url) as animus:
        reasons = {}
        for kind in ("naive", "timeout", "event"):
            item = await animus.run(NewWorkItem("bad", source="t").params({"kind": kind}))
            reasons[kind] = item.reason or ""
    assert "timezone-aware" in reasons["naive"]
    assert "timeout must be from 0 seconds" in reasons["timeout"]
    assert "event" in reasons["event"]



async def test_steps_and_waits_cannot_nest(db_url, tmp_path):
    class Nested(Faculty):
        name = "nested"
        accepts = ("nested",)
        retry_base = 0.0
        retry_max = 0.0

        async def engage(self, focus: Focus, oriented: Any) -> Any:
            async def body() -> Any:
                if focus.params["inner"] == "sleep":
                    await focus.sleep(1)
                return await focus.step("inner", lambda: 1)
            return await focus.step("outer", body)

    async with run_faculties([Nested()], home=tmp_path, database_url=db_url) as animus:
        items = [await animus.run(NewWorkItem("nested", source="t").params({"inner": inner}))
                 for inner in ("sleep", "step")]
        recorded = [await animus.db.steps(i.id) for i in items]
    assert [i.state for i in items] == [State.DEAD, State.DEAD]
    assert "'sleep' was called inside the body of step 'outer'" in (items[0].reason or "")
    assert "'inner' was called inside the body of step 'outer'" in (items[1].reason or "")
    assert recorded == [[], []]


async def test_a_focus_cancelled_as_it_suspends_ends_cancelled_not_waiting(db_url, tmp_path):
    class Doomed(Faculty):
        name = "doomed"
        accepts = ("doomed",)

        async def engage(self, focus: Focus, oriented: Any) -> Any:
            # an operator cancels the item while it runs, and it suspends before the engine
            # acts on the request (the test keeps the engine from hearing of it)
            await focus.db.cancel(focus.work.id, "not needed any more")
            await focus.sleep(3600)
            return "never"

    async with run_faculties([Doomed()], home=tmp_path, database_url=db_url,
                             options=NO_POLL) as animus:
        animus.engine.listener._on_cancel = lambda work_id: None
        item = await animus.run(NewWorkItem("doomed", source="test"))
        history = [e.event for e in await animus.db.history(item.id)]
    assert item.state == State.CANCELLED
    assert history[-3:] == ["cancel_requested", "suspended", "cancelled"]
