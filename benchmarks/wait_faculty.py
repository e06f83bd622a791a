"""The faculty of the waiting benchmark (benchmarks/bench_waits.py), loaded by ``animus up``
through an ``animus`` entry point the benchmark writes.

``bench-waits`` runs ``params["op"]``: ``"wait"`` waits for the signal ``go``,
``"sleep"`` sleeps ``params["s"]`` seconds. When ``params["mark"]`` is true, the attempt
that resumes (attempt 2 on) first appends a line to the file ``ANIMUS_BENCH_WAITS_MARKS``
names, as its ``engage`` starts: the work id, the system-wide monotonic clock (comparable
between processes on one machine), the wall clock, and the end of the wait it resumes from
(its ``until``, or ``-``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from animus_core import Faculty, Focus, hookimpl

__all__ = ["MARKS_ENV", "BenchWaiter", "register_faculties"]

MARKS_ENV = "ANIMUS_BENCH_WAITS_MARKS"
MAX_CONCURRENT = 256


class BenchWaiter(Faculty):
    name = "bench-waits"
    accepts = ("bench.wait",)
    max_concurrent = MAX_CONCURRENT

    def __init__(self) -> None:
        self._fd: int | None = None

    async def orient(self, focus: Focus) -> Any:  # async: no worker thread
        return None

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        params = focus.params
        if focus.attempt > 1 and params.get("mark"):
            mono, wall = time.clock_gettime(time.CLOCK_MONOTONIC), time.time()
            wait = focus.work.wait or {}
            self._mark(f"{focus.work.id} {mono:.6f} {wall:.6f} {wait.get('until') or '-'}\n")
        if params["op"] == "sleep":
            await focus.sleep(float(params["s"]))
        else:
            await focus.wait_for("go")
        return None

    async def consolidate(self, focus: Focus, engaged: Any) -> Any:
        return None

    def _mark(self, line: str) -> None:
        if self._fd is None:
            self._fd = os.open(os.environ[MARKS_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                               0o644)
        os.write(self._fd, line.encode())  # one write of a short line: never torn


def parse_mark(line: str) -> tuple[str, float, float, datetime | None] | None:
    """``(work_id, monotonic, wall, until)`` of one line the faculty wrote, None if torn."""
    parts = line.split()
    if len(parts) != 4:
        return None
    until = None if parts[3] == "-" else datetime.fromisoformat(parts[3])
    return parts[0], float(parts[1]), float(parts[2]), until


@hookimpl
def register_faculties(register: Callable[[Faculty], None]) -> None:
    register(BenchWaiter())
