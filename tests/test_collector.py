"""The engine's schedule for CPython's full garbage collections (animus_core/runtime/collector.py,
docs/operations.md "Garbage collection"): what start-up made is frozen out of every
collection, full collections run only when the schedule says (the process grew, nothing is in
flight, or too long since the last), cyclic garbage is still collected, and the process gets
CPython's collector back when the engine stops."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from animus_core import Faculty, Focus, NewWorkItem
from animus_core.runtime.collector import MIDDLE, NEVER, Collector, resident_bytes
from tests.engine_helpers import DEFAULT_OPTIONS, run_engine, wait_until


class Node:
    def __init__(self) -> None:
        self.other: Any = None


def cycle() -> weakref.ref[Node]:
    """Garbage in a cycle (only a collection frees it), moved to the full generation."""
    a, b = Node(), Node()
    a.other, b.other = b, a
    gc.collect(1)  # young -> middle -> full: what survives a collection of the middle one
    gc.collect(1)
    return weakref.ref(a)


@pytest.fixture
def restored() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.set_threshold(*thresholds)
    gc.unfreeze()


class Rss:
    def __init__(self, value: int) -> None:
        self.value = value

    def __call__(self) -> int:
        return self.value


def full_collections_while_allocating() -> int:
    """Full collections CPython starts on its own while 300,000 new objects live on (its
    rule: those moved to the full generation reach a quarter of those there)."""
    seen: list[int] = []

    def note(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info["generation"] == 2:
            seen.append(1)

    gc.callbacks.append(note)
    try:
        keep: list[list[int]] = [[] for _ in range(300_000)]
        del keep
    finally:
        gc.callbacks.remove(note)
    return len(seen)


def test_start_freezes_and_takes_the_full_collections_over_stop_gives_them_back(restored):
    before = gc.get_threshold()
    gc.collect()
    assert full_collections_while_allocating() > 0, "CPython's own rule: the control"
    collector = Collector(lambda: 0)
    collector.start()
    try:
        young, middle, full = gc.get_threshold()
        assert (young, middle, full) == (before[0], min(before[1], MIDDLE), NEVER)
        assert gc.get_freeze_count() > 0
        ref = cycle()
        assert full_collections_while_allocating() == 0, "a full collection off the schedule"
        assert ref() is not None, "only a full collection frees the cycle"
        assert collector.collect("test") >= 2
        assert ref() is None
        assert collector.collections == 1
    finally:
        collector.stop()
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
    collector.stop()  # twice is harmless
    assert gc.get_threshold() == before


def test_a_full_collection_is_due_when_the_process_grew_by_half(restored):
    rss = Rss(400 << 20)
    collector = Collector(lambda: 5, resident=rss)
    collector.start()
    try:
        assert collector.due() is None
        rss.value += 199 << 20  # less than half
        assert collector.due() is None
        rss.value += 1 << 20
        assert collector.due() == "grown by 200 MiB since the last"
        collector.collect("grown")
        assert collector.due() is None, "the collection measures the process again"
    finally:
        collector.stop()


def test_small_processes_grow_by_the_least_growth_before_a_collection(restored):
    rss = Rss(40 << 20)
    collector = Collector(lambda: 5, resident=rss)
    collector.start()
    try:
        rss.value += 63 << 20  # more than half, less than the least growth (64 MiB)
        assert collector.due() is None
        rss.value += 1 << 20
        assert collector.due() is not None
    finally:
        collector.stop()


def test_a_full_collection_is_due_when_nothing_is_in_flight_or_at_the_latest_every(restored):
    in_flight = [3]
    collector = Collector(lambda: in_flight[0], resident=Rss(1 << 30), idle_after=0.0,
                          every=3600.0)
    collector.start()
    try:
        assert collector.due() is None, "foci in flight, the process has not grown"
        in_flight[0] = 0
        assert collector.due() == "nothing in flight"
    finally:
        collector.stop()
    overdue = Collector(lambda: 3, resident=Rss(1 << 30), every=0.0)
    overdue.start()
    try:
        assert (overdue.due() or "").endswith("s since the last")
    finally:
        overdue.stop()


def test_resident_bytes_is_the_process_memory():
    assert 10 << 20 < resident_bytes() < 64 << 30


class Cycles(Faculty):
    """Each focus leaves garbage in a cycle behind, and says how the collector is set."""

    name = "cycles"
    accepts = ("cycles",)

    def __init__(self) -> None:
        self.refs: list[weakref.ref[Node]] = []
        self.thresholds: list[tuple[int, int, int]] = []

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        self.thresholds.append(gc.get_threshold())
        self.refs.append(cycle())
        return None


async def test_an_engine_that_schedules_collections_collects_cycles_when_idle(db, db_url, tmp_path,
                                                                              restored):
    before = gc.get_threshold()
    faculty = Cycles()
    options = dataclasses.replace(DEFAULT_OPTIONS, schedule_gc=True)
    async with run_engine(db_url, tmp_path / "home", faculties=[faculty],
                          options=options) as run:
        collector = run.engine.collector
        assert collector is not None
        collector.idle_after, collector.check = 0.0, 0.05
        await db.submit_many([NewWorkItem("cycles") for _ in range(3)])
        await wait_until(lambda: len(faculty.refs) == 3 and not run.engine.inflight, 20,
                         message="three foci ended")
        await wait_until(lambda: all(ref() is None for ref in faculty.refs), 10,
                         message="their cycles collected once nothing is in flight")
        assert collector.collections >= 1
    assert {t[2] for t in faculty.thresholds} == {NEVER}
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


async def test_an_engine_leaves_the_collector_alone_unless_asked(db, db_url, tmp_path):
    before = gc.get_threshold()
    faculty = Cycles()
    async with run_engine(db_url, tmp_path / "home", faculties=[faculty]) as run:
        assert run.engine.collector is None
        await db.submit_many([NewWorkItem("cycles")])
        await wait_until(lambda: faculty.thresholds, 20, message="a focus ran")
        await asyncio.sleep(0)
    assert faculty.thresholds == [before]
