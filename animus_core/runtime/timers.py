"""Wake timers: a waiting item with a timer (a sleep, a wait with a timeout) becomes
claimable when its timer runs out, and the engine must look then, not at its next poll.

The engine keeps one timer per work type it runs, armed for the earliest timer it knows of:
learnt from the ``animus_work`` notification a suspension sends (it carries ``wake_at``),
and read from the database (:func:`animus_core.store.read.next_wakes`, one index-only query)
when the listener connects, at each fallback poll, and after a timer fires; a timer that ran
out meanwhile (while the claim that followed the last fire ran, say) wakes the engine at
once. Waiting items cost the engine nothing else: no memory per item, no polling.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from animus_core.store import read
from animus_core.store.db import Db
from animus_core.values.errors import AnimusError

__all__ = ["WakeTimers"]

_log = logging.getLogger("animus.engine")
#: fired this long after a timer's moment: the claim compares the message's visibility with
#: the database's clock, and a claim a hair too early would find nothing
MARGIN = 0.003


class WakeTimers:
    def __init__(self, store: Db, queues: Iterable[str], work_types: Callable[[], list[str]],
                 wake: Callable[[list[str]], None]) -> None:
        """``work_types()``: the types this engine runs now; ``wake(types)``: work of
        those types may be claimable."""
        self.store = store
        self.queues = list(queues)
        self._work_types = work_types
        self._wake = wake
        #: work type -> (when, its armed timer)
        self._armed: dict[str, tuple[datetime, asyncio.TimerHandle]] = {}
        self._stale: set[str] = set()  # types to read again from the database
        self._reading: asyncio.Task[None] | None = None

    def note(self, work_types: Iterable[str], wake_at: datetime) -> None:
        """An item of one of ``work_types`` waits until ``wake_at``."""
        runs = set(self._work_types())
        for t in work_types:
            if t in runs:
                self._arm(t, wake_at)

    def _arm(self, work_type: str, when: datetime) -> None:
        armed = self._armed.get(work_type)
        if armed is not None:
            if armed[0] <= when:
                return
            armed[1].cancel()
        delay = max(0.0, (when - datetime.now(UTC)).total_seconds()) + MARGIN
        handle = asyncio.get_running_loop().call_later(delay, self._fire, work_type)
        self._armed[work_type] = (when, handle)

    def _fire(self, work_type: str) -> None:
        self._armed.pop(work_type, None)
        self._wake([work_type])
        self.refresh([work_type])  # the next timer of the type

    def refresh(self, work_types: Iterable[str] | None = None) -> None:
        """Read the next timer of ``work_types`` (None: every type this engine runs) from
        the database, in the background (one query, however many ask meanwhile)."""
        self._stale.update(self._work_types() if work_types is None else work_types)
        if self._reading is None or self._reading.done():
            self._reading = asyncio.create_task(self._read(), name="animus-wake-timers")

    async def _read(self) -> None:
        while self._stale:
            types, self._stale = sorted(self._stale), set()
            try:
                wakes = await read.next_wakes(self.store, self.queues, types)
            except AnimusError as e:  # the fallback poll and the next connect read again
                _log.debug("could not read the next wake timers: %s", e)
                return
            for t, (when, due) in wakes.items():
                if due:  # a timer ran out while the claim that followed its fire ran
                    self._wake([t])
                if when is not None:
                    self._arm(t, when)

    def close(self) -> None:
        for _, handle in self._armed.values():
            handle.cancel()
        self._armed.clear()
        if self._reading is not None:
            self._reading.cancel()
