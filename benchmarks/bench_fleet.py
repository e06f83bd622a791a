"""Scale-out: 1, 2 and 4 engine processes on one Postgres over the same backlog of I/O-bound
foci, against the ideal.

    .venv/bin/python -m benchmarks.bench_fleet [--engines 1,2,4] [--concurrency C]
        [--seconds S] [--work W] [--json PATH]

For each engine count E, on a fresh database of the embedded server (or of the server
``DATABASE_URL`` names): E ``python -m animus_core up --concurrency C`` processes run the
``bench-fleet`` faculty of benchmarks/fleet_faculty.py (engage waits W seconds, 0.2 by
default, as a call to a model would), over a backlog of E x C x S / W items submitted once all
E listen. Measured between 10% and 90% of the backlog completed:

* throughput, against the ideal E x C / W (every slot always busy);
* the database connections each engine holds, and the transactions per second each causes
  (``pg_stat_database``, the whole database, divided by E);
* CPU per item of the engines and of Postgres (``/proc``), and the machine's load.

Target (issue: a fleet on Kubernetes): 4 engines reach at least 90% of ideal with 64
concurrency each. Every item must complete exactly once (one execution record each).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from animus_core.infra import loop
from animus_core.infra.config import Settings
from animus_core.store.db import Db, describe_url, resolve_url
from animus_core.values.work import NewWorkItem
from benchmarks.bench_engine import (
    Check,
    CpuMeter,
    Line,
    Section,
    Server,
    _proc_stat,
    describe_database,
    fresh_animus_db,
    machine,
    publish,
    render_report,
    xacts,
)
from tests.engine_helpers import EngineProcess, plugin_site, wait_listening, wait_until

ROOT = Path(__file__).resolve().parent.parent
WORK_TYPE = "bench.fleet"
SUBMIT_BATCH = 1000
DEFAULT_PREFIX = "animus_bench_fleet"
TARGET = 0.90  # of ideal, at 4 engines


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user and system) a process used so far; 0 once it is gone."""
    fields = _proc_stat(pid)
    return 0.0 if fields is None else \
        (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


@contextlib.asynccontextmanager
async def fleet(url: str, work: Path, engines: int, concurrency: int, *,
                module: str = "benchmarks.fleet_faculty", plugin: str = "benchfleet",
                args: Sequence[str] = (), env: dict[str, str] | None = None,
                ) -> AsyncIterator[list[EngineProcess]]:
    """``engines`` processes of ``animus up --concurrency C`` (and ``args``), with the
    faculties of ``module`` (the bench-fleet faculty by default) and ``env`` added to
    theirs, all listening."""
    site = plugin_site(work, module, plugin)
    (work / "faculties").mkdir()
    environ = {k: v for k, v in os.environ.items()
               if k not in ("ANIMUS_DISABLE_PLUGIN_AUTOLOAD", "OTEL_ENDPOINT")}
    environ.update(DATABASE_URL=url, ANIMUS_HOME=str(work / "home"), ANIMUS_PLUGINS=plugin,
                   ANIMUS_FACULTIES=str(work / "faculties"), LOG_LEVEL="warning",
                   PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]), **(env or {}))
    procs = [EngineProcess(["--concurrency", str(concurrency), *args], environ, work,
                           work / f"engine-{i}.log") for i in range(engines)]
    try:
        await wait_listening(url, procs, timeout=90)
        yield procs
    finally:
        for p in procs:
            p.signal(signal.SIGTERM)
        for p in procs:
            with contextlib.suppress(AssertionError):
                await p.wait(60)
            p.close()


async def completed(conn: asyncpg.Connection) -> int:
    n: int = await conn.fetchval("SELECT count(*) FROM animus.work_items "
                                 "WHERE state = 'completed'")
    return n


async def _all_done(conn: asyncpg.Connection, backlog: int) -> bool:
    return await completed(conn) >= backlog


async def connections(conn: asyncpg.Connection) -> int:
    n: int = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name IN ('animus', 'animus-listener')")
    return n


async def one_count(server: Server, prefix: str, work: Path, engines: int, concurrency: int,
                    seconds: float, wait: float) -> dict[str, Any]:
    url = await fresh_animus_db(server, f"{prefix}_{engines}")
    ideal = engines * concurrency / wait
    backlog = int(ideal * seconds)
    meter = await CpuMeter.for_server(url)
    client = await Db.connect(url, min_size=1, max_size=2, actor="bench")
    watch = await asyncpg.connect(url)
    dbname = await watch.fetchval("SELECT current_database()")
    try:
        async with fleet(url, work, engines, concurrency) as procs:
            load_before = load()
            base = NewWorkItem(WORK_TYPE, source="bench")
            for i in range(0, backlog, SUBMIT_BATCH):
                await client.submit_many([base.params({"s": wait, "i": j})
                                          for j in range(i, min(i + SUBMIT_BATCH, backlog))])
            low, high = int(backlog * 0.1), int(backlog * 0.9)
            t_low = t_high = None
            marks: dict[str, Any] = {}
            deadline = time.monotonic() + seconds * 10 + 60
            while time.monotonic() < deadline:
                done = await completed(watch)
                now = time.monotonic()
                if t_low is None and done >= low:
                    t_low, done_low = now, done
                    marks = {"xacts": await xacts(watch, dbname), "cpu": meter.read(),
                             "engine_cpu": sum(_proc_cpu(p.pid) for p in procs)}
                    conns = await connections(watch)
                if t_low is not None and done >= high:
                    t_high, done_high = now, done
                    x = await xacts(watch, dbname)
                    cpu = meter.read()
                    engine_cpu = sum(_proc_cpu(p.pid) for p in procs)
                    break
                await asyncio.sleep(0.1)  # the count is the benchmark's own load: not too often
            if t_low is None or t_high is None:
                raise RuntimeError(f"{engines} engines did not get through the backlog in time")
            load_after = load()
            await wait_until(lambda: _all_done(watch, backlog), max(1.0, deadline -
                                                                    time.monotonic()),
                             message="the rest of the backlog")
        span = t_high - t_low
        items = done_high - done_low
        twice = await watch.fetchval(
            "SELECT count(*) FROM (SELECT work_id FROM animus.execution_records "
            "GROUP BY work_id HAVING count(*) > 1) x")
        finished = await completed(watch)
        server_cpu = None if cpu[1] is None or marks["cpu"][1] is None \
            else (cpu[1] - marks["cpu"][1]) / items * 1e6
        return {
            "engines": engines, "concurrency": concurrency, "backlog": backlog,
            "throughput": items / span, "ideal": ideal, "of_ideal": items / span / ideal,
            "seconds": span, "items": items,
            "connections_per_engine": conns / engines,
            "xacts_per_engine": (x - marks["xacts"]) / span / engines,
            "engine_cpu_us_per_item": (engine_cpu - marks["engine_cpu"]) / items * 1e6,
            "server_cpu_us_per_item": server_cpu,
            "completed": finished, "run_twice": twice,
            "load": f"{load_before} -> {load_after}",
        }
    finally:
        await watch.close()
        await client.close()


def section(results: list[dict[str, Any]], wait: float) -> Section:
    lines = []
    for r in results:
        e = r["engines"]
        lines += [
            Line(f"{e} engine(s): throughput", r["throughput"], "items/s", r["items"],
                 r["seconds"]),
            Line(f"{e} engine(s): ideal ({e} x {r['concurrency']} / {wait:g} s)", r["ideal"],
                 "items/s"),
            Line(f"{e} engine(s): of ideal", r["of_ideal"] * 100, "%"),
            Line(f"{e} engine(s): connections per engine", r["connections_per_engine"], ""),
            Line(f"{e} engine(s): transactions/s per engine", r["xacts_per_engine"], "per s"),
            Line(f"{e} engine(s): engine CPU per item", r["engine_cpu_us_per_item"], "us"),
            Line(f"{e} engine(s): Postgres CPU per item", r["server_cpu_us_per_item"], "us"),
        ]
    checks = [Check(f"{r['engines']} engine(s): of ideal", r["of_ideal"],
                    TARGET if r["engines"] == 4 else None) for r in results]
    checks += [Check(f"{r['engines']} engine(s): items run twice", r["run_twice"], 0, "<=")
               for r in results]
    notes = [f"{r['engines']} engine(s): load {r['load']}; {r['completed']}/{r['backlog']} "
             "completed" for r in results]
    bends = [r for r in results if r["of_ideal"] < TARGET]
    notes.append("the curve bends at " + (f"{bends[0]['engines']} engines ("
                                         f"{bends[0]['of_ideal'] * 100:.0f}% of ideal)"
                                         if bends else "none of these counts"))
    return Section("fleet", "scale-out: engines over one Postgres, I/O-bound foci",
                   [f"each focus waits {wait:g} s in engage (asyncio.sleep), as a model call "
                    "would; throughput between 10% and 90% of the backlog completed",
                    "ideal: every slot of every engine always busy"],
                   lines=lines, checks=checks, notes=notes)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    settings = Settings.from_env()
    url = await resolve_url(settings)
    server = Server(url)
    results = []
    with tempfile.TemporaryDirectory(prefix="animus-bench-fleet-") as tmp:
        database = await describe_database(server, args.database)
        for engines in args.engines:
            print(f"  {engines} engine(s)...", file=sys.stderr, flush=True)
            results.append(await one_count(server, args.database, Path(tmp) / str(engines),
                                           engines, args.concurrency, args.seconds, args.work))
    return {
        "benchmark": "fleet", "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": {"engines": args.engines, "concurrency": args.concurrency,
                   "seconds": args.seconds, "work": args.work},
        "machine": machine(),
        "database": {"where": "DATABASE_URL" if settings.database_url else
                     f"embedded server in {settings.home}", "server": describe_url(url),
                     **database},
        "sections": {"fleet": section(results, args.work).to_json()},
        "total_seconds": round(time.monotonic() - started, 3),
    }


def render(report: dict[str, Any]) -> str:
    return render_report("animus fleet benchmark (bench_fleet)", report)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_fleet",
                                description="engines over one Postgres, against the ideal")
    p.add_argument("--engines", default="1,2,4", help="engine counts (default 1,2,4)")
    p.add_argument("--concurrency", type=int, default=64, help="--concurrency of each engine")
    p.add_argument("--seconds", type=float, default=10.0,
                   help="the backlog lasts this long at the ideal rate (default 10)")
    p.add_argument("--work", type=float, default=0.2, help="seconds each focus waits")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers here")
    p.add_argument("--database", default=DEFAULT_PREFIX, metavar="PREFIX",
                   help=f"prefix of the databases dropped and created (default {DEFAULT_PREFIX})")
    args = p.parse_args(argv)
    args.engines = [int(x) for x in args.engines.split(",") if x.strip()]
    if not args.engines or min(args.engines) < 1 or args.concurrency < 1 or args.work <= 0:
        p.error("--engines, --concurrency and --work must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = loop.run(run(args))
    return publish(render(report), report, args.json)


if __name__ == "__main__":
    sys.exit(main())
