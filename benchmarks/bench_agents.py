"""Agent-scale concurrency: one engine with thousands of foci in flight, each waiting as a
call to a model would.

    .venv/bin/python -m benchmarks.bench_agents [--foci F] [--work W] [--seconds S]
        [--lease L] [--cpython-gc] [--json PATH]

One ``python -m animus_core up --concurrency F --lease L`` process (with ``--cpython-gc``, to
compare the engine's schedule of full garbage collections with CPython's own) runs the ``bench-agents``
faculty of benchmarks/agent_faculty.py (engage waits W seconds, 2 by default), on a fresh
database of the embedded server (or of the server ``DATABASE_URL`` names), over a backlog of
F x S / W items (S seconds at the ideal rate). Measured between 10% and 90% of the backlog
completed:

* throughput, against the ideal F / W (every slot always busy);
* the engine's memory: its RSS idle before the backlog, and the most it reached;
* lease keeping: the calls of ``animus.extend_leases`` per second (counted by Postgres,
  ``track_functions``), each a batch of every lease the engine holds; each pass of the lease
  keeper also reads the cancel requests of what it holds (one more query);
* the event loop's lag: a task in the engine sleeps 10 ms over and over and notes how late
  it wakes (the largest lag, and the 99th percentile);
* leases that lapsed: attempts taken back (an item with more than one attempt or execution
  record); and the first warnings of the engine's log.

Targets (issue: performance at the shape of real work): 5,000 foci of 2 s reach at least 90%
of ideal (2,500 items/s), RSS under 500 MB, lease keeping at most 20 queries/s, no loop stall
over 50 ms, no lease lapsing. Every item must complete exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from animus_core.infra import loop
from animus_core.infra.config import Settings
from animus_core.store.db import Db, describe_url, resolve_url
from animus_core.values.work import NewWorkItem
from benchmarks.agent_faculty import LAG_ENV, parse_lag
from benchmarks.bench_engine import (
    Check,
    CpuMeter,
    Line,
    Section,
    Server,
    describe_database,
    fresh_animus_db,
    machine,
    publish,
    render_report,
)
from benchmarks.bench_fleet import _proc_cpu, completed, connections, fleet, load

WORK_TYPE = "bench.agent"
SUBMIT_BATCH = 1000
DEFAULT_PREFIX = "animus_bench_agents"
TARGETS = {"of_ideal": 0.90, "rss_mib": 500.0, "lease_queries": 20.0, "lag_ms": 50.0}


def rss_mib(pid: int) -> float:
    """The resident memory of a process now, MiB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


async def extend_calls(conn: asyncpg.Connection) -> int:
    """Calls of animus.extend_leases so far (counted once track_functions is on; none yet
    is no row)."""
    n: int | None = await conn.fetchval(
        "SELECT calls FROM pg_stat_user_functions WHERE schemaname = 'animus' "
        "AND funcname = 'extend_leases'")
    return n or 0


async def measure(server: Server, prefix: str, work: Path, foci: int, wait: float,
                  seconds: float, lease: int, cpython_gc: bool = False) -> dict[str, Any]:
    url = await fresh_animus_db(server, f"{prefix}_run")
    ideal = foci / wait
    backlog = int(ideal * seconds)
    admin = await asyncpg.connect(url)
    try:  # counted by Postgres for the engine's sessions, which start after this
        dbname = await admin.fetchval("SELECT current_database()")
        await admin.execute(f'ALTER DATABASE "{dbname}" SET track_functions = \'pl\'')
        counted = True
    except asyncpg.InsufficientPrivilegeError:
        counted = False
    finally:
        await admin.close()
    meter = await CpuMeter.for_server(url)
    client = await Db.connect(url, min_size=1, max_size=2, actor="bench")
    watch = await asyncpg.connect(url)
    lag_file = work / "lag.txt"
    try:
        async with fleet(url, work, 1, foci, module="benchmarks.agent_faculty",
                         plugin="benchagents",
                         args=["--lease", str(lease), *(["--cpython-gc"] if cpython_gc else [])],
                         env={LAG_ENV: str(lag_file)}) as procs:
            engine = procs[0]
            await asyncio.sleep(1.0)
            rss_idle = rss_mib(engine.pid)
            load_before = load()
            base = NewWorkItem(WORK_TYPE, source="bench")
            for i in range(0, backlog, SUBMIT_BATCH):
                await client.submit_many([base.params({"s": wait, "i": j})
                                          for j in range(i, min(i + SUBMIT_BATCH, backlog))])
            low, high = int(backlog * 0.1), int(backlog * 0.9)
            t_low = t_high = None
            rss_peak = rss_idle
            deadline = time.monotonic() + seconds * 10 + 60
            while time.monotonic() < deadline:
                rss_peak = max(rss_peak, rss_mib(engine.pid))
                done = await completed(watch)
                now = time.monotonic()
                if t_low is None and done >= low:
                    t_low, done_low = now, done
                    cpu_low, engine_low = meter.read(), _proc_cpu(engine.pid)
                    calls_low = await extend_calls(watch)
                    conns = await connections(watch)
                if t_low is not None and done >= high:
                    t_high, done_high = now, done
                    cpu_high, engine_high = meter.read(), _proc_cpu(engine.pid)
                    calls_high = await extend_calls(watch)
                    break
                await asyncio.sleep(0.1)
            if t_low is None or t_high is None:
                raise RuntimeError("the engine did not get through the backlog in time")
            load_after = load()
            while await completed(watch) < backlog and time.monotonic() < deadline:
                rss_peak = max(rss_peak, rss_mib(engine.pid))
                await asyncio.sleep(0.2)
        log = engine_log(work)
        span = t_high - t_low
        items = done_high - done_low
        retaken = await watch.fetchval(
            "SELECT count(*) FROM animus.work_items WHERE attempts > 1")
        twice = await watch.fetchval(
            "SELECT count(*) FROM (SELECT work_id FROM animus.execution_records "
            "GROUP BY work_id HAVING count(*) > 1) x")
        finished = await completed(watch)
        # each line covers the second before it: those that overlap the window
        lags = [lag for lag in (parse_lag(line) for line in lag_file.read_text().splitlines())
                if lag is not None and t_low <= lag[0] <= t_high + 1] if lag_file.exists() else []
        server_cpu = None if cpu_high[1] is None or cpu_low[1] is None \
            else (cpu_high[1] - cpu_low[1]) / items * 1e6
        extend_rate = (calls_high - calls_low) / span if counted else None
        return {
            "foci": foci, "work": wait, "lease": lease, "backlog": backlog,
            "throughput": items / span, "ideal": ideal, "of_ideal": items / span / ideal,
            "seconds": span, "items": items, "connections": conns,
            "rss_idle_mib": rss_idle, "rss_peak_mib": rss_peak,
            "extend_calls_per_s": extend_rate,
            "lease_queries_per_s": None if extend_rate is None else 2 * extend_rate,
            "lag_max_ms": max((lag[2] for lag in lags), default=None),
            "lag_p99_ms": max((lag[3] for lag in lags), default=None),
            "lag_seconds": len(lags),
            "engine_cpu_us_per_item": (engine_high - engine_low) / items * 1e6,
            "server_cpu_us_per_item": server_cpu,
            "completed": finished, "retaken": retaken, "run_twice": twice,
            "warnings": [line for line in log.splitlines()
                         if " WARNING " in line or " ERROR " in line][:8],
            "load": f"{load_before} -> {load_after}",
        }
    finally:
        await watch.close()
        await client.close()


def engine_log(work: Path) -> str:
    with contextlib.suppress(OSError):
        return (work / "engine-0.log").read_text(errors="replace")
    return ""


def section(r: dict[str, Any]) -> Section:
    f, w = r["foci"], r["work"]
    lines = [
        Line("throughput", r["throughput"], "items/s", r["items"], r["seconds"]),
        Line(f"ideal ({f} foci / {w:g} s)", r["ideal"], "items/s"),
        Line("of ideal", r["of_ideal"] * 100, "%"),
        Line("engine RSS idle, before the backlog", r["rss_idle_mib"], "MiB"),
        Line("engine RSS, the most it reached", r["rss_peak_mib"], "MiB"),
        Line("lease keeping: extend_leases calls per second", r["extend_calls_per_s"], "per s"),
        Line("lease keeping: queries per second (extend + cancel requests)",
             r["lease_queries_per_s"], "per s"),
        Line("event loop lag, largest", r["lag_max_ms"], "ms"),
        Line("event loop lag, p99 (the worst second's)", r["lag_p99_ms"], "ms"),
        Line("Postgres connections of the engine", r["connections"], ""),
        Line("engine CPU per item", r["engine_cpu_us_per_item"], "us"),
        Line("Postgres CPU per item", r["server_cpu_us_per_item"], "us"),
    ]
    checks = [
        Check("of ideal", r["of_ideal"], TARGETS["of_ideal"]),
        Check("engine RSS, MiB", r["rss_peak_mib"], TARGETS["rss_mib"], "<=", "MiB"),
        Check("lease keeping queries/s", r["lease_queries_per_s"], TARGETS["lease_queries"],
              "<=", "per s"),
        Check("event loop lag, ms", r["lag_max_ms"], TARGETS["lag_ms"], "<=", "ms"),
        Check("attempts taken back (leases lapsed)", r["retaken"], 0, "<="),
        Check("items run twice", r["run_twice"], 0, "<="),
    ]
    notes = [f"load {r['load']}; {r['completed']}/{r['backlog']} completed; lease "
             f"{r['lease']} s (extended every {max(1.0, r['lease'] / 3):g} s); the loop's lag "
             f"over {r['lag_seconds']} seconds of the window"]
    notes += [f"engine log: {line[:300]}" for line in r["warnings"]]
    return Section("agents", f"agent-scale: {f} foci in flight in one engine, each waiting "
                   f"{w:g} s", [f"each focus waits {w:g} s in engage (asyncio.sleep), as a "
                                "model call would; measured between 10% and 90% of the "
                                "backlog completed", "ideal: every slot always busy"],
                   lines=lines, checks=checks, notes=notes)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    settings = Settings.from_env()
    url = await resolve_url(settings)
    server = Server(url)
    with tempfile.TemporaryDirectory(prefix="animus-bench-agents-") as tmp:
        database = await describe_database(server, args.database)
        result = await measure(server, args.database, Path(tmp), args.foci, args.work,
                               args.seconds, args.lease, args.cpython_gc)
    return {
        "benchmark": "agents", "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": {"foci": args.foci, "work": args.work, "seconds": args.seconds,
                   "lease": args.lease, "cpython_gc": args.cpython_gc},
        "machine": machine(),
        "database": {"where": "DATABASE_URL" if settings.database_url else
                     f"embedded server in {settings.home}", "server": describe_url(url),
                     **database},
        "sections": {"agents": section(result).to_json()},
        "total_seconds": round(time.monotonic() - started, 3),
    }


def render(report: dict[str, Any]) -> str:
    return render_report("animus agent-scale benchmark (bench_agents)", report)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_agents",
                                description="thousands of waiting foci in one engine")
    p.add_argument("--foci", type=int, default=5000, help="the engine's --concurrency")
    p.add_argument("--work", type=float, default=2.0, help="seconds each focus waits")
    p.add_argument("--seconds", type=float, default=10.0,
                   help="the backlog lasts this long at the ideal rate (default 10)")
    p.add_argument("--lease", type=int, default=6,
                   help="the engine's --lease, seconds (default 6: extended every 2 s, so "
                        "that leases are extended while foci wait)")
    p.add_argument("--cpython-gc", action="store_true",
                   help="run the engine with --cpython-gc: CPython's own full collections "
                        "instead of the engine's schedule (to compare)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers here")
    p.add_argument("--database", default=DEFAULT_PREFIX, metavar="PREFIX",
                   help=f"prefix of the databases dropped and created (default {DEFAULT_PREFIX})")
    args = p.parse_args(argv)
    if args.foci < 1 or args.work <= 0 or args.seconds <= 0 or args.lease < 1:
        p.error("--foci, --work, --seconds and --lease must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = loop.run(run(args))
    return publish(render(report), report, args.json)


if __name__ == "__main__":
    sys.exit(main())
