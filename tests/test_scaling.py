"""``animus.scaling_depth``: what a fleet scales on (KEDA's PostgreSQL scaler runs it), run on
the real database: the routable work an engine could start now plus the work engines hold;
not waiting work, not work due later, not work of other types (docs/operations-kubernetes.md).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from animus_core import Db, NewWorkItem
from animus_core.store.roles import setup_roles
from animus_core.values.waits import Wait
from tests.governance_helpers import people as team
from tests.support import raw

ROUTED = ["scale.a", "scale.b"]


async def depth(db_url: str, *args: Any) -> int:
    async with raw(db_url) as conn:
        n: int = await conn.fetchval(
            "SELECT animus.scaling_depth($1, $2)" if args else "SELECT animus.scaling_depth()",
            *args)
    return n


async def test_it_counts_what_engines_could_start_now_and_what_they_hold(
        db: Db, db_url: str) -> None:
    assert await depth(db_url, "work", ROUTED) == 0
    for t in ("scale.a", "scale.a", "scale.b", "scale.b", "scale.b", "scale.b"):
        await db.submit_work(NewWorkItem(t, source="test"))
    await db.submit_work(NewWorkItem("scale.nobody", source="test"))  # no engine runs it
    assert await depth(db_url, "work", ROUTED) == 6
    assert await depth(db_url, "work", ["scale.a"]) == 2
    assert await depth(db_url) == 7  # every type

    [held] = await db.claim(work_types=["scale.a"], start=True)  # an engine runs it
    assert await depth(db_url, "work", ROUTED) == 6  # still demand: a busy engine stays

    [sleeper] = await db.claim(work_types=["scale.a"], start=True)
    later = datetime.now(UTC) + timedelta(hours=1)
    await db.suspend(sleeper.lease, Wait.sleep(1, later), wake_at=later)
    [waiter] = await db.claim(work_types=["scale.b"], start=True)
    await db.suspend(waiter.lease, Wait.for_event(1, "go"), wake_at=None)
    assert await depth(db_url, "work", ROUTED) == 4  # the waiting two cost no engine

    [failing] = await db.claim(work_types=["scale.b"], start=True)
    await db.fail(failing.lease, "boom")
    await db.retry(failing.item.id, delay=3600)  # due in an hour
    assert await depth(db_url, "work", ROUTED) == 3

    await db.signal(waiter.item.id, "go", None)  # woken: an engine could start it now
    assert await depth(db_url, "work", ROUTED) == 4
    await db.complete(held.lease, {"ok": True})
    assert await depth(db_url, "work", ROUTED) == 3


async def test_an_unknown_queue_is_a_clear_error(db: Db, db_url: str) -> None:
    with pytest.raises(asyncpg.PostgresError, match="there is no queue 'nope'"):
        await depth(db_url, "nope", ROUTED)


async def test_a_reader_may_ask_and_nothing_more(db: Db, db_url: str, server_url: str) -> None:
    """KEDA's login needs no more than reading: animus roles add-user keda --role reader."""
    async with raw(db_url) as conn:
        await setup_roles(conn)
    await db.submit_work(NewWorkItem("scale.a", source="test"))
    async with team(db_url, server_url, [("keda", "reader")]) as people:
        keda = await asyncpg.connect(people.url("keda"))
        try:
            assert await keda.fetchval("SELECT animus.scaling_depth('work', $1)", ROUTED) == 1
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await keda.fetchval("SELECT animus.submit('scale.a', '{}')")
        finally:
            await keda.close()
