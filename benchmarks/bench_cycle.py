"""Short work at low concurrency: does a slot turn over at the speed of the work?

    .venv/bin/python -m benchmarks.bench_cycle [--concurrency 1,4,16,64] [--work 1,10]
        [--seconds S] [--json PATH]

For each concurrency C and work time W (milliseconds), on a fresh database of the embedded
server (or of the server ``DATABASE_URL`` names), with a backlog of items submitted before
the clock starts:

* **animus:** an engine in this process runs a faculty with ``max_concurrent = C`` whose
  engage waits W ms (for an event from outside the event loop, as the end of an I/O wait
  comes: :class:`Clock`);
* **raw pgmq (the baseline):** C asyncio workers on C connections, each reading one message
  (``pgmq.read``), waiting W ms the same way and archiving it (``pgmq.archive``), over the
  same backlog.

Each runs for about S seconds of its ideal rate (C / W); throughput is measured from the
first completion to the last, against that ideal, and printed beside the baseline's. The
ideal is the ceiling; on a small machine the CPU per item caps both before it (the last
column says where).

Target (issue: performance at the shape of real work): every case reaches at least 70% of
its ideal, up to the CPU ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import ctypes.util
import heapq
import itertools
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
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
    CpuUse,
    Line,
    Section,
    Server,
    describe_database,
    fresh_animus_db,
    machine,
    publish,
    render_report,
    running_engine,
    submit_all,
    wait_done,
)
from benchmarks.bench_fleet import load

DEFAULT_PREFIX = "animus_bench_cycle"
WORK_TYPE = "bench.cycle"
RAW_QUEUE = "bench_cycle_raw"
TARGET = 0.70
CORES_NOTE = ("the CPU ceiling: the cores of the machine / the CPU per item (this process and "
              "Postgres), every core busy")


class Clock:
    """The work: a wait that ends as an I/O wait does, by a file descriptor becoming readable
    (a Linux ``timerfd`` armed to the earliest deadline, read by the event loop), to the
    microsecond. An ``asyncio.sleep`` of 1 ms instead lasts what the loop's millisecond
    timers make of it: 1.03 ms on average in a loop woken every 2 ms by other work, 1.19 ms
    in one left idle between them, which counted against whatever made the loop quieter."""

    def __init__(self) -> None:
        self._due: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._fd: int | None = None
        self._armed = math.inf
        self._loop: asyncio.AbstractEventLoop | None = None
        #: how long the waits took, from the call to the caller's resumption (seconds)
        self.waited = 0.0
        self.waits = 0

    async def sleep(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        if self._fd is None:
            self._fd = _timerfd()
            self._loop = loop
            loop.add_reader(self._fd, self._fired)
        began = time.monotonic()
        done: asyncio.Future[None] = loop.create_future()
        when = began + seconds
        heapq.heappush(self._due, (when, next(self._order), done))
        if when < self._armed:
            self._arm(when)
        await done
        self.waited += time.monotonic() - began
        self.waits += 1

    def _arm(self, when: float) -> None:
        assert self._fd is not None
        self._armed = when
        _settime(self._fd, when)

    def _fired(self) -> None:
        assert self._fd is not None
        with contextlib.suppress(BlockingIOError):
            os.read(self._fd, 8)
        now = time.monotonic()
        while self._due and self._due[0][0] <= now:
            done = heapq.heappop(self._due)[2]
            if not done.done():
                done.set_result(None)
        self._armed = math.inf
        if self._due:
            self._arm(self._due[0][0])

    def close(self) -> None:
        if self._fd is not None and self._loop is not None:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None

    def mean_ms(self) -> float | None:
        return self.waited / self.waits * 1000 if self.waits else None


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_CLOCK_MONOTONIC = 1  # time.monotonic's clock
_TFD_TIMER_ABSTIME = 1


def _timerfd() -> int:
    fd = int(_libc.timerfd_create(_CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC))
    if fd < 0:
        raise OSError(ctypes.get_errno(), "timerfd_create failed")
    return fd


def _settime(fd: int, when: float) -> None:
    """Arm ``fd`` to fire at ``when`` (time.monotonic seconds)."""
    sec = int(when)
    value = _Itimerspec(_Timespec(0, 0), _Timespec(sec, max(1, int((when - sec) * 1e9))))
    if _libc.timerfd_settime(fd, _TFD_TIMER_ABSTIME, ctypes.byref(value), None) != 0:
        raise OSError(ctypes.get_errno(), "timerfd_settime failed")


class Waiter(Faculty):
    """Waits ``params["ms"]`` milliseconds in engage (on its :class:`Clock`, which each run
    gives its subclass), nothing else."""

    name = "bench-cycle"
    accepts = (WORK_TYPE,)
    clock: Clock

    async def orient(self, focus: Focus) -> Any:
        return None

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        await self.clock.sleep(focus.params["ms"] / 1000)
        return None

    async def consolidate(self, focus: Focus, engaged: Any) -> Any:
        return None


def backlog_size(concurrency: int, work_ms: float, seconds: float) -> int:
    """Items for ``seconds`` at the ideal rate, at least 50 and at most 20,000."""
    return max(50, min(20_000, int(concurrency / (work_ms / 1000) * seconds)))


async def run_animus(server: Server, prefix: str, home: Path, concurrency: int,
                     work_ms: float, n: int) -> tuple[float, CpuUse | None, float | None]:
    """Items per second, CPU, and how long the work took on average (ms)."""
    url = await fresh_animus_db(server, f"{prefix}_animus")
    client = await Db.connect(url, min_size=1, max_size=2, actor="bench-submitter")
    try:
        base = NewWorkItem(WORK_TYPE, source="bench")
        await submit_all(client, [base.params({"ms": work_ms, "i": i}) for i in range(n)])
        await client.seal_audit()
    finally:
        await client.close()
    meter = await CpuMeter.for_server(url)
    clock = Clock()
    faculty = type("Waiter", (Waiter,), {"max_concurrent": concurrency, "clock": clock})()
    options = EngineOptions(concurrency=concurrency, lease_seconds=60)
    try:
        async with running_engine(url, home, options, faculties=[faculty], expect=n,
                                  meter=meter) as run:
            seconds = await wait_done(run)
            cpu = (CpuUse.between(n, run.cpu_started, run.completions.cpu_at)
                   if run.cpu_started and run.completions.cpu_at else None)
    finally:
        clock.close()
    return n / seconds, cpu, clock.mean_ms()


async def run_raw(server: Server, prefix: str, concurrency: int, work_ms: float,
                  n: int) -> tuple[float, CpuUse | None, float | None]:
    url = await fresh_animus_db(server, f"{prefix}_raw")
    conns = [await asyncpg.connect(url) for _ in range(concurrency)]
    clock = Clock()
    try:
        await conns[0].execute("SELECT pgmq.create($1::text)", RAW_QUEUE)
        msgs = [f'{{"t": "{WORK_TYPE}", "i": {i}}}' for i in range(n)]
        for i in range(0, n, 1000):
            await conns[0].execute("SELECT pgmq.send_batch($1::text, $2::jsonb[])", RAW_QUEUE,
                                   msgs[i:i + 1000])
        meter = await CpuMeter.for_server(url)
        done = 0

        async def worker(conn: asyncpg.Connection) -> None:
            nonlocal done
            while True:
                rows = await conn.fetch("SELECT msg_id FROM pgmq.read($1::text, 60, 1)",
                                        RAW_QUEUE)
                if not rows:
                    return
                await clock.sleep(work_ms / 1000)
                await conn.execute("SELECT pgmq.archive($1::text, $2::bigint)", RAW_QUEUE,
                                   rows[0]["msg_id"])
                done += 1

        cpu0 = meter.read()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in conns))
        seconds = time.perf_counter() - t0
        cpu = meter.since(n, cpu0)
    finally:
        clock.close()
        for c in conns:
            await c.close()
    if done != n:
        raise RuntimeError(f"raw pgmq workers archived {done} of {n} messages")
    return n / seconds, cpu, clock.mean_ms()


def cpu_us(cpu: CpuUse | None) -> float | None:
    """CPU per item, this process and Postgres together, in microseconds."""
    if cpu is None or cpu.server is None:
        return None
    return (cpu.own + cpu.server) / cpu.items * 1e6


def cpu_ceiling(cpu: CpuUse | None) -> float | None:
    """Items per second all the machine's cores allow at this CPU per item."""
    if cpu is None or cpu.server is None:
        return None
    per_item = (cpu.own + cpu.server) / cpu.items
    return None if per_item <= 0 else (os.cpu_count() or 1) / per_item


async def measure(server: Server, prefix: str, concurrencies: Sequence[int],
                  works: Sequence[float], seconds: float) -> list[dict[str, Any]]:
    results = []
    with tempfile.TemporaryDirectory(prefix="animus-bench-cycle-") as tmp:
        for work_ms in works:
            for c in concurrencies:
                n = backlog_size(c, work_ms, seconds)
                print(f"  concurrency {c}, {work_ms:g} ms: {n} items...", file=sys.stderr,
                      flush=True)
                ours, ours_cpu, ours_work = await run_animus(
                    server, prefix, Path(tmp) / f"{c}-{work_ms}", c, work_ms, n)
                raw, raw_cpu, raw_work = await run_raw(server, prefix, c, work_ms, n)
                ideal = c / (work_ms / 1000)
                results.append({
                    "concurrency": c, "work_ms": work_ms, "items": n, "ideal": ideal,
                    "animus": ours, "raw": raw, "animus_of_ideal": ours / ideal,
                    "raw_of_ideal": raw / ideal, "animus_ceiling": cpu_ceiling(ours_cpu),
                    "animus_cpu_us": cpu_us(ours_cpu), "raw_cpu_us": cpu_us(raw_cpu),
                    "animus_work_ms": ours_work, "raw_work_ms": raw_work,
                })
    return results


def section(results: list[dict[str, Any]]) -> Section:
    lines, checks = [], []
    for r in results:
        case = f"C={r['concurrency']}, {r['work_ms']:g} ms"
        lines += [
            Line(f"{case}: animus", r["animus"], "items/s", r["items"]),
            Line(f"{case}: raw pgmq, {r['concurrency']} workers", r["raw"], "items/s",
                 r["items"]),
            Line(f"{case}: ideal (C / work)", r["ideal"], "items/s"),
            Line(f"{case}: animus CPU per item (engine + Postgres)", r["animus_cpu_us"], "us"),
            Line(f"{case}: raw pgmq CPU per item (workers + Postgres)", r["raw_cpu_us"], "us"),
            Line(f"{case}: animus CPU ceiling (all cores busy)", r["animus_ceiling"],
                 "items/s"),
            Line(f"{case}: the work took, animus (mean, to the focus's resumption)",
                 r["animus_work_ms"], "ms"),
            Line(f"{case}: the work took, raw pgmq (mean, to the worker's resumption)",
                 r["raw_work_ms"], "ms"),
        ]
        ceiling = r["animus_ceiling"]
        bound = min(r["ideal"], ceiling) if ceiling else r["ideal"]
        checks += [
            Check(f"{case}: animus of ideal", r["animus_of_ideal"], None),
            Check(f"{case}: animus of min(ideal, CPU ceiling)", r["animus"] / bound, TARGET),
            Check(f"{case}: raw pgmq of ideal (baseline)", r["raw_of_ideal"], None),
        ]
    return Section("cycle", "short work at low concurrency: a backlog, work W per item, C slots",
                   ["animus: an engine in this process, one faculty with max_concurrent C, "
                    "engage waits W",
                    "raw pgmq: C workers on C connections, each read(1), wait W, archive",
                    "the wait: an event from outside the loop W later (a thread's precise "
                    "sleep), as an I/O wait ends",
                    "throughput from the start to the last completion; ideal C / W"],
                   lines=lines, checks=checks, notes=[CORES_NOTE])


async def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    settings = Settings.from_env()
    url = await resolve_url(settings)
    server = Server(url)
    database = await describe_database(server, args.database)
    load_before = load()
    results = await measure(server, args.database, args.concurrency, args.work, args.seconds)
    report_section = section(results)
    report_section.notes.append(f"load {load_before} -> {load()}")
    return {
        "benchmark": "cycle", "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": {"concurrency": args.concurrency, "work_ms": args.work,
                   "seconds": args.seconds},
        "machine": machine(),
        "database": {"where": "DATABASE_URL" if settings.database_url else
                     f"embedded server in {settings.home}", "server": describe_url(url),
                     **database},
        "sections": {"cycle": report_section.to_json()},
        "total_seconds": round(time.monotonic() - started, 3),
    }


def render(report: dict[str, Any]) -> str:
    return render_report("animus short-work benchmark (bench_cycle)", report)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_cycle",
                                description="short work at low concurrency, against raw pgmq")
    p.add_argument("--concurrency", default="1,4,16,64", help="slots (default 1,4,16,64)")
    p.add_argument("--work", default="1,10", help="work per item, ms (default 1,10)")
    p.add_argument("--seconds", type=float, default=2.0,
                   help="each case's backlog lasts this long at its ideal rate (default 2)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers here")
    p.add_argument("--database", default=DEFAULT_PREFIX, metavar="PREFIX",
                   help=f"prefix of the databases dropped and created (default {DEFAULT_PREFIX})")
    args = p.parse_args(argv)
    try:
        args.concurrency = [int(x) for x in args.concurrency.split(",") if x.strip()]
        args.work = [float(x) for x in args.work.split(",") if x.strip()]
    except ValueError:
        p.error("--concurrency and --work must be comma-separated numbers")
    if (not args.concurrency or not args.work or min(args.concurrency) < 1
            or min(args.work) <= 0 or args.seconds <= 0):
        p.error("--concurrency, --work and --seconds must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = loop.run(run(args))
    return publish(render(report), report, args.json)


if __name__ == "__main__":
    sys.exit(main())
