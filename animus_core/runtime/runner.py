"""The focus runner: one focus of one faculty on one claimed item, orient -> engage ->
consolidate, or recover on failure. It records the attempt (its execution record, and the
failure, retry or dead letter) and hands completions to the completer, which records them in
batches."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pluggy
from opentelemetry import context, trace

from animus_core.faculties.embedders import select_embedder
from animus_core.faculties.faculty import Faculty
from animus_core.faculties.focus import AgentRunner, Focus
from animus_core.faculties.plugins import Phases
from animus_core.faculties.steps import StepJournal
from animus_core.governance.work import GovernedWork, RuleRefused
from animus_core.infra.config import Settings
from animus_core.infra.secrets import redactor
from animus_core.infra.telemetry import current_traceparent, extract, instruments, tracer, tracing
from animus_core.runtime.completions import Completions
from animus_core.runtime.deadlines import Deadlines
from animus_core.runtime.failures import (
    NO_PARAMS_HASH,
    describe,
    failure_kind,
    params_hash,
)
from animus_core.runtime.flights import Flight, Slot
from animus_core.runtime.workspace import Workspace
from animus_core.store.db import Db, Retry
from animus_core.store.memory import Memory
from animus_core.store.tx import TxScope
from animus_core.values import json_values
from animus_core.values.canonical import canonical_hash
from animus_core.values.errors import AnimusError, LeaseLost, PhaseFailed
from animus_core.values.limits import clip, limits
from animus_core.values.records import ExecutionRecord, file_text
from animus_core.values.states import State
from animus_core.values.version import __version__
from animus_core.values.waits import Resume, Suspended
from animus_core.values.work import Lease, WorkItem

__all__ = ["FocusRunner", "open_memory", "spans_recorded"]

_log = logging.getLogger("animus.engine")
_NULL_HASH = canonical_hash(None, nfc=True)  # the outcome of most foci


class FocusRunner:
    def __init__(self, store: Db, governed: GovernedWork, deadlines: Deadlines,
                 completions: Completions, *, recorded: Callable[[], None],
                 retry_later: Callable[[Slot, float], None],
                 phases: Callable[[Faculty], Phases], agent: AgentRunner) -> None:
        self.store = store
        self.governed = governed
        self.deadlines = deadlines
        self.completions = completions
        self._recorded = recorded
        self._retry_later = retry_later
        self._phases = phases
        self._agent = agent
        #: set at start-up
        self.workspace: Workspace | None = None
        self.memory: Memory | None = None
        self.memory_problem = "memory is not configured for this engine"
        self.environment_hash = ""
        #: whether spans are recorded (a tracer provider was installed when the engine started)
        self.traced = False
        self._faculty_hashes: dict[str, tuple[dict[str, Any], str]] = {}  # by faculty name
        self._identities: set[str] = set()  # faculty hashes whose files were looked at
        self._files_kept: set[str] = set()  # digests whose text is in animus.faculty_files
        self._keeping: set[asyncio.Task[None]] = set()

    # -- phases ------------------------------------------------------------------------------

    async def _call(self, fac: Faculty, hook: str, focus: Focus, flight: Flight, /,
                    **kwargs: Any) -> Any:
        # through pluggy, wrappers included (see Phases): a sync method's whole call runs in
        # a worker thread; an async one's returns the awaitable (or a wrapper's value)
        phases = self._phases(fac)
        timeout = fac.timeout
        if not phases.is_async(hook):
            return await asyncio.wait_for(
                asyncio.to_thread(phases.call, hook, focus=focus, **kwargs), timeout)
        result = phases.call(hook, focus=focus, **kwargs)
        if not inspect.isawaitable(result):
            return result
        if timeout is None:
            return await result
        return await self.deadlines.within(flight, timeout, hook, result)

    async def _phase(self, fac: Faculty, phase: str, focus: Focus, flight: Flight,
                     traced: bool, /, **kwargs: Any) -> Any:
        started = time.perf_counter()
        if not traced:
            focus.traceparent = focus.work.traceparent
            try:
                return await self._call(fac, phase, focus, flight, **kwargs)
            finally:
                instruments.phase_duration.record(time.perf_counter() - started,
                                                  {"faculty": fac.name, "phase": phase})
        # the SDK would record the exception's own (unredacted) text: the status says it instead
        with tracer.start_as_current_span(phase, attributes={
                "animus.faculty": fac.name, "animus.phase": phase},
                record_exception=False, set_status_on_exception=False) as s:
            focus.traceparent = current_traceparent()
            try:
                return await self._call(fac, phase, focus, flight, **kwargs)
            except Exception as e:
                s.set_status(trace.StatusCode.ERROR, redactor.text(str(e))[:500])
                raise
            finally:
                instruments.phase_duration.record(time.perf_counter() - started,
                                                  {"faculty": fac.name, "phase": phase})

    def _record(self, fac: Faculty, focus: Focus, started_at: datetime, result: str,
                params_hash: str, *, outcome: Any = None,
                error: str | None = None) -> ExecutionRecord:
        identity = fac.identity()
        known = self._faculty_hashes.get(fac.name)
        if known is not None and known[0] == identity:
            faculty_hash = known[1]
        else:
            faculty_hash = canonical_hash(identity)
            self._faculty_hashes[fac.name] = (identity, faculty_hash)
        if faculty_hash not in self._identities:  # a faculty, or a version of its files, new
            self._identities.add(faculty_hash)
            self._keep_files(fac)
        return ExecutionRecord(
            work_id=focus.work.id, attempt=focus.attempt, result=result,
            work_type=focus.work.work_type, params_hash=params_hash,
            faculty=identity, faculty_hash=faculty_hash,
            engine_version=__version__, environment_hash=self.environment_hash,
            models=sorted(focus.llm_usage), error=error, started_at=started_at,
            steps=focus.steps.summary() if focus.steps is not None else None,
            outcome_hash=(None if result != "completed" else _NULL_HASH if outcome is None
                          else canonical_hash(outcome, nfc=True)))

    def _keep_files(self, fac: Faculty) -> None:
        """Keep the text of the faculty's files the first time this engine records their
        digests (in the background: an execution record never waits for it)."""
        new = {d: p for d, p in fac.source_files().items() if d not in self._files_kept}
        if not new:
            return
        self._files_kept.update(new)
        task = asyncio.get_running_loop().create_task(self._store_files(new))
        self._keeping.add(task)
        task.add_done_callback(self._keeping.discard)

    async def _store_files(self, files: dict[str, Path]) -> None:
        texts = await asyncio.to_thread(
            lambda: {d: t for d, p in files.items() if (t := file_text(p, d)) is not None})
        try:
            if texts:
                await self.store.record_files(texts)
        except Exception as e:  # kept at a later attempt instead
            self._files_kept.difference_update(files)
            self._identities.clear()
            _log.warning("could not keep the text of %s: %s", ", ".join(map(str, files.values())),
                         e)

    # -- one focus ---------------------------------------------------------------------------

    def _focus_for(self, fac: Faculty, item: WorkItem, lease: Lease, scope: TxScope,
                   resume: Resume | None = None) -> Focus:
        ws = self.workspace
        assert ws is not None, "the runner runs foci only once the engine started"
        memory = self.memory
        return Focus(item, self.store, attempt=item.attempts, log=_log, root=ws.root,
                     keep_root=ws.keep_root, hook_env=ws.hook_env,
                     memory=memory.for_work(source=fac.name, work_id=item.id) if memory else None,
                     consolidate_memory=memory.scoped(scope, source=fac.name, work_id=item.id)
                     if memory else None,
                     memory_unavailable=self.memory_problem, agent=self._agent,
                     submitter=self.governed.child_submitter(item),
                     steps=StepJournal(self.store, lease, wait=item.wait,
                                       attempt=item.attempts,
                                       first=item.attempts == 1 and item.replay_of is None,
                                       resume=resume))

    async def run(self, flight: Flight) -> None:
        """Run the focus of ``flight`` (as its task) to its end, and record it."""
        fac, item, lease = flight.slot.faculty, flight.claimed.item, flight.claimed.lease
        scope = self.store.transaction()
        focus = self._focus_for(fac, item, lease, scope, flight.resume)
        started = time.perf_counter()
        started_at = datetime.now(UTC)
        phase, failed, result = "orient", False, "completed"
        hashed = ""
        # Nobody records spans without a tracer provider: skip building them (a third of the
        # per-item cost of a trivial focus). Hooks still continue the item's own trace.
        traced = self.traced
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
                hashed = params_hash(item.params)
                oriented = await self._phase(fac, "orient", focus, flight, traced)
                phase = "engage"
                await self.governed.check_before_engage(item)
                engaged = await self._phase(fac, "engage", focus, flight, traced,
                                            oriented=oriented)
                phase = "consolidate"
                focus.consolidating()
                outcome = redactor.json(
                    await self._phase(fac, "consolidate", focus, flight, traced, engaged=engaged))
                # what the completion will store (encoded once): within the JSON model and
                # the size limit
                stored = msgspec.Raw(json_values.encode(outcome, "outcome",
                                                        limit=limits().outcome_bytes,
                                                        setting="ANIMUS_MAX_OUTCOME_BYTES"))
                ms = int((time.perf_counter() - started) * 1000)
                usage = focus.unrecorded_usage()
                if usage:
                    conn = await scope.connection()
                    await self.store.record_usage(item.id, usage, conn=conn)
                record = self._record(fac, focus, started_at, "completed", hashed,
                                      outcome=outcome)
                steps = focus.steps.take_pending() if focus.steps is not None else []
                if scope.conn is not None:
                    # consolidate wrote memories: they commit with the completion, or not at all
                    await self.store.complete_many([(lease, stored, ms)], conn=scope.conn,
                                                   executions=[record],
                                                   steps=[(lease, r) for r in steps])
                    await scope.finish(commit=True)
            except Suspended as suspension:
                await scope.finish(commit=False)
                if flight.cancelling:  # asked to stop as it suspended: it ends instead
                    failed, result = True, "dead"
                    await self._cancelled(fac, focus, lease, started, started_at,
                                          hashed or NO_PARAMS_HASH)
                    return
                result = "suspended"
                focus_span.add_event("suspended", {"from": "running", "to": "waiting",
                                                   "wait": str(suspension)})
                await self._suspend(fac, focus, lease, suspension, started, started_at,
                                    hashed or NO_PARAMS_HASH)
            except asyncio.CancelledError:
                await scope.finish(commit=False)
                if flight.lost:  # its record (lost) comes with the claim that takes it back
                    failed, result = True, "lost"
                elif not flight.cancelling:
                    raise  # shutdown: the drain releases it
                else:
                    failed, result = True, "dead"
                    await self._cancelled(fac, focus, lease, started, started_at,
                                          hashed or NO_PARAMS_HASH)
            except Exception as e:
                await scope.finish(commit=False)
                failed, result = True, "failed"
                ms = int((time.perf_counter() - started) * 1000)
                error = redactor.text(describe(e, phase, fac))
                instruments.hook_failures.add(1, {"faculty": fac.name, "phase": phase,
                                                  "reason": failure_kind(e, phase)})
                focus_span.set_status(trace.StatusCode.ERROR, error[:500])
                focus_span.add_event("failed", {"from": "running", "to": "failed",
                                                "phase": phase, "error": error[:500]})
                record = self._record(fac, focus, started_at, "failed",
                                      hashed or NO_PARAMS_HASH, error=error)
                result = await self._failed(flight, focus, error, phase, ms, record,
                                            final=isinstance(e, RuleRefused)
                                            or (isinstance(e, PhaseFailed) and e.final))
            else:
                focus_span.add_event("completed", {"from": "running", "to": "completed"})
                if not scope.used:  # the usual path: batched with other completions
                    self.completions.add(lease, stored, ms, record, steps)
                else:
                    self._recorded()
        finally:
            # recorded while the focus span is current, so the histogram gets exemplars
            instruments.focus_duration.record(time.perf_counter() - started,
                                              {"faculty": fac.name, "result": result})
            if token is not None:
                context.detach(token)
                focus_span.set_attribute("animus.result", result)
                focus_span.end()
            ws = self.workspace
            kept = focus.cleanup(keep=failed and ws is not None
                                 and (ws.keep_failed or fac.keep_failed))
            if kept:
                _log.info("kept focus directory of failed %s: %s", item.id, kept)

    async def _suspend(self, fac: Faculty, focus: Focus, lease: Lease, suspension: Suspended,
                       started: float, started_at: datetime, hashed: str) -> None:
        """The focus suspended: end the attempt ``running -> waiting`` (its slot is freed)."""
        ms = int((time.perf_counter() - started) * 1000)
        try:
            if focus.steps is not None:  # the steps of the waits it resumed from, first
                await focus.steps.flush()
            item = await self.store.suspend(
                lease, suspension.wait, wake_at=suspension.wake_at, duration_ms=ms,
                execution=self._record(fac, focus, started_at, "suspended", hashed))
            _log.debug("%s %s suspended: %s", fac.name, lease.work_id, item.reason)
        except LeaseLost as e:
            item = None
            _log.warning("%s", e)
        except AnimusError as e:  # its lease will run out and a later attempt resumes it
            item = None
            _log.error("could not suspend %s (its lease will expire and it will be "
                       "resumed): %s", lease.work_id, e)
        if item is not None and item.state == State.WAITING and item.cancel_requested:
            # a cancellation asked for while it ran, which this engine had not seen yet: a
            # waiting item is cancelled at once, rather than at a wake-up that may not come
            try:
                await self.store.cancel(item.id, item.cancel_requested)
            except AnimusError as e:
                _log.error("%s was cancelled while it ran and now waits: could not cancel it "
                           "(animus work cancel %s ends it): %s", item.id, item.id, e)
        usage = focus.unrecorded_usage()  # what it spent is kept, as for a failure
        if usage:
            try:
                await self.store.record_usage(lease.work_id, usage)
            except AnimusError as e:
                _log.error("could not record the model usage of %s: %s", lease.work_id, e)
        self._recorded()

    async def _cancelled(self, fac: Faculty, focus: Focus, lease: Lease, started: float,
                         started_at: datetime, hashed: str) -> None:
        """A requested cancellation stopped the focus: end the item failed -> dead."""
        ms = int((time.perf_counter() - started) * 1000)
        await _flush_steps(focus)
        try:  # the database writes the reason (and the record's error): who asked
            await self.store.cancel_attempt(lease, duration_ms=ms, execution=self._record(
                fac, focus, started_at, "failed", hashed))
        except AnimusError as e:
            _log.warning("could not record the cancellation of %s: %s", lease.work_id, e)
        self._recorded()

    async def _failed(self, flight: Flight, focus: Focus, error: str, phase: str, ms: int,
                      record: ExecutionRecord, *, final: bool = False) -> str:
        """Run recover, record the failure (with the attempt's execution record, while the
        lease is held), then retry or dead-letter as the faculty's policy says; returns
        which."""
        fac, lease = flight.slot.faculty, flight.claimed.lease
        note = ""
        verdict: bool | None = None
        try:
            if not final:  # retrying cannot change a rule's answer
                verdict = await self._phase(fac, "recover", focus, flight, self.traced,
                                            error=error, phase=phase)
        except Exception as e:
            note = f" (recover failed too: {redactor.text(describe(e, 'recover', fac))})"
        except Suspended:
            note = " (recover tried to suspend the focus: only orient, engage and consolidate may)"
        reason = clip(f"{phase} failed: {error}{note}")
        result = "failed"
        _log.warning("%s %s attempt %d: %s", fac.name, lease.work_id, focus.attempt, reason)
        # suspensions count as activations, not failures
        then = fac.retry_policy.decide(reason, attempts=focus.attempt - focus.work.suspensions,
                                       item_max_attempts=focus.work.max_attempts,
                                       recover=verdict, final=final)
        await _flush_steps(focus)
        try:  # one round trip; what a failed attempt spent is kept too
            await self.store.fail_attempt(lease, reason, then=then, duration_ms=ms,
                                          execution=record,
                                          usage=focus.unrecorded_usage())
            result = "retry" if isinstance(then, Retry) else "dead"
            if isinstance(then, Retry):
                self._retry_later(flight.slot, then.delay + 0.05)
        except LeaseLost as e:
            _log.warning("%s", e)
        except AnimusError as e:
            _log.error("could not record the failure of %s (its lease will expire and it "
                       "will be retried): %s", lease.work_id, e)
        self._recorded()
        trace.get_current_span().add_event(result, {"reason": reason[:500]})
        return result


async def _flush_steps(focus: Focus) -> None:
    """Record the steps of the waits an attempt that ends now resumed from, if it has not
    yet (a later attempt would find the same outcomes, and record them)."""
    if focus.steps is None:
        return
    try:
        await focus.steps.flush()
    except AnimusError as e:
        _log.debug("could not record the resumed steps of %s: %s", focus.work.id, e)


def spans_recorded() -> bool:
    """Whether spans are recorded: a tracer provider is installed (or the module's tracer
    was made by one). The engine asks once, as it starts."""
    return not (isinstance(tracer, trace.ProxyTracer) and not tracing())


async def open_memory(store: Db, pm: pluggy.PluginManager,
                      settings: Settings) -> tuple[Memory | None, str]:
    """The engine's memory with the embedder the settings select, or None and why not (foci
    then get that reason when they use ``focus.memory``)."""
    try:
        return await Memory.open(store, select_embedder(pm, settings)), ""
    except AnimusError as e:
        problem = f"memory is unavailable: {e}"
        _log.error("%s", problem)
        return None, problem
