"""The console's live feed (animus_core/web/live.py): one reader for every viewer, a viewer
too slow to keep up is let go (and its page reconnects), and the chart counts what finished
once."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from uuid import uuid4

from animus_core import Db
from animus_core.store.console import Change
from animus_core.web.live import Hub


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
