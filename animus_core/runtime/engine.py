"""The control plane: wake on NOTIFY, claim up to free capacity, run foci, retire work.

One asyncio task per concern:

* the **listener** holds a dedicated connection on ``LISTEN animus_work`` and reconnects by
  itself; each notification marks the faculties that accept its work types as *dirty*;
* the **scheduler** loop claims for dirty faculties, as many items as each has free slots
  (``max_concurrent``, the global ``concurrency`` and an optional rate limit), and starts a
  focus task per item. A faculty whose last claim came back short is clean until the next
  notification, retry timer or the slow fallback poll, so an idle engine sends almost no
  queries;
* **foci** run orient -> engage -> consolidate, or recover and retry with backoff, or
  dead-letter;
* the **lease keeper** extends the leases of running foci, so a long focus never runs twice;
* the **completer** batches completions into one round trip;
* the **sealer** chains new audit rows shortly after they commit, and now and then writes a
  checkpoint of the chain's head outside the database (:mod:`animus_core.infra.witness`);
* on the embedded server, a **keeper** starts the server again if it dies under the engine.

When the database cannot be reached, every task retries with backoff; the engine says so
once when the outage begins and once when it ends, not on every retry.

Several engines on one database cooperate through it alone: claims skip locked rows, and a
lease that runs out makes the item claimable again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

import msgspec
import pluggy
from opentelemetry import context, trace

from animus_core.faculties.faculty import Faculty
from animus_core.faculties.focus import EngineFoci, Focus, sweep_foci
from animus_core.faculties.llm import collect_tools, make_client
from animus_core.faculties.plugins import Faculties, await_me_maybe
from animus_core.governance.rules import RuleSet
from animus_core.infra import embedded, witness
from animus_core.infra.config import Settings
from animus_core.infra.secrets import redactor
from animus_core.infra.telemetry import current_traceparent, extract, instruments, tracer, tracing
from animus_core.store import read
from animus_core.store.db import DEFAULT_QUEUE, Db, DeadLetter, Retry, connection_lost
from animus_core.store.memory import Memory, select_embedder
from animus_core.values import json_values
from animus_core.values.canonical import canonical_hash
from animus_core.values.errors import AnimusError, DatabaseUnavailable, InvalidInput, LeaseLost
from animus_core.values.limits import clip, limits
from animus_core.values.records import ExecutionRecord, environment
from animus_core.values.schedules import Schedule
from animus_core.values.version import __version__
from animus_core.values.work import (
    Claimed,
    Lease,
    NewWorkItem,
    WorkItem,
    WorkNotification,
)

__all__ = ["Engine", "EngineOptions"]

_log = logging.getLogger("animus.engine")
_audit_log = logging.getLogger("animus.audit")
CHANNEL = "animus_work"
CANCEL_CHANNEL = "animus_cancel"
DEADLINE_TICK = 0.05  # how often running phases are checked against their timeout (s)


@dataclass(frozen=True, kw_only=True)
class EngineOptions:
    concurrency: int = 64
    lease_seconds: int = 60
    poll_interval: float = 10.0
    grace: float = 30.0
    queues: tuple[str, ...] = (DEFAULT_QUEUE,)
    keep_foci: bool = False
    seal_interval: float = 1.0
    #: at most this often (seconds) a checkpoint of the audit chain's head is written under
    #: ANIMUS_HOME and logged; and when the engine stops
    checkpoint_interval: float = 60.0


@dataclass
class _Slot:
    faculty: Faculty
    running: int = 0
    dirty: bool = True
    tokens: float = 0.0
    refilled: float = field(default_factory=time.monotonic)

    def take_tokens(self, want: int) -> int:
        rate = self.faculty.rate_limit
        if not rate:
            return want
        now = time.monotonic()
        self.tokens = min(max(1.0, rate), self.tokens + (now - self.refilled) * rate)
        self.refilled = now
        allowed = min(want, int(self.tokens))
        self.tokens -= allowed
        return allowed

    def seconds_to_token(self) -> float:
        rate = self.faculty.rate_limit or 1.0
        return max(0.01, (1 - self.tokens) / rate)


@dataclass
class _InFlight:
    claimed: Claimed
    task: asyncio.Task[None]
    slot: _Slot
    #: until when the lease surely holds (monotonic): when the claim or the last extension
    #: that succeeded was asked for, plus the lease time; see Engine._fence
    held_until: float
    #: stopped because its lease is lost (or about to be): it records nothing
    lost: bool = False
    finished: bool = False
    #: when the running coroutine phase times out (loop time); see Engine._enforce_deadlines
    deadline: float | None = None
    timed_out: bool = False


class Engine:
    """Runs faculties against the work in one database until asked to stop."""

    def __init__(self, db: Db, pm: pluggy.PluginManager, faculties: Faculties,
                 settings: Settings, options: EngineOptions | None = None) -> None:
        self.db = db
        self.pm = pm
        self.faculties = faculties
        self.settings = settings
        self.options = options or EngineOptions()
        self.slots = {f.name: _Slot(f) for f in faculties}
        self.inflight: dict[UUID, _InFlight] = {}
        self.unroutable: dict[str, float] = {}
        self.started = asyncio.Event()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._completions: list[tuple[Lease, Any, int | None]] = []
        #: the batch being written right now (its leases are held until it is recorded)
        self._recording: list[tuple[Lease, Any, int | None]] = []
        self._executions: list[ExecutionRecord] = []
        self.environment_hash = ""
        self._completions_ready = asyncio.Event()
        self._deadlines = asyncio.Event()  # set while some phase has a deadline to enforce
        self._closing = False
        #: when a stop was asked for, plus the grace period: the last moment to record work
        self._stop_deadline: float | None = None
        self._cancelling: set[UUID] = set()
        self._checks: set[asyncio.Task[None]] = set()  # cancel notifications being verified
        self._activity = False
        self.foci_root = settings.home / "foci"
        self._foci: EngineFoci | None = None  # this engine's own directory in foci_root
        self.hook_env = {"DATABASE_URL": db.url, "ANIMUS_HOME": str(settings.home)}
        self.listener_connected = asyncio.Event()
        self.memory: Memory | None = None
        self.tools = collect_tools(pm)
        self.rules = RuleSet.load(settings.rules_dir)
        redactor.learn(os.environ, [n for f in faculties
                                    for n in getattr(getattr(f, "spec", None), "secrets", ())])
        db.rules = self.rules
        self._client: Any = None
        #: faculties switched off at start (name -> why); their work stays queued
        self.disabled: dict[str, str] = {}
        self.disabled_types: dict[str, str] = {}
        for fac in list(faculties):
            missing = [v for v in fac.requires_env if not os.environ.get(v)]
            if missing:
                self.disabled[fac.name] = f"{', '.join(missing)} not set"
                self.disabled_types.update(dict.fromkeys(fac.accepts, fac.name))
                faculties.remove(fac.name)
                self.slots.pop(fac.name, None)
                _log.error("faculty %s is disabled: %s (its work stays queued)", fac.name,
                           self.disabled[fac.name])
        self.memory_problem = "memory is not configured for this engine"
        for key in db.audit_keys.keys:  # a Python faculty could print one; nobody may see it
            for text in (key.hex(), base64.b64encode(key).decode(),
                         base64.urlsafe_b64encode(key).decode()):
                redactor.learn({"ANIMUS_AUDIT_KEY": text})
        #: when the database became unreachable (monotonic), while it is
        self._outage_since: float | None = None
        self._holding_reported = False
        self._db_trouble = asyncio.Event()  # a task saw the database fail: the keeper looks
        self._unwitnessed = True
        self._witnessed_at = -1e18
        self._witnessed_seq = -1
        self._checkpoint_file: Path | None = None

    # -- running -----------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the engine to drain and return from :meth:`run`."""
        if self._stop_deadline is None:
            self._stop_deadline = time.monotonic() + self.options.grace
            if self._completions:
                _log.warning(
                    "stopping while %d finished foci wait for the database: they are recorded "
                    "if it answers within the grace period (%.0fs); otherwise these items run "
                    "again once their leases expire: %s", len(self._completions),
                    self.options.grace, ", ".join(str(c[0].work_id) for c in self._completions))
        self._stopping.set()
        self._wake.set()

    async def _open_memory(self) -> None:
        try:
            self.memory = await Memory.open(self.db, select_embedder(self.pm, self.settings))
        except AnimusError as e:
            self.memory_problem = f"memory is unavailable: {e}"
            _log.error("%s", self.memory_problem)

    async def run(self) -> None:
        # the keeper first: the start-up steps below wait for the database too
        keeper = (self._supervise("animus-embedded", self._keep_embedded_server)
                  if self.settings.database_url is None and embedded.holds(self.settings.home)
                  else None)
        try:
            await self._start_up()
        except BaseException:
            if keeper is not None:
                keeper.cancel()
                await asyncio.gather(keeper, return_exceptions=True)
            raise
        helpers = [
            self._supervise("animus-listener", self._listen),
            self._supervise("animus-leases", self._keep_leases),
            self._supervise("animus-sealer", self._seal_loop),
            self._supervise("animus-deadlines", self._enforce_deadlines),
            *[self._supervise(f"schedule-{s.name}", functools.partial(self._tick, s))
              for f in self.faculties for s in f.schedules],
        ]
        if self.settings.otel_endpoint:
            helpers.append(self._supervise("animus-depths", self._sample_depths))
        if keeper is not None:
            helpers.append(keeper)
        completer = self._supervise("animus-completer", self._complete_loop)
        self.started.set()
        _log.info("engine started: %d faculties, concurrency %d, queues %s",
                  len(self.faculties), self.options.concurrency, ",".join(self.options.queues))
        quiet_pool = _DuringOutage(self)
        logging.getLogger("asyncpg.pool").addFilter(quiet_pool)
        try:
            await self._schedule_loop()
        finally:
            await self._drain()
            # The completer is not cancelled mid-batch: it is told to finish and exit.
            self._closing = True
            self._completions_ready.set()
            await asyncio.gather(completer, return_exceptions=True)
            for task in (*helpers, *self._checks):
                task.cancel()
            await asyncio.gather(*helpers, *self._checks, return_exceptions=True)
            await self._flush_completions()
            with contextlib.suppress(AnimusError):
                await self.db.seal_audit()
                await self._witness()
            logging.getLogger("asyncpg.pool").removeFilter(quiet_pool)
            for impl in self.pm.hook.shutdown.get_hookimpls():
                try:
                    await await_me_maybe(impl.function(*[self for _ in impl.argnames]))
                except Exception:
                    _log.exception("shutdown hook of %s failed", impl.plugin_name)
            if self._foci is not None:
                self._foci.close()
            _log.info("engine stopped")

    async def _start_up(self) -> None:
        await self._open_memory()
        self.environment_hash, env = await asyncio.to_thread(environment)
        await self._until_reachable("record the environment",
                                    lambda: self.db.record_environment(self.environment_hash, env))
        for impl in self.pm.hook.startup.get_hookimpls():
            await await_me_maybe(impl.function(*[self for _ in impl.argnames]))
        await self._until_reachable("look for unroutable work", self._report_unroutable_backlog)
        self._foci = await asyncio.to_thread(self._claim_foci)

    def _supervise(self, name: str, loop: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """Run a helper loop as a task that outlives its failures: a lost connection, or any
        other exception, is logged and the loop starts again after a backoff (1 s, doubling
        to 30 s while it keeps failing at once). Only cancellation ends it, or the loop
        returning (the completer, once the engine closes)."""
        async def supervised() -> None:
            backoff = 1.0
            while True:
                started = time.monotonic()
                try:
                    await loop()
                    return
                except Exception as e:
                    if time.monotonic() - started > 60:
                        backoff = 1.0  # it ran a good while: not failing at once
                    level = logging.ERROR
                    if isinstance(e, DatabaseUnavailable):
                        self._unreachable(e)
                        level = logging.DEBUG
                    _log.log(level, "engine task %s failed (%s: %s); restarting it in %.0fs",
                             name, type(e).__name__, redactor.text(str(e))[:300], backoff,
                             exc_info=level == logging.ERROR)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)

        task = asyncio.create_task(supervised(), name=name)
        task.add_done_callback(self._helper_died)
        return task

    def _claim_foci(self) -> EngineFoci:
        """Remove what engines that died left in the foci root, then take a directory of
        this engine's own there (several engines may share one ANIMUS_HOME)."""
        removed = sweep_foci(self.foci_root)
        if removed:
            _log.info("removed %d focus directories of attempts whose engine is gone: %s",
                      len(removed), ", ".join(p.name for p in removed))
        return EngineFoci.open(self.foci_root)

    def _helper_died(self, task: asyncio.Task[Any]) -> None:
        """A helper must not end while the engine runs (its loop is restarted on failure):
        if one returns, say so loudly and stop the engine rather than stall without a word."""
        if task.cancelled() or self._closing or task.exception() is not None:
            return
        _log.critical("engine task %s stopped unexpectedly; stopping the engine",
                      task.get_name())
        self.stop()

    def _unreachable(self, e: BaseException) -> None:
        """A task could not reach the database: the first one to see it in an outage says
        so (the others retry quietly, at DEBUG), and the embedded server's keeper looks."""
        self._db_trouble.set()
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            _log.warning("the database is unreachable (%s); the engine retries with backoff "
                         "and logs when it answers again", redactor.text(str(e))[:300])

    def _reachable(self) -> None:
        """A round trip to the database succeeded: the outage, if there was one, is over."""
        if self._outage_since is not None:
            _log.info("the database answers again, after %.0fs",
                      time.monotonic() - self._outage_since)
            self._outage_since = None
            self._holding_reported = False

    def _retrying(self, e: AnimusError, message: str, *args: Any) -> None:
        """Log a failure that will be retried: a warning, or, when it is the database being
        unreachable, a note of the outage and a DEBUG line."""
        if isinstance(e, DatabaseUnavailable):
            self._unreachable(e)
            _log.debug(message, *args)
        else:
            _log.warning(message, *args)

    async def _until_reachable(self, what: str, step: Callable[[], Awaitable[Any]]) -> None:
        """Run a start-up ``step``, retrying while the database is unreachable."""
        backoff = 0.5
        while True:
            try:
                await step()
                return
            except DatabaseUnavailable as e:
                if self._stopping.is_set():
                    raise
                self._db_trouble.set()
                _log.warning("cannot %s yet, retrying in %.1fs: %s", what, backoff, e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    # -- scheduling ------------------------------------------------------------------------

    def _mark_dirty(self, work_types: Iterable[str] | None = None) -> None:
        if work_types is None:
            for slot in self.slots.values():
                slot.dirty = True
        else:
            for t in work_types:
                fac = self.faculties.by_type.get(t)
                if fac is None:
                    self._note_unroutable(t)
                else:
                    self.slots[fac.name].dirty = True
        self._wake.set()

    def _note_unroutable(self, work_type: str) -> None:
        instruments.unroutable.add(1, {"work_type": work_type})
        now = time.monotonic()
        if now - self.unroutable.get(work_type, -1e9) > 300:
            if work_type in self.disabled_types:
                name = self.disabled_types[work_type]
                _log.warning("work type %r belongs to faculty %s, which is disabled (%s): its "
                             "items stay queued until it is enabled", work_type, name,
                             self.disabled[name])
            else:
                _log.warning("work type %r has no faculty: its items stay queued until a "
                             "faculty that accepts it is installed", work_type)
        self.unroutable[work_type] = now

    def _wake_later(self, delay: float, slot: _Slot) -> None:
        def fire() -> None:
            slot.dirty = True
            self._wake.set()

        asyncio.get_running_loop().call_later(delay, fire)

    async def _schedule_loop(self) -> None:
        backoff = 0.5
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.options.poll_interval)
            if self._stopping.is_set():
                break
            if not self._wake.is_set():  # the slow fallback poll
                self._mark_dirty()
            self._wake.clear()
            try:
                await self._fill()
                backoff = 0.5
            except AnimusError as e:  # unreachable, or refused: the loop must go on either way
                delay = backoff * random.uniform(0.5, 1.5)  # jittered, as the completer's
                self._retrying(e, "claim failed, retrying in %.1fs: %s", delay, e)
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, 10.0)
                self._mark_dirty()

    async def _fill(self) -> None:
        total_free = self.options.concurrency - len(self.inflight)
        for slot in self.slots.values():
            if not slot.dirty or total_free <= 0:
                continue
            free = min(slot.faculty.max_concurrent - slot.running, total_free)
            if free <= 0:
                continue  # stays dirty: a finishing focus will wake the loop
            allowed = slot.take_tokens(free)
            if allowed <= 0:
                self._wake_later(slot.seconds_to_token(), slot)
                continue
            got = 0
            # Cleared before the claim: a notification that arrives while it is in flight
            # sets it again, and is not lost.
            slot.dirty = False
            for queue in self.options.queues:
                asked = time.monotonic()
                claimed = await self.db.claim(
                    queue, limit=allowed - got, lease_seconds=self.options.lease_seconds,
                    work_types=slot.faculty.accepts, start=True,
                )
                self._reachable()
                for c in claimed:
                    self._start_focus(slot, c, asked + self.options.lease_seconds)
                got += len(claimed)
                if got >= allowed:
                    break
            if slot.faculty.rate_limit and got < allowed:
                slot.tokens += allowed - got
            total_free -= got
            # A full claim means more may be waiting; a short one that nothing is visible now.
            if got >= free:
                slot.dirty = True
            if got:
                self._activity = True

    def _start_focus(self, slot: _Slot, claimed: Claimed, held_until: float) -> None:
        old = self.inflight.get(claimed.item.id)
        if old is not None:  # its lease ran out and this engine claimed the item again
            self._lose(old.claimed.lease, "this engine claimed the item again")
        slot.running += 1
        task = asyncio.create_task(self._focus(slot, claimed), name=f"focus-{claimed.item.id}")
        # in place before the task takes its first step: _focus finds its own record here
        flight = self.inflight[claimed.item.id] = _InFlight(claimed, task, slot, held_until)
        # a task cancelled before its first step never runs _focus's own clean-up
        task.add_done_callback(lambda _: self._finished(flight))

    def _finished(self, flight: _InFlight) -> None:
        """Once per focus: free its slot, and forget it (unless a newer attempt of the same
        item replaced it)."""
        if flight.finished:
            return
        flight.finished = True
        flight.slot.running -= 1
        work_id = flight.claimed.item.id
        if self.inflight.get(work_id) is flight:
            del self.inflight[work_id]
        if flight.slot.dirty:  # its backlog was not drained: use the freed slot
            self._wake.set()

    # -- foci ------------------------------------------------------------------------------

    async def _call(self, fac: Faculty, hook: str, focus: Focus, /, **kwargs: Any) -> Any:
        method = getattr(fac, hook)
        timeout = fac.timeout
        if not _is_async(method):
            return await asyncio.wait_for(asyncio.to_thread(method, focus, **kwargs), timeout)
        flight = self.inflight.get(focus.work.id)
        if flight is None or timeout is None:
            async with asyncio.timeout(timeout):
                return await method(focus, **kwargs)
        # One deadline checker for every focus instead of a timer per phase (asyncio.timeout
        # costs about 5 us, a sixth of a trivial focus).
        flight.deadline = asyncio.get_running_loop().time() + timeout
        self._deadlines.set()
        try:
            return await method(focus, **kwargs)
        except asyncio.CancelledError:
            if not flight.timed_out:
                raise
            flight.timed_out = False
            task = asyncio.current_task()
            if task is not None and task.uncancel() > 0:
                raise  # cancelled for another reason as well
            raise TimeoutError(f"{hook} ran longer than {timeout:g} s") from None
        finally:
            flight.deadline = None

    async def _enforce_deadlines(self) -> None:
        """Cancel coroutine phases that run past their faculty's timeout (see _call)."""
        loop = asyncio.get_running_loop()
        while True:
            await self._deadlines.wait()
            await asyncio.sleep(DEADLINE_TICK)
            now, waiting = loop.time(), False
            for flight in list(self.inflight.values()):
                if flight.deadline is None or flight.timed_out:
                    continue
                if now >= flight.deadline:
                    flight.timed_out = True
                    flight.task.cancel()
                else:
                    waiting = True
            if not waiting:
                self._deadlines.clear()

    async def _check_rules(self, item: WorkItem) -> None:
        """Rules again, right before engage: they may have changed since submit."""
        if not self.rules.active:
            return
        decision = self.rules.evaluate(item.work_type, item.params, item.provenance.source)
        if decision.effect == "deny":
            raise RuleRefused(f"denied before engage: {decision.reason}")
        if decision.effect == "require_approval":
            # Only approvals by people who hold the rule's role count (whatever the stored
            # gate says: a submitter with raw SQL access could have written it).
            approvers = await self.db.approvers(item.id, decision.role or "approver")
            if item.gate is None or len(approvers) < decision.quorum:
                raise RuleRefused(
                    f"rule {decision.rule!r} requires {decision.quorum} approval(s) by "
                    f"{decision.role} before engage; this item has {len(approvers)}")

    def _record(self, fac: Faculty, focus: Focus, started_at: datetime, result: str,
                params_hash: str, *, outcome: Any = None,
                error: str | None = None) -> ExecutionRecord:
        identity = fac.identity()
        return ExecutionRecord(
            work_id=focus.work.id, attempt=focus.attempt, result=result,
            work_type=focus.work.work_type, params_hash=params_hash,
            faculty=identity, faculty_hash=canonical_hash(identity),
            engine_version=__version__, environment_hash=self.environment_hash,
            models=sorted(focus.llm_usage), error=error, started_at=started_at,
            outcome_hash=canonical_hash(outcome, nfc=True) if result == "completed" else None)

    async def _cancelled(self, fac: Faculty, focus: Focus, lease: Lease, started: float,
                         started_at: datetime, params_hash: str) -> None:
        """A requested cancellation stopped the focus: end the item failed -> dead."""
        self._cancelling.discard(lease.work_id)
        ms = int((time.perf_counter() - started) * 1000)
        try:  # the database writes the reason (and the record's error): who asked
            await self.db.cancel_attempt(lease, duration_ms=ms, execution=self._record(
                fac, focus, started_at, "failed", params_hash))
        except AnimusError as e:
            _log.warning("could not record the cancellation of %s: %s", lease.work_id, e)
        self._activity = True

    def _llm_access(self) -> tuple[Any, dict[str, Any]]:
        if self._client is None:
            self._client = make_client()
        return self._client, self.tools

    async def _phase(self, fac: Faculty, phase: str, focus: Focus, traced: bool, /,
                     **kwargs: Any) -> Any:
        started = time.perf_counter()
        if not traced:
            focus.traceparent = focus.work.traceparent
            try:
                return await self._call(fac, phase, focus, **kwargs)
            finally:
                instruments.phase_duration.record(time.perf_counter() - started,
                                                  {"faculty": fac.name, "phase": phase})
        # the SDK would record the exception's own (unredacted) text: the status says it instead
        with tracer.start_as_current_span(phase, attributes={
                "animus.faculty": fac.name, "animus.phase": phase},
                record_exception=False, set_status_on_exception=False) as s:
            focus.traceparent = current_traceparent()
            try:
                return await self._call(fac, phase, focus, **kwargs)
            except Exception as e:
                s.set_status(trace.StatusCode.ERROR, redactor.text(str(e))[:500])
                raise
            finally:
                instruments.phase_duration.record(time.perf_counter() - started,
                                                  {"faculty": fac.name, "phase": phase})

    async def _focus(self, slot: _Slot, claimed: Claimed) -> None:
        fac, item, lease = slot.faculty, claimed.item, claimed.lease
        flight = self.inflight[item.id]  # this focus's own record (see _start_focus)
        focus = Focus(item, self.db, attempt=item.attempts, log=_log,
                      root=self._foci.path if self._foci else self.foci_root,
                      keep_root=self.foci_root, hook_env=self.hook_env)
        memory = self.memory.for_work(source=fac.name, work_id=item.id) if self.memory else None
        focus._memory = memory
        focus.memory_unavailable = self.memory_problem
        focus._llm = self._llm_access
        started = time.perf_counter()
        started_at = datetime.now(UTC)
        phase, failed, result = "orient", False, "completed"
        params_hash = ""
        scope = self.db.transaction()
        # Nobody records spans without a tracer provider: skip building them (a third of the
        # per-item cost of a trivial focus). Hooks still continue the item's own trace.
        traced = _traced()
        token = None
        if traced:
            focus_span = tracer.start_span(
                f"focus {item.work_type}", context=extract(item.traceparent), attributes={
                    "animus.work.id": str(item.id), "animus.work.type": item.work_type,
                    "animus.faculty": fac.name, "animus.attempt": item.attempts})
            focus_span.add_event("running", {"from": "claimed", "to": "running"})
            token = context.attach(trace.set_span_in_context(focus_span))
        else:
            focus_span = trace.INVALID_SPAN
        try:
            try:
                params_hash = _params_hash(item.params)
                oriented = await self._phase(fac, "orient", focus, traced)
                phase = "engage"
                await self._check_rules(item)
                engaged = await self._phase(fac, "engage", focus, traced, oriented=oriented)
                phase = "consolidate"
                if self.memory is not None:
                    focus._memory = self.memory.scoped(scope, source=fac.name, work_id=item.id)
                outcome = redactor.json(
                    await self._phase(fac, "consolidate", focus, traced, engaged=engaged))
                # what the completion will store (encoded once): within the JSON model and
                # the size limit
                stored = msgspec.Raw(json_values.encode(outcome, "outcome",
                                                        limit=limits().outcome_bytes,
                                                        setting="ANIMUS_MAX_OUTCOME_BYTES"))
                ms = int((time.perf_counter() - started) * 1000)
                if focus.llm_usage:
                    conn = await scope.connection()
                    await self.db.record_usage(item.id, _usage_record(focus), conn=conn)
                record = self._record(fac, focus, started_at, "completed", params_hash,
                                      outcome=outcome)
                if scope.conn is not None:
                    # consolidate wrote memories: they commit with the completion, or not at all
                    await self.db.complete_many([(lease, stored, ms)], conn=scope.conn,
                                                executions=[record])
                    await scope.finish(commit=True)
            except asyncio.CancelledError:
                await scope.finish(commit=False)
                if flight.lost:  # its record (lost) comes with the claim that takes it back
                    self._cancelling.discard(item.id)  # a cancel request is moot now
                    failed, result = True, "lost"
                elif item.id not in self._cancelling:
                    raise  # shutdown: the drain releases it
                else:
                    failed, result = True, "dead"
                    await self._cancelled(fac, focus, lease, started, started_at,
                                          params_hash or _NO_PARAMS_HASH)
            except Exception as e:
                await scope.finish(commit=False)
                failed, result = True, "failed"
                ms = int((time.perf_counter() - started) * 1000)
                error = redactor.text(_describe(e, phase, fac))
                instruments.hook_failures.add(1, {"faculty": fac.name, "phase": phase,
                                                  "reason": _failure_kind(e, error)})
                focus_span.set_status(trace.StatusCode.ERROR, error[:500])
                focus_span.add_event("failed", {"from": "running", "to": "failed",
                                                "phase": phase, "error": error[:500]})
                record = self._record(fac, focus, started_at, "failed",
                                      params_hash or _NO_PARAMS_HASH, error=error)
                result = await self._failed(fac, focus, lease, error, phase, ms, record,
                                            final=isinstance(e, RuleRefused | Unrunnable))
            else:
                focus_span.add_event("completed", {"from": "running", "to": "completed"})
                if not scope.used:  # the usual path: batched with other completions
                    self._completions.append((lease, stored, ms))
                    self._executions.append(record)
                    self._completions_ready.set()
                self._activity = True
        finally:
            # recorded while the focus span is current, so the histogram gets exemplars
            instruments.focus_duration.record(time.perf_counter() - started,
                                              {"faculty": fac.name, "result": result})
            if token is not None:
                context.detach(token)
                focus_span.set_attribute("animus.result", result)
                focus_span.end()
            kept = focus.cleanup(keep=failed and (self.options.keep_foci
                                                  or getattr(fac, "keep_failed", False)))
            if kept:
                _log.info("kept focus directory of failed %s: %s", item.id, kept)
            self._finished(flight)

    async def _failed(self, fac: Faculty, focus: Focus, lease: Lease, error: str,
                      phase: str, ms: int, record: ExecutionRecord, *,
                      final: bool = False) -> str:
        """Run recover, record the failure (with the attempt's execution record, while the
        lease is held), then retry or dead-letter; returns which."""
        note = ""
        verdict: bool | None = None
        try:
            if final:
                verdict = False  # retrying cannot change a rule's answer
            else:
                verdict = await self._phase(fac, "recover", focus, _traced(),
                                            error=error, phase=phase)
        except Exception as e:
            note = f" (recover failed too: {redactor.text(_describe(e, 'recover', fac))})"
        reason = clip(f"{phase} failed: {error}{note}")
        result = "failed"
        _log.warning("%s %s attempt %d: %s", fac.name, lease.work_id, focus.attempt, reason)
        attempts, limit = focus.attempt, fac.max_attempts or focus.work.max_attempts
        then: Retry | DeadLetter
        if verdict is False:
            then = DeadLetter(reason if final  # a rule; recover not asked
                              else clip(f"recover chose to dead-letter: {reason}"))
        elif attempts >= limit:
            then = DeadLetter(clip(f"attempts exhausted ({attempts}/{limit}): {reason}"))
        else:
            delay = min(fac.retry_max, fac.retry_base * 2 ** (attempts - 1))
            delay *= random.uniform(0.5, 1.5)
            then = Retry(delay, clip(f"retry {attempts + 1}/{limit} in {delay:.1f}s after {reason}"))
        try:  # what a failed attempt spent is kept too
            await self.db.fail_attempt(lease, reason, then=then, duration_ms=ms, execution=record,
                                       usage=_usage_record(focus) if focus.llm_usage else None)
            result = "retry" if isinstance(then, Retry) else "dead"
            if isinstance(then, Retry):
                self._wake_later(then.delay + 0.05, self.slots[fac.name])
        except LeaseLost as e:
            _log.warning("%s", e)
        except AnimusError as e:
            _log.error("could not record the failure of %s (its lease will expire and it "
                       "will be retried): %s", lease.work_id, e)
        self._activity = True
        trace.get_current_span().add_event(result, {"reason": reason[:500]})
        return result

    # -- completions, leases, sealing -----------------------------------------------------------

    async def _complete_loop(self) -> None:
        while True:
            await self._completions_ready.wait()
            self._completions_ready.clear()
            await self._flush_completions()
            if self._closing:  # run() flushes once more after this; then it is over
                return

    async def _flush_completions(self) -> None:
        held = 0
        while self._completions:
            batch, self._completions = self._completions, []
            records, self._executions = self._executions, []
            self._recording = batch
            try:
                await self.db.complete_many(batch, executions=records)
            except DatabaseUnavailable as e:
                self._completions = batch + self._completions
                self._executions = records + self._executions
                if self._stop_deadline is not None and time.monotonic() >= self._stop_deadline:
                    ids = ", ".join(str(c[0].work_id) for c in self._completions)
                    _log.error(
                        "stopping without recording %d finished foci: the database is still "
                        "unreachable at the end of the grace period (%s). These items will run "
                        "again once their leases expire: %s", len(self._completions), e, ids)
                    self._completions, self._executions = [], []
                    return
                self._unreachable(e)
                held = len(self._completions)
                if not self._holding_reported:
                    self._holding_reported = True
                    _log.warning("holding finished foci until the database answers (or, if the "
                                 "engine is stopping, until its grace period ends): %s",
                                 ", ".join(str(c[0].work_id) for c in self._completions))
                _log.debug("completing %d items failed, retrying: %s", len(batch), e)
                self._recording = []  # back in _completions, where the lease keeper sees them
                # Jittered: a fixed delay can fall into step with a periodic fault (backends
                # terminated every 250 ms) and meet it on every retry.
                delay = 0.5 if self._stop_deadline is not None else 1.0
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                continue
            except AnimusError:
                for one, rec in zip(batch, records, strict=True):  # keep the others
                    try:
                        await self.db.complete_many([one], executions=[rec])
                    except DatabaseUnavailable:
                        self._completions.append(one)  # tried again with the next batch
                        self._executions.append(rec)
                    except AnimusError as e1:
                        _log.warning("could not complete %s: %s", one[0].work_id, e1)
            finally:
                self._recording = []
            self._reachable()
            if held:
                _log.info("recorded the finished foci held while the database was unreachable")
                held = 0
            self._activity = True

    async def _keep_leases(self) -> None:
        """Extend the leases of running foci every third of the lease time, and fence: a
        focus whose lease could not be extended is stopped before that lease can run out."""
        every = max(1.0, self.options.lease_seconds / 3)
        next_extension = time.monotonic() + every
        retry = 0.1
        while True:
            now = time.monotonic()
            fence_at = min((f.held_until - self._fence_margin for f in self.inflight.values()),
                           default=next_extension)
            await asyncio.sleep(max(0.05, min(next_extension, fence_at) - now))
            if time.monotonic() >= next_extension:
                next_extension = time.monotonic() + every
                if await self._extend_leases(timeout=every):
                    retry = 0.1
                else:
                    # Waiting the usual period after a failure would leave a third of the
                    # lease to spare, or none after two, and the fence would stop the foci:
                    # try again soon (a fresh connection often works at once), backing off
                    # to the usual period.
                    retry = min(every, retry * 2)
                    next_extension = time.monotonic() + min(
                        every, retry * random.uniform(0.5, 1.5))
            self._fence()

    @property
    def _fence_margin(self) -> float:
        return max(0.5, self.options.lease_seconds / 6)

    async def _extend_leases(self, timeout: float) -> bool:
        """Whether the leases held (if any) were extended."""
        flights = list(self.inflight.values())
        leases = [f.claimed.lease for f in flights]
        # A finished focus whose completion is not recorded yet still holds its item:
        # were its lease to run out, the work would be claimed and done again.
        recording = [c[0] for c in (*self._recording, *self._completions)]
        if not leases and not recording:
            return True
        asked = time.monotonic()
        try:
            async with asyncio.timeout(timeout):  # a hung call must not delay the fence
                lost = await self.db.extend_lease(leases + recording,
                                                  self.options.lease_seconds)
                # a cancel request whose notification this engine missed
                requested = (await self.db.cancel_requests([le.work_id for le in leases])
                             if leases else [])
        except (AnimusError, TimeoutError) as e:
            n = len(leases) + len(recording)
            if isinstance(e, AnimusError):
                self._retrying(e, "could not extend %d leases: %s", n, e)
            else:
                _log.warning("could not extend %d leases: %s", n, e)
            return False
        for flight in flights:
            if flight.claimed.lease not in lost:
                flight.held_until = asked + self.options.lease_seconds
        for lease in lost:
            self._lose(lease, "it was taken back after the lease ran out")
        for work_id in requested:
            self._cancel(work_id)
        return True

    def _fence(self) -> None:
        """Stop each focus whose lease may run out before this engine can extend it (the
        database is unreachable or too slow): once it runs out, another engine (or this one,
        reconnected) may claim the item, and two attempts must never run at once."""
        now = time.monotonic()
        for flight in list(self.inflight.values()):
            if flight.held_until - now <= self._fence_margin:
                self._lose(flight.claimed.lease,
                           f"its lease could not be extended and ends in "
                           f"{max(0.0, flight.held_until - now):.1f}s")

    async def _seal_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.seal_interval)
            if self._activity:
                self._activity = False
                try:
                    if await self.db.seal_audit():
                        self._unwitnessed = True
                except AnimusError as e:
                    self._retrying(e, "audit sealing failed (will retry): %s", e)
                    self._activity = True
                    continue
            if (self._unwitnessed and time.monotonic() - self._witnessed_at
                    >= self.options.checkpoint_interval):
                await self._witness()

    async def _witness(self) -> None:
        """Write a checkpoint of the audit chain's head under ANIMUS_HOME and log it (to the
        OTLP log stream too, when telemetry exports): copies the database cannot rewrite."""
        try:
            cp = await self.db.audit_checkpoint(seal=False)
        except AnimusError as e:
            self._retrying(e, "could not take an audit checkpoint (will retry): %s", e)
            return
        self._unwitnessed = False
        self._witnessed_at = time.monotonic()
        if cp.seq == self._witnessed_seq:
            return
        # logged first: the write below runs in a thread, and a stop may cancel the wait for
        # it; the checkpoint then counts as unwritten and the stop writes (and logs) it again
        line = cp.line()
        _audit_log.info("audit checkpoint %s", line, extra={"animus.audit.checkpoint": line})
        path = witness.checkpoint_path(self.settings.home, cp.database)
        try:
            await asyncio.to_thread(witness.append_checkpoint, path, cp)
        except OSError as e:
            _log.warning("could not write an audit checkpoint to %s: %s", path, e)
        else:
            if path != self._checkpoint_file:
                self._checkpoint_file = path
                _log.info("writing audit checkpoints to %s", path)
        self._witnessed_seq = cp.seq

    async def _tick(self, schedule: Schedule) -> None:
        """Submit the schedule's work at each tick; the database lets one engine win a tick."""
        while True:
            tick = schedule.next_tick(datetime.now(UTC))
            await asyncio.sleep(max(0.0, (tick - datetime.now(UTC)).total_seconds()))
            item = (NewWorkItem(schedule.work_type, source="schedule", trigger=schedule.name)
                    .params(schedule.params).priority(schedule.priority))
            try:
                result = await self.db.submit_scheduled(schedule.name, tick, item)
            except AnimusError as e:
                self._retrying(e, "schedule %s could not submit its %s tick: %s", schedule.name,
                               tick.isoformat(), e)
                continue
            if result is not None:
                instruments.schedule_ticks.add(1, {"schedule": schedule.name})
                _log.info("schedule %s fired for %s: %s", schedule.name, tick.isoformat(),
                          result.id)

    async def _sample_depths(self, every: float = 10.0) -> None:
        """Queue depth for the animus.queue.depth gauge (only while telemetry exports)."""
        while True:
            try:
                for q in await read.queue_depths(self.db):
                    instruments.set_queue_depth(q.queue, q.depth)
            except AnimusError as e:
                _log.debug("queue depth sample failed: %s", e)
            await asyncio.sleep(every)

    # -- listening -----------------------------------------------------------------------------

    def _on_cancel(self, conn: object, pid: int, channel: str, payload: str) -> None:
        try:
            work_id = UUID(payload)
        except ValueError:
            return
        if work_id in self.inflight and work_id not in self._cancelling:
            # Any database user may NOTIFY: only a request recorded (and audited) by
            # Db.cancel stops a focus, so look it up before acting.
            check = asyncio.create_task(self._confirm_cancel(work_id))
            self._checks.add(check)
            check.add_done_callback(self._checks.discard)

    async def _confirm_cancel(self, work_id: UUID) -> None:
        try:
            confirmed = await self.db.cancel_requests([work_id])
        except AnimusError as e:  # the lease keeper asks again shortly
            _log.warning("could not look up the cancel request of %s: %s", work_id, e)
            return
        if work_id in confirmed:
            self._cancel(work_id)

    def _cancel(self, work_id: UUID) -> None:
        flight = self.inflight.get(work_id)
        if flight is not None and work_id not in self._cancelling:
            _log.info("cancelling the running focus of %s on request", work_id)
            self._cancelling.add(work_id)
            flight.task.cancel()

    def _lose(self, lease: Lease, why: str) -> None:
        """The lease is lost, or about to be (the engine stalled or was cut off): stop the
        focus now, killing its hooks, rather than run on beside the next attempt. The focus
        records nothing: the claim that takes the item back records the attempt as lost, and
        the lease no longer lets this engine finish it."""
        flight = self.inflight.get(lease.work_id)
        if flight is None or flight.claimed.lease != lease or flight.lost:
            return  # finished meanwhile, or already being stopped
        _log.warning("lease lost on work item %s (attempt %d): %s; stopping its focus",
                     lease.work_id, flight.claimed.item.attempts, why)
        flight.lost = True
        flight.task.cancel()

    def _on_notify(self, conn: object, pid: int, channel: str, payload: str) -> None:
        try:
            note = WorkNotification(**json.loads(payload))
        except (ValueError, TypeError):
            _log.warning("ignoring a malformed %s notification: %s", CHANNEL,
                         redactor.text(payload)[:200])  # a cut secret would no longer match
            self._mark_dirty()
            return
        if note.queue in self.options.queues:
            self._mark_dirty(note.work_types)

    async def _listen(self) -> None:
        backoff = 0.2
        while True:
            conn = None
            try:
                conn = await self.db.listen({CHANNEL: self._on_notify,
                                             CANCEL_CHANNEL: self._on_cancel})
                self.listener_connected.set()
                self._reachable()
                if backoff > 0.2:
                    _log.info("listener reconnected")
                backoff = 0.2
                self._mark_dirty()  # catch up on anything sent while not listening
                await conn.wait_lost()
                _log.warning("listener connection lost; reconnecting")
                self._db_trouble.set()  # the server may have gone: the keeper looks
            except AnimusError as e:
                if isinstance(e, DatabaseUnavailable):
                    self._unreachable(e)
                    _log.debug("listener cannot connect (retrying in %.1fs): %s", backoff, e)
                else:
                    _log.warning("listener cannot connect (retrying in %.1fs): %s", backoff, e)
            finally:
                self.listener_connected.clear()
                if conn is not None:
                    await conn.close()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
            self._mark_dirty()

    # -- the embedded server -------------------------------------------------------------------

    async def _keep_embedded_server(self) -> None:
        """On the embedded default this engine holds the server (with the other animus
        processes of its ANIMUS_HOME). If the server dies under it (its postmaster killed,
        ``pg_ctl stop``), nothing else would start it again: work would wait for the next
        animus command. Look whenever a task loses the database, and every few seconds."""
        home = self.settings.home
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._db_trouble.wait(), 5.0)
            self._db_trouble.clear()
            if not await asyncio.to_thread(embedded.server_running, home):
                await self._restart_embedded(home)

    async def _restart_embedded(self, home: Path) -> None:
        began, attempts, backoff = time.monotonic(), 0, 0.5
        _log.warning("the embedded Postgres in %s stopped under this engine; starting it again "
                     "(retrying with backoff until it starts)", home / "pgdata")
        while True:
            attempts += 1
            try:
                url = await asyncio.to_thread(embedded.embedded_url, home)
                break
            except DatabaseUnavailable as e:
                _log.debug("the embedded Postgres did not start yet (attempt %d): %s", attempts, e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
        _log.info("the embedded Postgres is back: started again after %.1fs (%d attempt%s)",
                  time.monotonic() - began, attempts, "" if attempts == 1 else "s")
        if urlsplit(url).query != urlsplit(self.db.url).query:
            _log.error("the embedded Postgres came back on another socket (%s, was %s): restart "
                       "this engine to reach it", url, self.db.url)
        self._mark_dirty()

    # -- shutdown ------------------------------------------------------------------------------

    async def _drain(self) -> None:
        if not self.inflight:
            return
        _log.info("draining: waiting up to %.0fs for %d foci", self.options.grace,
                  len(self.inflight))
        tasks = [f.task for f in self.inflight.values()]
        _done, pending = await asyncio.wait(tasks, timeout=self.options.grace)
        if not pending:
            return
        leftovers = [f for f in self.inflight.values() if f.task in pending]
        for f in leftovers:
            f.task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for f in leftovers:
            try:
                await self.db.release(f.claimed.lease, "released at shutdown (grace period over)")
            except AnimusError as e:
                _log.warning("could not release %s: it will run again once its lease expires "
                             "(%s)", f.claimed.item.id, e)
            self._finished(f)

    async def _report_unroutable_backlog(self) -> None:
        accepted = list(self.faculties.by_type)
        for r in await read.unroutable_backlog(self.db, accepted):
            self._note_unroutable(r.work_type)


class _DuringOutage(logging.Filter):
    """asyncpg's pool logs each failed reconnect with a traceback: a lost server is the
    engine's outage, which it reports once, so those records are dropped (and the first one
    may be what tells the engine)."""

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self.engine = engine

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and connection_lost(error):
            self.engine._unreachable(error)
        return self.engine._outage_since is None


class RuleRefused(Exception):
    """A rule refused the work before engage: it is dead-lettered, not retried."""


class Unrunnable(Exception):
    """The item cannot run at all (its stored params cannot be read): dead-lettered now."""


_NO_PARAMS_HASH = "none: the params cannot be read"  # an attempt refused before it ran


def _params_hash(params: Any) -> str:
    """The canonical hash of an item's params; :class:`Unrunnable` for params written around
    animus that it cannot read or hash (they are outside its JSON value model)."""
    if isinstance(params, json_values.Unreadable):
        raise Unrunnable(f"params cannot be read ({params.reason}): the item was written "
                         "around animus; it is dead-lettered without running")
    try:
        return canonical_hash(params, nfc=True)
    except (ValueError, TypeError, RecursionError):
        try:
            json_values.check(params, "params")
            problem = "they have no canonical form"
        except InvalidInput as e:
            problem = str(e)
        raise Unrunnable(f"params cannot be read ({problem}): the item was written around "
                         "animus; it is dead-lettered without running") from None


def _usage_record(focus: Focus) -> dict[str, Any]:
    return {"models": {m: msgspec.structs.asdict(u) for m, u in focus.llm_usage.items()},
            "cost_usd": round(focus.llm_cost_usd, 6)}


def _failure_kind(e: BaseException, error: str) -> str:
    if isinstance(e, TimeoutError) or "timed out" in error:
        return "timeout"
    if "not JSON" in error or "unreadable output" in error:
        return "bad_output"
    if "exited with status" in error or "killed by signal" in error:
        return "exit_status"
    return "exception"


def _describe(e: BaseException, phase: str, fac: Faculty) -> str:
    """The failure reason for ``e`` (NUL, which Postgres text cannot hold, shown as U+FFFD)."""
    return _reason(e, phase, fac).replace("\x00", "\ufffd")


def _reason(e: BaseException, phase: str, fac: Faculty) -> str:
    if isinstance(e, TimeoutError):
        return f"timed out after {fac.timeout:g}s"
    if isinstance(e, InvalidInput) and phase == "consolidate":
        return str(e)  # the outcome cannot be stored, and says why
    text = str(e).strip()
    name = type(e).__name__
    if name == "HookFailed" or isinstance(e, Unrunnable):
        return text
    return f"{name}: {text}" if text else name


def _traced() -> bool:
    """Whether spans are recorded: a tracer provider is installed (or the module's tracer
    was made by one)."""
    return not (isinstance(tracer, trace.ProxyTracer) and not tracing())


_ASYNC: dict[Any, bool] = {}


def _is_async(method: Any) -> bool:
    """``asyncio.iscoroutinefunction``, remembered per function (it costs microseconds)."""
    func = getattr(method, "__func__", method)
    try:
        return _ASYNC[func]
    except KeyError:
        answer = _ASYNC[func] = asyncio.iscoroutinefunction(method)
        return answer
    except TypeError:  # an unhashable callable object
        return asyncio.iscoroutinefunction(method)
