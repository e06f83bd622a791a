"""The durable steps of one attempt, as :meth:`Focus.step <animus_core.faculties.focus.Focus.step>`
runs them.

The n-th ``step`` call of an attempt is step n. The item's recorded steps are read on the
first call (one query; a focus that calls no step reads nothing). A step recorded at that
position, under the same name, is replayed: its stored result is returned and its body does
not run. A step recorded under another name is :class:`StepOrderChanged`. Otherwise the body
runs (retried as its :class:`StepPolicy` says), and its result, within the JSON value model
and the outcome size limit, is committed with an audit row before ``step`` returns: by the
holder of the item's lease only.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import msgspec

from animus_core.infra.secrets import redactor
from animus_core.values import json_values
from animus_core.values.canonical import canonical_hash
from animus_core.values.errors import InvalidInput, StepOrderChanged
from animus_core.values.limits import limits
from animus_core.values.steps import Step, StepPolicy
from animus_core.values.work import Lease

__all__ = ["StepJournal", "StepStore"]

_log = logging.getLogger("animus.steps")
_NAME_CHARS = 200


class StepStore(Protocol):
    """What the journal needs of the store (:class:`animus_core.store.db.Db` is one)."""

    async def steps(self, work_id: Any) -> list[Step]: ...

    async def record_step(self, lease: Lease, position: int, name: str, result: msgspec.Raw,
                          *, result_hash: str, started_at: datetime,
                          duration_ms: int) -> None: ...


class StepJournal:
    """The steps of one attempt of one work item, held under ``lease``."""

    def __init__(self, store: StepStore, lease: Lease) -> None:
        self._store = store
        self._lease = lease
        self._recorded: dict[int, Step] | None = None
        self._loading = asyncio.Lock()
        self._calls = 0
        #: (position, name) of the steps this attempt ran, and of those it replayed
        self.ran: list[tuple[int, str]] = []
        self.replayed: list[tuple[int, str]] = []

    def summary(self) -> dict[str, Any] | None:
        """For the attempt's execution record: the steps it ran and replayed, or ``None``
        when it called no step."""
        if not self._calls:
            return None
        return {kind: [{"position": p, "name": n} for p, n in sorted(marks)]
                for kind, marks in (("ran", self.ran), ("replayed", self.replayed))}

    async def _load(self) -> dict[int, Step]:
        async with self._loading:  # steps started together read the record once
            if self._recorded is None:
                steps = await self._store.steps(self._lease.work_id)
                self._recorded = {s.position: s for s in steps}
        return self._recorded

    async def run(self, name: str, fn: Callable[..., Any], args: Sequence[Any],
                  kwargs: Mapping[str, Any], policy: StepPolicy) -> Any:
        if not isinstance(name, str) or not name.strip() or len(name) > _NAME_CHARS:
            raise InvalidInput(f"a step's name must be text of 1 to {_NAME_CHARS} characters, "
                               f"got {name!r:.80}")
        json_values.check(name, "a step's name")
        self._calls += 1
        position = self._calls  # taken before any await: steps gathered keep call order
        known = (await self._load()).get(position)
        if known is not None:
            if known.name != name:
                raise StepOrderChanged(
                    f"StepOrderChanged: step {position} is {known.name!r} in the record of "
                    f"work item {self._lease.work_id} (run by attempt {known.attempt}), this "
                    f"attempt called {name!r}: a focus must call its steps in the same order "
                    "on every attempt, so the record cannot be replayed and retrying cannot "
                    f"help (rerun or replay the item, with --from-step {known.name} to keep "
                    "the steps before it)")
            self.replayed.append((position, name))
            return known.result
        started_at, started = datetime.now(UTC), time.perf_counter()
        # stored like an outcome: a secret's value never reaches the database
        result = redactor.json(await _with_retries(name, position, fn, args, kwargs, policy))
        text = json_values.encode(result, f"step {position} {name!r} result",
                                  limit=limits().outcome_bytes,
                                  setting="ANIMUS_MAX_OUTCOME_BYTES")
        value = json_values.read_stored(text)  # what every later attempt will be given
        await self._store.record_step(
            self._lease, position, name, msgspec.Raw(text.encode()),
            result_hash=canonical_hash(value, nfc=True), started_at=started_at,
            duration_ms=int((time.perf_counter() - started) * 1000))
        self.ran.append((position, name))
        return value


async def _with_retries(name: str, position: int, fn: Callable[..., Any], args: Sequence[Any],
                        kwargs: Mapping[str, Any], policy: StepPolicy) -> Any:
    for run in range(1, policy.attempts + 1):
        try:
            return await _call(fn, args, kwargs)
        except Exception as e:
            if run == policy.attempts:
                if policy.attempts > 1:
                    e.add_note(f"step {position} {name!r} failed {run} times")
                raise
            delay = policy.delay(run)
            _log.warning("step %d %r failed (run %d of %d), again in %gs: %s: %s", position,
                         name, run, policy.attempts, delay, type(e).__name__, e)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable: a policy runs at least once")


async def _call(fn: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
    """Await an async ``fn``; run a sync one in a worker thread."""
    if inspect.iscoroutinefunction(fn):
        return await fn(*args, **kwargs)
    result = await asyncio.to_thread(fn, *args, **kwargs)
    if inspect.isawaitable(result):  # a sync callable that returned a coroutine
        return await result
    return result
