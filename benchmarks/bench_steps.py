"""What a durable step costs: an engine drains items whose focus runs 10 no-op steps, beside
the same items with no step, and (when it is installed) DBOS Transact runs a workflow of 10
no-op steps, on the same database in the same run.

    .venv/bin/python -m benchmarks.bench_steps [--n N] [--steps K] [--json PATH]

Each step is one durable commit (the result and its audit row, in one round trip); the
first step of a focus also reads the item's record (one query). Compare the ratios across
runs; the absolute numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from animus_core.faculties.faculty import Faculty
from animus_core.faculties.focus import Focus
from animus_core.infra import loop
from animus_core.infra.config import Settings
from animus_core.runtime.engine import EngineOptions
from animus_core.store.db import Db, describe_url, resolve_url
from animus_core.values.work import NewWorkItem
from benchmarks.bench_engine import (
    ENGINE_POOL,
    LEASE_SECONDS,
    Check,
    Line,
    Section,
    Server,
    checkpoint,
    clock,
    describe_database,
    fresh_animus_db,
    latency_lines,
    machine,
    package_version,
    publish,
    rate_line,
    ratio_check,
    render_report,
    running_engine,
    submit_all,
    wait_done,
)

DEFAULT_PREFIX = "animus_bench_steps"
CONCURRENCY = 64  # foci (and DBOS workflows) at once


@dataclass(frozen=True)
class Config:
    n: int = 2_000  # items (and DBOS workflows) per path
    k: int = 10  # steps per item

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "k": self.k, "concurrency": CONCURRENCY}


async def _noop() -> None:
    return None


class StepFaculty(Faculty):
    """Runs ``k`` no-op steps per item (none for ``k = 0``), timing each ``step`` call."""

    name = "bench-steps"
    accepts = ("bench.steps",)
    max_concurrent = CONCURRENCY

    def __init__(self, k: int) -> None:
        self.k = k
        self.latencies: list[float] = []

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        for i in range(self.k):
            t0 = clock()
            await focus.step(f"s{i}", _noop)
            self.latencies.append(clock() - t0)
        return None


async def drain(server: Server, prefix: str, home: Path, cfg: Config,
                k: int) -> tuple[Line, list[float]]:
    """Items with ``k`` steps each, submitted first, then drained by an engine."""
    url = await fresh_animus_db(server, f"{prefix}_{k}")
    client = await Db.connect(url, min_size=1, max_size=2, actor="bench-submitter")
    try:
        await submit_all(client, [NewWorkItem("bench.steps", source="bench").params({"i": i})
                                  for i in range(cfg.n)])
        await client.seal_audit()
    finally:
        await client.close()
    await checkpoint(url)
    faculty = StepFaculty(k)
    options = EngineOptions(concurrency=CONCURRENCY, lease_seconds=LEASE_SECONDS)
    async with running_engine(url, home / f"k{k}", options, faculties=[faculty],
                              expect=cfg.n) as run:
        seconds = await wait_done(run)
    label = f"animus engine, {k} no-op steps per item" if k else "animus engine, no step"
    return rate_line(label, cfg.n, seconds), faculty.latencies


async def dbos_drain(url: str, cfg: Config) -> tuple[Line, list[float]]:
    """DBOS Transact: ``n`` workflows of ``k`` no-op async steps, ``CONCURRENCY`` at once,
    its system tables in schema ``dbos`` of the same database."""
    from dbos import DBOS

    latencies: list[float] = []
    DBOS(config={"name": "animus-bench-steps", "system_database_url": url,
                 "sys_db_pool_size": ENGINE_POOL, "log_level": "WARNING"})

    @DBOS.step()
    async def noop_step() -> None:
        return None

    @DBOS.workflow()
    async def flow(k: int) -> None:
        for _ in range(k):
            t0 = clock()
            await noop_step()
            latencies.append(clock() - t0)

    # DBOS's async API runs its database calls in the loop's default executor: give it a
    # thread per workflow in flight (the default, cores + 4, would throttle it)
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(CONCURRENCY))
    try:
        DBOS.launch()
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one() -> None:
            async with gate:  # called directly: it runs here, durably, and nothing polls
                await flow(cfg.k)

        await one()  # warm up: the first workflow pays for DBOS's own start
        latencies.clear()
        t0 = clock()
        await asyncio.gather(*(one() for _ in range(cfg.n)))
        seconds = clock() - t0
    finally:
        DBOS.destroy(destroy_registry=True)
    return rate_line(f"DBOS Transact {package_version('dbos')}, {cfg.k} no-op steps per "
                     "workflow", cfg.n, seconds), latencies


def step_lines(label: str, items: Line, k: int, latencies: list[float]) -> list[Line]:
    """Steps per second, and the latency of one step call (p50, p99, max)."""
    if items.value is None or not latencies:
        return []
    rate = Line(f"{label}: steps", items.value * k, "steps/s", (items.items or 0) * k,
                items.seconds)
    return [rate, *latency_lines(f"{label}: one step", [s * 1000 for s in latencies])]


async def bench(server: Server, cfg: Config, prefix: str, home: Path) -> Section:
    none, _ = await drain(server, prefix, home, cfg, 0)
    ours, latencies = await drain(server, prefix, home, cfg, cfg.k)
    lines = [none, ours, *step_lines("animus", ours, cfg.k, latencies)]
    # what a step adds to an item, at this concurrency: (1/with - 1/without) / k, in ms
    added = ((1 / ours.value - 1 / none.value) / cfg.k * CONCURRENCY * 1000
             if ours.value and none.value else None)
    lines.append(Line("animus: time a step adds to its focus (from the two rates)", added,
                      "ms", cfg.n))
    checks: list[Check] = [ratio_check("items with steps / items without (context)", ours,
                                       none, None)]
    notes = [f"the first step of each focus also reads the item's steps (one query); the "
             f"{cfg.k} steps of a focus run one after the other, {CONCURRENCY} foci at once"]
    if package_version("dbos") == "not installed":
        notes.append("DBOS Transact is not installed (pip install dbos): no comparison")
    else:
        url = await fresh_animus_db(server, f"{prefix}_dbos")
        await checkpoint(url)
        try:
            theirs, dbos_latencies = await dbos_drain(url, cfg)
        except Exception as e:  # a peer that cannot run is reported, never faked
            notes.append(f"DBOS Transact did not run: {type(e).__name__}: {e}"[:300])
        else:
            lines += [theirs, *step_lines("DBOS", theirs, cfg.k, dbos_latencies)]
            checks.append(ratio_check("animus steps/s / DBOS steps/s", ours, theirs, 1.0))
            notes.append("DBOS runs in this process on its own pool (as many connections as "
                         "the engine's), its system tables in schema dbos of an animus "
                         "database on the same server; it has no queue, lease or audit row")
    return Section("steps", f"durable steps: {cfg.k} no-op steps per item, n={cfg.n}",
                   [f"n={cfg.n} items per path, submitted beforehand; engine concurrency "
                    f"{CONCURRENCY}, faculty max_concurrent {CONCURRENCY}, pool {ENGINE_POOL}",
                    "step latency: the time of each `await focus.step(...)` call (DBOS: each "
                    "step call inside its workflow)"],
                   lines=lines, checks=checks, notes=notes)


async def run(cfg: Config, prefix: str) -> dict[str, Any]:
    started = clock()
    settings = Settings.from_env()
    url = await resolve_url(settings)
    where = "DATABASE_URL" if settings.database_url else f"embedded server in {settings.home}"
    server = Server(url)
    with tempfile.TemporaryDirectory(prefix="animus-bench-steps-") as tmp:
        database = await describe_database(server, prefix)
        t0 = clock()
        section = await bench(server, cfg, prefix, Path(tmp))
        section.seconds = clock() - t0
    return {"benchmark": "steps", "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "config": {**cfg.to_json(), "database_prefix": prefix}, "machine": machine(),
            "database": {"where": where, "server": describe_url(url), **database},
            "peers": {"dbos": package_version("dbos")},
            "sections": {"steps": section.to_json()},
            "total_seconds": round(clock() - started, 3)}


def render(report: dict[str, Any]) -> str:
    return render_report("animus durable step benchmark (bench_steps)", report,
                         f"  peers       dbos {report['peers']['dbos']}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_steps",
                                description="the cost of durable steps, against items without "
                                            "steps and DBOS Transact, in the same run")
    p.add_argument("--n", type=int, default=Config.n, help="items per path (default 2000)")
    p.add_argument("--steps", type=int, default=Config.k, help="steps per item (default 10)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers here")
    p.add_argument("--database", default=DEFAULT_PREFIX, metavar="PREFIX",
                   help=f"prefix of the databases dropped and created (default {DEFAULT_PREFIX})")
    args = p.parse_args(argv)
    if args.n < 1 or args.steps < 1:
        p.error("--n and --steps must be at least 1")
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,40}", args.database):
        p.error("--database must be a plain lower-case name (letters, digits, _), at most 41")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = loop.run(run(Config(n=args.n, k=args.steps), args.database))
    return publish(render(report), report, args.json)


if __name__ == "__main__":
    sys.exit(main())
