"""Phase timeouts (animus_core/runtime/deadlines.py): one checker that sleeps until the
earliest deadline it knows of, woken sooner by a phase with an earlier one."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest

from animus_core.runtime.deadlines import Deadlines
from animus_core.runtime.flights import Flight


@contextlib.asynccontextmanager
async def checker(flights: list[Flight]) -> AsyncIterator[Deadlines]:
    deadlines = Deadlines(flights)
    task = asyncio.create_task(deadlines.run())
    try:
        yield deadlines
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def phase(flights: list[Flight], deadlines: Deadlines, timeout: float, seconds: float,
          ) -> asyncio.Task[str]:
    """A phase of ``seconds`` under ``timeout``, as a focus's task, with its flight."""

    async def run() -> str:
        return await deadlines.within(flight, timeout, "orient", asyncio.sleep(seconds, "done"))

    task = asyncio.create_task(run())
    flight = Flight(claimed=cast(Any, None), task=cast(Any, task), slot=cast(Any, None),
                    held_until=math.inf)
    flights.append(flight)
    return task


async def test_a_short_deadline_after_a_long_one_is_kept():
    flights: list[Flight] = []
    async with checker(flights) as deadlines:
        long = phase(flights, deadlines, 600, 600)
        await asyncio.sleep(0.05)  # the checker now sleeps until the long phase's deadline
        short = phase(flights, deadlines, 0.1, 600)
        async with asyncio.timeout(5):  # without the wake-up: 600 s
            with pytest.raises(TimeoutError, match=r"orient ran longer than 0\.1 s"):
                await short
        assert not long.done()
        long.cancel()


async def test_a_phase_that_ends_in_time_is_left_alone_and_nothing_is_watched_after():
    flights: list[Flight] = []
    async with checker(flights) as deadlines:
        assert await phase(flights, deadlines, 0.2, 0.05) == "done"
        await asyncio.sleep(0.3)  # past the deadline it had
        assert not any(f.timed_out for f in flights)
        assert deadlines.check(asyncio.get_running_loop().time()) == math.inf


async def test_many_phases_each_cancelled_at_its_own_deadline():
    flights: list[Flight] = []
    async with checker(flights) as deadlines:
        tasks = [phase(flights, deadlines, timeout, 600) for timeout in (0.3, 0.1, 0.2)]
        ended: list[int] = []
        for task in tasks:
            task.add_done_callback(lambda t: ended.append(tasks.index(t)))
        async with asyncio.timeout(5):
            results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, TimeoutError) for r in results)
        assert ended == [1, 2, 0], "the earliest deadline first"
