"""The faculty of the agent-scale benchmark (benchmarks/bench_agents.py), loaded by
``animus up`` through an ``animus`` entry point the benchmark writes.

``bench-agents`` waits ``params["s"]`` seconds in engage, as a call to a model would (I/O, no
CPU). From its first focus on, it also watches the engine's event loop: a task sleeps 10 ms
over and over and notes how late each wake-up is (the loop's lag), and once a second appends
a line to the file ``ANIMUS_BENCH_LAG`` names: the monotonic clock (system-wide, comparable
with the benchmark's), the samples of that second, their largest lag and their 99th
percentile, in milliseconds.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

from animus_core import Faculty, Focus, hookimpl

__all__ = ["LAG_ENV", "AgentWaiter", "parse_lag", "register_faculties"]

LAG_ENV = "ANIMUS_BENCH_LAG"
TICK = 0.010


class AgentWaiter(Faculty):
    name = "bench-agents"
    accepts = ("bench.agent",)
    max_concurrent = 10_000  # the most a faculty may have; the engine's --concurrency limits it

    def __init__(self) -> None:
        self._watch: asyncio.Task[None] | None = None

    async def orient(self, focus: Focus) -> Any:  # async: no worker thread
        if self._watch is None and os.environ.get(LAG_ENV):
            self._watch = asyncio.create_task(_watch_lag(os.environ[LAG_ENV]))
        return None

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        await asyncio.sleep(float(focus.params["s"]))
        return None

    async def consolidate(self, focus: Focus, engaged: Any) -> Any:
        return None


async def _watch_lag(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    lags: list[float] = []
    since = time.monotonic()
    while True:
        before = time.monotonic()
        await asyncio.sleep(TICK)
        now = time.monotonic()
        lags.append(max(0.0, now - before - TICK) * 1000)
        if now - since >= 1.0:
            lags.sort()
            p99 = lags[min(len(lags) - 1, int(len(lags) * 0.99))]
            os.write(fd, f"{now:.6f} {len(lags)} {lags[-1]:.3f} {p99:.3f}\n".encode())
            lags, since = [], now


def parse_lag(line: str) -> tuple[float, int, float, float] | None:
    """``(monotonic, samples, max_ms, p99_ms)`` of one line the faculty wrote; None if torn."""
    parts = line.split()
    if len(parts) != 4:
        return None
    return float(parts[0]), int(parts[1]), float(parts[2]), float(parts[3])


@hookimpl
def register_faculties(register: Callable[[Faculty], None]) -> None:
    register(AgentWaiter())
