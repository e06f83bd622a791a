"""Overload: producers in other processes submit faster than the engine can drain.

    .venv/bin/python -m benchmarks.bench_overload [--drain N] [--seconds S] [--factor F]
        [--producers P] [--batch B] [--json PATH]

Two runs of the same engine (in this process, concurrency 64, the no-op faculty of
``bench_engine``), each on a fresh database of the embedded server (or of the server
``DATABASE_URL`` names):

1. **drain (the baseline):** a backlog of N items is submitted, then the engine drains it:
   its drain rate R, with nobody submitting;
2. **overload:** the engine starts on an empty queue while P producer processes (this module
   with ``--produce``) submit F x R items per second between them for S seconds, B items per
   ``submit_many``, each on a schedule (a producer behind its schedule submits again at once).

Measured: the engine's completion rate over the producers' window (after its first fifth)
against R; the rate the producers reached against the one asked for, and their submit
latency (p50, p99): what a submitter sees when the engine cannot keep up; the backlog when
the producers stop, and the time to drain it. Every item must complete exactly once.

Target (issue: performance at the shape of real work): with F = 2, the completion rate stays
at least 90% of the drain rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from animus_core.infra import loop
from animus_core.infra.config import Settings
from animus_core.runtime.engine import EngineOptions
from animus_core.store.db import Db, describe_url, resolve_url
from animus_core.values.work import NewWorkItem
from benchmarks.bench_engine import (
    Check,
    CpuMeter,
    Line,
    NoopFaculty,
    Section,
    Server,
    describe_database,
    fresh_animus_db,
    machine,
    noop_items,
    publish,
    render_report,
    running_engine,
    submit_all,
    wait_done,
)
from benchmarks.bench_fleet import load

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PREFIX = "animus_bench_overload"
TARGET = 0.90
#: the first part of the producers' window left out of the completion rate (the engine
#: starts on an empty queue)
WARMUP = 0.2


# -- a producer (a process of its own) ---------------------------------------------------------


async def produce(url: str, rate: float, seconds: float, batch: int, tag: str) -> dict[str, Any]:
    """Submit ``rate`` items per second for ``seconds``, ``batch`` at a time on a schedule;
    returns what was submitted and how long each ``submit_many`` took."""
    db = await Db.connect(url, min_size=1, max_size=1, actor=f"bench-producer-{tag}")
    base = NewWorkItem("bench.noop", source="bench")
    latencies: list[float] = []
    submitted = 0
    try:
        start = time.monotonic()
        while (now := time.monotonic()) - start < seconds:
            due = start + submitted / rate  # the schedule: when this batch should go
            if due > now:
                await asyncio.sleep(due - now)
            items = [base.params({"p": tag, "i": submitted + i}) for i in range(batch)]
            t0 = time.monotonic()
            await db.submit_many(items)
            latencies.append(time.monotonic() - t0)
            submitted += batch
        elapsed = time.monotonic() - start
    finally:
        await db.close()
    return {"submitted": submitted, "seconds": elapsed, "latencies": latencies,
            "cpu": time.process_time()}


async def run_producers(url: str, rate: float, seconds: float, producers: int,
                        batch: int) -> list[dict[str, Any]]:
    """``producers`` processes of this module, ``rate`` items per second between them."""
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.bench_overload", "--produce", url,
        "--rate", str(rate / producers), "--seconds", str(seconds), "--batch", str(batch),
        "--tag", str(i), cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)}) for i in range(producers)]
    results = []
    for p in procs:
        out, _ = await p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"a producer failed (exit {p.returncode})")
        results.append(json.loads(out))
    return results


# -- the two runs ------------------------------------------------------------------------------


async def drain_rate(server: Server, prefix: str, home: Path, n: int) -> tuple[float, float | None]:
    """The engine's drain rate, and the CPU (this process and Postgres) per item it drained
    over the same interval (None when the server is not on this machine)."""
    url = await fresh_animus_db(server, f"{prefix}_drain")
    meter = await CpuMeter.for_server(url)
    client = await Db.connect(url, min_size=1, max_size=2, actor="bench-submitter")
    try:
        await submit_all(client, noop_items(n))
        await client.seal_audit()
    finally:
        await client.close()
    async with running_engine(url, home, EngineOptions(), faculties=[NoopFaculty()],
                              expect=n) as run:
        # between 10% and 90% of the backlog completed: without the engine's start and end
        counter = run.completions
        seen: dict[float, tuple[float, int, tuple[float, float | None]]] = {}
        while not counter.reached.is_set() and not run.task.done():
            for share in (0.1, 0.9):
                if share not in seen and counter.items >= share * n:
                    seen[share] = (time.monotonic(), counter.items, meter.read())
            await asyncio.sleep(0.005)
        await wait_done(run)
    (t0, c0, cpu0), (t1, c1, cpu1) = seen[0.1], seen.get(0.9, (time.monotonic(), n, meter.read()))
    cpu = (None if cpu0[1] is None or cpu1[1] is None
           else (cpu1[0] - cpu0[0] + cpu1[1] - cpu0[1]) / (c1 - c0))
    return (c1 - c0) / (t1 - t0), cpu


async def overload(server: Server, prefix: str, home: Path, rate: float, seconds: float,
                   producers: int, batch: int) -> dict[str, Any]:
    url = await fresh_animus_db(server, f"{prefix}_overload")
    meter = await CpuMeter.for_server(url)
    async with running_engine(url, home, EngineOptions(), faculties=[NoopFaculty()]) as run:
        counter = run.completions
        marks: dict[str, tuple[float, int, tuple[float, float | None]]] = {}

        async def mark_window() -> None:
            await asyncio.sleep(seconds * WARMUP)
            marks["from"] = (time.monotonic(), counter.items, meter.read())

        marker = asyncio.create_task(mark_window())
        started = time.monotonic()
        made = await run_producers(url, rate, seconds, producers, batch)
        marks["to"] = (time.monotonic(), counter.items, meter.read())
        await marker
        submitted = sum(p["submitted"] for p in made)
        backlog = submitted - counter.items
        counter.target = submitted  # wait_done: until every submitted item completed
        drained_from = time.monotonic()
        if counter.items < submitted:
            await wait_done(run)
        drain_seconds = time.monotonic() - drained_from
    db = await Db.connect(url, min_size=1, max_size=1, actor="bench-check")
    try:
        async with db.connection() as conn:
            completed = await conn.fetchval(
                "SELECT count(*) FROM animus.work_items WHERE state = 'completed'")
            twice = await conn.fetchval(
                "SELECT count(*) FROM (SELECT work_id FROM animus.execution_records "
                "GROUP BY work_id HAVING count(*) > 1) x")
    finally:
        await db.close()
    (t0, c0, cpu0), (t1, c1, cpu1) = marks["from"], marks["to"]
    latencies = sorted(x for p in made for x in p["latencies"])
    produced_seconds = max(p["seconds"] for p in made)
    # cores busy in the window: the engine's process and Postgres as measured, the producers
    # at their average over their whole run
    producers_cpu = sum(p["cpu"] for p in made) / produced_seconds
    server_cores = (None if cpu0[1] is None or cpu1[1] is None
                    else (cpu1[1] - cpu0[1]) / (t1 - t0))
    return {
        "engine_cores": (cpu1[0] - cpu0[0]) / (t1 - t0), "server_cores": server_cores,
        "producer_cores": producers_cpu,
        "asked_rate": rate, "submitted": submitted,
        "submit_rate": submitted / produced_seconds, "window_seconds": t1 - t0,
        "completion_rate": (c1 - c0) / (t1 - t0), "completed_in_window": c1 - c0,
        "submit_p50_ms": statistics.median(latencies) * 1000,
        "submit_p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
        "backlog": backlog, "drain_seconds": drain_seconds,
        "backlog_rate": backlog / drain_seconds if drain_seconds > 0 else None,
        "completed": completed,
        "run_twice": twice, "seconds": time.monotonic() - started,
    }


def ceiling(drain: float, drain_cpu: float | None, r: dict[str, Any]) -> dict[str, float] | None:
    """What this run's own costs allow: the cores its three parties kept busy while the
    producers submitted, and the CPU each item cost, drained (``drain_cpu``, from the drain)
    and submitted (what the window's CPU left once its completions are paid, per item
    submitted in it: the producers', Postgres's for the submissions, and the engine's for
    sealing their audit rows). Were submissions held to the completion rate (the most an admission
    limit could do), those cores would complete ``busy / (submit + drain)`` items a second."""
    submitted = r["submit_rate"] * r["window_seconds"]
    if drain_cpu is None or r["server_cores"] is None or submitted <= 0:
        return None
    busy = r["engine_cores"] + r["server_cores"] + r["producer_cores"]
    spent = busy * r["window_seconds"] - r["completed_in_window"] * drain_cpu
    submit_cpu = spent / submitted
    return {"busy_cores": busy, "drain_cpu_us": drain_cpu * 1e6,
            "submit_cpu_us": submit_cpu * 1e6,
            "ratio": busy / (submit_cpu + drain_cpu) / drain}


def section(drain: float, r: dict[str, Any], args: argparse.Namespace) -> Section:
    lines = [
        Line("drain rate, nobody submitting (baseline)", drain, "items/s", args.drain),
        Line(f"producers asked for ({args.factor:g} x drain)", r["asked_rate"], "items/s"),
        Line("producers reached", r["submit_rate"], "items/s", r["submitted"]),
        Line("completion rate while they submit", r["completion_rate"], "items/s",
             r["completed_in_window"], r["window_seconds"]),
        Line(f"submit latency p50 ({args.batch} items a call)", r["submit_p50_ms"], "ms"),
        Line(f"submit latency p99 ({args.batch} items a call)", r["submit_p99_ms"], "ms"),
        Line("backlog when the producers stopped", r["backlog"], "items"),
        Line("then drained at", r["backlog_rate"], "items/s", r["backlog"],
             r["drain_seconds"]),
        Line("cores busy while they submit: the engine's process", r["engine_cores"], "cores"),
        Line("cores busy while they submit: Postgres", r["server_cores"], "cores"),
        Line("cores busy while they submit: the producers", r["producer_cores"], "cores"),
    ]
    most = r.get("ceiling")
    if most is not None:
        lines += [
            Line("CPU per item drained (the drain: engine + Postgres)", most["drain_cpu_us"],
                 "us"),
            Line("CPU per item submitted (the rest of the window's CPU)",
                 most["submit_cpu_us"], "us"),
            Line("ceiling: completions held to submissions, on the cores busy here",
                 most["ratio"] * drain, "items/s"),
        ]
    checks = [
        Check("completion rate under overload / drain rate", r["completion_rate"] / drain,
              TARGET),
        *([Check("ceiling / drain rate (this machine)", most["ratio"], None)]
          if most is not None else []),
        Check("producers reached / asked for", r["submit_rate"] / r["asked_rate"], None),
        Check("items completed / submitted", r["completed"] / max(1, r["submitted"]), 1.0),
        Check("items run twice", r["run_twice"], 0, "<="),
    ]
    return Section(
        "overload", "overload: producers in other processes submit faster than the engine drains",
        [f"drain: {args.drain} items submitted first, then one engine (concurrency 64, no-op "
         "faculty) drains them; its rate between 10% and 90% of them completed",
         f"overload: the same engine, empty queue; {args.producers} producer processes submit "
         f"{args.factor:g} x the drain rate between them for {args.seconds:g} s, "
         f"{args.batch} items a submit_many, on a schedule",
         f"completion rate over the producers' window after its first {WARMUP:.0%}"],
        lines=lines, checks=checks,
        notes=[f"the machine has {os.cpu_count()} cores: the producers' CPU is taken from "
               "the engine's and Postgres's when all are busy",
               "ceiling: the cores the three kept busy in the window, divided by what an item "
               "costs submitted and drained (each as measured in this run): the completion "
               "rate were submissions held to it, the most an admission limit could give"])


async def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    settings = Settings.from_env()
    url = await resolve_url(settings)
    server = Server(url)
    database = await describe_database(server, args.database)
    load_before = load()
    with tempfile.TemporaryDirectory(prefix="animus-bench-overload-") as tmp:
        print(f"  drain of {args.drain} items...", file=sys.stderr, flush=True)
        drain, drain_cpu = await drain_rate(server, args.database, Path(tmp) / "drain",
                                            args.drain)
        rate = drain * args.factor
        print(f"  overload: {rate:.0f} items/s for {args.seconds:g} s...", file=sys.stderr,
              flush=True)
        result = await overload(server, args.database, Path(tmp) / "overload", rate,
                                args.seconds, args.producers, args.batch)
    result["ceiling"] = ceiling(drain, drain_cpu, result)
    report_section = section(drain, result, args)
    report_section.notes.append(f"load {load_before} -> {load()}")
    return {
        "benchmark": "overload", "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": {"drain": args.drain, "seconds": args.seconds, "factor": args.factor,
                   "producers": args.producers, "batch": args.batch},
        "machine": machine(),
        "database": {"where": "DATABASE_URL" if settings.database_url else
                     f"embedded server in {settings.home}", "server": describe_url(url),
                     **database},
        "sections": {"overload": report_section.to_json()},
        "total_seconds": round(time.monotonic() - started, 3),
    }


def render(report: dict[str, Any]) -> str:
    return render_report("animus overload benchmark (bench_overload)", report)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_overload",
                                description="producers at twice the drain rate")
    p.add_argument("--drain", type=int, default=10_000,
                   help="items of the drain that measures the engine (default 10000)")
    p.add_argument("--seconds", type=float, default=10.0,
                   help="how long the producers submit (default 10)")
    p.add_argument("--factor", type=float, default=2.0,
                   help="the producers' rate, a multiple of the drain rate (default 2)")
    p.add_argument("--producers", type=int, default=2, help="producer processes (default 2)")
    p.add_argument("--batch", type=int, default=50,
                   help="items each producer submits a call (default 50)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers here")
    p.add_argument("--database", default=DEFAULT_PREFIX, metavar="PREFIX",
                   help=f"prefix of the databases dropped and created (default {DEFAULT_PREFIX})")
    # a producer process (started by the benchmark itself)
    p.add_argument("--produce", metavar="URL", help=argparse.SUPPRESS)
    p.add_argument("--rate", type=float, help=argparse.SUPPRESS)
    p.add_argument("--tag", default="0", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.drain < 1 or args.seconds <= 0 or args.factor <= 0 or args.producers < 1 \
            or args.batch < 1:
        p.error("--drain, --seconds, --factor, --producers and --batch must be positive")
    if args.produce and (args.rate is None or args.rate <= 0):
        p.error("--produce needs a positive --rate")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.produce:
        made = loop.run(produce(args.produce, args.rate, args.seconds, args.batch, args.tag))
        print(json.dumps(made))
        return 0
    report = loop.run(run(args))
    return publish(render(report), report, args.json)


if __name__ == "__main__":
    sys.exit(main())
