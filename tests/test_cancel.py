"""Cancelling work that is already running: the focus stops and the item ends dead."""

from __future__ import annotations

import asyncio
from typing import Any

import psutil

from animus_core import Faculty, Focus, NewWorkItem, State
from animus_core.runtime.engine import EngineOptions
from tests.engine_helpers import run_engine, wait_finished, wait_until, write_toml_faculty
from tests.support import raw


class Sleeper(Faculty):
    name = "sleeper"
    accepts = ("sleep",)
    max_concurrent = 2
    started: asyncio.Event

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        type(self).started.set()
        await asyncio.sleep(60)
        return {"slept": True}


async def test_cancelling_a_running_python_focus(db, db_url, animus_home):
    Sleeper.started = asyncio.Event()
    async with run_engine(db_url, animus_home, faculties=[Sleeper()]) as running:
        item = (await db.submit_work(NewWorkItem("sleep", source="test"))).id
        await asyncio.wait_for(Sleeper.started.wait(), 15)
        requested = await db.cancel(item, "the operator changed their mind")
        assert requested.state is State.RUNNING
        assert requested.cancel_requested == "the operator changed their mind"
        done = await wait_finished(db, item, timeout=10)
        # the engine lets go of the focus once its cleanup ran, after the item finished
        await wait_until(lambda: running.engine.inflight == {}, 5,
                         message="the focus to be let go")
    assert done.state is State.DEAD
    assert done.attempts == 1
    assert "cancelled while running: the operator changed their mind" in (done.reason or "")
    events = [(e.event, e.from_state, e.to_state) for e in await db.history(item)]
    assert ("cancel_requested", "running", "running") in events
    assert events[-2:] == [("failed", "running", "failed"), ("dead", "failed", "dead")]


async def test_cancelling_kills_a_running_hook(db, db_url, animus_home, tmp_path):
    marker = tmp_path / "hook.pid"
    toml = write_toml_faculty(tmp_path, "slowhook", hooks={
        "engage": f'echo $$ > "{marker}"\nexec sleep 60\n'})
    async with run_engine(db_url, animus_home, faculties_dir=toml.parent):
        item = (await db.submit_work(NewWorkItem("slowhook", source="test"))).id
        await wait_until(lambda: marker.exists() and marker.read_text().strip(), 15)
        pid = int(marker.read_text())
        await db.cancel(item, "stop it")
        done = await wait_finished(db, item, timeout=10)
        assert done.state is State.DEAD
        await wait_until(lambda: not psutil.pid_exists(pid)
                         or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 5,
                         message="the hook process is still alive")
    assert "stop it" in (done.reason or "")


async def test_a_notification_without_a_request_cancels_nothing(db, db_url, animus_home):
    """Anyone who can connect can NOTIFY animus_cancel; only a request recorded on the item
    (animus.cancel, which takes an operator) stops its focus."""
    Sleeper.started = asyncio.Event()
    async with run_engine(db_url, animus_home, faculties=[Sleeper()]) as running:
        kept, stopped = [(await db.submit_work(NewWorkItem("sleep", source="test"))).id
                         for _ in range(2)]
        await wait_until(lambda: {kept, stopped} <= set(running.engine.inflight), 15,
                         message="both foci to start")
        async with raw(db_url) as conn:
            await conn.execute("SELECT pg_notify('animus_cancel', $1)", str(kept))
        await db.cancel(stopped, "a real request")  # notified after the forged one
        assert (await wait_finished(db, stopped, timeout=10)).state is State.DEAD
        assert kept in running.engine.inflight
        assert (await db.get_work_item(kept)).state is State.RUNNING
        await db.cancel(kept, "done waiting")
        assert (await wait_finished(db, kept, timeout=10)).state is State.DEAD


async def test_a_missed_notification_is_caught_by_the_lease_keeper(db, db_url, animus_home):
    Sleeper.started = asyncio.Event()
    options = EngineOptions(lease_seconds=3, poll_interval=1.0)
    async with run_engine(db_url, animus_home, faculties=[Sleeper()], options=options):
        item = (await db.submit_work(NewWorkItem("sleep", source="test"))).id
        await asyncio.wait_for(Sleeper.started.wait(), 15)
        async with db.connection() as conn:  # the request without its notification
            await conn.execute("UPDATE animus.work_items SET cancel_requested = 'quietly' "
                               "WHERE id = $1", item)
        done = await wait_finished(db, item, timeout=10)
    assert done.state is State.DEAD
    assert "quietly" in (done.reason or "")


async def test_cancel_of_a_queued_item_is_immediate_and_of_a_finished_one_refused(db, animus):
    queued = (await db.submit_work(NewWorkItem("nobody-runs-this", source="test"))).id
    out = animus("work", "cancel", str(queued))
    assert out.returncode == 0
    assert f"cancelled {queued}" in out.stdout
    assert (await db.get_work_item(queued)).state is State.CANCELLED
    again = animus("work", "cancel", str(queued))
    assert again.returncode == 2
    assert again.stderr.startswith("animus: error:")
    assert "cancelled" in again.stderr
    assert "Traceback" not in again.stderr
