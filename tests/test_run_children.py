"""Waiting for child work (docs/writing-faculties.md, Waiting for child work):
``focus.run_children`` submits children once per item and suspends the focus (no slot, no
lease) until all of them have finished; the transaction that finishes the last one wakes the
parent. Real engine on real Postgres, with the fallback poll set to a minute, so that only
the database's wake-up can wake a parent in time.

Children of the work type ``external`` are run by no faculty: the tests claim, complete or
cancel them themselves, as another engine would."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from animus_core import Created, Db, DeadLetter, Faculty, Focus, Lease, LeaseLost, NewWorkItem, State
from animus_core.testing import OPTIONS, run_faculties
from animus_core.values.children import ChildFailed, ChildrenTimedOut, ChildResult, outcomes
from animus_core.values.errors import InvalidInput
from animus_core.values.waits import Wait
from tests.conftest import ROOT
from tests.engine_helpers import engine_processes, plugin_site, wait_finished, wait_listening, wait_until
from tests.support import code_blocks, raw
from tests.test_failure import running
from tests.test_waits import suspended_record

NO_POLL = dataclasses.replace(OPTIONS, poll_interval=60.0)


class Parent(Faculty):
    """Runs the children ``params["kids"]`` (``{"type", "params", "fail"?}``) and returns
    how each ended; with ``params["strict"]`` their outcomes (a failed child raises)."""

    name = "parent"
    accepts = ("parent",)
    max_concurrent = 1
    retry_base = 0.0
    retry_max = 0.0

    def __init__(self) -> None:
        self.attempts: list[int] = []

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        self.attempts.append(focus.attempt)
        kids = [NewWorkItem(k["type"], source="test").params(k.get("params", {}))
                .max_attempts(1) for k in focus.params["kids"]]
        try:
            results = await focus.run_children(kids, timeout=focus.params.get("timeout"))
        except ChildrenTimedOut as e:
            return {"timed_out": [e.unfinished, e.total]}
        if focus.params.get("strict"):
            return outcomes(results)
        return [{"state": str(r.state), "outcome": r.outcome, "error": r.error,
                 "type": r.work_type} for r in results]


class Kid(Faculty):
    """Returns ``{"n": params["n"]}`` once ``gate`` is set; fails when ``params["fail"]``."""

    name = "kid"
    accepts = ("kid",)
    max_concurrent = 8

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        await self.gate.wait()
        if focus.params.get("fail"):
            raise RuntimeError(f"kid {focus.params['n']} fell over")
        return {"n": focus.params["n"]}


def parent(*kids: dict[str, Any], **params: Any) -> NewWorkItem:
    return NewWorkItem("parent", source="test").params({"kids": list(kids), **params})


def kid(n: int, **params: Any) -> dict[str, Any]:
    return {"type": "kid", "params": {"n": n, **params}}


def external(n: int) -> dict[str, Any]:
    return {"type": "external", "params": {"n": n}}


async def until_state(db: Db, work_id: Any, state: State) -> Any:
    async def reached() -> Any:
        item = await db.get_work_item(work_id)
        return item if item.state == state else None
    return await wait_until(reached, 20, message=f"work item {work_id} to be {state}")


async def woken(db: Db, work_id: Any) -> list[str]:
    return [e.payload["reason"] for e in await db.history(work_id) if e.event == "woken"]


async def test_all_children_complete_and_the_results_come_in_the_order_given(db_url, tmp_path):
    kids = Kid()
    kids.gate.clear()
    async with run_faculties([Parent(), kids], home=tmp_path, database_url=db_url,
                             options=NO_POLL) as animus:
        sent = await animus.submit(parent(kid(0), kid(1), kid(2), kid(3)))
        waiting = await until_state(animus.db, sent.id, State.WAITING)
        assert waiting.reason == "waiting for 4 children"
        assert waiting.wait["kind"] == "children"
        assert len(waiting.wait["children"]) == 4
        kids.gate.set()
        item = await animus.animus.wait_finished(sent.id, 20)
        steps = await animus.db.steps(item.id)
        children = await animus.db.list_work(parent_id=item.id)
        reasons = await woken(animus.db, item.id)
    assert item.state == State.COMPLETED, item.reason
    assert [r["outcome"] for r in item.outcome.data] == [{"n": 0}, {"n": 1}, {"n": 2}, {"n": 3}]
    assert {r["state"] for r in item.outcome.data} == {"completed"}
    assert [(s.position, s.name, s.attempt) for s in steps] == [
        (1, "submit children", 1), (2, "wait for children", 2)]
    assert steps[0].result == {"children": [str(i) for i in waiting.wait["children"]]}
    assert sorted(str(c.id) for c in children) == sorted(steps[0].result["children"])
    assert (item.attempts, item.suspensions) == (2, 1)
    assert reasons == ["woken: its 4 children finished"]


async def test_a_failed_child_comes_back_dead_with_its_error_and_the_parent_decides(
        db_url, tmp_path):
    async with run_faculties([Parent(), Kid()], home=tmp_path, database_url=db_url,
                             options=NO_POLL) as animus:
        decided = await animus.run(parent(kid(0), kid(1, fail=True)))
        strict = await animus.run(parent(kid(0), kid(1, fail=True), strict=True))
    assert decided.state == State.COMPLETED, decided.reason
    ok, failed = decided.outcome.data
    assert (ok["state"], ok["outcome"]) == ("completed", {"n": 0})
    assert (failed["state"], failed["outcome"]) == ("dead", None)
    assert "kid 1 fell over" in failed["error"]
    # outcomes() raises for the failed child: the parent is dead-lettered, not retried
    assert strict.state == State.DEAD
    assert "ended dead" in (strict.reason or "")
    assert "kid 1 fell over" in (strict.reason or "")
    assert strict.attempts - strict.suspensions == 1


async def test_the_parent_holds_no_slot_while_its_children_run(db_url, tmp_path):
    kids = Kid()
    kids.gate.clear()
    fac = Parent()
    assert fac.max_concurrent == 1
    async with run_faculties([fac, kids], home=tmp_path, database_url=db_url,
                             options=NO_POLL) as animus:
        first = await animus.submit(parent(kid(0)))
        await until_state(animus.db, first.id, State.WAITING)
        assert first.id not in animus.engine.inflight
        # the one slot of the parent faculty is free: a second parent runs and waits too
        second = await animus.submit(parent(kid(1)))
        await until_state(animus.db, second.id, State.WAITING)
        assert animus.engine.inflight.keys().isdisjoint({first.id, second.id})
        kids.gate.set()
        done = [await animus.animus.wait_finished(i.id, 20) for i in (first, second)]
    assert [d.state for d in done] == [State.COMPLETED] * 2
    assert [d.outcome.data[0]["outcome"] for d in done] == [{"n": 0}, {"n": 1}]


async def test_a_cancelled_child_counts_as_finished(db_url, tmp_path):
    async with run_faculties([Parent()], home=tmp_path, database_url=db_url,
                             options=NO_POLL) as animus:
        db = animus.db
        sent = await animus.submit(parent(external(0), external(1)))
        waiting = await until_state(db, sent.id, State.WAITING)
        first, second = waiting.wait["children"]
        await db.cancel(first, "not needed")
        assert (await db.get_work_item(sent.id)).state == State.WAITING  # one to go
        [claimed] = await db.claim(work_types=["external"], lease_seconds=60, start=True)
        assert str(claimed.item.id) == second
        await db.complete(claimed.lease, {"done": 1})
        item = await animus.animus.wait_finished(sent.id, 20)
    assert item.state == State.COMPLETED
    assert [(r["state"], r["outcome"]) for r in item.outcome.data] == [
        ("cancelled", None), ("completed", {"done": 1})]


async def test_two_children_finishing_at_once_wake_the_parent_exactly_once(db_url, tmp_path):
    """Each child's completion commits in a transaction of its own; the second runs while
    the first has not committed. Neither sees the other finished when it starts; the second
    waits for the first's lock on the parent and then sees it."""
    async with run_faculties([Parent()], home=tmp_path, database_url=db_url,
                             options=NO_POLL) as animus:
        db = animus.db
        sent = await animus.submit(parent(external(0), external(1)))
        await until_state(db, sent.id, State.WAITING)
        claimed = await db.claim(work_types=["external"], limit=2, lease_seconds=60, start=True)
        assert len(claimed) == 2
        async with raw(db_url) as one, raw(db_url) as two:
            tx_one, tx_two = one.transaction(), two.transaction()
            await tx_one.start()
            await tx_two.start()
            await db.complete_many([(claimed[0].lease, {"k": 0}, 1)], conn=one)
            second = asyncio.create_task(
                db.complete_many([(claimed[1].lease, {"k": 1}, 1)], conn=two))
            pid_two = two.get_server_pid()

            async def blocked() -> bool:
                return await one.fetchval(
                    "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1",
                    pid_two) is True

            await wait_until(blocked, 20, message="the second completion to wait for a lock")
            await tx_one.commit()
            await second
            await tx_two.commit()
        item = await animus.animus.wait_finished(sent.id, 20)
        reasons = await woken(db, sent.id)
    assert item.state == State.COMPLETED
    assert [r["outcome"] for r in item.outcome.data] == [{"k": 0}, {"k": 1}]
    assert reasons == ["woken: its 2 children finished"]


async def test_children_finished_before_the_wait_do_not_suspend_the_focus(db_url, tmp_path):
    class Refusing(Parent):
        async def engage(self, focus: Focus, oriented: Any) -> Any:
            results = await focus.run_children([
                NewWorkItem("kid", source="test").refused("not this time"),
                NewWorkItem("kid", source="test").refused("nor this")])
            return [(str(r.state), r.reason) for r in results]

    async with run_faculties([Refusing()], home=tmp_path, database_url=db_url,
                             options=NO_POLL) as animus:
        item = await animus.run(parent())
        steps = await animus.db.steps(item.id)
    assert item.outcome.data == [["dead", "not this time"], ["dead", "nor this"]]
    assert item.suspensions == 0
    assert [s.name for s in steps] == ["submit children", "wait for children"]


async def test_a_wait_for_children_that_times_out(db_url, tmp_path):
    async with run_faculties([Parent()], home=tmp_path, database_url=db_url,
                             options=NO_POLL) as animus:
        item = await animus.run(parent(external(0), external(1), timeout=0.3))
        history = await animus.db.history(item.id)
    assert item.state == State.COMPLETED
    assert item.outcome.data == {"timed_out": [2, 2]}
    assert "woken: wait for 2 children timed out" in [
        e.payload.get("reason") for e in history if e.event == "woken"]


async def test_bad_calls_say_what_was_wrong(db_url, tmp_path):
    class Bad(Faculty):
        name = "bad"
        accepts = ("bad",)
        retry_base = 0.0
        retry_max = 0.0

        async def engage(self, focus: Focus, oriented: Any) -> Any:
            kind = focus.params["kind"]
            if kind == "one":
                await focus.run_children(NewWorkItem("kid"))  # type: ignore[arg-type]
            elif kind == "dict":
                await focus.run_children([{"work_type": "kid"}])  # type: ignore[list-item]
            elif kind == "timeout":
                await focus.run_children([NewWorkItem("kid")], timeout=-1)
            return await focus.run_children([])

    async with run_faculties([Bad()], home=tmp_path, database_url=db_url) as animus:
        reasons = {}
        for kind in ("one", "dict", "timeout", "none"):
            item = await animus.run(NewWorkItem("bad", source="t").params({"kind": kind}))
            reasons[kind] = (item.state, item.reason or "", item.outcome.data)
    assert reasons["none"][::2] == (State.COMPLETED, [])
    assert "run_children takes a list of NewWorkItem, got NewWorkItem" in reasons["one"][1]
    assert "run_children: item 0 is a dict, not a NewWorkItem" in reasons["dict"][1]
    assert "timeout must be from 0 seconds to 10 years" in reasons["timeout"][1]


# -- in the store ------------------------------------------------------------------------------


async def submitted(db: Db, lease: Lease, *items: NewWorkItem) -> list[str]:
    """Submit ``items`` as children of the item held by ``lease``, as step 1."""
    results = await db.submit_children(lease, 1, "submit children",
                                       [i.parent(lease.work_id) for i in items], queue="work",
                                       started_at=datetime.now(UTC))
    return [str(r.id) for r in results]


async def test_a_lost_lease_submits_no_children(db):
    """The children are submitted in the transaction that records their step: when the
    step cannot be recorded (the lease was lost), nothing is submitted."""
    c = await running(db, "mother")
    stale = msgspec.structs.replace(c.lease, token=c.lease.token + 1)
    with pytest.raises(LeaseLost):
        await submitted(db, stale, NewWorkItem("external", source="t"),
                        NewWorkItem("external", source="t"))
    assert await db.list_work(parent_id=c.item.id) == []
    assert await db.steps(c.item.id) == []
    assert await db.list_work(work_type="external") == []


async def test_a_suspension_whose_children_have_finished_is_woken_at_once(db):
    c = await running(db, "mother")
    ids = await submitted(db, c.lease, NewWorkItem("external", source="t"),
                          NewWorkItem("external", source="t"))
    for i in ids:
        await db.cancel(i, "done with")
    item = await db.suspend(c.lease, Wait.for_children(2, ids), wake_at=None,
                            execution=suspended_record(c))
    assert (item.state, item.reason) == (State.QUEUED, "woken: its 2 children had finished")
    events = [e.event for e in await db.history(c.item.id)]
    assert events[-2:] == ["suspended", "woken"]


async def test_a_child_failing_while_its_parent_suspends_does_not_deadlock(db, db_url):
    """A child that fails for good updates its row twice (failed, then dead), so its
    transaction checks its parent's key; the suspension locks the children before the
    parent, and waits for that transaction instead of deadlocking with it."""
    c = await running(db, "mother")
    ids = await submitted(db, c.lease, NewWorkItem("external", source="t"),
                          NewWorkItem("external", source="t"))
    held = {str(x.item.id): x for x in await db.claim(
        work_types=["external"], limit=2, lease_seconds=60, start=True)}
    last = held[ids[1]].lease
    async with raw(db_url) as conn, raw(db_url) as watch:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("SELECT animus.fail($1, $2, $3, 'boom', 1)", last.work_id,
                           last.msg_id, last.token)
        suspending = asyncio.create_task(db.suspend(
            c.lease, Wait.for_children(2, ids), wake_at=None, execution=suspended_record(c)))

        async def blocked() -> bool:
            return bool(await watch.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE '%animus.suspend%'"))

        await wait_until(blocked, 20, message="the suspension to wait for the failing child")
        await conn.execute("SELECT animus.dead_letter($1, 'gave up')", last.work_id)
        await tx.commit()
        item = await suspending
    assert (item.state, item.reason) == (State.WAITING, "waiting for 2 children")
    ended = await db.children_results(ids)
    assert ended[0] is None
    assert ended[1] is not None
    assert (ended[1].state, ended[1].reason) == (State.DEAD, "gave up")


async def test_a_merged_child_follows_the_item_it_was_merged_into(db):
    live = await db.submit_work(NewWorkItem("external", source="t").dedup_key("shared"))
    assert isinstance(live, Created)
    c = await running(db, "mother")
    [child] = await submitted(db, c.lease,
                              NewWorkItem("external", source="t").dedup_key("shared"))
    merged = await db.get_work_item(child)
    assert (merged.state, merged.merged_into) == (State.MERGED, live.id)
    item = await db.suspend(c.lease, Wait.for_children(2, [child]), wake_at=None,
                            execution=suspended_record(c))
    assert (item.state, item.reason) == (State.WAITING, "waiting for 1 child")
    [result] = await db.children_results([child])
    assert result is None  # merged, but what it follows has not finished
    await db.cancel(live.id, "enough")
    woke = await db.get_work_item(c.item.id)
    assert (woke.state, woke.reason) == (State.QUEUED, "woken: its 1 child finished")
    [result] = await db.children_results([child])
    assert result == ChildResult(id=UUID(child), work_type="external", state=State.CANCELLED,
                                 reason="enough", merged_into=live.id)


def test_child_results_round_trip_and_raise_for_failures() -> None:
    ok = ChildResult(id=UUID(int=1), work_type="k", state=State.COMPLETED, outcome={"a": [1]})
    bad = ChildResult(id=UUID(int=2), work_type="k", state=State.DEAD, error="boom",
                      reason="attempts exhausted (1/1): boom")
    assert [ChildResult.from_json(r.to_json()) for r in (ok, bad)] == [ok, bad]
    assert outcomes([ok]) == [{"a": [1]}]
    with pytest.raises(ChildFailed, match=r"child work item .*2 \(k\) ended dead: attempts"):
        outcomes([ok, bad])
    with pytest.raises(InvalidInput, match="lists at least one child"):
        Wait(kind="children", position=1, children=[])
    with pytest.raises(InvalidInput, match="a wait of kind 'sleep' lists no children"):
        Wait(kind="sleep", position=1, until="2030-01-01T00:00:00+00:00", children=["x"])


async def test_a_merged_child_follows_an_item_completed_in_a_batch(db):
    """Completed with another item in one statement (a batch is audited by statement), the
    item a child was merged into still wakes the child's parent."""
    live = await db.submit_work(NewWorkItem("external", source="t").dedup_key("batched"))
    other = await db.submit_work(NewWorkItem("external", source="t"))
    assert isinstance(live, Created)
    assert isinstance(other, Created)
    c = await running(db, "mother")
    [child] = await submitted(db, c.lease,
                              NewWorkItem("external", source="t").dedup_key("batched"))
    item = await db.suspend(c.lease, Wait.for_children(2, [child]), wake_at=None,
                            execution=suspended_record(c))
    assert item.state == State.WAITING
    held = await db.claim(work_types=["external"], limit=2, lease_seconds=60, start=True)
    assert {x.item.id for x in held} == {live.id, other.id}
    await db.complete_many([(x.lease, {"done": True}, 1) for x in held])
    woke = await db.get_work_item(c.item.id)
    assert (woke.state, woke.reason) == (State.QUEUED, "woken: its 1 child finished")


_finishes = st.sampled_from(["complete", "fail", "cancel"])


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=st.lists(st.lists(_finishes, min_size=1, max_size=3), min_size=1, max_size=4))
def test_the_parent_wakes_once_when_its_last_child_finishes(db_url: str,
                                                            plan: list[list[str]]) -> None:
    """Children finished in groups (cancelled, then completed together in one statement,
    then failed for good): the parent waits until the last group has finished, and is woken
    once, by the statement that finished the last child."""
    asyncio.run(_finish_in_groups(db_url, plan))


_examples = iter(range(10**6))


async def _finish_in_groups(db_url: str, plan: list[list[str]]) -> None:
    kind = f"child{next(_examples)}"
    db = await Db.connect(db_url)
    try:
        c = await running(db, f"mother-{kind}")
        n = sum(len(g) for g in plan)
        ids = await submitted(db, c.lease, *[NewWorkItem(kind, source="t") for _ in range(n)])
        item = await db.suspend(c.lease, Wait.for_children(2, ids), wake_at=None,
                                execution=suspended_record(c))
        assert item.state == State.WAITING
        todo = list(ids)
        for g, group in enumerate(plan):
            assert (await db.get_work_item(c.item.id)).state == State.WAITING
            mine, todo = todo[:len(group)], todo[len(group):]
            how = dict(zip(mine, group, strict=True))
            for i in mine:
                if how[i] == "cancel":
                    await db.cancel(i, "not needed")
            to_run = [i for i in mine if how[i] != "cancel"]
            held = {str(x.item.id): x for x in await db.claim(
                work_types=[kind], limit=len(to_run), lease_seconds=60, start=True)} \
                if to_run else {}
            assert set(held) == set(to_run)  # the oldest queued children: this group's
            await db.complete_many([(held[i].lease, {"i": i}, 1) for i in to_run
                                    if how[i] == "complete"])
            for i in to_run:
                if how[i] == "fail":
                    await db.fail_attempt(held[i].lease, "boom", then=DeadLetter("gave up"))
            last = g == len(plan) - 1
            now = await db.get_work_item(c.item.id)
            assert now.state == (State.QUEUED if last else State.WAITING), (g, now.reason)
        count = "1 child" if n == 1 else f"{n} children"
        assert await woken(db, c.item.id) == [f"woken: its {count} finished"]
        ended = await db.children_results(ids)
        assert all(r is not None for r in ended)
    finally:
        await db.close()


# -- an engine killed after it submitted the children -------------------------------------------


@pytest.fixture
def proc_env(cli_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """The environment of an engine process that loads tests/children_faculty.py."""
    site = plugin_site(tmp_path, "tests.children_faculty", "testchildren")
    env = {k: v for k, v in cli_env.items() if k != "ANIMUS_DISABLE_PLUGIN_AUTOLOAD"}
    env.update(ANIMUS_FACULTIES="faculties", ANIMUS_HOME=str(tmp_path / "home"),
               ANIMUS_PLUGINS="testchildren", LOG_LEVEL="info",
               PYTHONPATH=f"{site}:{ROOT}")
    return env


@pytest.mark.slow
async def test_an_engine_killed_after_submitting_children_does_not_submit_them_again(
        db, db_url, tmp_path, proc_env):
    root = tmp_path / "effects"
    root.mkdir()
    with engine_processes(proc_env, tmp_path) as start:
        first = start("--lease", "2", "--poll", "0.5")
        await wait_listening(db_url, [first])
        created = await db.submit_work(NewWorkItem("brood", source="test").params(
            {"kids": 3, "hold": True, "dir": str(root)}))
        assert isinstance(created, Created)
        await wait_until(lambda: (root / "held").exists(), 30,
                         message=f"the first attempt to submit its children\n{first.output()}")
        first.signal(signal.SIGKILL)
        assert await first.wait(10) == -signal.SIGKILL
        kids = await db.list_work(parent_id=created.id)
        assert len(kids) == 3
        assert [s.name for s in await db.steps(created.id)] == ["submit children"]

        second = start("--lease", "2", "--poll", "0.5")
        await wait_listening(db_url, [second])
        waiting = await until_state(db, created.id, State.WAITING)  # resumed, then suspended
        assert sorted(waiting.wait["children"]) == sorted(str(k.id) for k in kids)
        assert len(await db.list_work(parent_id=created.id)) == 3  # none submitted again
        for claimed in await db.claim(work_types=["external"], limit=3, lease_seconds=60,
                                      start=True):
            await db.complete(claimed.lease, {"n": claimed.item.params["n"]})
        item = await wait_finished(db, created.id, 60)
    assert item.state == State.COMPLETED, second.output()
    assert [r["outcome"] for r in item.outcome.data] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert len(await db.list_work(parent_id=created.id)) == 3
    steps = await db.steps(created.id)
    assert [(s.name, s.attempt) for s in steps] == [
        ("submit children", 1), ("wait for children", 3)]
    assert [r.result for r in await db.executions(created.id)] == [
        "lost", "suspended", "completed"]


async def test_the_documented_example_runs(db_url, tmp_path, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", db_url)
    (example,) = code_blocks("writing-faculties.md", "### Waiting for child work", "python")
    namespace: dict[str, Any] = {}
    exec(compile(example, "writing-faculties.md", "exec"), namespace)
    await namespace["test_survey"](tmp_path)
