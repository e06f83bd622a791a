"""MVCC pressure: a session holds the xmin horizon while work flows in at a steady rate.

    .venv/bin/python -m benchmarks.bench_mvcc [--rate R] [--warmup S] [--hold S]
        [--recovery S] [--concurrency C] [--json PATH] [--no-baseline]

On a fresh database of the embedded server (or of the server ``DATABASE_URL`` names), an
engine in this process runs a faculty with ``max_concurrent = C`` (64 by default) that does
nothing but note when each focus starts, while a producer in this process submits one item
per transaction, R a second (500 by default), on a schedule: each submission is due at
``start + k / R`` and runs in a task of its own, so a slow one does not hold back the next.
One timeline, three phases, the producer running through all of them:

* **warm-up** (10 s);
* **hold** (60 s): another session opens a REPEATABLE READ transaction, reads a row of
  ``animus.work_items`` and stays idle in transaction, holding the xmin horizon: no row
  version deleted or updated after its snapshot can be removed until it ends;
* **recovery** (30 s): that session rolls back.

The claim latency of an item is the start of its focus (orient) less the commit of its
submission, both on this process's clock; an item belongs to the phase its submission
committed in. Every second: the items submitted, started and completed, the age of the
oldest snapshot of the database (``age(backend_xmin)``), and ``n_dead_tup`` / ``n_live_tup``
of every table in the schemas ``animus`` and ``pgmq`` (``pg_stat_user_tables``: Postgres
updates them within a second or so of the work, later for a session that goes idle), and
the CPU used by this process and by the Postgres server. At the end every item must have
completed, each in one attempt.

**Raw pgmq (the baseline, same run):** on a database of its own, the same producer calls
``pgmq.send`` of one message at the same rate, and C workers on C connections each loop
``pgmq.read`` of one message, then ``pgmq.archive``; a worker whose read comes back empty
waits C ms (the C workers together poll about once a millisecond). The same phases and the
same hold; its latency is the read's return less the send's commit.

Targets (issue: performance at the shape of real work, item 4): during the hold, completion
keeps up (at least 95% of R a second) and claim p99 <= 100 ms; in the last 10 s of the first
30 s after the hold, p99 <= 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import asyncpg

from animus_core.faculties.faculty import Faculty
from animus_core.faculties.focus import Focus
from animus_core.infra import loop
from animus_core.infra.config import Settings
from animus_core.runtime.engine import EngineOptions
from animus_core.store.db import Db, describe_url, resolve_url
from animus_core.values.work import NewWorkItem
from benchmarks.bench_engine import (
    Check,
    CpuMeter,
    Line,
    Section,
    Server,
    clock,
    describe_database,
    fresh_animus_db,
    machine,
    percentile,
    publish,
    render_report,
    running_engine,
)
from benchmarks.bench_fleet import load

DEFAULT_PREFIX = "animus_bench_mvcc"
WORK_TYPE = "bench.mvcc"
RAW_QUEUE = "bench_mvcc_raw"
PRODUCER_POOL = 8  # connections the producer's submissions share
RAW_POLL = 0.001  # seconds between empty reads of the raw workers, all together
DRAIN_TIMEOUT = 120.0  # seconds after the producer stops for the last item to complete
HOLD_P99_MS = 100.0
RECOVERED_P99_MS = 50.0
KEEP_UP = 0.95  # completions per second during the hold, over --rate
RECOVERY_TARGET = 30.0  # seconds after the hold by which p99 is to be back down
RECOVERED_WINDOW = 10.0  # the last seconds of those, where it is measured

#: what the producer calls for item k: submits it, and notes when the submission committed
Send = Callable[[int], Coroutine[Any, Any, None]]

HOLD_SQL = "SELECT 1 FROM animus.work_items LIMIT 1"
TABLES_SQL = """SELECT schemaname || '.' || relname AS name, n_dead_tup, n_live_tup,
                       autovacuum_count + vacuum_count AS vacuums
                  FROM pg_stat_user_tables WHERE schemaname IN ('animus', 'pgmq')
                 ORDER BY 1"""
HORIZON_SQL = """SELECT max(age(backend_xmin)) FROM pg_stat_activity
                  WHERE datname = current_database()"""
ACTIVITY_SQL = """SELECT datname = current_database() AS ours,
                         CASE WHEN backend_type = 'autovacuum worker' THEN 'autovacuum'
                              ELSE coalesce(wait_event_type || ':' || wait_event, 'running')
                         END AS doing, count(*) AS n
                    FROM pg_stat_activity
                   WHERE state = 'active' AND pid <> pg_backend_pid()
                     AND backend_type IN ('client backend', 'autovacuum worker')
                   GROUP BY 1, 2"""


@dataclass(frozen=True)
class Config:
    """The producer's rate, the phases' seconds, the concurrency, and whether the baseline runs."""

    rate: float = 500.0
    warmup: float = 10.0
    hold: float = 60.0
    recovery: float = 30.0
    concurrency: int = 64
    baseline: bool = True

    @property
    def seconds(self) -> float:
        return self.warmup + self.hold + self.recovery

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


# -- one path over the timeline -------------------------------------------------------------


@dataclass
class Sample:
    """The counts and the tables' tuples at one moment (``t``: seconds since the start)."""

    t: float
    submitted: int
    started: int
    completed: int
    xmin_age: int | None
    tables: dict[str, tuple[int, int, int]]  # name -> (dead, live, vacuums so far)
    cpu: tuple[float, float | None]  # CPU seconds so far: this process, the server
    doing: dict[str, int]  # this database's active sessions by what they wait on
    others: int  # active sessions of the server's other databases

    def to_json(self) -> dict[str, Any]:
        return {"t": round(self.t, 3), "submitted": self.submitted, "started": self.started,
                "completed": self.completed, "xmin_age": self.xmin_age,
                "doing": self.doing, "other_databases_active": self.others,
                "cpu": [None if x is None else round(x, 3) for x in self.cpu],
                "dead": {k: v[0] for k, v in self.tables.items()},
                "live": {k: v[1] for k, v in self.tables.items()},
                "vacuums": {k: v[2] for k, v in self.tables.items()}}


@dataclass
class Trace:
    """What one path (animus, or raw pgmq) did over the timeline; times on ``clock``."""

    name: str
    committed: dict[int, float] = field(default_factory=dict)  # item -> submission committed
    started: dict[int, float] = field(default_factory=dict)  # item -> its work started
    samples: list[Sample] = field(default_factory=list)
    marks: dict[str, Sample] = field(default_factory=dict)  # phase ends
    start: float = 0.0
    hold_start: float = 0.0
    hold_end: float = 0.0
    end: float = 0.0  # the producer's last submission committed
    done: float = 0.0  # the last item completed
    twice: int = 0  # items that ran more than once

    def value_at(self, at: float, value: Callable[[Sample], float | None]) -> float | None:
        """``value`` of the samples at ``at``, between the two around it (None: not read)."""
        points = [(self.start + s.t, v) for s in self.samples if (v := value(s)) is not None]
        if not points:
            return None
        if at <= points[0][0]:
            return points[0][1]
        for (t0, v0), (t1, v1) in pairwise(points):
            if at <= t1:
                return v0 if t1 == t0 else v0 + (v1 - v0) * (at - t0) / (t1 - t0)
        return points[-1][1]


class Observer:
    """A connection that samples a trace's counts, the database's tables and the CPU used."""

    def __init__(self, conn: asyncpg.Connection, trace: Trace, completed: Callable[[], int],
                 meter: CpuMeter) -> None:
        self.conn = conn
        self.trace = trace
        self.completed = completed
        self.meter = meter
        self.lock = asyncio.Lock()

    async def sample(self) -> Sample:
        async with self.lock:
            await self.conn.execute("SELECT pg_stat_clear_snapshot()")
            rows = await self.conn.fetch(TABLES_SQL)
            horizon = await self.conn.fetchval(HORIZON_SQL)
            activity = await self.conn.fetch(ACTIVITY_SQL)
        t = self.trace
        sample = Sample(clock() - t.start, len(t.committed), len(t.started), self.completed(),
                        horizon, {r["name"]: (r["n_dead_tup"], r["n_live_tup"], r["vacuums"])
                                  for r in rows}, self.meter.read(),
                        {r["doing"]: r["n"] for r in activity if r["ours"]},
                        sum(r["n"] for r in activity if not r["ours"]))
        t.samples.append(sample)
        return sample

    async def every_second(self, stop: asyncio.Event) -> None:
        tick = self.trace.start
        while not stop.is_set():
            await self.sample()
            tick += 1.0
            await sleep_until(tick)


async def sleep_until(at: float) -> None:
    await asyncio.sleep(max(0.0, at - clock()))


async def produce(send: Send, rate: float, start: float, seconds: float) -> int:
    """Calls ``send(k)`` at ``start + k / rate`` for ``seconds``, each in a task of its own;
    returns how many once every one has returned."""
    pending: set[asyncio.Task[None]] = set()
    failures: list[BaseException] = []

    def finished(task: asyncio.Task[None]) -> None:
        pending.discard(task)
        error = None if task.cancelled() else task.exception()
        if error is not None:
            failures.append(error)

    n = int(rate * seconds)
    try:
        for k in range(n):
            await sleep_until(start + k / rate)
            task = asyncio.create_task(send(k))
            pending.add(task)
            task.add_done_callback(finished)
        while pending:
            await asyncio.wait(set(pending))
    finally:
        for task in pending:
            task.cancel()
    if failures:
        raise RuntimeError(f"{len(failures)} of {n} submissions failed, the first: "
                           f"{failures[0]!r}")
    return n


async def until_done(trace: Trace, completed: Callable[[], int], n: int) -> None:
    """Until ``n`` items completed; fails after ``DRAIN_TIMEOUT`` seconds."""
    deadline = clock() + DRAIN_TIMEOUT
    while completed() < n:
        if clock() > deadline:
            raise RuntimeError(f"{trace.name}: {completed()} of {n} items completed "
                               f"{DRAIN_TIMEOUT:g} s after the producer stopped")
        await asyncio.sleep(0.05)


async def timeline(url: str, cfg: Config, trace: Trace, send: Send,
                   completed: Callable[[], int]) -> None:
    """Runs the producer through warm-up, hold and recovery, holding the xmin horizon of
    ``url`` during the hold, sampling every second, until every item completed."""
    observer = Observer(await asyncpg.connect(url), trace, completed,
                        await CpuMeter.for_server(url))
    holder = await asyncpg.connect(url)
    stop = asyncio.Event()
    try:
        trace.start = clock()
        producer = asyncio.create_task(produce(send, cfg.rate, trace.start, cfg.seconds))
        sampler = asyncio.create_task(observer.every_second(stop))
        try:
            await sleep_until(trace.start + cfg.warmup)
            trace.marks["end of warm-up"] = await observer.sample()
            hold = holder.transaction(isolation="repeatable_read")
            await hold.start()
            await holder.execute(HOLD_SQL)
            trace.hold_start = clock()
            await sleep_until(trace.start + cfg.warmup + cfg.hold)
            trace.marks["end of hold"] = await observer.sample()
            await hold.rollback()
            trace.hold_end = clock()
            await sleep_until(trace.start + cfg.seconds)
            trace.marks["end of recovery"] = await observer.sample()
            n = await producer
            trace.end = clock()
            await until_done(trace, completed, n)
            trace.done = clock()
            await observer.sample()
        finally:
            stop.set()
            producer.cancel()
            await asyncio.gather(producer, sampler, return_exceptions=True)
    finally:
        await holder.close()
        await observer.conn.close()


# -- animus -----------------------------------------------------------------------------------


class StartRecorder(Faculty):
    """Notes when each item's focus starts (orient), and does nothing else."""

    name = "bench-mvcc"
    accepts = (WORK_TYPE,)

    def __init__(self, started: dict[int, float]) -> None:
        self.started = started

    async def orient(self, focus: Focus) -> Any:
        self.started.setdefault(focus.params["k"], clock())
        return None

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        return None

    async def consolidate(self, focus: Focus, engaged: Any) -> Any:
        return None


async def run_animus(server: Server, prefix: str, home: Path, cfg: Config) -> Trace:
    url = await fresh_animus_db(server, f"{prefix}_animus")
    trace = Trace("animus")
    faculty = type("StartRecorder", (StartRecorder,),
                   {"max_concurrent": cfg.concurrency})(trace.started)
    producer = await Db.connect(url, min_size=PRODUCER_POOL, max_size=PRODUCER_POOL,
                                actor="bench-producer")
    base = NewWorkItem(WORK_TYPE, source="bench")

    async def submit(k: int) -> None:
        await producer.submit_many([base.params({"k": k})])
        trace.committed[k] = clock()

    options = EngineOptions(concurrency=cfg.concurrency, lease_seconds=60)
    try:
        async with running_engine(url, home, options, faculties=[faculty]) as run:
            await timeline(url, cfg, trace, submit, lambda: run.completions.items)
    finally:
        await producer.close()
    conn = await asyncpg.connect(url)
    try:
        trace.twice = await conn.fetchval(
            """SELECT count(*) FROM animus.work_items w
                WHERE w.attempts > 1 OR (SELECT count(*) FROM animus.execution_records e
                                          WHERE e.work_id = w.id) > 1""")
    finally:
        await conn.close()
    return trace


# -- raw pgmq ---------------------------------------------------------------------------------


async def run_raw(server: Server, prefix: str, cfg: Config) -> Trace:
    url = await fresh_animus_db(server, f"{prefix}_raw")
    trace = Trace("raw pgmq")
    pool = await asyncpg.create_pool(url, min_size=PRODUCER_POOL, max_size=PRODUCER_POOL)
    workers = [await asyncpg.connect(url) for _ in range(cfg.concurrency)]
    stop = asyncio.Event()
    archived = 0

    async def send(k: int) -> None:
        async with pool.acquire() as conn:
            await conn.execute("SELECT pgmq.send($1::text, $2::jsonb)", RAW_QUEUE,
                               f'{{"k": {k}}}')
        trace.committed[k] = clock()

    async def work(conn: asyncpg.Connection) -> None:
        nonlocal archived
        while not stop.is_set():
            row = await conn.fetchrow("SELECT msg_id, (message->>'k')::int AS k "
                                      "FROM pgmq.read($1::text, 60, 1)", RAW_QUEUE)
            if row is None:
                await asyncio.sleep(RAW_POLL * cfg.concurrency)
                continue
            trace.started.setdefault(row["k"], clock())
            await conn.execute("SELECT pgmq.archive($1::text, $2::bigint)", RAW_QUEUE,
                               row["msg_id"])
            archived += 1

    try:
        await workers[0].execute("SELECT pgmq.create($1::text)", RAW_QUEUE)
        running = [asyncio.create_task(work(c)) for c in workers]
        try:
            await timeline(url, cfg, trace, send, lambda: archived)
        finally:
            stop.set()
            await asyncio.gather(*running)
        trace.twice = await workers[0].fetchval(
            f'SELECT count(*) FROM pgmq."a_{RAW_QUEUE}" WHERE read_ct > 1')
    finally:
        for c in workers:
            await c.close()
        await pool.close()
    return trace


# -- the report -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """A stretch of the timeline, on ``clock``."""

    label: str
    lo: float
    hi: float

    @property
    def seconds(self) -> float:
        return self.hi - self.lo


def windows(trace: Trace, cfg: Config) -> tuple[list[Window], Window]:
    """The phases and the parts of the recovery reported, and the one whose p99 is to be
    back down."""
    after = trace.hold_end
    first = min(cfg.recovery, RECOVERY_TARGET)
    out = [Window("warm-up", trace.start, trace.hold_start),
           Window("hold", trace.hold_start, after),
           Window(f"recovery 0-{first:g} s", after, after + first)]
    recovered = out[-1]
    if first > RECOVERED_WINDOW:
        lo = first - RECOVERED_WINDOW
        recovered = Window(f"recovery {lo:g}-{first:g} s", after + lo, after + first)
        out.append(recovered)
    if cfg.recovery > RECOVERY_TARGET:
        out.append(Window(f"recovery {first:g}-{cfg.recovery:g} s", after + first,
                          after + cfg.recovery))
    return out, recovered


@dataclass
class Figures:
    """One path's figures over one window."""

    items: int
    seconds: float
    submitted: float  # per second
    completed: float | None  # per second
    p50: float | None
    p95: float | None
    p99: float | None
    max: float | None
    submit_p99: float | None  # due -> committed, ms
    process_cores: float | None  # CPU of this process over the window, in cores
    server_cores: float | None  # of the Postgres server

    def to_json(self) -> dict[str, Any]:
        return {k: None if v is None else round(v, 3) for k, v in vars(self).items()}


def figures(trace: Trace, window: Window, rate: float) -> Figures:
    """The figures of the items whose submission committed in ``window``; completions and
    CPU between the samples around its ends."""
    inside = [k for k, at in trace.committed.items() if window.lo <= at < window.hi]
    ms = [(trace.started[k] - trace.committed[k]) * 1000 for k in inside if k in trace.started]
    late = [(trace.committed[k] - trace.start - k / rate) * 1000 for k in inside]

    def pct(values: list[float], q: float) -> float | None:
        return percentile(values, q) if values else None

    seconds = max(window.seconds, 1e-9)

    def per_second(value: Callable[[Sample], float | None]) -> float | None:
        lo, hi = trace.value_at(window.lo, value), trace.value_at(window.hi, value)
        return None if lo is None or hi is None else (hi - lo) / seconds

    return Figures(
        len(ms), window.seconds, len(inside) / seconds,
        per_second(lambda s: s.completed), pct(ms, 50), pct(ms, 95), pct(ms, 99),
        max(ms) if ms else None, pct(late, 99), per_second(lambda s: s.cpu[0]),
        per_second(lambda s: s.cpu[1]))


def path_lines(who: str, window: Window, f: Figures) -> list[Line]:
    prefix = f"{who}, {window.label}" if who else window.label
    return [Line(f"{prefix}: submitted", f.submitted, "items/s", f.items, f.seconds),
            Line(f"{prefix}: completed", f.completed, "items/s", seconds=f.seconds),
            Line(f"{prefix}: claim p50", f.p50, "ms", f.items),
            Line(f"{prefix}: claim p95", f.p95, "ms", f.items),
            Line(f"{prefix}: claim p99", f.p99, "ms", f.items),
            Line(f"{prefix}: claim max", f.max, "ms", f.items),
            Line(f"{prefix}: submit lag p99 (due -> commit)", f.submit_p99, "ms", f.items),
            Line(f"{prefix}: CPU of this process", f.process_cores, "cores"),
            Line(f"{prefix}: CPU of Postgres", f.server_cores, "cores")]


def backlog_lines(who: str, trace: Trace, cfg: Config) -> list[Line]:
    """The backlog over the hold, the age of the oldest snapshot at its end, and the items
    whose submission committed after the timeline's end (a producer running late)."""
    prefix = f"{who}, " if who else ""
    held = trace.marks["end of hold"]
    during = [s.submitted - s.completed for s in trace.samples
              if trace.hold_start <= trace.start + s.t <= trace.hold_end]
    planned_end = trace.hold_end + cfg.recovery
    return [Line(f"{prefix}backlog at the end of the hold", held.submitted - held.completed,
                 "items"),
            Line(f"{prefix}largest backlog during the hold", max(during, default=0), "items"),
            Line(f"{prefix}oldest snapshot's age at the end of the hold", held.xmin_age,
                 "xids"),
            Line(f"{prefix}submissions committed after the timeline's end",
                 sum(at >= planned_end for at in trace.committed.values()), "items")]


def activity_note(trace: Trace, window: Window) -> str:
    """What the database's active sessions waited on over ``window``, and how busy the
    server's other databases were, from the 1 s samples."""
    inside = [s for s in trace.samples if window.lo <= trace.start + s.t < window.hi]
    doing: Counter[str] = Counter()
    for s in inside:
        doing.update(s.doing)
    total = doing.total()
    waits = ", ".join(f"{what} {n / total:.0%}" for what, n in doing.most_common(5))
    others = [s.others for s in inside]
    return (f"{trace.name}, {window.label}: {total / max(1, len(inside)):.1f} active sessions "
            f"on average ({waits or 'none'}); other databases: "
            f"{sum(others) / max(1, len(others)):.1f} active sessions on average, at most "
            f"{max(others, default=0)}")


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def latency_section(cfg: Config, ours: Trace, raw: Trace | None) -> Section:
    spans, recovered = windows(ours, cfg)
    mine = {w.label: figures(ours, w, cfg.rate) for w in spans}
    lines: list[Line] = []
    for w in spans:
        lines += path_lines("", w, mine[w.label])
    lines += backlog_lines("", ours, cfg)
    hold = mine["hold"]
    checks = [
        Check("hold: claim p99, ms", hold.p99, HOLD_P99_MS, "<=", "ms"),
        Check(f"{recovered.label}: claim p99, ms", mine[recovered.label].p99,
              RECOVERED_P99_MS, "<=", "ms"),
        Check("hold: completed / --rate", ratio(hold.completed, cfg.rate), KEEP_UP),
        Check("hold: submitted / --rate", hold.submitted / cfg.rate, None),
        Check("hold: completed / submitted", ratio(hold.completed, hold.submitted), None),
        Check("hold: claim p99 / warm-up claim p99", ratio(hold.p99, mine["warm-up"].p99),
              None),
        Check("items run twice", ours.twice, 0, "<="),
    ]
    theirs: dict[str, Figures] = {}
    if raw is not None:
        raw_spans, _ = windows(raw, cfg)
        theirs = {w.label: figures(raw, w, cfg.rate) for w in raw_spans}
        for w in raw_spans:
            lines += path_lines("raw pgmq", w, theirs[w.label])
        lines += backlog_lines("raw pgmq", raw, cfg)
        checks += [Check(f"{w.label}: animus p99 / raw pgmq p99",
                         ratio(mine[w.label].p99, theirs[w.label].p99), None) for w in spans]
        checks += [Check("raw pgmq, hold: completed / --rate",
                         ratio(theirs["hold"].completed, cfg.rate), None),
                   Check("raw pgmq, hold: claim p99 / warm-up claim p99",
                         ratio(theirs["hold"].p99, theirs["warm-up"].p99), None),
                   Check("raw pgmq: messages read twice", raw.twice, None, "<=")]
    notes = [f"animus: {len(ours.committed)} items, every one completed, the last "
             f"{ours.done - ours.end:.2f} s after the last submission"]
    notes += [activity_note(ours, w) for w in spans[:3]]
    if raw is not None:
        notes.append(f"raw pgmq: {len(raw.committed)} messages, every one archived, the last "
                     f"{raw.done - raw.end:.2f} s after the last send")
        notes += [activity_note(raw, w) for w in raw_spans[:3]]
    else:
        notes.append("raw pgmq baseline not run (--no-baseline)")
    return Section(
        "mvcc", "MVCC pressure: a session holds the xmin horizon under a steady load",
        [f"a producer submits one item per transaction, {cfg.rate:g}/s on a schedule, "
         f"{PRODUCER_POOL} connections; warm-up {cfg.warmup:g} s, hold {cfg.hold:g} s, "
         f"recovery {cfg.recovery:g} s",
         "hold: a REPEATABLE READ transaction reads a row and stays idle in transaction",
         f"animus: an engine in this process, concurrency {cfg.concurrency}, a faculty that "
         "notes orient's start and does nothing else",
         f"raw pgmq: pgmq.send of one message; {cfg.concurrency} workers read(1) + archive, "
         f"each waiting {RAW_POLL * cfg.concurrency * 1000:g} ms after an empty read",
         "claim latency: work start - submission commit (this process's clock), by the "
         "phase the submission committed in; completed/s and CPU between 1 s samples",
         "CPU of Postgres: every backend of the server, whatever its database"],
        lines=lines, checks=checks, notes=notes,
        extra={"windows": {w.label: mine[w.label].to_json() for w in spans},
               "raw_windows": {k: v.to_json() for k, v in theirs.items()}})


MARKS = ("end of warm-up", "end of hold", "end of recovery")


def dead_tuple_lines(trace: Trace, who: str) -> tuple[list[Line], list[str]]:
    names = sorted({name for s in trace.samples for name, v in s.tables.items() if v[0]})

    def at(mark: str, name: str, field: int = 0) -> int:
        return trace.marks[mark].tables.get(name, (0, 0, 0))[field]

    def last(name: str, field: int = 0) -> int:
        return trace.samples[-1].tables.get(name, (0, 0, 0))[field]

    lines = [Line(f"{who}{name}, {mark}", at(mark, name), "dead tuples")
             for name in names for mark in MARKS]
    rose = [f"{name} ({at('end of warm-up', name):,} -> {at('end of hold', name):,})"
            for name in names if at("end of hold", name) > at("end of warm-up", name)]
    during = [f"{name} ({n}x)" for name in names
              if (n := at("end of hold", name, 2) - at("end of warm-up", name, 2)) > 0]
    after = [f"{name} ({n}x)" for name in names
             if (n := last(name, 2) - at("end of hold", name, 2)) > 0]
    notes = [f"{trace.name}: dead tuples rose over the hold in {', '.join(rose) or 'no table'}",
             f"{trace.name}: vacuumed during the hold: {', '.join(during) or 'no table'}; "
             f"after it (by the last sample): {', '.join(after) or 'no table'}"]
    return lines, notes


def dead_per_item(trace: Trace) -> float | None:
    """Dead tuples left in all the tables during the hold, per item submitted in it."""
    before, after = trace.marks["end of warm-up"], trace.marks["end of hold"]
    items = after.submitted - before.submitted
    dead = sum(v[0] for v in after.tables.values()) - sum(v[0] for v in before.tables.values())
    return dead / items if items > 0 else None


def dead_tuple_section(ours: Trace, raw: Trace | None) -> Section:
    lines, notes = dead_tuple_lines(ours, "dead tuples: ")
    lines.append(Line("dead tuples per item submitted during the hold", dead_per_item(ours),
                      "dead tuples"))
    checks = []
    if raw is not None:
        raw_lines, raw_notes = dead_tuple_lines(raw, "raw pgmq: ")
        lines += [*raw_lines, Line("raw pgmq: dead tuples per message sent during the hold",
                                   dead_per_item(raw), "dead tuples")]
        notes += raw_notes
        checks.append(Check("dead tuples per item during the hold: animus / raw pgmq",
                            ratio(dead_per_item(ours), dead_per_item(raw)), None))
    return Section(
        "dead_tuples", "dead tuples of every animus and pgmq table with any",
        ["n_dead_tup of pg_stat_user_tables at the end of each phase; the tables of the "
         "schemas animus and pgmq with a dead tuple in any sample",
         "n_dead_tup is Postgres's running estimate: each vacuum replaces it with the count "
         "it found, dead tuples it could not remove included",
         "every 1 s sample (dead, live, vacuums) is in the JSON"],
        lines=lines, checks=checks, notes=notes,
        extra={"animus": [s.to_json() for s in ours.samples],
               "raw_pgmq": [s.to_json() for s in raw.samples] if raw else []})


# -- run ---------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    started = clock()
    cfg = Config(args.rate, args.warmup, args.hold, args.recovery, args.concurrency,
                 args.baseline)
    settings = Settings.from_env()
    url = await resolve_url(settings)
    server = Server(url)
    database = await describe_database(server, args.database)
    load_before = load()
    runs_started = clock()
    with tempfile.TemporaryDirectory(prefix="animus-bench-mvcc-") as tmp:
        print(f"  animus: {cfg.seconds:g} s at {cfg.rate:g}/s...", file=sys.stderr, flush=True)
        ours = await run_animus(server, args.database, Path(tmp), cfg)
    load_middle = load()
    raw = None
    if cfg.baseline:
        print(f"  raw pgmq: {cfg.seconds:g} s at {cfg.rate:g}/s...", file=sys.stderr,
              flush=True)
        raw = await run_raw(server, args.database, cfg)
    latency = latency_section(cfg, ours, raw)
    latency.notes.append(f"load {load_before} -> {load_middle} (animus done)"
                         + (f" -> {load()} (raw pgmq done)" if raw else ""))
    dead = dead_tuple_section(ours, raw)
    latency.seconds = dead.seconds = clock() - runs_started  # both report the same runs
    return {
        "benchmark": "mvcc", "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": cfg.to_json(),
        "machine": machine(),
        "database": {"where": "DATABASE_URL" if settings.database_url else
                     f"embedded server in {settings.home}", "server": describe_url(url),
                     **database},
        "sections": {"mvcc": latency.to_json(), "dead_tuples": dead.to_json()},
        "total_seconds": round(clock() - started, 3),
    }


def render(report: dict[str, Any]) -> str:
    return render_report("animus MVCC-pressure benchmark (bench_mvcc)", report)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_mvcc",
                                description="a session holding the xmin horizon under a "
                                            "steady load, against raw pgmq")
    p.add_argument("--rate", type=float, default=500.0,
                   help="items submitted per second (default 500)")
    p.add_argument("--warmup", type=float, default=10.0, help="seconds before the hold "
                   "(default 10)")
    p.add_argument("--hold", type=float, default=60.0,
                   help="seconds the xmin horizon is held (default 60)")
    p.add_argument("--recovery", type=float, default=30.0,
                   help="seconds after the hold (default 30)")
    p.add_argument("--concurrency", type=int, default=64,
                   help="engine concurrency, and raw pgmq workers (default 64)")
    p.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="skip the raw pgmq baseline")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers here")
    p.add_argument("--database", default=DEFAULT_PREFIX, metavar="PREFIX",
                   help=f"prefix of the databases dropped and created (default {DEFAULT_PREFIX})")
    args = p.parse_args(argv)
    if (args.rate <= 0 or args.warmup <= 0 or args.hold <= 0 or args.recovery <= 0
            or args.concurrency < 1):
        p.error("--rate, --warmup, --hold, --recovery and --concurrency must be positive")
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,40}", args.database):
        p.error("--database must be a plain lower-case name (letters, digits, _), at most 41")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = loop.run(run(args))
    return publish(render(report), report, args.json)


if __name__ == "__main__":
    sys.exit(main())
