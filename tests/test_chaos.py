"""An engine under attack by its own database: backends terminated several times a second.

Under a steady stream of submissions, Postgres terminates every connection of the engine
(its pool and its listener) and of the producer, four times a second for several seconds.
No background task may die of it: each drops the broken connection and retries on a fresh
one, and the engine keeps running. Afterwards every item is completed, none was completed
twice, none is stuck, and no item's focus ran twice at the same time.

Longer scenarios (SIGKILL of engines, a Postgres restart, exhausted connection slots, an
idle-in-transaction session holding the xmin horizon) are in ``benchmarks/chaos.py``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

import pytest

from animus_core import Db, Faculty, NewWorkItem
from animus_core.runtime.engine import EngineOptions
from animus_core.values.errors import DatabaseUnavailable
from tests.engine_helpers import run_engine, wait_until
from tests.support import raw

pytestmark = pytest.mark.slow

_KILL = """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
            WHERE datname = current_database() AND pid <> pg_backend_pid()
              AND application_name IN ('animus', 'animus-listener')"""


class Tally(Faculty):
    """Counts runs per item and notices two foci of one item running at once."""

    name = "tally"
    accepts = ("tally",)
    max_concurrent = 8

    def __init__(self) -> None:
        self.active: set[UUID] = set()
        self.runs: collections.Counter[UUID] = collections.Counter()
        self.overlaps = 0

    async def engage(self, focus: Any, oriented: Any) -> Any:
        work_id = focus.work.id
        if work_id in self.active:
            self.overlaps += 1
        self.active.add(work_id)
        self.runs[work_id] += 1
        try:
            await asyncio.sleep(0.002)
        finally:
            self.active.discard(work_id)
        return {"n": focus.params["n"]}


async def _produce(db: Db, n: int, every: float) -> list[str]:
    """Submit ``n`` keyed items, retrying what a lost connection interrupted (the key makes a
    retry of a submission that did commit a merge, not a second item)."""
    keys = []
    for i in range(n):
        key = f"chaos-{i}"
        while True:
            try:
                await db.submit_work(NewWorkItem("tally", source="chaos").dedup_key(key)
                                     .params({"n": i}))
                break
            except DatabaseUnavailable:
                await asyncio.sleep(0.05)
        keys.append(key)
        await asyncio.sleep(every)
    return keys


async def test_terminated_backends_stop_nothing_and_lose_nothing(db_url, tmp_path):
    tally = Tally()
    options = EngineOptions(poll_interval=0.5, lease_seconds=3, grace=5.0, seal_interval=0.1)
    producer = await Db.connect(db_url, max_size=4, actor="chaos-producer")
    kills = 0
    try:
        async with run_engine(db_url, tmp_path, faculties=[tally], options=options) as running:
            production = asyncio.create_task(_produce(producer, 300, 0.01))
            async with raw(db_url) as killer:
                while not production.done():
                    kills += await killer.fetchval(_KILL)
                    await asyncio.sleep(0.25)
            keys = await production
            assert not running.engine.stopping.is_set(), "the engine stopped itself"

            async def all_done() -> bool:
                async with raw(db_url) as conn:
                    return bool(await conn.fetchval(
                        """SELECT count(*) FROM animus.work_items
                            WHERE work_type = 'tally' AND state = 'completed'""") >= len(keys))

            await wait_until(all_done, 60, message="every item to complete")
            assert not running.engine.stopping.is_set(), "the engine stopped itself"
    finally:
        with contextlib.suppress(Exception):
            await producer.close()

    assert kills >= 20, f"only {kills} backends were terminated: the attack did not happen"
    async with raw(db_url) as conn:
        states = dict(await conn.fetch(
            """SELECT state::text, count(*) FROM animus.work_items
                WHERE work_type = 'tally' AND merged_into IS NULL GROUP BY state"""))
        completions = await conn.fetchval(
            """SELECT count(*) FROM animus.audit_log a JOIN animus.work_items w ON w.id = a.work_id
                WHERE w.work_type = 'tally' AND a.to_state = 'completed'""")
    assert states == {"completed": len(keys)}, states  # nothing lost, nothing stuck
    assert completions == len(keys)                    # nothing completed twice
    assert tally.overlaps == 0                         # no focus ran twice at the same time


class Echo(Faculty):
    name = "echo"
    accepts = ("echo",)

    async def engage(self, focus: Any, oriented: Any) -> Any:
        return {"ok": True}


@pytest.mark.parametrize("params", [
    '{"deep": ' + "[" * 3000 + "]" * 3000 + "}",
    '{"n": 1e400}',
])
async def test_a_poison_item_written_around_animus_is_dead_lettered_not_fatal(
        db, db_url, tmp_path, params):
    """JSON that Postgres stores but animus cannot read (written with SQL through
    animus.submit, which a submitter may call) must not stop the engines that claim it: the
    item is dead-lettered with the reason, and other work goes on."""
    async with raw(db_url) as conn:
        poison = await conn.fetchval(
            "SELECT id FROM animus.submit('work', jsonb_build_array(jsonb_build_object("
            "'work_type', 'echo', 'source', 'psql', 'params', $1::text::jsonb)))", params)
    async with run_engine(db_url, tmp_path, faculties=[Echo()]) as running:
        from tests.engine_helpers import wait_finished

        dead = await wait_finished(db, poison, timeout=20)
        fine = await db.submit_work(NewWorkItem("echo", source="test"))
        done = await wait_finished(db, fine.id, timeout=20)
        assert not running.engine.stopping.is_set()
    assert dead.state == "dead"
    assert "params cannot be read" in (dead.reason or "")
    assert done.state == "completed"


class Stubborn(Faculty):
    """Attempt 1 runs long; later attempts are quick. Notes each attempt's run interval."""

    name = "stubborn"
    accepts = ("stubborn",)

    def __init__(self) -> None:
        self.running: set[UUID] = set()
        self.overlaps = 0
        self.started = asyncio.Event()

    async def engage(self, focus: Any, oriented: Any) -> Any:
        work_id = focus.work.id
        if work_id in self.running:
            self.overlaps += 1
        self.running.add(work_id)
        self.started.set()
        try:
            await asyncio.sleep(20 if focus.attempt == 1 else 0.05)
        finally:
            self.running.discard(work_id)
        return {"attempt": focus.attempt}


async def test_an_engine_cut_off_from_the_database_stops_its_foci_before_their_leases_end(
        db, db_url, server_url, tmp_path):
    """Fencing: an engine that cannot reach the database cannot extend its leases, and once a
    lease ran out another engine may claim the item. So the engine stops a focus whose lease
    it could not extend before that lease ends: the other engine's attempt never runs beside
    it. Engine A is cut off (its connections terminated, new ones refused); B, connected
    before, keeps claiming."""
    faculty = Stubborn()
    options = EngineOptions(poll_interval=0.5, lease_seconds=3, grace=5.0, seal_interval=0.2)
    database = urlsplit(db_url).path.lstrip("/")
    other = await Db.connect(db_url, min_size=1, max_size=1, actor="engine-b")
    try:
        async with other.connection() as conn:
            other_pid = await conn.fetchval("SELECT pg_backend_pid()")
        async with run_engine(db_url, tmp_path, faculties=[faculty], options=options), \
                raw(server_url) as admin:  # ALTER DATABASE from another database
            work_id = (await db.submit_work(NewWorkItem("stubborn", source="test"))).id
            await asyncio.wait_for(faculty.started.wait(), 15)
            await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
            try:
                await admin.execute(
                    """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                        WHERE datname = $1 AND pid <> $2
                          AND application_name IN ('animus', 'animus-listener')""",
                    database, other_pid)
                taken: list[Any] = []
                for _ in range(100):  # until A's lease runs out (3 s) and B can claim it
                    taken = await other.claim(work_types=["stubborn"], lease_seconds=30,
                                              start=True)
                    if taken:
                        break
                    await asyncio.sleep(0.1)
                assert taken, "the lease of the cut-off engine never ran out"
                beside = work_id in faculty.running  # is A's attempt still running?
                await other.complete(taken[0].lease, {"by": "b"})
            finally:
                await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
    finally:
        await other.close()
    assert not beside, "engine B's attempt started while engine A's attempt 1 still ran"
    item = await db.get_work_item(work_id)
    assert (item.state, item.attempts, item.outcome.data) == ("completed", 2, {"by": "b"})
    assert [r.result for r in await db.executions(work_id)] == ["lost"]


async def test_a_finished_focus_keeps_its_lease_until_its_completion_is_recorded(db_url, tmp_path):
    """The database refuses completions for longer than the lease (as it does while backends
    are terminated faster than a completion's transaction can finish): the finished focus
    must keep its item, not see it claimed again, run again and cost an attempt."""
    tally = Tally()
    options = EngineOptions(poll_interval=0.5, lease_seconds=2, grace=5.0, seal_interval=0.1)
    producer = await Db.connect(db_url, max_size=2, actor="chaos-producer")
    try:
        async with run_engine(db_url, tmp_path, faculties=[tally], options=options) as running:
            refuse_until = asyncio.get_running_loop().time() + 5.0  # 2.5 leases

            def unreachable() -> None:
                if asyncio.get_running_loop().time() < refuse_until:
                    raise DatabaseUnavailable("lost the database connection: (test) refused")

            running.db.seams.faults["complete_many"] = unreachable
            result = await producer.submit_work(NewWorkItem("tally", source="chaos")
                                                .params({"n": 1}))

            async def done() -> bool:
                return (await producer.get_work_item(result.canonical_id)).state == "completed"

            await wait_until(done, 30, message="the item to complete")
        item = await producer.get_work_item(result.canonical_id)
        events = [e.event for e in await producer.history(result.canonical_id)]
    finally:
        await producer.close()
    assert tally.runs[result.canonical_id] == 1, events
    assert item.attempts == 1
    assert "failed" not in events


class Slow(Faculty):
    """Runs longer than the lease, so only the lease keeper keeps it to one run."""

    name = "slow"
    accepts = ("slow",)
    max_concurrent = 2

    def __init__(self) -> None:
        self.runs = 0

    async def engage(self, focus: Any, oriented: Any) -> Any:
        self.runs += 1
        await asyncio.sleep(7)
        return {}


async def test_a_failed_lease_extension_is_tried_again_before_the_lease_runs_out(db_url, tmp_path):
    """Three extensions in a row fail (their connections were terminated): the keeper must not
    wait a third of the lease after each, or the fence stops the focus before its lease runs
    out, and the item runs again."""
    slow = Slow()
    options = EngineOptions(poll_interval=0.5, lease_seconds=6, grace=5.0, seal_interval=0.1)
    producer = await Db.connect(db_url, max_size=2, actor="chaos-producer")
    try:
        async with run_engine(db_url, tmp_path, faculties=[slow], options=options) as running:
            failures = 0

            def flaky() -> None:
                nonlocal failures
                if failures < 3:
                    failures += 1
                    raise DatabaseUnavailable("lost the database connection: (test) terminated")

            running.db.seams.faults["extend_lease"] = flaky
            result = await producer.submit_work(NewWorkItem("slow", source="chaos"))

            async def done() -> bool:
                return (await producer.get_work_item(result.canonical_id)).state == "completed"

            await wait_until(done, 30, message="the item to complete")
        item = await producer.get_work_item(result.canonical_id)
        events = [e.event for e in await producer.history(result.canonical_id)]
    finally:
        await producer.close()
    assert failures == 3
    assert slow.runs == 1, events
    assert item.attempts == 1


class SlowCleanup(Faculty):
    """The first focus takes seconds to clean up when it is stopped; the others are quick."""

    name = "slowclean"
    accepts = ("slowclean",)
    max_concurrent = 2

    def __init__(self) -> None:
        self.started = asyncio.Event()

    async def engage(self, focus: Any, oriented: Any) -> Any:
        if not self.started.is_set():  # the first focus of the test only
            self.started.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                await asyncio.sleep(4)  # cleanup that outlives the lease
                raise
        return {"attempt": focus.attempt}


async def test_an_engine_that_claims_again_an_item_it_still_runs_keeps_count(
        db, db_url, server_url, tmp_path):
    """The fence stopped attempt 1, but its cleanup outlives the lease and this engine claims
    the item again: both foci must be counted apart, and the slot of each freed once, or the
    faculty loses a slot for good (and one with max_concurrent = 1 would never claim again)."""
    faculty = SlowCleanup()
    options = EngineOptions(poll_interval=0.5, lease_seconds=2, grace=10.0, seal_interval=0.2)
    database = urlsplit(db_url).path.lstrip("/")
    async with run_engine(db_url, tmp_path, faculties=[faculty], options=options) as running, \
            raw(server_url) as admin:
        work_id = (await db.submit_work(NewWorkItem("slowclean", source="test"))).id
        await asyncio.wait_for(faculty.started.wait(), 15)
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        try:
            await admin.execute(_KILL.replace("current_database()", "$1"), database)
            await asyncio.sleep(2.5)
        finally:
            await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        from tests.engine_helpers import wait_finished

        item = await wait_finished(db, work_id, timeout=30)
        await wait_until(lambda: not running.engine.inflight, 15, message="foci to end")
        slot = running.engine.slots["slowclean"]
        # the replaced focus may still be in its cleanup (not in flight, yet running): wait
        # for it, and for its slot to come back (on the old code it never did)
        await wait_until(lambda: slot.running == 0, 15,
                         message="the slots of both foci to be freed")
        later = (await db.submit_work(NewWorkItem("slowclean", source="test"))).id
        assert (await wait_finished(db, later, timeout=15)).state == "completed"
    assert item.state == "completed"
