"""The reserve: a faculty of short foci keeps a few items claimed ahead of its free slots, so
a slot that frees starts the next at once (docs/concepts.md, "The reserve"). What it must not
change: a faculty never runs more foci than its slots, every item runs once, a stop gives
reserved items back without counting an attempt, a cancel ends one without running it, and
their leases hold however long the slots stay busy."""

from __future__ import annotations

import asyncio
from typing import Any

from animus_core import Faculty, Focus, NewWorkItem, State
from animus_core.runtime.engine import EngineOptions
from animus_core.runtime.flights import Slot
from animus_core.runtime.reserve import MOST, Reserve
from tests.engine_helpers import events, run_engine, wait_until
from tests.support import raw

QUICK = "quick"


class Quick(Faculty):
    """Engage takes a millisecond, and once ``quick_ones`` foci ran, waits for ``gate``;
    counts the foci running at once and every run of each item."""

    name = QUICK
    accepts = (QUICK,)
    max_concurrent = 2

    def __init__(self, quick_ones: int | None = None) -> None:
        self.quick_ones = quick_ones
        self.gate = asyncio.Event()
        self.now = self.peak = self.at_gate = 0
        self.runs: dict[str, int] = {}

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        key = str(focus.work.id)
        self.runs[key] = self.runs.get(key, 0) + 1
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            await asyncio.sleep(0.001)
            if self.quick_ones is not None and len(self.runs) > self.quick_ones:
                self.at_gate += 1
                await self.gate.wait()
        finally:
            self.now -= 1
        return None


async def submit(db: Any, n: int, work_type: str = QUICK) -> list[str]:
    results = await db.submit_many([NewWorkItem(work_type).params({"i": i}) for i in range(n)])
    return [str(r.id) for r in results]


async def states(db_url: str, ids: list[str]) -> dict[str, tuple[str, int]]:
    async with raw(db_url) as conn:
        rows = await conn.fetch("SELECT id::text, state::text, attempts FROM animus.work_items "
                                "WHERE id::text = ANY($1::text[])", ids)
    return {r["id"]: (r["state"], r["attempts"]) for r in rows}


async def held_back(run: Any, faculty: Quick) -> list[str]:
    """Wait until both slots wait at the gate with items in reserve: their ids."""
    slot = run.engine.slots[QUICK]
    try:
        await wait_until(lambda: faculty.at_gate == 2 and len(run.engine.reserve) > 0, 20,
                         message="both slots at the gate and items in reserve")
    except AssertionError as e:
        raise AssertionError(f"{e}: {faculty.at_gate} at the gate, {len(faculty.runs)} ran, "
                             f"{len(run.engine.reserve)} in reserve, dirty {slot.dirty}, "
                             f"claiming {slot.claiming}, turnover {slot.turnover}") from None
    return [str(h.claimed.item.id) for h in run.engine.reserve]


async def test_short_foci_start_from_a_reserve_and_stay_within_their_slots(db, db_url, tmp_path):
    faculty = Quick()
    peak_reserve = 0
    async with run_engine(db_url, tmp_path / "home", faculties=[faculty]) as run:
        ids = await submit(db, 400)

        async def done() -> bool:
            nonlocal peak_reserve
            peak_reserve = max(peak_reserve, len(run.engine.reserve))
            return len(faculty.runs) == 400 and not faculty.now

        await wait_until(done, 60, interval=0.001, message="400 quick foci")
        claims = run.db.seams.claim_calls
    assert faculty.peak <= 2
    assert peak_reserve > 0
    assert set(faculty.runs.values()) == {1}
    # many items per claim: without the reserve, each freed slot claimed one
    assert claims < 200
    assert set((await states(db_url, ids)).values()) == {("completed", 1)}


async def test_foci_longer_than_a_claims_round_trip_keep_no_reserve(db, db_url, tmp_path):
    class Slow(Quick):
        async def engage(self, focus: Focus, oriented: Any) -> Any:
            await asyncio.sleep(0.1)
            return await super().engage(focus, oriented)

    faculty = Slow()
    most = 0
    async with run_engine(db_url, tmp_path / "home", faculties=[faculty]) as run:
        await submit(db, 12)

        def done() -> bool:
            nonlocal most
            most = max(most, len(run.engine.reserve))
            return len(faculty.runs) == 12 and not faculty.now

        await wait_until(done, 30, interval=0.005, message="12 slow foci")
    # another engine with free slots could have run what this one would have held
    assert most == 0


async def test_a_stop_gives_reserved_items_back_without_counting_an_attempt(
        db, db_url, tmp_path):
    faculty = Quick(quick_ones=100)
    options = EngineOptions(grace=0.5, poll_interval=1.0)
    async with run_engine(db_url, tmp_path / "home", faculties=[faculty],
                          options=options) as run:
        ids = await submit(db, 400)
        reserved = await held_back(run, faculty)
    after = await states(db_url, ids)
    assert not [i for i, (state, _) in after.items() if state == "running"]
    for wid in reserved:
        assert after[wid] == ("queued", 0), wid
        assert wid not in faculty.runs
        assert (await events(db, wid))[-1] == "queued"
        assert "held in reserve" in ((await db.get_work_item(wid)).reason or "")
    assert set(faculty.runs.values()) == {1}


async def test_a_cancel_ends_a_reserved_item_without_running_it(db, db_url, tmp_path):
    faculty = Quick(quick_ones=100)
    async with run_engine(db_url, tmp_path / "home", faculties=[faculty]) as run:
        await submit(db, 400)
        victim = (await held_back(run, faculty))[-1]
        await db.cancel(victim, "not wanted")

        async def ended() -> bool:
            item = await db.get_work_item(victim)
            return bool(item.state == State.DEAD)

        await wait_until(ended, 15, message="the reserved item to end")
        assert victim not in run.engine.reserve
        faculty.gate.set()
        await wait_until(lambda: len(faculty.runs) == 399 and not faculty.now, 30,
                         message="the others to run")
    item = await db.get_work_item(victim)
    assert victim not in faculty.runs
    assert "not wanted" in (item.reason or "")


async def test_reserved_items_keep_their_leases_while_the_slots_stay_busy(db, db_url, tmp_path):
    faculty = Quick(quick_ones=60)
    options = EngineOptions(lease_seconds=2, poll_interval=0.5, seal_interval=0.2)
    async with run_engine(db_url, tmp_path / "home", faculties=[faculty],
                          options=options) as run:
        ids = await submit(db, 200)
        reserved = await held_back(run, faculty)
        await asyncio.sleep(5)  # two and a half lease times
        # still held (a claim in flight may have topped the reserve up since)
        assert set(reserved) <= {str(h.claimed.item.id) for h in run.engine.reserve}
        faculty.gate.set()
        await wait_until(lambda: len(faculty.runs) == 200 and not faculty.now, 30,
                         message="all 200 to run")
    assert set(faculty.runs.values()) == {1}
    assert set((await states(db_url, ids)).values()) == {("completed", 1)}


def test_the_reserve_holds_about_50_ms_of_a_faculty_s_work_on_its_slots():
    class Wide(Quick):
        max_concurrent = 256

    class Limited(Quick):
        rate_limit = 100.0

    reserve = Reserve(concurrency=64)
    wide, limited = Slot(Wide()), Slot(Limited())
    assert reserve.target(wide) == 0  # no focus has ended yet
    for seconds, held in ((0.0001, MOST), (0.001, MOST), (0.02, 160), (0.1, 32), (0.5, 6),
                          (2.0, 1), (4.0, 0)):
        wide.turnover = seconds  # 64 slots, the engine's concurrency, not the faculty's 256
        assert reserve.target(wide) == held, seconds
    limited.observe(0.001)
    assert reserve.target(limited) == 0
