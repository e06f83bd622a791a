"""The faculty of the fleet benchmark (benchmarks/bench_fleet.py), loaded by ``animus up``
through an ``animus`` entry point the benchmark writes: ``bench-fleet`` waits
``params["s"]`` seconds in engage, as a call to a model would (I/O, no CPU)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from animus_core import Faculty, Focus, hookimpl

__all__ = ["FleetWaiter", "register_faculties"]


class FleetWaiter(Faculty):
    name = "bench-fleet"
    accepts = ("bench.fleet",)
    max_concurrent = 1024  # the engine's --concurrency is the limit

    async def orient(self, focus: Focus) -> Any:  # async: no worker thread
        return None

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        await asyncio.sleep(float(focus.params["s"]))
        return None

    async def consolidate(self, focus: Focus, engaged: Any) -> Any:
        return None


@hookimpl
def register_faculties(register: Callable[[Faculty], None]) -> None:
    register(FleetWaiter())
