"""Waiting across killed and shared engines: ``python -m animus_core up`` processes running
the ``waiter`` faculty of tests/step_faculty.py. An engine SIGKILLed while its items sleep
or wait loses nothing: the next engine wakes them by their timer (learnt from the database
at start-up) or their signal, every step's side effect happens once and each item completes
once. Two engines share waiting items without running any twice. The fallback poll is a
minute, so only timers and notifications can wake anything in time."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import pytest

from animus_core import Created, Db, NewWorkItem, State
from tests.engine_helpers import events, run_cli, wait_finished, wait_listening, wait_until
from tests.test_step_processes import counts, engines, proc_env  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow
ENGINE = ("--lease", "5", "--poll", "60")


async def submit(db: Db, root: Path, *script: list[object]) -> str:
    created = await db.submit_work(NewWorkItem("waiter", source="test").params(
        {"dir": str(root), "script": [list(op) for op in script]}))
    assert isinstance(created, Created)
    return str(created.id)


async def all_waiting(db: Db, ids: list[str]) -> bool:
    items = [await db.get_work_item(i) for i in ids]
    return all(i.state == State.WAITING for i in items)


async def test_items_sleeping_or_waiting_when_their_engine_is_killed_resume_on_the_next(
        db, db_url, tmp_path, engines, proc_env):  # noqa: F811 - fixtures
    root = tmp_path / "effects"
    root.mkdir()
    first = engines(*ENGINE)
    await wait_listening(db_url, [first])
    sleeper = await submit(db, root, ["step", "s1"], ["sleep", 3], ["step", "s2"])
    waiter = await submit(db, root, ["step", "w1"], ["wait", "go"], ["step", "w2"])
    await wait_until(lambda: all_waiting(db, [sleeper, waiter]), 30,
                     message=f"both to wait\n{first.output()}")
    code, out, err = await run_cli(proc_env, tmp_path, "status", "--json")
    assert code == 0, err
    waiting = json.loads(out)["waiting"]
    assert waiting["total"] == 2
    assert waiting["by_kind"]["event"] == {"n": 1, "next_wake_at": None}
    assert waiting["by_kind"]["sleep"]["n"] == 1
    assert [(w["id"], w["wait"]["kind"]) for w in waiting["next"]] == [
        (sleeper, "sleep"), (waiter, "event")]  # the timer first
    assert waiting["next"][1]["reason"] == "waiting for 'go'"
    code, out, err = await run_cli(proc_env, tmp_path, "status")
    assert code == 0, err
    assert "\nwaiting: 2 (event 1, sleep 1); first to wake:\n" in out
    first.signal(signal.SIGKILL)
    assert await first.wait(10) == -signal.SIGKILL

    # nobody runs: the signal is kept and wakes the item for whichever engine comes
    code, out, err = await run_cli(proc_env, tmp_path, "work", "signal", waiter, "go",
                                   "--data", '{"ok": true}')
    assert code == 0, err
    assert (await db.get_work_item(waiter)).state == State.QUEUED

    second = engines(*ENGINE)
    await wait_listening(db_url, [second])
    done = [await wait_finished(db, wid, 60) for wid in (sleeper, waiter)]
    assert [d.state for d in done] == [State.COMPLETED] * 2, second.output()
    assert done[0].outcome.data == ["s1 done", "s2 done"]
    assert done[1].outcome.data == ["w1 done", {"ok": True}, "w2 done"]
    assert counts(root, ["s1", "s2", "w1", "w2"]) == [1, 1, 1, 1]
    code, out, err = await run_cli(proc_env, tmp_path, "work", "show", waiter, "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert [(s["position"], s["name"], s["attempt"]) for s in shown["steps"]] == [
        (1, "w1", 1), (2, "wait for go", 2), (3, "w2", 2)]
    [sent] = shown["signals"]
    assert (sent["event"], sent["payload"], sent["consumed_by_position"]) == (
        "go", {"ok": True}, 2)
    for wid in (sleeper, waiter):
        assert (await events(db, wid)).count("completed") == 1
        records = await db.executions(wid)
        assert [r.result for r in records] == ["suspended", "completed"]


async def test_two_engines_share_waiting_items_and_run_none_twice(
        db, db_url, tmp_path, engines, proc_env):  # noqa: F811 - fixtures
    root = tmp_path / "effects"
    root.mkdir()
    procs = [engines(*ENGINE), engines(*ENGINE)]
    await wait_listening(db_url, procs)
    sleepers = [await submit(db, root, ["step", f"a{i}"], ["sleep", 1.5], ["step", f"b{i}"])
                for i in range(12)]
    waiters = [await submit(db, root, ["step", f"c{i}"], ["wait", "go"], ["step", f"d{i}"])
               for i in range(12)]
    await wait_until(lambda: all_waiting(db, waiters), 30, message="the waiters to wait")
    await asyncio.gather(*(db.signal(w, "go", i) for i, w in enumerate(waiters)))
    done = [await wait_finished(db, wid, 60) for wid in sleepers + waiters]
    assert {d.state for d in done} == {State.COMPLETED}, [p.output() for p in procs]
    names = [f"{x}{i}" for x in "abcd" for i in range(12)]
    assert counts(root, names) == [1] * len(names)
    for i, d in enumerate(done[12:]):
        assert d.outcome.data == [f"c{i} done", i, f"d{i} done"]
    for d in done:
        assert (await events(db, d.id)).count("completed") == 1

    code, out, err = await run_cli(proc_env, tmp_path, "status", "--json")
    assert code == 0, err
    assert json.loads(out)["waiting"] == {"total": 0, "by_kind": {}, "next": []}
