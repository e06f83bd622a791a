"""Phase timeouts: one checker for every running focus instead of a timer per phase
(``asyncio.timeout`` costs about 5 us, a sixth of a trivial focus).

The checker sleeps until the earliest deadline it knows of; a phase that starts with an
earlier one wakes it. Most phases end long before their deadline (300 s by default), so with
thousands of foci in flight it looks over them about as often as one of them could be due,
not twenty times a second.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Iterable
from typing import TypeVar

from animus_core.runtime.flights import Flight

__all__ = ["Deadlines"]

T = TypeVar("T")


class Deadlines:
    def __init__(self, flights: Iterable[Flight]) -> None:
        self._flights = flights
        self._next = math.inf  # when the checker looks next
        self._sooner = asyncio.Event()  # a deadline before that

    async def within(self, flight: Flight, timeout: float, what: str, work: Awaitable[T]) -> T:
        """Await ``work`` as ``flight``'s task; TimeoutError once ``timeout`` has passed."""
        flight.deadline = deadline = asyncio.get_running_loop().time() + timeout
        if deadline < self._next:
            self._next = deadline
            self._sooner.set()
        try:
            return await work
        except asyncio.CancelledError:
            if not flight.timed_out:
                raise
            flight.timed_out = False
            task = asyncio.current_task()
            if task is not None and task.uncancel() > 0:
                raise  # cancelled for another reason as well
            raise TimeoutError(f"{what} ran longer than {timeout:g} s") from None
        finally:
            flight.deadline = None

    def check(self, now: float) -> float:
        """Cancel the phases past their deadline; the earliest deadline left (inf: none)."""
        earliest = math.inf
        for flight in list(self._flights):
            deadline = flight.deadline
            if deadline is None or flight.timed_out:
                continue
            if now >= deadline:
                flight.timed_out = True
                flight.task.cancel()
            elif deadline < earliest:
                earliest = deadline
        return earliest

    async def run(self) -> None:
        """Cancel the phases that run past their deadline."""
        loop = asyncio.get_running_loop()
        while True:
            self._sooner.clear()
            self._next = earliest = self.check(loop.time())
            if earliest == math.inf:
                await self._sooner.wait()
                continue
            wake = loop.call_at(earliest, self._sooner.set)
            try:
                await self._sooner.wait()
            finally:
                wake.cancel()
