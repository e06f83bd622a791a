"""Control-plane benchmarks: the engine against raw pgmq, its peers, LISTEN/NOTIFY and a
plain subprocess loop.

    .venv/bin/python -m benchmarks.bench_engine [--n N] [--json PATH] [--only NAME[,NAME]] [--big]

Four benchmarks, each on a fresh database of the embedded server (or of the server
``DATABASE_URL`` names), every baseline measured in the same run on the same server:

* ``drain``   a no-op Python faculty drains N pre-submitted items; baselines: raw pgmq
              read+archive, pgqueuer and procrastinate running an equivalent no-op job;
              for context, the same drain without its audit rows, then without those and
              its execution records (what they cost; never how animus runs);
* ``wake``    an idle engine (fallback poll 60 s) gets one item at a time: submit commit ->
              orient start; baseline: a bare LISTEN/NOTIFY round trip;
* ``command`` a TOML faculty with three bash hooks; baseline: a plain loop running the
              same three scripts with the same parallelism, no database;
* ``idle``    an engine with one TOML and one Python faculty and no work: transactions per
              second its connections cause.

Compare the ratios across runs; the absolute numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import re
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
import msgspec

from animus_core.app import Animus
from animus_core.faculties.faculty import Faculty
from animus_core.faculties.focus import Focus
from animus_core.infra import loop
from animus_core.infra.config import Settings
from animus_core.infra.loop import loop_name
from animus_core.infra.processes import Child
from animus_core.runtime.engine import Engine, EngineOptions
from animus_core.store.audit import UNSEALED_SQL
from animus_core.store.db import DEFAULT_QUEUE, Db, describe_url, resolve_url
from animus_core.testing import Provides
from animus_core.values.waits import Resume
from animus_core.values.work import Claimed, Created, Lease, NewWorkItem
from benchmarks.bench_work import describe_server, fresh_database

clock = time.perf_counter

BENCHMARKS = ("drain", "wake", "command", "idle")
DEFAULT_PREFIX = "animus_bench_engine"
SUBMIT_BATCH = 1000  # submissions per submit_many / send_batch / enqueue call (untimed)
RAW_QUEUE = "bench_raw"
RAW_BATCH = 100  # pgmq.read quantity of the raw baseline
LEASE_SECONDS = 60
DRAIN_CONCURRENCY = 256  # engine concurrency and the no-op faculty's max_concurrent
PGQUEUER_BATCH = 100  # pgqueuer dequeue batch (it requires max tasks >= 2 x batch)
PGQUEUER_MAX_TASKS = 256
PROCRASTINATE_CONCURRENCY = 256
PEER_POOL = 10  # connections for procrastinate's pool, as many as the engine's pool
ENGINE_POOL = 10  # the engine's Db pool, as `animus up` opens it
DRAIN_TIMEOUT = 600.0
WAKE_CHANNEL = "animus_bench_ping"
WAKE_WARMUP = 5
PINGS_LOST_AFTER = 5.0


@dataclass(frozen=True)
class Config:
    n: int = 20_000  # drain items (animus, raw pgmq, pgqueuer)
    n_procrastinate: int = 2_000  # procrastinate fetches one job per round trip: n/10
    k: int = 200  # wake-ups measured
    spacing: float = 0.020  # seconds between wake submissions
    m: int = 300  # command faculty items
    p: int = 4  # command faculty parallelism (max_concurrent)
    idle_settle: float = 12.0  # > 10 s: a backend may report its counts 10 s late
    idle_window: float = 20.0
    big: bool = False

    @classmethod
    def make(cls, n: int | None, big: bool) -> Config:
        if big:
            n = n or 100_000
            return cls(n=n, n_procrastinate=max(1, n // 10), k=1000, m=1000, idle_window=60.0,
                       big=True)
        n = n or cls.n
        return cls(n=n, n_procrastinate=max(1, n // 10))

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


# -- results -----------------------------------------------------------------------------------


@dataclass
class Line:
    """One measured path: a rate (items over seconds) or a single value with a unit."""

    label: str
    value: float | None
    unit: str
    items: int | None = None
    seconds: float | None = None
    note: str = ""  # why there is no value (a peer that could not run)
    cpu: CpuUse | None = None  # CPU used over the same interval (drains)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "label": self.label, "value": None if self.value is None else round(self.value, 4),
            "unit": self.unit, "items": self.items,
            "seconds": None if self.seconds is None else round(self.seconds, 6),
            "note": self.note or None}
        if self.cpu is not None:
            own, server = self.cpu.per_item()
            out["cpu_us_per_item"] = {"process": round(own, 2),
                                      "server": None if server is None else round(server, 2)}
        return out


def rate_line(label: str, items: int, seconds: float, cpu: CpuUse | None = None) -> Line:
    return Line(label, items / seconds if seconds > 0 else 0.0, "items/s", items, seconds,
                cpu=cpu)


@dataclass
class Check:
    """A measured value against its target (``>=`` or ``<=``); no target: context only."""

    label: str
    value: float | None
    target: float | None
    op: str = ">="
    unit: str = ""
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.value is None or self.target is None:
            return None
        return self.value >= self.target if self.op == ">=" else self.value <= self.target

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "value": None if self.value is None else round(self.value, 4),
                "target": self.target, "op": self.op, "unit": self.unit, "met": self.met,
                "note": self.note or None}


def ratio_check(label: str, ours: Line, base: Line, target: float | None) -> Check:
    if ours.value is None or base.value is None or base.value <= 0:
        return Check(label, None, target, note=base.note or ours.note or "no value")
    return Check(label, ours.value / base.value, target)


@dataclass
class Section:
    key: str
    title: str
    setup: list[str]
    lines: list[Line] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"title": self.title, "setup": self.setup,
                "results": [ln.to_json() for ln in self.lines],
                "checks": [c.to_json() for c in self.checks], "notes": self.notes,
                "details": self.extra, "seconds": round(self.seconds, 3)}


# -- CPU time --------------------------------------------------------------------------------


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3 on of ``/proc/<pid>/stat`` (state, ppid, ...), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


@dataclass(frozen=True)
class CpuMeter:
    """CPU seconds used by this process (every thread) and by the Postgres server: the
    postmaster, its children, and the children it has reaped. Read from ``/proc``, so the
    server is measured only when it runs on this machine (``postmaster`` is None
    otherwise). Every database's backends count, so other tenants of the server would too."""

    postmaster: int | None

    @classmethod
    async def for_server(cls, url: str) -> CpuMeter:
        conn = await asyncpg.connect(url)
        try:  # while the backend is alive: its parent is the postmaster
            fields = _proc_stat(await conn.fetchval("SELECT pg_backend_pid()"))
        finally:
            await conn.close()
        return cls(int(fields[1]) if fields else None)

    def since(self, items: int, start: tuple[float, float | None] | None) -> CpuUse | None:
        """What ``items`` cost since ``start`` (a :meth:`read`), if it was read."""
        return None if start is None else CpuUse.between(items, start, self.read())

    def read(self) -> tuple[float, float | None]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        own = usage.ru_utime + usage.ru_stime
        if self.postmaster is None:
            return own, None
        ticks = 0
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            fields = _proc_stat(int(name))
            if fields is None:
                continue
            if int(name) == self.postmaster:  # itself and the children it reaped
                ticks += sum(int(f) for f in fields[11:15])
            elif int(fields[1]) == self.postmaster:
                ticks += int(fields[11]) + int(fields[12])
        return own, ticks / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuUse:
    """CPU per item of one drain: this process, and the server when it could be read."""

    items: int
    own: float
    server: float | None

    @classmethod
    def between(cls, items: int, start: tuple[float, float | None],
                end: tuple[float, float | None]) -> CpuUse:
        server = None if start[1] is None or end[1] is None else end[1] - start[1]
        return cls(items, end[0] - start[0], server)

    def per_item(self) -> tuple[float, float | None]:
        """Microseconds per item: (this process, the server)."""
        return (self.own / self.items * 1e6,
                None if self.server is None else self.server / self.items * 1e6)


# -- databases ---------------------------------------------------------------------------------


@dataclass
class Server:
    url: str  # a URL on the server (its own database, never dropped)


async def fresh_animus_db(server: Server, name: str) -> str:
    """Drop, create and migrate ``name``; return its URL."""
    url = await fresh_database(server.url, name)
    db = await Db.connect(url, min_size=1, max_size=1, actor="bench")
    try:
        await db.migrate()
    finally:
        await db.close()
    return url


async def checkpoint(url: str) -> None:
    """Flush dirty buffers before a timed phase, so no phase inherits another's checkpoint.
    Needs superuser or pg_checkpoint; skipped without them."""
    conn = await asyncpg.connect(url)
    try:
        with contextlib.suppress(asyncpg.PostgresError):
            await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


def package_version(name: str) -> str:
    try:
        return dist_version(name)
    except PackageNotFoundError:
        return "not installed"


# -- running an engine in this process ---------------------------------------------------------


class CompletionCounter:
    """Counts items whose completion committed, and notes when ``target`` of them had."""

    def __init__(self, target: int = 0, meter: CpuMeter | None = None) -> None:
        self.target = target
        self.meter = meter
        self.items = 0
        self.calls = 0
        self.at: float | None = None
        self.cpu_at: tuple[float, float | None] | None = None
        self.reached = asyncio.Event()

    def count(self, items: int) -> None:
        self.calls += 1
        self.items += items
        if self.target and self.items >= self.target and self.at is None:
            self.at = clock()
            if self.meter is not None:
                self.cpu_at = self.meter.read()
            self.reached.set()


class ClaimCounter:
    """Counts claims, the items they returned and the time they took."""

    def __init__(self) -> None:
        self.calls = 0
        self.empty = 0
        self.items = 0
        self.seconds = 0.0

    def count(self, items: int, seconds: float) -> None:
        self.seconds += seconds
        self.calls += 1
        self.items += items
        self.empty += not items


class MeteredDb(Db):
    """The real store, counting the engine's claims and completions as they return."""

    claims: ClaimCounter
    completions: CompletionCounter

    async def claim(self, *args: Any, **kwargs: Any) -> list[Claimed]:
        t0 = clock()
        claimed = await super().claim(*args, **kwargs)
        self.claims.count(len(claimed), clock() - t0)
        return claimed

    async def claim_resuming(self, *args: Any, **kwargs: Any,
                             ) -> list[tuple[Claimed, Resume | None]]:
        t0 = clock()  # the engine's claim: a claim, with what a resumed attempt reads
        claimed = await super().claim_resuming(*args, **kwargs)
        self.claims.count(len(claimed), clock() - t0)
        return claimed

    async def complete_many(self, done: Sequence[tuple[Lease, Any, int | None]], *args: Any,
                            **kwargs: Any) -> None:
        await super().complete_many(done, *args, **kwargs)
        self.completions.count(len(done))


class UnrecordedDb(MeteredDb):
    """For context only, never how animus runs: the real store, dropping the execution
    records of completions (what the drain costs without them)."""

    async def complete_many(self, done: Sequence[tuple[Lease, Any, int | None]], *args: Any,
                            **kwargs: Any) -> None:
        kwargs.pop("executions", None)
        await super().complete_many(done, *args, **kwargs)


@dataclass
class EngineRun:
    engine: Engine
    db: Db
    task: asyncio.Task[None]
    started_at: float
    completions: CompletionCounter
    claims: ClaimCounter
    cpu_started: tuple[float, float | None] | None = None

    def stats(self) -> dict[str, Any]:
        c, k = self.completions, self.claims
        return {"claim_calls": k.calls, "empty_claims": k.empty, "items_claimed": k.items,
                "items_per_claim": round(k.items / max(1, k.calls - k.empty), 1),
                "claim_ms_mean": round(k.seconds / max(1, k.calls) * 1000, 3),
                "complete_calls": c.calls, "items_completed": c.items,
                "items_per_complete": round(c.items / max(1, c.calls), 1)}


@contextlib.asynccontextmanager
async def running_engine(url: str, home: Path, options: EngineOptions, *,
                         faculties: Sequence[Faculty] = (), faculties_dir: Path | None = None,
                         expect: int = 0, meter: CpuMeter | None = None,
                         store: type[MeteredDb] = MeteredDb,
                         ) -> AsyncIterator[EngineRun]:
    """An engine on ``url`` in this event loop, started and listening when the block begins;
    ``started_at`` is the clock just before ``Engine.run`` was scheduled."""
    settings = Settings(database_url=url, home=home, plugins_autoload=False,
                        faculties_dir=faculties_dir or home / "no-toml-faculties")
    db = await store.connect(url, max_size=ENGINE_POOL, actor="bench-engine")
    completions, claims = CompletionCounter(expect, meter), ClaimCounter()
    db.completions, db.claims = completions, claims
    animus = Animus(settings, db=db, load_entry_points=False,
                    plugins={"bench-faculties": Provides(faculties)} if faculties else None)
    await animus.load_faculties()
    if animus.problems:
        await db.close()
        raise RuntimeError(f"faculties did not load: {animus.problems}")
    # as `animus up` runs it: the engine schedules the process's full garbage collections
    # (and gives the collector back when it stops, before any baseline runs)
    engine = animus.engine(replace(options, schedule_gc=True))
    cpu_started = meter.read() if meter is not None else None
    started_at = clock()
    task = asyncio.create_task(engine.run(), name="bench-engine")
    try:
        started = asyncio.create_task(engine.started.wait())
        await asyncio.wait([task, started], timeout=30, return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        if task.done():
            task.result()
        if not engine.started.is_set():
            raise RuntimeError("the engine did not start within 30 s")
        await asyncio.wait_for(engine.listener_connected.wait(), 30)
        yield EngineRun(engine, db, task, started_at, completions, claims, cpu_started)
    finally:
        engine.stop()
        try:
            await asyncio.wait_for(task, 60)
        finally:
            await db.close()


async def wait_done(run: EngineRun, stall: float = 60.0) -> float:
    """Until ``expect`` completions committed; returns the seconds since the engine was
    started. Fails when no completion commits for ``stall`` seconds (a wedged engine)."""
    c = run.completions
    seen, since = c.items, clock()
    while not c.reached.is_set():
        if run.task.done():
            run.task.result()
            raise RuntimeError("the engine stopped before its work was done")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(c.reached.wait(), 1.0)
        if c.items != seen:
            seen, since = c.items, clock()
        elif clock() - since > stall:
            raise RuntimeError(f"the engine stalled: {c.items} of {c.target} items completed, "
                               f"none in the last {stall:g} s")
    assert c.at is not None
    return c.at - run.started_at


async def wait_idle(run: EngineRun, timeout: float = 10.0) -> None:
    """Until no faculty waits for a claim and no focus runs."""
    deadline = clock() + timeout
    while any(s.dirty for s in run.engine.slots.values()) or run.engine.inflight:
        if clock() > deadline:
            raise RuntimeError("the engine did not become idle")
        await asyncio.sleep(0.01)


# -- 1. native drain ---------------------------------------------------------------------------


class NoopFaculty(Faculty):
    """Does nothing, as fast as it can."""

    name = "bench-noop"
    accepts = ("bench.noop",)
    max_concurrent = DRAIN_CONCURRENCY

    async def orient(self, focus: Focus) -> Any:
        return None

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        return None

    async def consolidate(self, focus: Focus, engaged: Any) -> Any:
        return None


def noop_items(n: int, work_type: str = "bench.noop") -> list[NewWorkItem]:
    base = NewWorkItem(work_type, source="bench")
    return [base.params({"i": i}) for i in range(n)]


async def submit_all(db: Db, items: Sequence[NewWorkItem]) -> None:
    for i in range(0, len(items), SUBMIT_BATCH):
        await db.submit_many(items[i : i + SUBMIT_BATCH])


#: what a context drain leaves out (never how animus runs): the audit rows of the drain's
#: moves (their triggers disabled, which takes the table's owner) and the execution records
WITHOUT = {"audit": "audit rows", "records": "execution records"}
_AUDIT_TRIGGERS = ("ALTER TABLE animus.work_items DISABLE TRIGGER work_items_audit_update, "
                   "DISABLE TRIGGER work_item_audit_update")


async def drain_animus(url: str, home: Path, n: int, meter: CpuMeter | None = None, *,
                       without: Sequence[str] = ()) -> tuple[Line, dict[str, Any]]:
    """The engine drains ``n`` no-op items; with ``without`` (keys of :data:`WITHOUT`), for
    context, leaving out what it names."""
    if unknown := set(without) - set(WITHOUT):
        raise ValueError(f"drain_animus: unknown without {sorted(unknown)}")
    client = await Db.connect(url, min_size=1, max_size=2, actor="bench-submitter")
    try:
        await submit_all(client, noop_items(n))
        await client.seal_audit()  # the submissions' audit rows are not the drain's work
        async with client.connection() as conn:
            await conn.execute("ANALYZE animus.work_items")
            await conn.execute(f'ANALYZE pgmq."q_{DEFAULT_QUEUE}"')
            if "audit" in without:
                await conn.execute(_AUDIT_TRIGGERS)
    finally:
        await client.close()
    await checkpoint(url)
    options = EngineOptions(concurrency=DRAIN_CONCURRENCY, lease_seconds=LEASE_SECONDS)
    store = UnrecordedDb if "records" in without else MeteredDb
    conn = await asyncpg.connect(url)
    try:
        async with running_engine(url, home, options, faculties=[NoopFaculty()],
                                  expect=n, meter=meter, store=store) as run:
            seconds = await wait_done(run)
            stats = run.stats()
            cpu = (CpuUse.between(n, run.cpu_started, run.completions.cpu_at)
                   if run.cpu_started and run.completions.cpu_at else None)
            # sealing owed when the clock stopped: sealed now, by the engine's own Db (beside
            # its sealer, under the same lock), for the cost of the whole trail
            backlog = left = await conn.fetchval(UNSEALED_SQL)
            give_up = clock() + 60
            while left:
                if not await run.db.seal_audit():  # the engine's sealer holds the lock
                    if clock() > give_up:
                        raise RuntimeError(f"{left} audit rows of the drain stayed unsealed "
                                           "for 60 s (a keyed chain and no audit key here?)")
                    await asyncio.sleep(0.01)
                left = await conn.fetchval(UNSEALED_SQL)
            sealed = (CpuUse.between(n, run.cpu_started, meter.read())
                      if meter is not None and run.cpu_started else None)
        states = {r["state"]: r["n"] for r in await conn.fetch(
            "SELECT state::text, count(*) AS n FROM animus.work_items GROUP BY 1")}
    finally:
        await conn.close()
    stats.update(states=states, audit_rows_to_seal_when_done=backlog)
    if sealed is not None:
        own, server = sealed.per_item()
        stats["cpu_us_per_item_every_row_sealed"] = {
            "process": round(own, 2), "server": None if server is None else round(server, 2)}
    if states != {"completed": n}:
        raise RuntimeError(f"the engine left work behind: {states}")
    label = f"animus engine, no-op faculty (concurrency {DRAIN_CONCURRENCY})"
    if without:
        label = _context_label(without)
    return rate_line(label, n, seconds, cpu), stats


async def drain_raw(url: str, n: int, meter: CpuMeter | None = None) -> Line:
    db = await Db.connect(url, min_size=1, max_size=1, actor="bench-raw")
    try:
        msgs = [i.to_json() for i in noop_items(n)]
        async with db.connection() as conn:
            await conn.execute("SELECT pgmq.create($1::text)", RAW_QUEUE)
            for i in range(0, n, SUBMIT_BATCH):
                await conn.execute("SELECT pgmq.send_batch($1::text, $2::jsonb[])", RAW_QUEUE,
                                   msgs[i : i + SUBMIT_BATCH])
            await conn.execute(f'ANALYZE pgmq."q_{RAW_QUEUE}"')
        await checkpoint(url)
        done = 0
        async with db.connection() as conn:
            cpu0 = meter.read() if meter else None
            t0 = clock()
            while True:
                rows = await conn.fetch("SELECT * FROM pgmq.read($1::text, $2::int, $3::int)",
                                        RAW_QUEUE, LEASE_SECONDS, RAW_BATCH)
                if not rows:
                    break
                await conn.execute("SELECT pgmq.archive($1::text, $2::bigint[])", RAW_QUEUE,
                                   [r["msg_id"] for r in rows])
                done += len(rows)
            seconds = clock() - t0
            cpu = meter.since(n, cpu0) if meter else None
    finally:
        await db.close()
    if done != n:
        raise RuntimeError(f"raw pgmq drained {done} of {n} messages")
    return rate_line(f"raw pgmq read({RAW_BATCH}) + archive, one connection", n, seconds, cpu)


async def drain_pgqueuer(url: str, n: int, meter: CpuMeter | None = None) -> Line:
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.models import Job
    from pgqueuer.qm import QueueManager
    from pgqueuer.queries import Queries
    from pgqueuer.types import QueueExecutionMode

    setup = await asyncpg.connect(url)
    worker = await asyncpg.connect(url)
    try:
        queries = Queries(AsyncpgDriver(setup))
        await queries.install()
        for i in range(0, n, SUBMIT_BATCH):
            size = min(SUBMIT_BATCH, n - i)
            await queries.enqueue(["bench_noop"] * size,
                                  [b'{"i": %d}' % (i + j) for j in range(size)], [0] * size)
        await setup.execute("ANALYZE")
        await checkpoint(url)
        qm = QueueManager(Queries(AsyncpgDriver(worker)))

        @qm.entrypoint("bench_noop")
        async def bench_noop(job: Job) -> None:
            return None

        cpu0 = meter.read() if meter else None
        t0 = clock()
        await asyncio.wait_for(qm.run(batch_size=PGQUEUER_BATCH, mode=QueueExecutionMode.drain,
                                      max_concurrent_tasks=PGQUEUER_MAX_TASKS), DRAIN_TIMEOUT)
        seconds = clock() - t0
        cpu = meter.since(n, cpu0) if meter else None
        left = await setup.fetchval("SELECT count(*) FROM pgqueuer")
        ok = await setup.fetchval(
            "SELECT count(*) FROM pgqueuer_log WHERE status = 'successful'")
    finally:
        await worker.close()
        await setup.close()
    if left or ok != n:
        raise RuntimeError(f"pgqueuer left {left} jobs queued, logged {ok} of {n} as successful")
    return rate_line(f"pgqueuer {package_version('pgqueuer')} (batch {PGQUEUER_BATCH}, "
                     f"max {PGQUEUER_MAX_TASKS} tasks)", n, seconds, cpu)


async def drain_procrastinate(url: str, n: int, meter: CpuMeter | None = None) -> Line:
    import procrastinate

    logging.getLogger("procrastinate").setLevel(logging.ERROR)  # per-app warnings, job logs
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(
        conninfo=url, min_size=1, max_size=PEER_POOL))

    @app.task(name="bench_noop")
    async def bench_noop(i: int) -> None:
        return None

    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        for i in range(0, n, SUBMIT_BATCH):
            jobs: list[dict[str, Any]] = [{"i": j} for j in range(i, min(n, i + SUBMIT_BATCH))]
            await bench_noop.batch_defer_async(*jobs)
        await checkpoint(url)
        cpu0 = meter.read() if meter else None
        t0 = clock()
        await asyncio.wait_for(app.run_worker_async(
            concurrency=PROCRASTINATE_CONCURRENCY, wait=False, install_signal_handlers=False),
            DRAIN_TIMEOUT)
        seconds = clock() - t0
        cpu = meter.since(n, cpu0) if meter else None
    conn = await asyncpg.connect(url)
    try:
        states = {r["status"]: r["n"] for r in await conn.fetch(
            "SELECT status::text, count(*) AS n FROM procrastinate_jobs GROUP BY 1")}
    finally:
        await conn.close()
    if states != {"succeeded": n}:
        raise RuntimeError(f"procrastinate left jobs behind: {states}")
    return rate_line(f"procrastinate {package_version('procrastinate')} (concurrency "
                     f"{PROCRASTINATE_CONCURRENCY}, pool {PEER_POOL})", n, seconds, cpu)


async def peer(label: str, run: Callable[[], Any]) -> Line:
    """Run a peer's drain; a peer that cannot run is reported, never faked."""
    try:
        line: Line = await run()
        return line
    except Exception as e:
        reason = f"{type(e).__name__}: {e}".strip()
        return Line(label, None, "items/s", note=f"did not run: {reason[:300]}")


async def bench_drain(server: Server, cfg: Config, prefix: str, home: Path) -> Section:
    url = await fresh_animus_db(server, f"{prefix}_drain")
    meter = await CpuMeter.for_server(url)
    raw = await drain_raw(url, cfg.n, meter)
    ours, stats = await drain_animus(url, home, cfg.n, meter)
    pgq_url = await fresh_database(server.url, f"{prefix}_pgqueuer")
    pgq = await peer("pgqueuer", lambda: drain_pgqueuer(pgq_url, cfg.n, meter))
    proc_url = await fresh_database(server.url, f"{prefix}_procrastinate")
    proc = await peer("procrastinate",
                      lambda: drain_procrastinate(proc_url, cfg.n_procrastinate, meter))
    context = [await context_drain(server, cfg, f"{prefix}_drain_{'_'.join(w)}", home, meter, w)
               for w in (("audit",), ("audit", "records"))]
    section = Section(
        "drain", "1. native drain: items submitted beforehand, then drained by a no-op job",
        [f"n={cfg.n} (procrastinate: n={cfg.n_procrastinate}, it fetches one job per round "
         "trip)", "each drain timed from worker start until its last item is done; a CHECKPOINT "
         "before each", f"engine: concurrency {DRAIN_CONCURRENCY}, faculty max_concurrent "
         f"{DRAIN_CONCURRENCY}, pool {ENGINE_POOL}, lease {LEASE_SECONDS}s, audit sealer on",
         "context (never how animus runs): the same drain on databases of their own without "
         "the audit rows of its moves (their triggers disabled), then without those and the "
         "execution records: what they cost"],
        lines=[ours, raw, pgq, proc, *context, *cpu_lines(
            {"animus": ours, "raw pgmq": raw, "pgqueuer": pgq, "procrastinate": proc,
             **{_short(line): line for line in context}})],
        checks=[
            ratio_check("animus / pgqueuer", ours, pgq, 1.0),
            ratio_check("animus / raw pgmq", ours, raw, 0.33),
            ratio_check("animus / procrastinate (context)", ours, proc, None),
        ],
        extra={"engine": stats},
    )
    section.notes.append(
        f"engine: {stats['claim_calls']} claims ({stats['items_per_claim']} items each), "
        f"{stats['complete_calls']} completion batches ({stats['items_per_complete']} items "
        f"each); {stats['audit_rows_to_seal_when_done']} audit rows were still to seal when "
        "the last item completed")
    sealed = stats.get("cpu_us_per_item_every_row_sealed")
    if sealed is not None:
        section.notes.append(
            f"CPU per item until every audit row of the drain was sealed as well: "
            f"{sealed['process']:.2f} us in this process, "
            + ("the server not read" if sealed["server"] is None
               else f"{sealed['server']:.0f} us in Postgres")
            + " (the figures above stop at the last completion)")
    for line in (pgq, proc):
        if line.note:
            section.notes.append(f"{line.label} {line.note}")
    section.notes.extend(cpu_notes(ours, pgq, raw))
    section.notes.extend(context_notes(sealed, context))
    return section


async def context_drain(server: Server, cfg: Config, name: str, home: Path, meter: CpuMeter,
                        without: Sequence[str]) -> Line:
    """For context: the same drain on a database of its own, leaving out ``without``."""
    url = await fresh_animus_db(server, name)
    try:
        line, _ = await drain_animus(url, home, cfg.n, meter, without=without)
    except asyncpg.InsufficientPrivilegeError as e:
        return Line(_context_label(without), None,
                    "items/s", note=f"not measured: {e} (it takes the owner of the tables)")
    return line


def _context_label(without: Sequence[str]) -> str:
    return "  context: animus without " + " or ".join(WITHOUT[w] for w in without)


def _short(line: Line) -> str:
    return line.label.replace("  context: animus ", "").replace("execution records", "records")


def context_notes(sealed: dict[str, float | None] | None, context: Sequence[Line]) -> list[str]:
    """What the drain's audit rows and execution records cost per item: the context drains
    against the drain as animus runs, up to its last audit row sealed (``sealed``)."""
    if sealed is None or sealed["server"] is None:
        return []
    used = (sealed["process"] or 0.0) + sealed["server"]
    notes = []
    for line in context:
        if line.note:
            notes.append(f"{line.label.strip()}: {line.note}")
        elif line.cpu is not None and line.cpu.server is not None:
            less = sum(v or 0.0 for v in line.cpu.per_item())
            notes.append(f"{line.label.strip()} (never how animus runs): {less:.0f} us "
                         f"of CPU per item, {used - less:.0f} us less than animus with every "
                         f"audit row sealed ({used:.0f} us)")
    return notes


def cpu_lines(paths: dict[str, Line]) -> list[Line]:
    """CPU per item of each drain: this process (the worker, every thread) and the server."""
    lines = []
    for name, line in paths.items():
        if line.cpu is None:
            continue
        own, server = line.cpu.per_item()
        lines.append(Line(f"CPU per item, {name}: this process", own, "us/item", line.items))
        if server is not None:
            lines.append(Line(f"CPU per item, {name}: Postgres server", server, "us/item",
                              line.items))
    return lines


def cpu_notes(ours: Line, pgq: Line, raw: Line) -> list[str]:
    """What the CPU per item means on this machine's cores."""
    if ours.cpu is None or ours.cpu.server is None:
        return ["CPU per item: the server's processes could not be read (not on this machine, "
                "or no /proc); only this process is shown"]
    cores = os.cpu_count() or 1
    budget = cores * 1e6  # microseconds of CPU per second
    used = sum(v or 0.0 for v in ours.cpu.per_item())
    notes = [f"CPU per item: animus uses {used:.0f} us in all; with all {cores} cores busy that "
             f"caps it at {budget / used:,.0f} items/s (it ran at {ours.value or 0:,.0f}/s, "
             f"{(ours.value or 0) * used / budget:.0%} of the cores)"]
    for name, line, target in (("pgqueuer", pgq, 1.0), ("raw pgmq", raw, 0.33)):
        if line.value:
            notes.append(f"{target:g} x {name} ({target * line.value:,.0f} items/s) leaves at most "
                         f"{budget / (target * line.value):.0f} us of CPU per item on {cores} "
                         "cores, all busy")
    return notes


# -- 2. wake latency ---------------------------------------------------------------------------


class WakeFaculty(Faculty):
    """Notes when orient starts for each item."""

    name = "bench-wake"
    accepts = ("bench.wake",)
    max_concurrent = 4

    def __init__(self) -> None:
        self.seen: dict[UUID, float] = {}
        self.changed = asyncio.Event()

    async def orient(self, focus: Focus) -> Any:
        self.seen[focus.work.id] = clock()
        self.changed.set()
        return None

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        return None

    async def consolidate(self, focus: Focus, engaged: Any) -> Any:
        return None

    async def wait_for(self, work_id: UUID, timeout: float) -> float:
        deadline = clock() + timeout
        while work_id not in self.seen:
            self.changed.clear()
            if work_id in self.seen:
                break
            left = deadline - clock()
            if left <= 0:
                raise TimeoutError(f"orient did not start for {work_id} within {timeout:g}s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)
        return self.seen[work_id]


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (q in 0..100)."""
    s = sorted(values)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def latency_lines(label: str, ms: Sequence[float]) -> list[Line]:
    return [Line(f"{label} p50", percentile(ms, 50), "ms", len(ms)),
            Line(f"{label} p99", percentile(ms, 99), "ms", len(ms)),
            Line(f"{label} max", max(ms), "ms", len(ms))]


async def bench_wake(server: Server, cfg: Config, prefix: str, home: Path) -> Section:
    url = await fresh_animus_db(server, f"{prefix}_wake")
    faculty = WakeFaculty()
    options = EngineOptions(poll_interval=60.0, lease_seconds=LEASE_SECONDS)
    ours: list[float] = []
    base: list[float] = []
    pings: dict[str, float] = {}
    pinged = asyncio.Event()

    def on_ping(_c: object, _pid: int, _channel: str, payload: str) -> None:
        pings[payload] = clock()
        pinged.set()

    client = await Db.connect(url, min_size=1, max_size=2, actor="bench-submitter")
    listener = await asyncpg.connect(url)
    notifier = await asyncpg.connect(url)
    try:
        await listener.add_listener(WAKE_CHANNEL, on_ping)
        async with running_engine(url, home, options, faculties=[faculty]) as run:
            await wait_idle(run)
            for k in range(cfg.k + WAKE_WARMUP):
                t_round = clock()

                async def engine_wake(k: int = k) -> float:
                    res = await client.submit_work(
                        NewWorkItem("bench.wake", source="bench").params({"k": k}))
                    committed = clock()
                    assert isinstance(res, Created)
                    return (await faculty.wait_for(res.id, 10.0) - committed) * 1000

                async def notify_round_trip(k: int = k) -> float:
                    key = str(k)
                    pinged.clear()
                    t0 = clock()
                    await notifier.execute("SELECT pg_notify($1, $2)", WAKE_CHANNEL, key)
                    deadline = t0 + PINGS_LOST_AFTER
                    while key not in pings:
                        pinged.clear()
                        if key in pings:
                            break
                        await asyncio.wait_for(pinged.wait(), max(0.001, deadline - clock()))
                    return (pings[key] - t0) * 1000

                # alternate who goes first, so noise lands on both alike
                if k % 2:
                    b, a = await notify_round_trip(), await engine_wake()
                else:
                    a, b = await engine_wake(), await notify_round_trip()
                if k >= WAKE_WARMUP:
                    ours.append(a)
                    base.append(b)
                await asyncio.sleep(max(0.0, cfg.spacing - (clock() - t_round)))
            stats = run.stats()
    finally:
        await notifier.close()
        await listener.close()
        await client.close()
    p50, p99 = percentile(ours, 50), percentile(ours, 99)
    section = Section(
        "wake", "2. wake latency: idle engine (fallback poll 60 s), one item at a time",
        [f"k={cfg.k} wake-ups (after {WAKE_WARMUP} untimed), one every "
         f"{cfg.spacing * 1000:.0f} ms", "animus: submit_work returned (committed) -> the "
         "faculty's orient starts (same process, same clock)", "baseline: pg_notify sent on one "
         "connection -> callback on a second connection (full round trip)"],
        lines=[*latency_lines("animus submit commit -> orient", ours),
               *latency_lines("bare LISTEN/NOTIFY round trip", base)],
        checks=[Check("animus p50", p50, 1.0, "<=", "ms"),
                Check("animus p99", p99, 5.0, "<=", "ms")],
        extra={"engine": stats, "animus_ms": [round(x, 4) for x in ours],
               "notify_ms": [round(x, 4) for x in base]},
    )
    section.notes.append(f"engine claims: {stats['claim_calls']} ({stats['empty_claims']} came "
                         "back empty)")
    return section


# -- 3. command faculty -------------------------------------------------------------------------

HOOKS = {
    "orient": """
        IFS= read -r work < work.json || true
        printf '{"work_bytes": %d}\\n' "${#work}" > orient-out.json
    """,
    "engage": """
        IFS= read -r oriented < orient-out.json || true
        printf '{"oriented": %s, "engaged": true}\\n' "$oriented" > engage-out.json
    """,
    "consolidate": """
        IFS= read -r engaged < engage-out.json || true
        printf '{"engaged": %s, "done": true}\\n' "$engaged" > consolidate-out.json
    """,
}
PHASES3 = ("orient", "engage", "consolidate")


def write_hooks(root: Path) -> dict[str, Path]:
    """The three bash hooks (shell builtins only: read, printf, redirections)."""
    scripts = {}
    for phase, body in HOOKS.items():
        path = root / "hooks" / f"{phase}.sh"
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [ln.strip() for ln in body.strip().splitlines()]
        path.write_text("#!/usr/bin/env bash\nset -euo pipefail\n" + "\n".join(lines) + "\n")
        path.chmod(0o755)
        scripts[phase] = path
    (root / "plain").mkdir(exist_ok=True)  # the baseline's focus directories
    return scripts


def write_toml(directory: Path, name: str, work_type: str, scripts: dict[str, Path],
               max_concurrent: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    lines = ["[faculty]", f'name = "{name}"', f'accepts = ["{work_type}"]',
             f"max_concurrent = {max_concurrent}"]
    for phase in PHASES3:
        lines += ["", f"[faculty.{phase}]", f'command = "{scripts[phase]}"']
    path = directory / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def run_script(script: Path, cwd: Path, env: dict[str, str]) -> None:
    """As the engine runs a hook (the same :class:`Child`): own session, no stdin, output
    captured."""
    proc = Child.start([str(script)], cwd=cwd, env=env, new_session=True)
    _out, err = await proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{script.name} exited with {proc.returncode}: {err[-500:]!r}")


async def plain_loop(scripts: dict[str, Path], items: Sequence[NewWorkItem], parallel: int,
                     root: Path) -> float:
    """The baseline: the same three scripts per item, ``parallel`` items at once, in a fresh
    temporary directory each, no database. Returns the seconds it took."""
    base_env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR",
                                           "USER") if k in os.environ}
    sem = asyncio.Semaphore(parallel)

    async def one(i: int, item: NewWorkItem) -> None:
        async with sem:
            directory = Path(tempfile.mkdtemp(prefix=f"plain-{i}-", dir=root))
            try:
                (directory / "work.json").write_bytes(msgspec.json.encode(item.to_json()))
                for phase in PHASES3:
                    env = {**base_env, "ANIMUS_FOCUS_DIR": str(directory),
                           "ANIMUS_PHASE": phase, "ANIMUS_WORK_ID": str(i)}
                    await run_script(scripts[phase], directory, env)
                json.loads((directory / "consolidate-out.json").read_bytes())
            finally:
                shutil.rmtree(directory, ignore_errors=True)

    t0 = clock()
    await asyncio.gather(*(one(i, item) for i, item in enumerate(items)))
    return clock() - t0


async def bench_command(server: Server, cfg: Config, prefix: str, home: Path) -> Section:
    url = await fresh_animus_db(server, f"{prefix}_command")
    work_root = home / "command"
    scripts = write_hooks(work_root)
    fac_dir = work_root / "faculties"
    write_toml(fac_dir, "bench-cmd", "bench.cmd", scripts, cfg.p)
    items = noop_items(cfg.m, "bench.cmd")
    client = await Db.connect(url, min_size=1, max_size=2, actor="bench-submitter")
    try:
        await submit_all(client, items)
        await client.seal_audit()
    finally:
        await client.close()

    # The baseline runs half before and half after the engine, so drift hits both alike.
    half = cfg.m // 2
    base_s = await plain_loop(scripts, items[:half], cfg.p, work_root / "plain")
    options = EngineOptions(lease_seconds=LEASE_SECONDS)
    async with running_engine(url, home, options, faculties_dir=fac_dir, expect=cfg.m) as run:
        ours_s = await wait_done(run)
        stats = run.stats()
    base_s += await plain_loop(scripts, items[half:], cfg.p, work_root / "plain")

    conn = await asyncpg.connect(url)
    try:
        states = {r["state"]: r["n"] for r in await conn.fetch(
            "SELECT state::text, count(*) AS n FROM animus.work_items GROUP BY 1")}
        sample = await conn.fetchval(
            "SELECT outcome_data::text FROM animus.work_items LIMIT 1")
    finally:
        await conn.close()
    if states != {"completed": cfg.m}:
        raise RuntimeError(f"the command faculty left work behind: {states}")
    ours = rate_line(f"animus engine, TOML faculty, 3 bash hooks, max_concurrent {cfg.p}",
                     cfg.m, ours_s)
    base = rate_line(f"plain loop, same 3 scripts, {cfg.p} at once", cfg.m, base_s)
    spawns = Line("  (plain loop: hook spawns per second)", 3 * cfg.m / base_s, "spawns/s",
                  3 * cfg.m, base_s)
    return Section(
        "command", "3. command faculty: three bash hooks per item",
        [f"m={cfg.m} items submitted beforehand, parallelism p={cfg.p}", "hooks read and write "
         "a small JSON file with bash builtins only; each is `#!/usr/bin/env bash`",
         "baseline: half its items before the engine runs, half after"],
        lines=[ours, base, spawns],
        checks=[ratio_check("animus / plain loop", ours, base, 0.80)],
        notes=[f"engine: {stats['claim_calls']} claims ({stats['items_per_claim']} items "
               f"each, {stats['claim_ms_mean']} ms each on average), "
               f"{stats['complete_calls']} completion batches "
               f"({stats['items_per_complete']} items each)", f"an outcome: {sample}"],
        extra={"engine": stats},
    )


# -- 4. idle queries ------------------------------------------------------------------------------


async def xacts(conn: asyncpg.Connection, dbname: str) -> int:
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    n: int = await conn.fetchval(
        "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1", dbname)
    return n


async def settled_db(server: Server, name: str) -> str:
    """A fresh, migrated database with nothing left for autovacuum to do."""
    url = await fresh_animus_db(server, name)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()
    return url


async def bench_idle(server: Server, cfg: Config, prefix: str, home: Path) -> Section:
    name, control = f"{prefix}_idle", f"{prefix}_idle_control"
    url = await settled_db(server, name)
    await settled_db(server, control)
    work_root = home / "idle"
    scripts = write_hooks(work_root)
    fac_dir = work_root / "faculties"
    write_toml(fac_dir, "bench-idle-cmd", "bench.idle.cmd", scripts, 2)

    class IdleNoop(NoopFaculty):
        name = "bench-idle-py"
        accepts = ("bench.idle.py",)
        max_concurrent = 4

    # The observer sits in a third database, so its own queries are not counted; the
    # control database (migrated, no engine) over the same window shows the server's own
    # background transactions (autovacuum), which are subtracted.
    observer = await asyncpg.connect(server.url)
    try:
        preload = await observer.fetchval("SHOW shared_preload_libraries")
        async with running_engine(url, home, EngineOptions(), faculties=[IdleNoop()],
                                  faculties_dir=fac_dir) as run:
            await asyncio.sleep(cfg.idle_settle)
            claims0 = run.claims.calls
            x0, c0, t0 = await xacts(observer, name), await xacts(observer, control), clock()
            await asyncio.sleep(cfg.idle_window)
            x1, c1, t1 = await xacts(observer, name), await xacts(observer, control), clock()
            claims = run.claims.calls - claims0
            conns = await observer.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1", name)
            faculties = sorted(run.engine.slots)
    finally:
        await observer.close()
    seconds = t1 - t0
    engine_x = (x1 - x0) - (c1 - c0)
    per_s = engine_x / seconds
    stats_note = ("pg_stat_statements is not loaded (shared_preload_libraries = "
                  f"{preload!r}), so transactions are counted from pg_stat_database")
    if "pg_stat_statements" in (preload or ""):
        stats_note = "pg_stat_statements is loaded, but the count is from pg_stat_database"
    return Section(
        "idle", "4. idle queries: an engine with no work",
        ["one TOML faculty and one Python faculty, default options (fallback poll 10 s)",
         f"{cfg.idle_settle:g} s to settle, then {cfg.idle_window:g} s measured",
         "transactions (xact_commit + xact_rollback) of the engine's database, less those of "
         "a control database with no engine over the same window"],
        lines=[Line("transactions, engine database", x1 - x0, "xacts", seconds=seconds),
               Line("transactions, control database (no engine)", c1 - c0, "xacts",
                    seconds=seconds),
               Line("engine transactions per second", per_s, "per s"),
               Line("engine claims per second (in-process count)", claims / seconds, "per s",
                    claims, seconds),
               Line("engine statements per second (1 per claim)", claims / seconds,
                    "per s"),
               Line("engine connections open", conns, "conns")],
        checks=[Check("idle transactions per second", per_s, 1.0, "<=", "per s")],
        notes=[stats_note, f"faculties registered: {', '.join(faculties)}",
               "an idle claim is one statement (SELECT animus.claim(...)), one transaction, "
               "with no reset query when the connection goes back to the pool; a backend "
               "that reported less than 1 s before "
               "holds its next counts back up to 10 s, which blurs the window's edges (the "
               "settle time keeps the start-up burst out of the window)"],
        extra={"xacts": [x0, x1], "control_xacts": [c0, c1], "claims": claims,
               "connections": conns, "faculties": faculties,
               "shared_preload_libraries": preload},
    )


# -- run and report ---------------------------------------------------------------------------

RUNNERS: dict[str, Callable[[Server, Config, str, Path], Any]] = {
    "drain": bench_drain, "wake": bench_wake, "command": bench_command, "idle": bench_idle,
}


async def run(cfg: Config, only: Sequence[str], prefix: str) -> dict[str, Any]:
    started = clock()
    settings = Settings.from_env()
    url = await resolve_url(settings)
    where = "DATABASE_URL" if settings.database_url else f"embedded server in {settings.home}"
    server = Server(url)
    sections: dict[str, Section] = {}
    with tempfile.TemporaryDirectory(prefix="animus-bench-engine-") as tmp:
        home = Path(tmp)
        database = await describe_database(server, prefix)
        for key in only:
            t0 = clock()
            section: Section = await RUNNERS[key](server, cfg, prefix, home / key)
            section.seconds = clock() - t0
            sections[key] = section
    return {
        "benchmark": "engine",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": {**cfg.to_json(), "only": list(only), "database_prefix": prefix},
        "machine": machine(),
        "database": {"where": where, "server": describe_url(url), **database},
        "peers": {"pgqueuer": package_version("pgqueuer"),
                  "procrastinate": package_version("procrastinate")},
        "sections": {k: s.to_json() for k, s in sections.items()},
        "total_seconds": round(clock() - started, 3),
    }


async def describe_database(server: Server, prefix: str) -> dict[str, Any]:
    """The server's version, pgmq and durability settings, read from a fresh database."""
    info_url = await fresh_animus_db(server, f"{prefix}_info")
    info_db = await Db.connect(info_url, min_size=1, max_size=1, actor="bench")
    try:
        return await describe_server(info_db)
    finally:
        await info_db.close()


def machine() -> dict[str, Any]:
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(),
            "event_loop": loop_name(asyncio.get_running_loop())}


def _num(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "ms":
        return f"{value:.3f}"
    if unit in ("items/s", "spawns/s", "steps/s"):
        return f"{value:,.0f}"
    if unit == "per s":
        return f"{value:.2f}"
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:.2f}"


def render_report(title: str, report: dict[str, Any], *extra: str) -> str:
    """A report of sections as text: the title, where it was measured (and ``extra`` lines),
    each section, and the time it took."""
    lines = [title, *context_lines(report), *extra]
    for s in report["sections"].values():
        lines += render_section(s)
    lines += ["", f"  time        {report['total_seconds']:.1f} s in all"]
    return "\n".join(lines)


def context_lines(report: dict[str, Any]) -> list[str]:
    """Where a report was measured: the machine, the server and its durability settings."""
    machine, dbi = report["machine"], report["database"]
    dur = dbi["durability"]
    default = ("Postgres defaults, never changed here" if dbi["durability_is_postgres_default"]
               else "NOT the Postgres defaults")
    return [
        f"  machine     {machine['cpu_count']} cores, {machine['platform']}, Python "
        f"{machine['python']} ({machine['event_loop']})",
        f"  postgres    {dbi['version']} ({dbi['where']}), pgmq {dbi['pgmq']}",
        f"  durability  fsync={dur['fsync']} synchronous_commit={dur['synchronous_commit']} "
        f"({default})",
    ]


def render(report: dict[str, Any]) -> str:
    lines = [
        "animus engine benchmarks (bench_engine)",
        *context_lines(report),
        f"  peers       pgqueuer {report['peers']['pgqueuer']}, procrastinate "
        f"{report['peers']['procrastinate']}",
    ]
    for s in report["sections"].values():
        lines += render_section(s)
    lines += ["", f"  time        {report['total_seconds']:.1f} s in all"]
    return "\n".join(lines)


def render_section(s: dict[str, Any]) -> list[str]:
    """The lines of one section (as :meth:`Section.to_json` gives it): setup, results,
    checks and notes."""
    lines = ["", s["title"]]
    lines += [f"  {x}" for x in s["setup"]]
    lines += ["", f"  {'measure':<58} {'n':>7} {'seconds':>8} {'value':>10}  unit"]
    for r in s["results"]:
        items = "" if r["items"] is None else f"{r['items']}"
        secs = "" if r["seconds"] is None else f"{r['seconds']:.3f}"
        value = _num(r["value"], r["unit"]) if r["note"] is None else "not run"
        lines.append(f"  {r['label']:<58} {items:>7} {secs:>8} {value:>10}  {r['unit']}")
    lines += ["", f"  {'check (same run)':<58} {'value':>7} {'target':>8} {'met':>10}"]
    for c in s["checks"]:
        target = "-" if c["target"] is None else f"{c['op']} {c['target']:g}"
        met = "-" if c["met"] is None else ("yes" if c["met"] else "NO")
        value = "-" if c["value"] is None else f"{c['value']:.3f}"
        lines.append(f"  {c['label']:<58} {value:>7} {target:>8} {met:>10}")
    lines += [f"  note: {n}" for n in s["notes"]]
    lines.append(f"  ({s['seconds']:.1f} s)")
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_engine",
        description="animus engine benchmarks (drain, wake, command, idle) against baselines "
                    "measured in the same run on the same server.")
    p.add_argument("--n", type=int, default=None,
                   help="items for the drain benchmark (default 20000, 100000 with --big); "
                   "procrastinate drains n/10")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers here")
    p.add_argument("--only", default=",".join(BENCHMARKS), metavar="NAME[,NAME]",
                   help=f"run only these benchmarks, of {', '.join(BENCHMARKS)}")
    p.add_argument("--big", action="store_true",
                   help="a bigger run: n=100000, 1000 wake-ups, 1000 command items, 60 s idle")
    p.add_argument("--database", default=DEFAULT_PREFIX, metavar="PREFIX",
                   help=f"prefix of the databases dropped and created (default {DEFAULT_PREFIX})")
    args = p.parse_args(argv)
    if args.n is not None and args.n < 1:
        p.error("--n must be at least 1")
    args.only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = [x for x in args.only if x not in BENCHMARKS]
    if unknown or not args.only:
        p.error(f"--only takes names among {', '.join(BENCHMARKS)}")
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,40}", args.database):
        p.error("--database must be a plain lower-case name (letters, digits, _), at most 41")
    return args


def publish(text: str, report: dict[str, Any], path: Path | None) -> int:
    """Print a report's text, and write its JSON to ``path`` when one is given."""
    print(text)
    if path:
        path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"  json        {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = Config.make(args.n, args.big)
    report = loop.run(run(cfg, args.only, args.database))
    return publish(render(report), report, args.json)


if __name__ == "__main__":
    sys.exit(main())
