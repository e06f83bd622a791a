"""When the engine's process runs CPython's full garbage collections.

CPython starts a full collection once the objects moved into its oldest generation since the
last one reach a quarter of those already there. A focus lives long enough for its objects
(task, coroutines, the item, its lease) to reach that generation, and most of them are freed
by their reference counts when it ends. So an engine with thousands of foci in flight meets
that rule every second or so, and each full collection walks every object of every focus
while it holds the event loop: with 5,000 foci of 2 s in flight, 150-200 ms each, a quarter
of the engine's CPU, and leases, wake-ups and completions wait behind it.

:class:`Collector` keeps CPython's young collections (moving what survives them on sooner)
and takes over the full ones. What start-up made (modules, faculties, clients) lives as long
as the process and is frozen out of every collection. A full collection then runs when the
process has grown by half since the last one (garbage in cycles that outlived the young
collections: memory stays bounded, as under CPython's rule), when nothing is in flight
(it is cheap then), or at the latest ``every`` seconds after the last.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import resource
import sys
import time
from collections.abc import Callable

__all__ = ["Collector", "resident_bytes"]

_log = logging.getLogger("animus.engine")

#: the full generation's threshold while the collector is taken over: never reached
NEVER = 1 << 30
#: young collections between two of the middle generation (CPython's default: 10)
MIDDLE = 2


def resident_bytes() -> int:
    """The process's resident memory now (Linux), else the most it has had."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class Collector:
    """Full collections on the engine's schedule (see the module's description)."""

    def __init__(self, in_flight: Callable[[], int], *, every: float = 600.0,
                 idle_after: float = 60.0, growth: float = 0.5, min_growth: int = 64 << 20,
                 check: float = 1.0, resident: Callable[[], int] = resident_bytes) -> None:
        self.in_flight = in_flight
        self.every = every
        self.idle_after = idle_after
        self.growth = growth
        self.min_growth = min_growth
        self.check = check
        self.resident = resident
        self._thresholds: tuple[int, int, int] | None = None
        self._last = time.monotonic()
        self._base = 0
        #: full collections run by the schedule so far
        self.collections = 0

    def start(self) -> None:
        """Freeze what exists now and take the full collections over."""
        # Without a full collection first: it walks the whole process while the engine's start
        # waits (8 ms in a fresh `animus up`, 25-45 ms in a process holding more), and found
        # 48 objects there. The few in cycles frozen with the rest are freed after `stop`.
        gc.freeze()
        young, middle, _ = self._thresholds = gc.get_threshold()
        # What outlives a young collection is mostly a focus's: on to the full generation
        # after two rather than ten, not gathered in the middle one, whose collection walks
        # them all again (with 5,000 foci, 30 ms each time instead of 12)
        gc.set_threshold(young, min(middle, MIDDLE), NEVER)
        self._last, self._base = time.monotonic(), self.resident()

    def stop(self) -> None:
        """Give CPython its collector back (a process that goes on, a test, collects as
        before)."""
        if self._thresholds is not None:
            gc.set_threshold(*self._thresholds)
            self._thresholds = None
            gc.unfreeze()

    def due(self) -> str | None:
        """Why a full collection is due now, or None."""
        since = time.monotonic() - self._last
        if since >= self.every:
            return f"{since:.0f} s since the last"
        grown = self.resident() - self._base
        if grown >= max(self.min_growth, self._base * self.growth):
            return f"grown by {grown >> 20} MiB since the last"
        if since >= self.idle_after and not self.in_flight():
            return "nothing in flight"
        return None

    def collect(self, why: str) -> int:
        """A full collection now; the unreachable objects it found."""
        began = time.perf_counter()
        found = gc.collect()
        self.collections += 1
        self._last, self._base = time.monotonic(), self.resident()
        _log.debug("full garbage collection (%s): %d unreachable objects, %.1f ms", why, found,
                   (time.perf_counter() - began) * 1000)
        return found

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.check)
            why = self.due()
            if why is not None:
                self.collect(why)
