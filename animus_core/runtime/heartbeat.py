"""The engine's presence in the database: it registers as it starts (what it runs, and what
it disabled and why), beats every few seconds with its running foci and its schedules' next
ticks, stops when an operator asks it to (``animus stop``: the request is in its row; a
notification on ``animus_engines`` only makes it beat at once), and deregisters as it stops.
An engine whose beats stop is shown as lost (``animus status``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from animus_core.faculties.faculty import Faculty
from animus_core.runtime.flights import Slot
from animus_core.runtime.health import Health
from animus_core.store import engines
from animus_core.store.db import Db
from animus_core.values.engines import EngineInfo, FacultyInfo, ScheduleInfo
from animus_core.values.errors import AnimusError
from animus_core.values.version import __version__

__all__ = ["Heartbeat"]

_log = logging.getLogger("animus.engine")


class Heartbeat:
    def __init__(self, store: Db, health: Health, *, interval: float, concurrency: int,
                 queues: list[str], faculties: Callable[[], list[Faculty]],
                 disabled: dict[str, str], disabled_faculties: list[Faculty],
                 slots: dict[str, Slot], stop: Callable[[float | None], None]) -> None:
        """``stop(grace)`` drains the engine (``grace`` None: its own grace period)."""
        self.store = store
        self.health = health
        self.interval = interval
        self.id = uuid.uuid4()
        self._concurrency = concurrency
        self._queues = queues
        self._faculties = faculties
        self._disabled = disabled
        self._disabled_faculties = disabled_faculties
        self._slots = slots
        self._stop = stop
        self._now = asyncio.Event()  # beat at once (a notification came)
        self._registered = False
        self.stop_asked = False

    def info(self) -> EngineInfo:
        facs = [*self._faculties(), *self._disabled_faculties]
        return EngineInfo(
            id=self.id, host=socket.gethostname(), pid=os.getpid(), version=__version__,
            heartbeat_seconds=self.interval, concurrency=self._concurrency,
            queues=list(self._queues),
            faculties=[FacultyInfo(name=f.name, origin=f.origin, accepts=list(f.accepts),
                                   max_concurrent=f.max_concurrent, timeout=f.timeout,
                                   rate_limit=f.rate_limit, max_attempts=f.max_attempts,
                                   example=f.example) for f in facs],
            disabled=dict(self._disabled), schedules=self._schedules())

    def _schedules(self) -> list[ScheduleInfo]:
        now = datetime.now(UTC)
        return [ScheduleInfo(name=s.name, work_type=s.work_type, next_tick=s.next_tick(now))
                for f in self._faculties() for s in f.schedules]

    def notified(self, payload: str) -> None:
        """A notification on ``animus_engines``: a stop may have been asked of this engine
        (the beat that follows reads whether it was)."""
        if payload in (str(self.id), "*"):
            self._now.set()

    async def register(self) -> None:
        await engines.register(self.store, self.info())
        self._registered = True
        _log.info("engine %s registered (heartbeat every %gs)", self.id, self.interval)

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._now.wait(), self.interval)
            self._now.clear()
            await self.beat()

    async def beat(self) -> None:
        try:
            if not self._registered:
                await self.register()
            running = {name: slot.running for name, slot in self._slots.items()}
            beat = await engines.heartbeat(self.store, self.id, running, self._schedules())
            if not beat.registered:  # forgotten meanwhile (a lost engine's row was pruned)
                await self.register()
                return
        except AnimusError as e:
            self.health.retrying(e, "engine heartbeat failed (will retry): %s", e)
            return
        if beat.stop_requested and not self.stop_asked:
            self.stop_asked = True
            _log.info("an operator asked this engine to stop (animus stop)%s: draining",
                      f", within {beat.stop_grace:g}s" if beat.stop_grace is not None else "")
            self._stop(beat.stop_grace)

    async def deregister(self) -> None:
        if not self._registered:
            return
        try:
            await engines.deregister(self.store, self.id)
        except AnimusError as e:
            _log.warning("could not deregister engine %s (it will show as lost): %s", self.id, e)
