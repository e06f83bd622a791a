"""The console's live feed (animus_core/web/live.py): one reader for every viewer, a viewer
too slow to keep up is let go (and its page reconnects), and the chart counts what finished
once."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

from animus_core import Db, NewWorkItem
from animus_core.store.console import Change, watch
from animus_core.web.live import CHANNEL, Hub, Viewer
from tests.support import raw


async def test_a_viewer_that_stops_reading_is_let_go_and_its_stream_ends(db: Db) -> None:
    hub = Hub(db)
    stream = hub.subscribe()
    assert await anext(stream) == b"retry: 1000\n: connected\n\n"
    assert hub.viewers == 1
    for n in range(1001):  # more than a viewer's queue holds
        hub._publish("change", {"n": n})
    assert hub.viewers == 0
    async with asyncio.timeout(5):  # it ends (the page reconnects and catches up)
        got = [message async for message in stream]
    assert len(got) < 1001
    assert all(m.startswith(b"event: change\n") for m in got)


async def test_the_stream_of_a_viewer_whose_session_is_over_ends(db: Db) -> None:
    """One query, at each keep-alive, checks every viewer's session: a person who may no
    longer sign in (removed, here never added) is let go."""
    hub = Hub(db, keep_alive=0.1)
    gone = hub.subscribe(viewer=Viewer("console_live_nobody", time.time(), time.time() + 60))
    expired = hub.subscribe(viewer=Viewer("console_live_nobody", time.time(), time.time() - 1))
    async with asyncio.timeout(10):  # both end
        streams = [[m async for m in gone], [m async for m in expired]]
    for got in streams:
        assert got[0] == b"retry: 1000\n: connected\n\n"
        assert set(got[1:]) <= {b": keep-alive\n\n"}
    assert hub.viewers == 0
    await hub.stop()


def change(audit_id: int, from_state: str | None, to_state: str) -> Change:
    return Change(id=audit_id, work_id=uuid4(), event=to_state, from_state=from_state,
                  to_state=to_state, db_user="engine", at=datetime.now(UTC), state=to_state,
                  work_type="t", reason=None)


async def test_the_chart_counts_each_item_finishing_once(db: Db) -> None:
    hub = Hub(db)
    hub._started_at = 100  # the audit row the console started after
    hub._send([change(99, "running", "completed"),    # before the start: the seed's
               change(101, "running", "completed"),
               change(102, "dead", "dead"),           # a change to a dead item: not again
               change(103, None, "dead"),             # denied at submit: finished at once
               change(104, "running", "waiting")])
    chart = hub.chart()
    assert (chart.total_finished, chart.total_dead) == (2, 1)


async def _notified(conn: Any, got: asyncio.Queue[str], db: Db) -> bool:
    """Whether a submission notifies ``animus_changed`` (to ``conn``, which listens)."""
    await db.submit_many([NewWorkItem("watched")])
    try:
        await asyncio.wait_for(got.get(), 2)
    except TimeoutError:
        return False
    return True


async def test_work_changes_notify_the_console_only_while_one_watches(db: Db, db_url: str) -> None:
    """A notifying commit holds a lock of the whole server through its flush, and wakes every
    listener: without a console, work changes do not notify. A hub watches while it runs."""
    got: asyncio.Queue[str] = asyncio.Queue()
    async with raw(db_url) as conn:
        await conn.add_listener(CHANNEL, lambda *args: got.put_nowait(args[3]))
        assert not await _notified(conn, got, db)
        hub = Hub(db)
        await hub.start()
        try:
            assert await _notified(conn, got, db)
        finally:
            await hub.stop()
        assert not await _notified(conn, got, db)
        await watch(db, "someone", 60)
        assert await _notified(conn, got, db)
        await watch(db, "someone", 0)
        assert not await _notified(conn, got, db)
