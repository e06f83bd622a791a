"""The reserve: items claimed ahead of free slots, so a slot freed by short work is refilled
at once instead of after a claim's round trip.

A faculty whose foci turn over faster than a claim returns keeps a few more items leased than
it has slots: when a focus ends, the next starts from the reserve in the same turn of the
event loop, and the scheduler tops the reserve up in the background, many items per claim.
How many follows from how fast the faculty's foci have been finishing: enough for
``HORIZON`` seconds of its work, at most ``MOST``. A faculty of long foci (an LLM call, a
person) keeps none, so no item waits behind a busy engine while another has room; nor does
one with a rate limit, or one that has not finished a focus yet.

A reserved item is claimed (``running``, its lease held and extended by the lease keeper like
a running focus's); it starts when a slot frees. Stopping gives reserved items back
(``release``: the attempt is not counted); a cancel request ends one without starting it; one
whose lease could not be extended is dropped before it could run out, and runs again
elsewhere once it has.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from uuid import UUID

from animus_core.runtime.flights import Slot
from animus_core.values.waits import Resume
from animus_core.values.work import Claimed

__all__ = ["HORIZON", "MOST", "Held", "Reserve"]

_log = logging.getLogger("animus.engine")

#: seconds of a faculty's work its reserve holds: a few claims' round trips on a busy machine
#: (a claim took 5-7 ms while four command hooks kept both cores busy). With 20 ms, such a
#: faculty (4 slots, 20 ms foci) claimed 2.3 items at a time and ran at 0.71-0.80 of a plain
#: loop of the same hooks; with 50 ms, 5.4 items and 0.80-0.85 (four alternating pairs)
HORIZON = 0.05
#: the most items one faculty holds in reserve: a claim's worth (256), so that a faculty of
#: short foci on many slots has the next claim's items before its slots empty (64 let them
#: run dry while a claim was out: a drain of no-op items ran 12% slower)
MOST = 256


@dataclass
class Held:
    """A claimed item waiting in the reserve for a free slot."""

    claimed: Claimed
    #: until when its lease surely holds (monotonic), as Flight.held_until
    held_until: float
    resume: Resume | None = None


class Reserve:
    """The reserved items of every faculty of one engine, whose ``concurrency`` caps the
    foci of each."""

    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self._queues: dict[str, deque[Held]] = {}
        self._by_id: dict[UUID, tuple[str, Held]] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Held]:
        return iter([held for _, held in self._by_id.values()])

    def __contains__(self, work_id: object) -> bool:
        return work_id in self._by_id

    def count(self, slot: Slot) -> int:
        q = self._queues.get(slot.faculty.name)
        return len(q) if q else 0

    def target(self, slot: Slot) -> int:
        """How many items ``slot`` keeps in reserve now."""
        fac = slot.faculty
        if fac.rate_limit or slot.turnover is None:
            return 0
        slots = min(fac.max_concurrent, self.concurrency)
        return min(MOST, int(slots * HORIZON / max(slot.turnover, 1e-6)))

    def wants(self, slot: Slot) -> int:
        """How many more items ``slot`` should claim for its reserve: none while it holds more
        than half its target (so one claim brings many)."""
        want, have = self.target(slot), self.count(slot)
        return want - have if have <= want // 2 else 0

    def put(self, slot: Slot, held: Held) -> None:
        self._queues.setdefault(slot.faculty.name, deque()).append(held)
        self._by_id[held.claimed.item.id] = (slot.faculty.name, held)

    def take(self, slot: Slot, margin: float) -> Held | None:
        """The oldest item reserved for ``slot`` whose lease holds beyond ``margin`` seconds
        (those that do not are dropped: the keeper could not extend them in time)."""
        q = self._queues.get(slot.faculty.name)
        now = time.monotonic()
        while q:
            held = q.popleft()
            del self._by_id[held.claimed.item.id]
            if held.held_until - now > margin:
                return held
            _log.warning("not starting %s, held in reserve: its lease could not be extended and "
                         "ends in %.1fs; it runs again once it has", held.claimed.item.id,
                         max(0.0, held.held_until - now))
        return None

    def drop(self, work_id: UUID) -> Held | None:
        entry = self._by_id.pop(work_id, None)
        if entry is None:
            return None
        name, held = entry
        self._queues[name].remove(held)
        return held

    def clear(self) -> list[Held]:
        everything = [held for _, held in self._by_id.values()]
        self._queues.clear()
        self._by_id.clear()
        return everything
