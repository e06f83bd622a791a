"""The lease keeper: it extends the leases of running foci, so a long focus never runs
twice, and fences: a focus whose lease could not be extended is stopped before that lease
can run out (another engine may then claim the item, and two attempts must never run at
once)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping
from uuid import UUID

from animus_core.runtime.completions import Completions
from animus_core.runtime.flights import Flight
from animus_core.runtime.health import Health
from animus_core.runtime.reserve import Reserve
from animus_core.store.db import Db
from animus_core.values.errors import AnimusError
from animus_core.values.work import Lease

__all__ = ["LeaseKeeper"]

_log = logging.getLogger("animus.engine")


class LeaseKeeper:
    def __init__(self, store: Db, health: Health, flights: Mapping[UUID, Flight],
                 completions: Completions, reserve: Reserve, *, lease_seconds: int,
                 lose: Callable[[Lease, str], None], cancel: Callable[[UUID], None]) -> None:
        self.store = store
        self.health = health
        self.flights = flights
        self.completions = completions
        self.reserve = reserve
        self.lease_seconds = lease_seconds
        self._lose = lose
        self._cancel = cancel

    @property
    def margin(self) -> float:
        """How long before a lease runs out its focus is stopped."""
        return max(0.5, self.lease_seconds / 6)

    async def run(self) -> None:
        """Extend every third of the lease time; fence in between."""
        every = max(1.0, self.lease_seconds / 3)
        next_extension = time.monotonic() + every
        retry = 0.1
        while True:
            now = time.monotonic()
            fence_at = min((f.held_until - self.margin for f in self.flights.values()),
                           default=next_extension)
            await asyncio.sleep(max(0.05, min(next_extension, fence_at) - now))
            if time.monotonic() >= next_extension:
                next_extension = time.monotonic() + every
                if await self.extend(timeout=every):
                    retry = 0.1
                else:
                    # Waiting the usual period after a failure would leave a third of the
                    # lease to spare, or none after two, and the fence would stop the foci:
                    # try again soon (a fresh connection often works at once), backing off
                    # to the usual period.
                    retry = min(every, retry * 2)
                    next_extension = time.monotonic() + min(
                        every, retry * random.uniform(0.5, 1.5))
            self.fence()

    async def extend(self, timeout: float) -> bool:
        """Whether the leases held (if any) were extended."""
        flights = list(self.flights.values())
        reserved = list(self.reserve)
        leases = [f.claimed.lease for f in flights] + [h.claimed.lease for h in reserved]
        # A finished focus whose completion is not recorded yet still holds its item:
        # were its lease to run out, the work would be claimed and done again.
        recording = self.completions.held()
        if not leases and not recording:
            return True
        asked = time.monotonic()
        try:
            async with asyncio.timeout(timeout):  # a hung call must not delay the fence
                lost = await self.store.extend_lease(leases + recording, self.lease_seconds)
                # a cancel request whose notification this engine missed
                requested = (await self.store.cancel_requests([le.work_id for le in leases])
                             if leases else [])
        except (AnimusError, TimeoutError) as e:
            n = len(leases) + len(recording)
            if isinstance(e, AnimusError):
                self.health.retrying(e, "could not extend %d leases: %s", n, e)
            else:
                _log.warning("could not extend %d leases: %s", n, e)
            return False
        for flight in flights:
            if flight.claimed.lease not in lost:
                flight.held_until = asked + self.lease_seconds
        for held in reserved:
            if held.claimed.lease not in lost:
                held.held_until = asked + self.lease_seconds
        for lease in lost:
            if self.reserve.drop(lease.work_id) is None:
                self._lose(lease, "it was taken back after the lease ran out")
        for work_id in requested:
            self._cancel(work_id)
        return True

    def fence(self) -> None:
        """Stop each focus whose lease may run out before this engine can extend it (the
        database is unreachable or too slow)."""
        now = time.monotonic()
        for flight in list(self.flights.values()):
            if flight.held_until - now <= self.margin:
                self._lose(flight.claimed.lease,
                           f"its lease could not be extended and ends in "
                           f"{max(0.0, flight.held_until - now):.1f}s")
