"""The durable steps of one attempt, as :meth:`Focus.step <animus_core.faculties.focus.Focus.step>`
runs them.

The n-th ``step`` call of an attempt is step n. The item's recorded steps are read on the
first call (one query, with the signal a resumed wait took; a focus that calls no step reads
nothing). A step recorded at that
position, under the same name, is replayed: its stored result is returned and its body does
not run. A step recorded under another name is :class:`StepOrderChanged`. Otherwise the body
runs (retried as its :class:`StepPolicy` says), and its result, within the JSON value model
and the outcome size limit, is committed with an audit row before ``step`` returns: by the
holder of the item's lease only.

Sleeps, waits for signals and approvals are steps too: the first attempt that reaches one
suspends the focus (raising :class:`~animus_core.values.waits.Suspended`, which the runner
turns into ``running -> waiting``), and the attempt that resumes records its outcome at the
same position (the ended sleep, the signal taken, the decision, or the timeout), reading the
wait it resumes from the item (``WorkItem.wait``). An ended sleep and a signal that woke the
wait are outcomes the database holds already (a later attempt finds the same): their steps
are recorded with the attempt's next write (its next step, its suspension or failure, or the
batch of its completion, :meth:`StepJournal.take_pending`), not in a round trip of their own.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import msgspec

from animus_core.infra.secrets import redactor
from animus_core.values import json_values
from animus_core.values.canonical import canonical_hash
from animus_core.values.errors import (
    ApprovalTimedOut,
    InvalidInput,
    StepOrderChanged,
    WaitTimedOut,
)
from animus_core.values.limits import limits
from animus_core.values.steps import Step, StepPolicy, StepRecord
from animus_core.values.waits import (
    Approval,
    Decision,
    Resume,
    Signal,
    Suspended,
    Wait,
    check_approval,
)
from animus_core.values.work import Lease, check_name

__all__ = ["StepJournal", "StepStore", "WaitStore"]

_log = logging.getLogger("animus.steps")
#: the name of the step whose body runs in this context, if one does
_INSIDE: contextvars.ContextVar[str | None] = contextvars.ContextVar("animus_step", default=None)
_NAME_CHARS = 200


class StepStore(Protocol):
    """What the journal needs of the store for steps (:class:`animus_core.store.db.Db` is
    one)."""

    async def steps(self, work_id: Any) -> list[Step]: ...

    async def record_step(self, lease: Lease, position: int, name: str, result: msgspec.Raw,
                          *, result_hash: str, started_at: datetime, duration_ms: int,
                          usage: dict[str, Any] | None = None) -> None: ...

    async def record_steps(self, steps: Sequence[tuple[Lease, StepRecord]]) -> None: ...


class WaitStore(StepStore, Protocol):
    """... and for waits."""

    async def take_signal(self, lease: Lease, event: str, position: int) -> Signal | None: ...

    async def resume_read(self, work_id: Any, position: int,
                          event: str) -> tuple[list[Step], Signal | None]: ...

    async def gate_decisions(self, work_id: Any, position: int,
                             role: str) -> list[Approval]: ...


class StepJournal:
    """The steps of one attempt of one work item, held under ``lease``."""

    def __init__(self, store: WaitStore, lease: Lease, *,
                 wait: Mapping[str, Any] | None = None, attempt: int = 0,
                 first: bool = False, resume: Resume | None = None) -> None:
        """``wait`` is the item's kept wait (``WorkItem.wait``): what the attempt this one
        resumes was suspended for; ``attempt`` is this attempt's number; ``first``: no
        attempt of the item ran before this one and none of its steps were copied into it
        (its record is empty, and is not read); ``resume``: the record, read already (with
        the claim)."""
        self._store = store
        self._lease = lease
        self._attempt = attempt
        self._kept = Wait.from_json(dict(wait)) if wait else None
        self._recorded: dict[int, Step] | None = {} if first and not wait else None
        #: the signal the kept wait took when it woke the item (read with the steps)
        self._woken_by: Signal | None = None
        if resume is not None:
            self._recorded = {s.position: s for s in resume.steps}
            self._woken_by = resume.woken_by
        #: steps whose outcome the database holds already, recorded with the next write
        self._pending: list[StepRecord] = []
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

    # -- for callers that place steps themselves (child work, the command hooks' steps) ------

    @property
    def lease(self) -> Lease:
        """The lease the attempt holds (steps are recorded under it)."""
        return self._lease

    @property
    def position(self) -> int:
        """The position of the last step call (0: none yet)."""
        return self._calls

    def seek(self, position: int) -> None:
        """Make the next step call step ``position + 1``."""
        self._calls = position

    async def recorded(self) -> dict[int, Step]:
        """The item's recorded steps by position (read once, on first use)."""
        return dict(await self._load())

    def reload(self) -> None:
        """Read the record again on the next step call (it holds what this attempt recorded)."""
        self._recorded = None

    def take_pending(self) -> list[StepRecord]:
        """The steps this attempt has not recorded yet (see the module's documentation), for
        its caller to record with the attempt's end (``Db.complete_many(steps=...)``); they
        are the caller's from now on."""
        pending, self._pending = self._pending, []
        return pending

    async def flush(self) -> None:
        """Record the steps not recorded yet now (before the attempt suspends or fails)."""
        if self._pending:
            await self._store.record_steps([(self._lease, r) for r in self._pending])
            self._pending = []

    async def begin(self, name: str) -> tuple[int, Step | None]:
        """The next step call, named ``name``: its position, and its record when it has one
        (to replay); :class:`StepOrderChanged` when another name is recorded there."""
        _check_step_name(name)
        return await self._next(name)

    async def record(self, position: int, name: str, result: Any, *,
                     started_at: datetime, duration_ms: int) -> Any:
        """Commit ``result`` as step ``position`` (``name``), as :meth:`run` does; return it
        as every later attempt gets it."""
        return await self._record(position, name, result, started_at, duration_ms)

    async def _load(self) -> dict[int, Step]:
        async with self._loading:  # steps started together read the record once
            if self._recorded is None:
                kept = self._kept
                if kept is not None and kept.kind == "event" and kept.event is not None:
                    steps, self._woken_by = await self._store.resume_read(
                        self._lease.work_id, kept.position, kept.event)
                else:
                    steps = await self._store.steps(self._lease.work_id)
                recorded = {s.position: s for s in steps}
                for r in self._pending:  # this attempt's, not recorded yet
                    recorded[r.position] = self._step(r)
                self._recorded = recorded
        return self._recorded

    def _step(self, r: StepRecord) -> Step:
        return Step(work_id=self._lease.work_id, position=r.position, name=r.name,
                    attempt=self._attempt, result=json_values.read_stored(bytes(r.result).decode()),
                    result_hash=r.result_hash, started_at=r.started_at,
                    finished_at=r.started_at, duration_ms=r.duration_ms)

    async def run(self, name: str, fn: Callable[..., Any], args: Sequence[Any],
                  kwargs: Mapping[str, Any], policy: StepPolicy, *,
                  usage: Callable[[Any], dict[str, Any] | None] | None = None) -> Any:
        """Step ``name``: its recorded result, or ``fn``'s, recorded. ``usage(result)`` is the
        model usage the result cost, added to the item's totals as it is recorded (a model
        call made by the step)."""
        _check_step_name(name)
        position, known = await self._next(name)
        if known is not None:
            return known.result
        started_at, started = datetime.now(UTC), time.perf_counter()
        inside = _INSIDE.set(name)
        try:
            result = await _with_retries(name, position, fn, args, kwargs, policy)
        finally:
            _INSIDE.reset(inside)
        return await self._record(position, name, result, started_at,
                                  int((time.perf_counter() - started) * 1000),
                                  usage=usage(result) if usage is not None else None)

    async def sleep_until(self, until: datetime) -> None:
        """The durable sleep: suspend the focus until ``until`` (unless it has passed), and
        record the sleep as a step once the attempt that resumes gets here."""
        if until.tzinfo is None:
            raise InvalidInput("sleep_until needs a timezone-aware datetime, got a naive one")
        position, known = await self._next("sleep")
        if known is not None:
            return
        kept = self.kept_at(position, "sleep")
        if kept is not None:
            # resumed from this sleep: only its timer wakes a sleep, so it has ended
            self._defer(position, "sleep", {"until": kept.until}, datetime.now(UTC))
            return
        if until <= datetime.now(UTC):
            await self._record(position, "sleep", {"until": until.isoformat()},
                               datetime.now(UTC), 0)
            return
        raise Suspended(Wait.sleep(position, until))

    async def wait_for(self, event: str, timeout: float | timedelta | None) -> Any:
        """The durable wait for signal ``event``: its payload, from the first signal of
        that event not taken by an earlier wait (sent before the wait or during it);
        :class:`WaitTimedOut` once ``timeout`` has passed without one. Suspends the focus
        while it waits; the attempt that resumes records the outcome as a step."""
        check_name(event, "event")
        seconds = timeout_seconds(timeout, "wait_for")
        name = f"wait for {event}"
        position, known = await self._next(name)
        if known is not None:
            return _waited(known.result, event)
        kept = self.kept_at(position, "event")
        woken_by = self._woken_by
        if kept is not None and kept.event == event and woken_by is not None \
                and woken_by.consumed_by_position == position:
            # resumed by the signal this wait took as it woke the item (read with the steps)
            return _waited(self._defer(position, name, _taken(event, woken_by),
                                       woken_by.sent_at), event)
        signal = await self._store.take_signal(self._lease, event, position)
        if signal is not None:
            return _waited(await self._record(position, name, _taken(event, signal),
                                              signal.sent_at, 0), event)
        if kept is not None and kept.event == event:
            # resumed from this very wait without its signal: its timer ran out
            if kept.ran_out(datetime.now(UTC)):
                return _waited(await self._record(
                    position, name, {"event": event, "timed_out": True, "until": kept.until},
                    datetime.now(UTC), 0), event)
            raise Suspended(kept)  # woken early (a clock behind the database's)
        raise Suspended(Wait.for_event(position, event, deadline(seconds)))

    async def approval(self, why: str, role: str, quorum: int,
                       timeout: float | timedelta | None) -> Decision:
        """The durable approval gate: suspend the focus until people decide (``quorum``
        approvals by members of ``animus_<role>``, or one rejection, through
        ``animus.decide``) and return the :class:`Decision`; :class:`ApprovalTimedOut` once
        ``timeout`` has passed undecided. The attempt that resumes records the decision as
        a step (named ``approval``)."""
        check_approval(why, role, quorum)
        seconds = timeout_seconds(timeout, "approval")
        position, known = await self._next("approval")
        if known is not None:
            return _decided(known.result)
        kept = self.kept_at(position, "approval")
        if kept is None:
            # Decisions are taken only while the item waits at this position, and an attempt
            # gets past it only by recording the step: none can be there yet.
            raise Suspended(Wait.approval(position, why, role, quorum, deadline(seconds)))
        # resumed from this approval: decided, or its timer ran out (the gate is the kept
        # one, as it was when people decided it)
        gate_role, gate_quorum = kept.role or role, kept.quorum or quorum
        decisions = await self._store.gate_decisions(self._lease.work_id, position, gate_role)
        decision = Decision.of(decisions, gate_quorum)
        if decision is not None:
            return _decided(await self._record(
                position, "approval", {**decision.to_json(), "role": gate_role,
                                       "quorum": gate_quorum}, decision.decided_at, 0))
        if kept.ran_out(datetime.now(UTC)):
            return _decided(await self._record(
                position, "approval",
                {"timed_out": True, "until": kept.until, "why": kept.why, "role": gate_role,
                 "quorum": gate_quorum, "approvals": sum(1 for d in decisions if d.counts)},
                datetime.now(UTC), 0))
        raise Suspended(kept)  # woken early (a clock behind the database's)

    def kept_at(self, position: int, kind: str) -> Wait | None:
        """The item's kept wait, when the attempt this one resumes suspended for a wait of
        ``kind`` at ``position``."""
        kept = self._kept
        return kept if kept is not None and kept.position == position and kept.kind == kind \
            else None

    async def _next(self, name: str) -> tuple[int, Step | None]:
        """The position of the next step call, and its record when it has one (replayed)."""
        outer = _INSIDE.get()
        if outer is not None:  # a replay would skip the body, and what it called with it
            raise InvalidInput(f"{name!r} was called inside the body of step {outer!r}: steps, "
                               "sleeps and waits cannot nest; call them one after another in "
                               "the phase")
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
        return position, known

    async def _record(self, position: int, name: str, result: Any, started_at: datetime,
                      duration_ms: int, *, usage: dict[str, Any] | None = None) -> Any:
        """Commit step ``position``'s result (with the steps not recorded yet); return it as
        every later attempt gets it."""
        record, value = _encoded(position, name, result, started_at, duration_ms)
        if self._pending and usage is None:
            await self._store.record_steps([(self._lease, r)
                                            for r in (*self._pending, record)])
        else:
            await self.flush()
            await self._store.record_step(
                self._lease, position, name, record.result, result_hash=record.result_hash,
                started_at=started_at, duration_ms=duration_ms, usage=usage)
        self._pending = []
        self.ran.append((position, name))
        return value

    def _defer(self, position: int, name: str, result: Any, started_at: datetime) -> Any:
        """Step ``position``'s result, whose outcome the database holds already: recorded
        with the attempt's next write. Returns it as every later attempt gets it."""
        record, value = _encoded(position, name, result, started_at, 0)
        self._pending.append(record)
        if self._recorded is not None:
            self._recorded[position] = self._step(record)
        self.ran.append((position, name))
        return value


def _encoded(position: int, name: str, result: Any, started_at: datetime,
             duration_ms: int) -> tuple[StepRecord, Any]:
    """Step ``position``'s record, and its result as every later attempt gets it."""
    # stored like an outcome: a secret's value never reaches the database
    text = json_values.encode(redactor.json(result), f"step {position} {name!r} result",
                              limit=limits().outcome_bytes, setting="ANIMUS_MAX_OUTCOME_BYTES")
    value = json_values.read_stored(text)  # what every later attempt will be given
    return StepRecord(position=position, name=name, result=msgspec.Raw(text.encode()),
                      result_hash=canonical_hash(value, nfc=True), started_at=started_at,
                      duration_ms=duration_ms), value


def _taken(event: str, signal: Signal) -> dict[str, Any]:
    """The result of a wait's step that took ``signal``."""
    return {"event": event, "signal": signal.id, "sent_by": signal.sent_by,
            "payload": signal.payload}


def timeout_seconds(timeout: float | timedelta | None, what: str) -> float | None:
    """A wait's ``timeout`` in seconds (None: none), checked: from 0 seconds to 10 years."""
    seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
    if seconds is not None and not 0 <= seconds < 10 * 365 * 86400:  # also refuses NaN
        raise InvalidInput(f"{what} timeout must be from 0 seconds to 10 years, "
                           f"got {timeout!r}")
    return seconds


def deadline(seconds: float | None) -> datetime | None:
    """When a wait of ``seconds`` starting now ends (None: it has no timer)."""
    return None if seconds is None else datetime.now(UTC) + timedelta(seconds=seconds)


def _decided(result: Any) -> Decision:
    """What a recorded approval gives the focus: the decision, or ApprovalTimedOut."""
    if result.get("timed_out"):
        raise ApprovalTimedOut(result["why"], result["role"], result["quorum"],
                               result["approvals"], result["until"])
    return Decision.from_json({k: result[k] for k in ("approved", "reason", "by",
                                                      "decided_at")})


def _check_step_name(name: Any) -> None:
    if not isinstance(name, str) or not name.strip() or len(name) > _NAME_CHARS:
        raise InvalidInput(f"a step's name must be text of 1 to {_NAME_CHARS} characters, "
                           f"got {name!r:.80}")
    json_values.check(name, "a step's name")


def _waited(result: Any, event: str) -> Any:
    """What a recorded wait gives the focus: the signal's payload, or WaitTimedOut."""
    if result.get("timed_out"):
        raise WaitTimedOut(event, result.get("until"))
    return result.get("payload")


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
