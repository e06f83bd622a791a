"""Live engines in the store (0026_engines.sql): registration, heartbeats, lost engines, stop
requests, and the status read model, with who may do what. The engine processes themselves
are in test_engine_processes.py (status, stop)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from animus_core import NewWorkItem
from animus_core.store import engines, read
from animus_core.values.engines import (
    Engine,
    EngineInfo,
    FacultyInfo,
    ScheduleInfo,
    StuckWork,
    stuck_work,
)
from animus_core.values.errors import InvalidInput, PermissionDenied, WorkNotFound
from tests.governance_helpers import People
from tests.governance_helpers import people as team


@pytest.fixture
async def people(db_url: str, server_url: str) -> AsyncIterator[People]:
    async with team(db_url, server_url, (("rita", "reader"), ("sam", "submitter"),
                                         ("ann", "approver"), ("otto", "operator"))) as members:
        yield members


def info(*, heartbeat: float = 5.0, disabled: dict[str, str] | None = None) -> EngineInfo:
    return EngineInfo(
        id=uuid.uuid4(), host="box", pid=42, version="1.2.3", heartbeat_seconds=heartbeat,
        concurrency=8, queues=["work"],
        faculties=[FacultyInfo(name="sum", origin="pkg 1.0", accepts=["summarize"],
                               max_concurrent=2),
                   FacultyInfo(name="llm", origin="llm.toml", accepts=["think"],
                               max_concurrent=1)],
        disabled=disabled or {},
        schedules=[ScheduleInfo(name="nightly", work_type="summarize",
                                next_tick=datetime(2030, 1, 1, tzinfo=UTC))])


async def test_an_engine_registers_beats_is_lost_when_its_beats_stop_and_deregisters(db):
    live, gone = info(disabled={"llm": "ANTHROPIC_API_KEY not set"}), info(heartbeat=0.1)
    await engines.register(db, live)
    await engines.register(db, gone)
    beat = await engines.heartbeat(db, live.id, {"sum": 2})
    assert (beat.registered, beat.stop_requested, beat.stop_grace) == (True, False, None)
    await asyncio.sleep(0.4)  # three of gone's beats missed
    view = await read.status(db)
    by_id = {e.id: e for e in view.engines}
    assert set(by_id) == {live.id, gone.id}
    mine = by_id[live.id]
    assert (mine.lost, by_id[gone.id].lost) == (False, True)
    assert (mine.host, mine.pid, mine.version, mine.concurrency, mine.queues) == (
        "box", 42, "1.2.3", 8, ["work"])
    assert mine.running == {"sum": 2}
    assert mine.disabled == {"llm": "ANTHROPIC_API_KEY not set"}
    assert mine.accepts() == {"summarize": "sum"}  # a disabled faculty accepts nothing
    assert mine.schedules == live.schedules
    assert mine.db_user  # the session user that registered it
    assert mine.last_seen >= mine.started_at
    # a beat brings a lost engine back; a beat of one forgotten says to register again
    assert (await engines.heartbeat(db, gone.id, {})).registered
    assert not {e.id: e for e in (await read.status(db)).engines}[gone.id].lost
    await engines.deregister(db, gone.id)
    assert not (await engines.heartbeat(db, gone.id, {})).registered
    assert [e.id for e in (await read.status(db)).engines] == [live.id]


async def test_registering_again_updates_the_row_and_forgets_engines_lost_a_day_ago(db, db_url):
    old, again = info(), info()
    await engines.register(db, old)
    await engines.register(db, again)
    async with db.connection() as conn:
        await conn.execute("UPDATE animus.engines SET last_seen = now() - interval '25 hours' "
                           "WHERE id = $1", old.id)
    changed = EngineInfo(**{**{f: getattr(again, f) for f in again.__struct_fields__},
                            "concurrency": 99})
    await engines.register(db, changed)
    [row] = (await read.status(db)).engines
    assert (row.id, row.concurrency) == (again.id, 99)


async def test_stop_requests_are_recorded_with_who_asked_and_only_operators_ask(db, people):
    a, b = info(), info()
    for e in (a, b):
        await engines.register(db, e)
    for who in ("rita", "sam", "ann"):
        with pytest.raises(PermissionDenied):
            await engines.stop_engines(await people.db(who), None)
        with pytest.raises(PermissionDenied):
            await engines.register(await people.db(who), info())
    otto = await people.db("otto")
    with pytest.raises(WorkNotFound, match="no engine with id"):
        await engines.stop_engines(otto, uuid.uuid4())
    with pytest.raises(InvalidInput, match="grace period"):
        await engines.stop_engines(otto, a.id, grace=-1)
    assert await engines.stop_engines(otto, a.id, grace=7) == [a.id]
    beat = await engines.heartbeat(db, a.id, {})
    assert (beat.stop_requested, beat.stop_grace) == (True, 7.0)
    assert not (await engines.heartbeat(db, b.id, {})).stop_requested
    view = {e.id: e for e in (await read.status(db)).engines}
    assert view[a.id].stop_requested_by == people.name("otto")
    assert sorted(await engines.stop_engines(otto)) == sorted([a.id, b.id])
    beat = await engines.heartbeat(db, b.id, {})
    assert (beat.stop_requested, beat.stop_grace) == (True, None)


async def test_every_role_reads_the_status_in_one_query(db, people):
    """``animus status`` failed for the reader and the approver: it read pgmq's sequences."""
    await db.submit_work(NewWorkItem("summarize"))
    await engines.register(db, info())
    for who in ("rita", "ann", "sam", "otto"):
        view = await read.status(await people.db(who))
        assert [q.queue for q in view.queues] == ["work"]
        assert view.queues[0].depth == 1
        assert view.queued() == {"summarize": 1}
        assert len(view.engines) == 1
        assert view.now <= datetime.now(UTC) + timedelta(seconds=5)


def engine(accepts: dict[str, list[str]], *, lost: bool = False,
           disabled: dict[str, str] | None = None) -> Engine:
    now = datetime.now(UTC)
    return Engine(id=uuid.uuid4(), host="h", pid=1, version="1", heartbeat_seconds=5,
                  concurrency=4, queues=["work"],
                  faculties=[FacultyInfo(name=n, origin="o", accepts=t, max_concurrent=1)
                             for n, t in accepts.items()],
                  disabled=disabled or {}, db_user="u", started_at=now, last_seen=now,
                  lost=lost)


def test_stuck_work_says_why_no_live_engine_runs_it():
    up = engine({"a": ["x"], "b": ["y"]}, disabled={"b": "KEY not set"})
    gone = engine({"c": ["z"]}, lost=True)
    queued = {"x": 3, "y": 2, "z": 1, "w": 4, "none": 0}
    assert stuck_work([up, gone], queued) == [
        StuckWork(work_type="w", queued=4,
                  reason="no live engine has a faculty that accepts it (unroutable)"),
        StuckWork(work_type="y", queued=2, reason="its faculty is disabled on every live "
                                                  "engine (b on h:1: KEY not set)"),
        StuckWork(work_type="z", queued=1,
                  reason="no live engine has a faculty that accepts it (unroutable)")]
    # another live engine that runs y: not stuck
    assert [s.work_type for s in stuck_work([up, engine({"b": ["y"]})], {"y": 2})] == []
    assert stuck_work([gone], {"z": 1})[0].reason == "no engine is running"
