"""Stopping running foci before they finish: on a cancel request (checked against the
database: anyone may NOTIFY), or when the lease is lost (or about to be)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Mapping
from typing import Any
from uuid import UUID

from animus_core.runtime.flights import Flight
from animus_core.runtime.reserve import Reserve
from animus_core.store.db import Db
from animus_core.values.errors import AnimusError
from animus_core.values.work import Lease

__all__ = ["FocusStops"]

_log = logging.getLogger("animus.engine")


class FocusStops:
    def __init__(self, store: Db, flights: Mapping[UUID, Flight], reserve: Reserve) -> None:
        self.store = store
        self.flights = flights
        self.reserve = reserve
        #: cancel notifications being checked
        self.checks: set[asyncio.Task[None]] = set()

    def cancel_noticed(self, work_id: UUID) -> None:
        """A notification says someone asked to cancel ``work_id``: only a request recorded
        (and audited) by ``Db.cancel`` stops a focus, so look it up before acting."""
        flight = self.flights.get(work_id)
        if (flight is not None and not flight.cancelling) or work_id in self.reserve:
            self._background(self._confirm(work_id))

    def _background(self, job: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(job)
        self.checks.add(task)
        task.add_done_callback(self.checks.discard)

    async def _confirm(self, work_id: UUID) -> None:
        try:
            confirmed = await self.store.cancel_requests([work_id])
        except AnimusError as e:  # the lease keeper asks again shortly
            _log.warning("could not look up the cancel request of %s: %s", work_id, e)
            return
        if work_id in confirmed:
            self.cancel(work_id)

    def cancel(self, work_id: UUID) -> None:
        """A cancel request is confirmed: stop the focus; it ends the item dead. An item held
        in reserve ends dead without starting."""
        flight = self.flights.get(work_id)
        if flight is not None and not flight.cancelling:
            _log.info("cancelling the running focus of %s on request", work_id)
            flight.cancelling = True
            flight.task.cancel()
        held = self.reserve.drop(work_id)
        if held is not None:
            _log.info("cancelling %s (held in reserve, not started) on request", work_id)
            self._background(self._end_reserved(held.claimed.lease))

    async def _end_reserved(self, lease: Lease) -> None:
        try:
            await self.store.cancel_attempt(lease, duration_ms=0)
        except AnimusError as e:  # its lease runs out; the next claim finds the request
            _log.warning("could not record the cancellation of %s: %s", lease.work_id, e)

    def lose(self, lease: Lease, why: str) -> None:
        """The lease is lost, or about to be (the engine stalled or was cut off): stop the
        focus now, killing its hooks, rather than run on beside the next attempt. The focus
        records nothing: the claim that takes the item back records the attempt as lost, and
        the lease no longer lets this engine finish it."""
        flight = self.flights.get(lease.work_id)
        if flight is None or flight.claimed.lease != lease or flight.lost:
            return  # finished meanwhile, or already being stopped
        _log.warning("lease lost on work item %s (attempt %d): %s; stopping its focus",
                     lease.work_id, flight.claimed.item.attempts, why)
        flight.lost = True
        flight.task.cancel()
