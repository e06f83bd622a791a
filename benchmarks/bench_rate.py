"""Whether a faculty's ``rate_limit`` is the rate its backlog starts at: the achieved start
rate of a no-op faculty against the configured one.

    .venv/bin/python -m benchmarks.bench_rate [--quick] [--json PATH]

For each configured rate, a backlog of items is submitted before an engine starts (in this
process, fallback poll one minute, so only the engine's own timers can pace it), and the
engage start of every focus is taken on the event loop's clock. The bucket starts full
(``rate`` foci at once, at least one); the achieved rate is measured after that burst:
``(n - burst - 1) / (last start - start of the first after the burst)``. Target: within
5% of the configured rate.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from animus_core import Faculty, Focus, NewWorkItem, State
from animus_core.infra import loop
from animus_core.infra.config import Settings
from animus_core.store.db import Db, resolve_url
from animus_core.testing import OPTIONS, run_faculties
from benchmarks.bench_engine import Server, fresh_animus_db, machine

DEFAULT_PREFIX = "animus_bench_rate"
#: (configured rate per second, items): about ten seconds each
CASES = ((2.0, 22), (20.0, 220))
QUICK = ((10.0, 16),)


class Paced(Faculty):
    name = "bench-rate"
    accepts = ("bench.rate",)
    max_concurrent = 256

    def __init__(self, rate: float) -> None:
        self.rate_limit = rate  # type: ignore[misc]
        self.started: list[float] = []

    async def orient(self, focus: Focus) -> Any:  # async: no worker thread
        return None

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        self.started.append(asyncio.get_running_loop().time())
        return None

    async def consolidate(self, focus: Focus, engaged: Any) -> Any:
        return None


async def one(url: str, rate: float, n: int) -> dict[str, Any]:
    db = await Db.connect(url, min_size=1, max_size=2, actor="bench-rate")
    try:
        ids = [r.id for r in await db.submit_many(
            [NewWorkItem("bench.rate").params({"i": i}) for i in range(n)])]
    finally:
        await db.close()
    fac = Paced(rate)
    with tempfile.TemporaryDirectory(prefix="animus-bench-rate-") as home:
        async with run_faculties([fac], home=Path(home), database_url=url,
                                 options=dataclasses.replace(OPTIONS, poll_interval=60.0)
                                 ) as animus:
            for wid in ids:
                item = await animus.animus.wait_finished(wid, timeout=n / rate + 30)
                if item.state != State.COMPLETED:
                    raise RuntimeError(f"{wid} ended {item.state}: {item.reason}")
    burst = max(1, math.floor(rate))
    t = sorted(fac.started)
    achieved = (n - burst - 1) / (t[-1] - t[burst])
    return {"configured": rate, "items": n, "burst": burst, "achieved": round(achieved, 3),
            "ratio": round(achieved / rate, 4), "met": abs(achieved / rate - 1) <= 0.05}


async def run(cases: Sequence[tuple[float, int]], prefix: str) -> dict[str, Any]:
    load = os.getloadavg()
    server = Server(await resolve_url(Settings.from_env()))
    results = []
    for i, (rate, n) in enumerate(cases):
        url = await fresh_animus_db(server, f"{prefix}_{i}")
        results.append(await one(url, rate, n))
    return {"benchmark": "rate", "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": {**machine(), "load_average_start": [round(x, 2) for x in load],
                        "load_average_end": [round(x, 2) for x in os.getloadavg()]},
            "results": results}


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = ["animus rate-limit benchmark (bench_rate)",
             f"  load avg    {' '.join(map(str, m['load_average_start']))} at the start, "
             f"{' '.join(map(str, m['load_average_end']))} at the end",
             "  a backlog per case, submitted before the engine starts (fallback poll 60 s)",
             "",
             f"  {'configured /s':>14} {'items':>6} {'achieved /s':>12} {'ratio':>7}  "
             "within 5%"]
    for r in report["results"]:
        lines.append(f"  {r['configured']:>14g} {r['items']:>6} {r['achieved']:>12.3f} "
                     f"{r['ratio']:>7.4f}  {'yes' if r['met'] else 'NO'}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_rate", description=__doc__)
    p.add_argument("--quick", action="store_true", help="one short case (a smoke run)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers here")
    p.add_argument("--database", default=DEFAULT_PREFIX, metavar="PREFIX",
                   help="prefix of the databases dropped and created")
    args = p.parse_args(argv)
    report = loop.run(run(QUICK if args.quick else CASES, args.database))
    print(render(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if all(r["met"] for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
