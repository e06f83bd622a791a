"""Phase timeouts: one checker for every running focus instead of a timer per phase
(``asyncio.timeout`` costs about 5 us, a sixth of a trivial focus)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import TypeVar

from animus_core.runtime.flights import Flight

__all__ = ["Deadlines"]

TICK = 0.05  # how often running phases are checked against their timeout (s)
T = TypeVar("T")


class Deadlines:
    def __init__(self, flights: Iterable[Flight]) -> None:
        self._flights = flights
        self.watching = asyncio.Event()  # set while some phase has a deadline to enforce

    async def within(self, flight: Flight, timeout: float, what: str, work: Awaitable[T]) -> T:
        """Await ``work`` as ``flight``'s task; TimeoutError once ``timeout`` has passed."""
        flight.deadline = asyncio.get_running_loop().time() + timeout
        self.watching.set()
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

    async def run(self) -> None:
        """Cancel the phases that run past their deadline."""
        loop = asyncio.get_running_loop()
        while True:
            await self.watching.wait()
            await asyncio.sleep(TICK)
            now, waiting = loop.time(), False
            for flight in list(self._flights):
                if flight.deadline is None or flight.timed_out:
                    continue
                if now >= flight.deadline:
                    flight.timed_out = True
                    flight.task.cancel()
                else:
                    waiting = True
            if not waiting:
                self.watching.clear()
