"""What waiting costs: an engine process with many items waiting for a signal, how fast a
signal resumes a focus, and how late a sleep ends.

    .venv/bin/python -m benchmarks.bench_waits [--n N] [--k K] [--sleeps S] [--quick] [--json PATH]

One ``python -m animus_core up`` process (default options) runs the ``bench-waits`` faculty
of benchmarks/wait_faculty.py, loaded through an ``animus`` entry point, on a fresh database
of the embedded server (or of the server ``DATABASE_URL`` names):

* ``free``   the engine's memory (RSS) idle with no items, then with N items waiting for a
             signal; the transactions per second the engine causes while nothing wakes (a
             control database with no engine subtracted); then one ``Db.signal_many`` of all
             N, and the time until all N have completed;
* ``resume`` one item at a time on the idle engine: from just before ``Db.signal`` to the
             moment the resumed focus's ``engage`` starts (taken in the faculty); baseline:
             a bare LISTEN/NOTIFY round trip, interleaved;
* ``sleep``  items sleeping 0.2-1 s, in overlapping waves: the resumed focus's ``engage``
             start minus the end of its sleep; baseline: a bare asyncio timer in this
             process for the same delays.

Compare the figures with the load average printed beside them: the machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg

from animus_core.infra import loop
from animus_core.infra.config import Settings
from animus_core.store.audit import UNSEALED_SQL
from animus_core.store.db import Db, Signalled, describe_url, resolve_url
from animus_core.values.work import Created, NewWorkItem
from benchmarks.bench_engine import (
    Check,
    Line,
    Section,
    Server,
    checkpoint,
    context_lines,
    fresh_animus_db,
    latency_lines,
    machine,
    percentile,
    publish,
    render_section,
    xacts,
)
from benchmarks.bench_work import describe_server
from benchmarks.wait_faculty import MARKS_ENV, parse_mark
from tests.engine_helpers import EngineProcess, listeners, plugin_site, wait_listening

DEFAULT_PREFIX = "animus_bench_waits"
ROOT = Path(__file__).resolve().parent.parent
WORK_TYPE = "bench.wait"
SUBMIT_BATCH = 1000
WARMUP = 5  # untimed wake-ups before the resume latencies


def mono() -> float:
    """The system-wide monotonic clock: the faculty in the engine process reads the same."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


@dataclass(frozen=True)
class Config:
    n: int = 10_000  # items waiting in `free`
    settle: float = 12.0  # > 10 s: a backend may report its counts 10 s late
    window: float = 20.0  # the idle window
    k: int = 200  # resume latencies
    spacing: float = 0.020  # seconds between them
    sleeps: int = 200  # sleeping items
    sleep_min: float = 0.2
    sleep_max: float = 1.0
    waves: int = 4  # the sleepers are submitted in waves, wave_gap apart: their sleeps overlap
    wave_gap: float = 0.25
    quick: bool = False

    @classmethod
    def small(cls) -> Config:
        """A smoke run of a few seconds: the same paths, figures too small to judge by."""
        return cls(n=50, settle=0.4, window=1.0, k=5, sleeps=6, sleep_min=0.05,
                   sleep_max=0.15, waves=2, wave_gap=0.05, quick=True)

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


# -- the engine process -------------------------------------------------------------------------


@dataclass
class Engine:
    proc: EngineProcess
    marks: Marks


@contextlib.asynccontextmanager
async def engine_process(url: str, work: Path) -> AsyncIterator[Engine]:
    """``python -m animus_core up`` with default options, the bench-waits faculty loaded
    through an ``animus`` entry point (a dist-info of its own on PYTHONPATH), listening."""
    site = plugin_site(work, "benchmarks.wait_faculty", "benchwaits")
    (work / "faculties").mkdir()
    marks = work / "marks"
    marks.touch()
    env = {k: v for k, v in os.environ.items()
           if k not in ("ANIMUS_DISABLE_PLUGIN_AUTOLOAD", "OTEL_ENDPOINT")}
    env.update(DATABASE_URL=url, ANIMUS_HOME=str(work / "home"), ANIMUS_PLUGINS="benchwaits",
               ANIMUS_FACULTIES=str(work / "faculties"), LOG_LEVEL="warning",
               PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]), **{MARKS_ENV: str(marks)})
    proc = EngineProcess([], env, work, work / "engine.log")
    try:
        await wait_listening(url, [proc], timeout=60)
        yield Engine(proc, Marks(marks))
    finally:
        proc.signal(signal.SIGTERM)
        with contextlib.suppress(AssertionError):
            await proc.wait(30)
        proc.close()


def rss_kib(pid: int) -> int:
    """Resident set size of a process, in KiB (``VmRSS`` of ``/proc/<pid>/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


async def rss_median(pid: int, samples: int = 5, every: float = 0.2) -> float:
    values = []
    for i in range(samples):
        if i:
            await asyncio.sleep(every)
        values.append(rss_kib(pid))
    return statistics.median(values) / 1024


class Marks:
    """The lines the faculty appends as resumed foci start, read as they come."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._rest = ""
        self.seen: dict[str, tuple[float, float, datetime | None]] = {}

    def read(self) -> None:
        with self.path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        self._offset += len(data)
        text = self._rest + data.decode()
        *lines, self._rest = text.split("\n")
        for line in lines:
            mark = parse_mark(line)
            if mark is not None:
                self.seen[mark[0]] = mark[1:]

    async def wait_for(self, ids: Sequence[str], timeout: float, every: float = 0.001) -> None:
        deadline = mono() + timeout
        while True:
            self.read()
            if all(i in self.seen for i in ids):
                return
            if mono() > deadline:
                missing = [i for i in ids if i not in self.seen]
                raise RuntimeError(f"{len(missing)} resumed foci did not start within "
                                   f"{timeout:g} s (first: {missing[0]})")
            await asyncio.sleep(every)


# -- helpers -----------------------------------------------------------------------------------


async def submit(client: Db, params: Sequence[dict[str, Any]]) -> list[UUID]:
    base = NewWorkItem(WORK_TYPE, source="bench")
    ids = []
    for i in range(0, len(params), SUBMIT_BATCH):
        for r in await client.submit_many([base.params(p) for p in params[i : i + SUBMIT_BATCH]]):
            assert isinstance(r, Created)
            ids.append(r.id)
    return ids


async def counts(conn: asyncpg.Connection) -> dict[str, int]:
    rows = await conn.fetch("SELECT state::text, count(*) AS n FROM animus.work_items "
                            "WHERE work_type = $1 GROUP BY 1", WORK_TYPE)
    return {r["state"]: r["n"] for r in rows}


async def until_counted(conn: asyncpg.Connection, state: str, n: int, engine: Engine,
                        timeout: float, every: float = 0.1) -> None:
    deadline = mono() + timeout
    while (await counts(conn)).get(state, 0) < n:
        if not engine.proc.alive():
            raise RuntimeError(f"the engine exited:\n{engine.proc.output()[-2000:]}")
        if mono() > deadline:
            raise RuntimeError(f"not {n} items {state} after {timeout:g} s: "
                               f"{await counts(conn)}\n{engine.proc.output()[-2000:]}")
        await asyncio.sleep(every)


async def until_sealed(conn: asyncpg.Connection, timeout: float) -> None:
    """Until the engine's sealer has chained every audit row."""
    deadline = mono() + timeout
    while left := await conn.fetchval(UNSEALED_SQL):
        if mono() > deadline:
            raise RuntimeError(f"{left} audit rows still unsealed after {timeout:g} s")
        await asyncio.sleep(0.25)


async def quiet(url: str, timeout: float) -> None:
    """Let the engine become idle before a timed section: its sealer done with the audit
    rows the section before wrote, the tables vacuumed (autovacuum would visit them during
    the section otherwise) and dirty buffers flushed."""
    conn = await asyncpg.connect(url)
    try:
        await until_sealed(conn, timeout)
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()
    await checkpoint(url)


async def idle_claim_ms(db: Db, rounds: int = 20) -> float:
    """The median time of a claim that finds nothing visible (as an idle engine's claim)."""
    times = []
    for _ in range(rounds):
        t0 = mono()
        got = await db.claim(work_types=[WORK_TYPE], limit=64, lease_seconds=60, start=True)
        times.append((mono() - t0) * 1000)
        if got:
            raise RuntimeError("an idle claim found an item: nothing should be visible")
    return statistics.median(times)


# -- 1. waiting is free --------------------------------------------------------------------------


async def bench_free(cfg: Config, url: str, name: str, control: str, control_url: str,
                     server: Server, client: Db, engine: Engine) -> Section:
    pid = engine.proc.pid
    await asyncio.sleep(cfg.settle / 4)  # the start-up's imports and first claims
    samples = 2 if cfg.quick else 5
    rss_idle = await rss_median(pid, samples)
    conn = await asyncpg.connect(url)
    try:
        t0 = mono()
        ids = await submit(client, [{"op": "wait"}] * cfg.n)
        submitted = mono() - t0
        await until_counted(conn, "waiting", cfg.n, engine, timeout=max(120.0, cfg.n / 20))
        all_waiting = mono() - t0
        # the engine's sealer chains the suspensions' audit rows after them: that backlog
        # is not what waiting costs, so the window starts once it is sealed
        await until_sealed(conn, timeout=max(120.0, cfg.n / 50))
        sealed = mono() - t0
        # autovacuum would visit the tables the suspensions wrote during the window, and its
        # transactions count in the database's too: it finds nothing left to do
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()
    await asyncio.sleep(cfg.settle)  # their counts reported, the engine settled

    # The observer sits in a third database, so its own queries are not counted; the control
    # database (migrated, no engine) over the same window shows the server's own background
    # transactions (autovacuum), which are subtracted.
    observer = await asyncpg.connect(server.url)
    try:
        preload = await observer.fetchval("SHOW shared_preload_libraries")
        rss: list[int] = []
        x0, c0, w0 = await xacts(observer, name), await xacts(observer, control), mono()
        while mono() - w0 < cfg.window:
            rss.append(rss_kib(pid))
            await asyncio.sleep(min(1.0, cfg.window / 10))
        x1, c1, w1 = await xacts(observer, name), await xacts(observer, control), mono()
    finally:
        await observer.close()
    seconds = w1 - w0
    per_s = ((x1 - x0) - (c1 - c0)) / seconds
    rss_waiting = statistics.median(rss) / 1024
    claim_waiting = await idle_claim_ms(client)
    # What an engine holds per waiting item, apart from what running 10,000 foci left in
    # the one above (the allocator keeps its high-water mark): a fresh engine started while
    # they wait, measured as the idle one was.
    with tempfile.TemporaryDirectory(prefix="animus-bench-waits-fresh-") as fresh_dir:
        async with engine_process(url, Path(fresh_dir)) as fresh:
            for _ in range(1200):  # both listen (the first engine listens already)
                if await listeners(url) >= 2:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(cfg.settle / 4)
            rss_fresh = await rss_median(fresh.proc.pid, samples)
    control_db = await Db.connect(control_url, min_size=1, max_size=1, actor="bench")
    try:
        claim_empty = await idle_claim_ms(control_db)
    finally:
        await control_db.close()

    conn = await asyncpg.connect(url)
    try:
        t0_wall, t0 = time.time(), mono()
        answers = await client.signal_many([(i, "go", None) for i in ids])
        call = mono() - t0
        woke = sum(1 for a in answers if isinstance(a, Signalled) and a.woke)
        if woke != cfg.n:
            raise RuntimeError(f"signal_many woke {woke} of {cfg.n} items: {answers[:3]}")
        await until_counted(conn, "completed", cfg.n, engine, timeout=max(120.0, cfg.n / 20),
                            every=0.05)
        last = await conn.fetchval("SELECT max(resolved_at) FROM animus.work_items "
                                   "WHERE work_type = $1", WORK_TYPE)
        first_resumed = await conn.fetchval(
            "SELECT min(at) FROM animus.audit_log a JOIN animus.work_items w ON w.id = "
            "a.work_id WHERE w.work_type = $1 AND a.event = 'running' AND w.attempts = 2 "
            "AND a.at >= to_timestamp($2)", WORK_TYPE, t0_wall)
    finally:
        await conn.close()
    done = last.timestamp() - t0_wall
    rss_after = await rss_median(pid, samples)
    stats_note = ("pg_stat_statements is not loaded (shared_preload_libraries = "
                  f"{preload!r}): the engine's queries are counted as transactions in "
                  "pg_stat_database (xact_commit + xact_rollback); each engine query is a "
                  "transaction of its own")
    if "pg_stat_statements" in (preload or ""):
        stats_note = ("pg_stat_statements is loaded, but the count is from pg_stat_database "
                      "(transactions; each engine query is one)")
    return Section(
        "free", f"1. waiting is free: {cfg.n} items waiting for a signal",
        ["one `animus up` process, default options (concurrency 64, fallback poll 10 s); the "
         "faculty (max_concurrent 256) waits for signal `go` at once",
         f"RSS: median of samples of /proc/<pid>/status; {cfg.settle:g} s to settle after "
         f"the items suspended and their audit rows were sealed, then {cfg.window:g} s "
         "measured",
         "queries: transactions of the engine's database, less those of a control database "
         "with no engine over the same window",
         f"then one Db.signal_many of all {cfg.n}: from just before the call to the last "
         "completion (resolved_at of the last item, the database's clock)"],
        lines=[Line("engine RSS idle, no items", rss_idle, "MiB"),
               Line(f"a fresh engine's RSS with {cfg.n} waiting", rss_fresh, "MiB", cfg.n),
               Line(f"RSS with {cfg.n} waiting of the engine that ran and suspended them "
                    "(context)", rss_waiting, "MiB", cfg.n),
               Line("engine RSS after they all completed (context)", rss_after, "MiB"),
               Line(f"submit {cfg.n} (submit_many, batches of {SUBMIT_BATCH})", submitted, "s",
                    cfg.n),
               Line("submit -> all waiting (claimed, run, suspended)", all_waiting, "s", cfg.n),
               Line("submit -> their audit rows sealed (the window starts after)", sealed,
                    "s", cfg.n),
               Line("transactions, engine database", x1 - x0, "xacts", seconds=seconds),
               Line("transactions, control database (no engine)", c1 - c0, "xacts",
                    seconds=seconds),
               Line("engine queries per second while nothing wakes", per_s, "per s"),
               Line(f"idle claim (nothing visible), {cfg.n} waiting", claim_waiting, "ms"),
               Line("idle claim (nothing visible), empty queue", claim_empty, "ms"),
               Line(f"Db.signal_many of {cfg.n} (one call)", call, "s", cfg.n),
               Line("signal_many -> first resumed focus running",
                    first_resumed.timestamp() - t0_wall if first_resumed else None, "s"),
               Line(f"signal_many -> all {cfg.n} completed", done, "s", cfg.n),
               Line("  (resumed items completed per second)", cfg.n / done, "items/s", cfg.n,
                    done)],
        checks=[Check(f"fresh engine's RSS with {cfg.n} waiting / RSS idle",
                      rss_fresh / rss_idle, 1.10, "<="),
                Check("engine queries per second while nothing wakes", per_s, 1.0, "<=",
                      "per s"),
                Check(f"signal_many -> all {cfg.n} completed, seconds", done, 5.0, "<=", "s")],
        notes=[stats_note],
        extra={"xacts": [x0, x1], "control_xacts": [c0, c1], "rss_kib_window": rss,
               "shared_preload_libraries": preload},
    )


# -- 2. resume latency ---------------------------------------------------------------------------


async def bench_resume(cfg: Config, url: str, client: Db, engine: Engine) -> Section:
    conn = await asyncpg.connect(url)
    try:
        before = (await counts(conn)).get("waiting", 0)
        ids = await submit(client, [{"op": "wait", "mark": True}] * (cfg.k + WARMUP))
        await until_counted(conn, "waiting", before + len(ids), engine, timeout=60)
    finally:
        await conn.close()
    await quiet(url, timeout=max(120.0, cfg.n / 50))  # an idle engine, as the target says
    await asyncio.sleep(0.2 if cfg.quick else 1.0)
    ours: list[float] = []
    signal_rt: list[float] = []
    base: list[float] = []
    pings: dict[str, float] = {}
    pinged = asyncio.Event()

    def on_ping(_c: object, _pid: int, _channel: str, payload: str) -> None:
        pings[payload] = mono()
        pinged.set()

    listener = await asyncpg.connect(url)
    notifier = await asyncpg.connect(url)
    try:
        await listener.add_listener("animus_bench_ping", on_ping)
        for j, wid in enumerate(ids):
            t_round = mono()

            async def resume(wid: UUID = wid) -> tuple[float, float]:
                t0 = mono()
                await client.signal(wid, "go")
                sent = mono()
                await engine.marks.wait_for([str(wid)], 10.0)
                return (engine.marks.seen[str(wid)][0] - t0) * 1000, (sent - t0) * 1000

            async def notify(j: int = j) -> float:
                key = str(j)
                t0 = mono()
                await notifier.execute("SELECT pg_notify('animus_bench_ping', $1)", key)
                while key not in pings:
                    pinged.clear()
                    if key in pings:
                        break
                    await asyncio.wait_for(pinged.wait(), 5.0)
                return (pings[key] - t0) * 1000

            if j % 2:  # alternate who goes first, so noise lands on both alike
                b, (a, s) = await notify(), await resume()
            else:
                (a, s), b = await resume(), await notify()
            if j >= WARMUP:
                ours.append(a)
                signal_rt.append(s)
                base.append(b)
            await asyncio.sleep(max(0.0, cfg.spacing - (mono() - t_round)))
    finally:
        await notifier.close()
        await listener.close()
    rest = [a - s for a, s in zip(ours, signal_rt, strict=True)]
    return Section(
        "resume", "2. resume latency: idle engine, one signal at a time",
        [f"k={cfg.k} items waiting for `go` (after {WARMUP} untimed), one signalled every "
         f"{cfg.spacing * 1000:.0f} ms with Db.signal",
         "idle: started once the audit rows before were sealed, the tables vacuumed and a "
         "checkpoint taken",
         "from just before Db.signal to the resumed focus's engage start, taken in the "
         "faculty (engine process) on the system-wide monotonic clock",
         "baseline: pg_notify sent on one connection -> callback on another, interleaved"],
        lines=[*latency_lines("signal -> resumed engage starts", ours),
               *latency_lines("  of which Db.signal (its round trip, committed)", signal_rt),
               *latency_lines("  of which the rest (notify, claim, orient)", rest),
               *latency_lines("bare LISTEN/NOTIFY round trip", base)],
        checks=[Check("resume latency p50, ms", percentile(ours, 50), 5.0, "<=", "ms"),
                Check("resume latency p99, ms", percentile(ours, 99), 20.0, "<=", "ms")],
        extra={"resume_ms": [round(x, 4) for x in ours],
               "signal_ms": [round(x, 4) for x in signal_rt],
               "notify_ms": [round(x, 4) for x in base]},
    )


# -- 3. sleep lateness ---------------------------------------------------------------------------


async def bench_sleep(cfg: Config, url: str, client: Db, engine: Engine) -> Section:
    await quiet(url, timeout=120.0)
    rng = random.Random(7)
    per_wave = -(-cfg.sleeps // cfg.waves)
    ids: list[str] = []
    timers: list[float] = []
    all_fired = asyncio.Event()
    loop = asyncio.get_running_loop()

    def fired(due: float) -> None:
        timers.append((time.time() - due) * 1000)
        if len(timers) == cfg.sleeps:
            all_fired.set()

    for w in range(cfg.waves):
        if w:
            await asyncio.sleep(cfg.wave_gap)
        size = min(per_wave, cfg.sleeps - len(ids))
        seconds = [rng.uniform(cfg.sleep_min, cfg.sleep_max) for _ in range(size)]
        ids += [str(i) for i in await submit(
            client, [{"op": "sleep", "s": s, "mark": True} for s in seconds])]
        now = time.time()
        for s in seconds:  # the baseline: a bare timer here for the same delay
            loop.call_later(s, fired, now + s)
    await engine.marks.wait_for(ids, 60.0, every=0.05)
    late = []
    for i in ids:
        _mono, wall, until = engine.marks.seen[i]
        assert until is not None
        late.append((wall - until.timestamp()) * 1000)
    await asyncio.wait_for(all_fired.wait(), 10.0)
    return Section(
        "sleep", f"3. sleep lateness: {cfg.sleeps} items sleeping {cfg.sleep_min:g}-"
                 f"{cfg.sleep_max:g} s",
        [f"{cfg.waves} waves of {per_wave} items, {cfg.wave_gap * 1000:.0f} ms apart, each "
         "sleeping a uniform random time (focus.sleep), so sleeps overlap; started on an "
         "idle engine, as section 2",
         "lateness: the resumed focus's engage start (wall clock, in the faculty) minus the "
         "end of its sleep (the wait's until)",
         "baseline: a bare asyncio timer (loop.call_later) in this process for each delay"],
        lines=[*latency_lines("sleep end -> resumed engage starts", late),
               *latency_lines("bare asyncio timer lateness", timers)],
        checks=[Check("sleep lateness p99, ms", percentile(late, 99), 50.0, "<=", "ms"),
                Check("sleep lateness p50, ms (context)", percentile(late, 50), None, "<=",
                      "ms")],
        notes=["a negative lateness would be a focus resumed before its sleep ended"]
        if min(late) < 0 else [],
        extra={"late_ms": [round(x, 4) for x in late]},
    )


# -- run and report ------------------------------------------------------------------------------


async def run(cfg: Config, prefix: str) -> dict[str, Any]:
    started = mono()
    load_start = os.getloadavg()
    settings = Settings.from_env()
    server_url = await resolve_url(settings)
    where = "DATABASE_URL" if settings.database_url else f"embedded server in {settings.home}"
    server = Server(server_url)
    name, control = prefix, f"{prefix}_control"
    url = await fresh_animus_db(server, name)
    control_url = await fresh_animus_db(server, control)
    for u in (control_url, url) if not cfg.quick else ():
        conn = await asyncpg.connect(u)
        try:
            await conn.execute("VACUUM ANALYZE")  # nothing left for autovacuum to do
        finally:
            await conn.close()
    client = await Db.connect(url, min_size=1, max_size=2, actor="bench-waits")
    sections: dict[str, Section] = {}
    try:
        database = await describe_server(client)
        with tempfile.TemporaryDirectory(prefix="animus-bench-waits-") as tmp:
            async with engine_process(url, Path(tmp)) as engine:
                steps: dict[str, Callable[[], Awaitable[Section]]] = {
                    "free": lambda: bench_free(cfg, url, name, control, control_url, server,
                                               client, engine),
                    "resume": lambda: bench_resume(cfg, url, client, engine),
                    "sleep": lambda: bench_sleep(cfg, url, client, engine)}
                for key, step in steps.items():
                    t0 = mono()
                    load = os.getloadavg()
                    section = await step()
                    section.seconds = mono() - t0
                    section.setup.append("load average when it started: "
                                         + " ".join(f"{x:.2f}" for x in load))
                    sections[key] = section
                log = engine.proc.output()
        async with client.connection() as conn:
            left = await counts(conn)
    finally:
        await client.close()
    expected = cfg.n + cfg.k + WARMUP + cfg.sleeps
    check = {"states": left, "expected_completed": expected,
             "ok": left == {"completed": expected}}
    return {
        "benchmark": "waits",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": {**cfg.to_json(), "database": name},
        "machine": {**machine(), "load_average_start": [round(x, 2) for x in load_start],
                    "load_average_end": [round(x, 2) for x in os.getloadavg()]},
        "database": {"where": where, "server": describe_url(url), **database},
        "sections": {k: s.to_json() for k, s in sections.items()},
        "check": check,
        "engine_log_warnings": [ln for ln in log.splitlines()
                                if " WARNING " in ln or " ERROR " in ln][:20],
        "total_seconds": round(mono() - started, 3),
    }


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = ["animus waiting benchmark (bench_waits)" + (" -- QUICK smoke run, figures too "
                                                        "small to judge by"
                                                        if report["config"]["quick"] else ""),
             *context_lines(report),
             f"  load avg    {' '.join(map(str, m['load_average_start']))} at the start, "
             f"{' '.join(map(str, m['load_average_end']))} at the end (1, 5, 15 min)"]
    for s in report["sections"].values():
        lines += render_section(s)
    c = report["check"]
    lines += ["", f"  check       {'ok' if c['ok'] else 'FAILED'}: states {c['states']} "
                  f"(expected {c['expected_completed']} completed)"]
    lines += [f"  engine log  {ln}" for ln in report["engine_log_warnings"]]
    lines.append(f"  time        {report['total_seconds']:.1f} s in all")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_waits",
                                description="what waiting costs an engine: memory and queries "
                                            "while items wait, resume latency, sleep lateness")
    p.add_argument("--n", type=int, help=f"items waiting in `free` (default {Config.n})")
    p.add_argument("--k", type=int, help=f"resume latencies measured (default {Config.k})")
    p.add_argument("--sleeps", type=int, help=f"sleeping items (default {Config.sleeps})")
    p.add_argument("--window", type=float, help=f"idle window, seconds (default "
                                                f"{Config.window:g})")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run of a few seconds (n=50, k=5, 6 sleeps, 1 s window)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers here")
    p.add_argument("--database", default=DEFAULT_PREFIX, metavar="NAME",
                   help=f"database dropped and created (and NAME_control; default "
                        f"{DEFAULT_PREFIX})")
    args = p.parse_args(argv)
    for opt in ("n", "k", "sleeps"):
        if getattr(args, opt) is not None and getattr(args, opt) < 1:
            p.error(f"--{opt} must be at least 1")
    if args.window is not None and args.window <= 0:
        p.error("--window must be more than 0 seconds")
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,40}", args.database):
        p.error("--database must be a plain lower-case name (letters, digits, _), at most 41")
    return args


def config(args: argparse.Namespace) -> Config:
    cfg = Config.small() if args.quick else Config()
    given = {k: getattr(args, k) for k in ("n", "k", "sleeps", "window")
             if getattr(args, k) is not None}
    return Config(**{**cfg.to_json(), **given})


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = loop.run(run(config(args), args.database))
    code = publish(render(report), report, args.json)
    return code if report["check"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
