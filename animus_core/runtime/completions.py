"""The completer: finished foci are recorded in batches, one round trip for many.

A completion that arrives while the completer is idle is recorded at once. Under a steady
stream the completer writes at most once per ``LINGER``: those that finish while a write is
in flight, or within ``LINGER`` of its start, join the next transaction (group commit). A
focus frees its slot when it hands its completion over, so the wait costs no throughput;
each transaction costs Postgres about a millisecond whatever it carries. Written as soon as
the write before returned, a busy completer wrote one or two items a transaction: four
command hooks at a time ran at 0.73-0.80 of a plain loop of the same hooks instead of
0.81-0.88 (four alternating pairs of 900 items). Four slots of 1 ms work seemed to lose
throughput to the wait (0.83 of their ideal against 0.71), but it was their work, an
``asyncio.sleep``: the loop's millisecond timers made it 1.19 ms on average in a loop the
completer woke less often, 1.03 ms in one it woke every 2 ms. With work that ends as I/O
does (a file descriptor becoming readable), the wait gave 0.77-0.78 of the ideal against
0.75-0.77 (benchmarks/bench_cycle.py).

While the database is unreachable, finished foci are held (their leases kept by the lease
keeper) and recorded when it answers, or dropped at the end of a stop's grace period (their
items then run again once their leases expire)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from animus_core.runtime.health import Health
from animus_core.store.db import Db
from animus_core.values.errors import AnimusError, DatabaseUnavailable
from animus_core.values.records import ExecutionRecord
from animus_core.values.steps import StepRecord
from animus_core.values.work import Lease

__all__ = ["Completions"]

_log = logging.getLogger("animus.engine")
Done = tuple[Lease, Any, int | None]
#: the most completions recorded in one transaction
BATCH = 500
#: seconds between the starts of two transactions of a busy completer (an idle one writes
#: at once)
LINGER = 0.02
Steps = list[tuple[Lease, StepRecord]]


class Completions:
    def __init__(self, store: Db, health: Health, *,
                 stop_deadline: Callable[[], float | None],
                 on_recorded: Callable[[], None]) -> None:
        self.store = store
        self.health = health
        self._stop_deadline = stop_deadline
        self._on_recorded = on_recorded
        self._pending: list[Done] = []
        self._executions: list[ExecutionRecord] = []
        self._steps: Steps = []  # steps of these attempts not recorded yet
        #: the batch being written right now (its leases are held until it is recorded)
        self._recording: list[Done] = []
        self._ready = asyncio.Event()
        self._closing = False
        self._last_write = -1e18  # monotonic start of the last transaction

    def add(self, lease: Lease, outcome: Any, ms: int, record: ExecutionRecord,
            steps: list[StepRecord] | None = None) -> None:
        """Record the completion of the attempt holding ``lease`` (with ``steps`` it has not
        recorded yet) in the next batch."""
        self._pending.append((lease, outcome, ms))
        self._executions.append(record)
        if steps:
            self._steps.extend((lease, r) for r in steps)
        self._ready.set()

    def held(self) -> list[Lease]:
        """The leases of finished foci not recorded yet: they still hold their items."""
        return [c[0] for c in (*self._recording, *self._pending)]

    def __len__(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        """Let :meth:`run` finish the batch it writes and return."""
        self._closing = True
        self._ready.set()

    async def run(self) -> None:
        while True:
            await self._ready.wait()
            linger = self._last_write + LINGER - time.monotonic()
            if linger > 0 and not self._closing and len(self._pending) < BATCH:
                await asyncio.sleep(linger)  # busy: let this batch gather
            self._ready.clear()
            self._last_write = time.monotonic()
            await self.flush()
            if self._closing:  # the engine flushes once more after this; then it is over
                return

    async def flush(self) -> None:
        """Record the completions pending now. Those that arrive meanwhile wait for the next
        call: :meth:`run` makes it ``LINGER`` after this one began."""
        held = 0
        todo = len(self._pending)
        while todo > 0 and self._pending:
            # at most BATCH at a time: a completion locks its items until it commits, and a
            # lease extension of the same items (the keeper extends finished foci too) waits
            size = min(BATCH, todo)
            batch, self._pending = self._pending[:size], self._pending[size:]
            records, self._executions = self._executions[:size], self._executions[size:]
            leases = {id(done[0]) for done in batch}
            steps = [s for s in self._steps if id(s[0]) in leases]
            self._steps = [s for s in self._steps if id(s[0]) not in leases]
            self._recording = batch
            try:
                await self.store.complete_many(batch, executions=records, steps=steps)
            except DatabaseUnavailable as e:
                self._pending = batch + self._pending
                self._executions = records + self._executions
                self._steps = steps + self._steps
                deadline = self._stop_deadline()
                if deadline is not None and time.monotonic() >= deadline:
                    ids = ", ".join(str(c[0].work_id) for c in self._pending)
                    _log.error(
                        "stopping without recording %d finished foci: the database is still "
                        "unreachable at the end of the grace period (%s). These items will run "
                        "again once their leases expire: %s", len(self._pending), e, ids)
                    self._pending, self._executions, self._steps = [], [], []
                    return
                self.health.unreachable(e)
                held = len(self._pending)
                if not self.health.holding_reported:
                    self.health.holding_reported = True
                    _log.warning("holding finished foci until the database answers (or, if the "
                                 "engine is stopping, until its grace period ends): %s",
                                 ", ".join(str(c[0].work_id) for c in self._pending))
                _log.debug("completing %d items failed, retrying: %s", len(batch), e)
                self._recording = []  # back in _pending, where the lease keeper sees them
                # Jittered: a fixed delay can fall into step with a periodic fault (backends
                # terminated every 250 ms) and meet it on every retry.
                delay = 0.5 if deadline is not None else 1.0
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                continue
            except AnimusError:
                again: list[Done] = []
                again_records: list[ExecutionRecord] = []
                again_steps: Steps = []
                for one, rec in zip(batch, records, strict=True):  # keep the others
                    own = [s for s in steps if s[0] is one[0]]
                    try:
                        await self.store.complete_many([one], executions=[rec], steps=own)
                    except DatabaseUnavailable:
                        again.append(one)
                        again_records.append(rec)
                        again_steps.extend(own)
                    except AnimusError as e1:
                        _log.warning("could not complete %s: %s", one[0].work_id, e1)
                # first in this flush's next batch: a database still gone takes the path
                # above (held, retried, given up at the end of a stop's grace period)
                self._pending = again + self._pending
                self._executions = again_records + self._executions
                self._steps = again_steps + self._steps
                todo += len(again)
            finally:
                self._recording = []
            todo -= len(batch)
            self.health.reachable()
            if held:
                _log.info("recorded the finished foci held while the database was unreachable")
                held = 0
            self._on_recorded()

    def report_stopping(self, grace: float) -> None:
        if self._pending:
            _log.warning(
                "stopping while %d finished foci wait for the database: they are recorded "
                "if it answers within the grace period (%.0fs); otherwise these items run "
                "again once their leases expire: %s", len(self._pending), grace,
                ", ".join(str(c[0].work_id) for c in self._pending))
