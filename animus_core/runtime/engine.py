"""The control plane: wake on NOTIFY, claim up to free capacity, run foci, retire work.

The engine is the loop with its slots; each other concern is a part of its own, run as a
task that is restarted if it fails (:mod:`animus_core.runtime.health`):

* the **listener** (:mod:`.listener`) holds a dedicated connection on ``LISTEN`` and reports
  what woke it; each notification marks the faculties that accept its work types *dirty*;
* the **scheduler** (this loop) claims for dirty faculties, as many items as each has free
  slots (``max_concurrent``, the global ``concurrency`` and an optional rate limit), and
  starts a focus task per item. A faculty whose last claim came back short is clean until
  the next notification, retry timer or the slow fallback poll, so an idle engine sends
  almost no queries;
* the **reserve** (:mod:`.reserve`) holds a few items claimed ahead of free slots for a
  faculty whose foci are short, so a freed slot starts the next at once;
* the **runner** (:mod:`.runner`) runs each focus: orient -> engage -> consolidate, or
  recover, then retry or dead-letter as the faculty's retry policy says;
* the **completer** (:mod:`.completions`) records completions in batches;
* the **lease keeper** (:mod:`.leases`) extends the leases of running foci and fences;
* the **sealer** (:mod:`.sealer`) chains new audit rows and writes checkpoints;
* **wake timers** (:mod:`.timers`) for waiting items whose timer runs out;
* **schedule ticks** (:mod:`.ticks`), and on the embedded server a **keeper**
  (:mod:`.keeper`) that starts the server again if it dies under the engine.

Several engines on one database cooperate through it alone: claims skip locked rows, and a
lease that runs out makes the item claimable again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import importlib
import logging
import os
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import pluggy

from animus_core.faculties.llm import ClaudeRunner, collect_tools, make_client
from animus_core.faculties.plugins import Faculties, call_lifecycle
from animus_core.governance.rules import RuleSet
from animus_core.governance.work import GovernedWork
from animus_core.infra import embedded
from animus_core.infra.config import Settings
from animus_core.infra.loop import loop_name
from animus_core.infra.secrets import redactor
from animus_core.infra.telemetry import instruments
from animus_core.runtime.collector import Collector
from animus_core.runtime.completions import Completions
from animus_core.runtime.deadlines import Deadlines
from animus_core.runtime.flights import Flight, Slot
from animus_core.runtime.health import Health, QuietPool
from animus_core.runtime.heartbeat import Heartbeat
from animus_core.runtime.keeper import EmbeddedKeeper
from animus_core.runtime.leases import LeaseKeeper
from animus_core.runtime.listener import Listener
from animus_core.runtime.reserve import Held, Reserve
from animus_core.runtime.routing import Routing
from animus_core.runtime.runner import FocusRunner, open_memory, spans_recorded
from animus_core.runtime.sealer import Sealer
from animus_core.runtime.stops import FocusStops
from animus_core.runtime.ticks import tick
from animus_core.runtime.timers import WakeTimers
from animus_core.runtime.workspace import EngineFoci, open_workspace
from animus_core.store import read
from animus_core.store.db import DEFAULT_QUEUE, Db
from animus_core.store.memory import Memory
from animus_core.values.errors import AnimusError
from animus_core.values.mcp import McpServer
from animus_core.values.records import environment
from animus_core.values.waits import Resume
from animus_core.values.work import Claimed

__all__ = ["Engine", "EngineOptions"]

_log = logging.getLogger("animus.engine")
#: the connections of an engine's own pool (:meth:`Engine.run`): its claims, its completions,
#: and one for the rest (leases, seals, heartbeats, timers)
CONTROL_CONNECTIONS = 3
#: settings of those connections. Each keeps one plan of each statement it runs, and a plan
#: made while a table was empty (a new database, a drained queue just vacuumed) reads it
#: whole ever after: the claim's reads of the steps and signals of resumed items did so for
#: every item it resumed (in a wake of 10,000, 48 million rows of steps and 80 million of
#: signals). The engine's statements reach their rows through indexes; one with no index to
#: use still scans.
CONTROL_SETTINGS = {"enable_seqscan": "off"}
#: the most items one claim takes; more free slots are filled by further claims
CLAIM_CHUNK = 256
#: foci started before the loop turns: the first steps of 256 foci in one turn held it
#: 20-26 ms (smaller claims instead cost Postgres 10-15 us more per item)
START_SLICE = 64


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
    #: seconds between the engine's heartbeats; it is shown as lost after three missed
    heartbeat: float = 5.0
    #: the engine schedules CPython's full garbage collections (runtime/collector.py): for a
    #: process of its own (``animus up``), as it changes the collector for the whole process
    schedule_gc: bool = False


class Engine:
    """Runs faculties against the work in one database until asked to stop."""

    def __init__(self, db: Db, pm: pluggy.PluginManager, faculties: Faculties,
                 settings: Settings, options: EngineOptions | None = None, *,
                 rules: RuleSet | None = None) -> None:
        """``rules`` default to those of ``settings.rules_dir``."""
        self.db = db
        #: the store on the engine's own pool while it runs (:meth:`run`)
        self.control = db
        self.pm = pm
        self.faculties = faculties
        self.settings = settings
        self.options = opts = options or EngineOptions()
        self.rules = rules if rules is not None else RuleSet.load(settings.rules_dir)
        for path, rule, earlier_path, earlier in self.rules.shadowed():
            _log.warning("%s: rule %r can never match: rule %r (%s) comes first and matches "
                         "all it would (animus rules check)", path, rule.name, earlier.name,
                         earlier_path)
        #: every submission of this engine, and the check before engage, go through it
        self.governed = GovernedWork(db, self.rules)
        _learn_secrets(faculties, db)
        self.routing = Routing(faculties)
        self.slots = {f.name: Slot(f) for f in faculties}
        self.inflight: dict[UUID, Flight] = {}
        self.reserve = Reserve(opts.concurrency)
        #: the schedule of full garbage collections while the engine runs (``schedule_gc``)
        self.collector: Collector | None = None
        self.stops = FocusStops(db, self.inflight, self.reserve)
        self.started = asyncio.Event()
        self.stopping = asyncio.Event()
        self._wake = asyncio.Event()
        #: when the scheduler loop last turned (monotonic): the liveness probe reads it
        self.last_turn = time.monotonic()
        #: when a stop was asked for, plus the grace period: the last moment to record work
        self._stop_deadline: float | None = None
        self.foci_root = settings.home / "foci"
        self._foci: EngineFoci | None = None  # this engine's own directory in foci_root
        self.hook_env = {"DATABASE_URL": db.url, "ANIMUS_HOME": str(settings.home)}
        self.tools = collect_tools(pm)
        self._client: Any = None
        self._mcp: Any = None  # McpTools, made when a focus first declares an MCP server
        self.health = Health()
        self.sealer = Sealer(db, self.health, settings.home, interval=opts.seal_interval,
                             checkpoint_interval=opts.checkpoint_interval)
        self.completions = Completions(db, self.health, on_recorded=self.sealer.touch,
                                       stop_deadline=lambda: self._stop_deadline)
        self.leases = LeaseKeeper(db, self.health, self.inflight, self.completions, self.reserve,
                                  lease_seconds=opts.lease_seconds, lose=self.stops.lose,
                                  cancel=self.stops.cancel)
        self.deadlines = Deadlines(self.inflight.values())
        self.runner = FocusRunner(db, self.governed, self.deadlines, self.completions,
                                  recorded=self.sealer.touch, retry_later=self._wake_later,
                                  phases=faculties.phases,
                                  agent=ClaudeRunner(self._llm_access, rules=self.rules,
                                                     mcp=self._mcp_tools))
        self.timers = WakeTimers(db, opts.queues, lambda: list(self.faculties.by_type),
                                 self._mark_dirty)
        self.heartbeat = Heartbeat(db, self.health, interval=opts.heartbeat,
                                   concurrency=opts.concurrency, queues=list(opts.queues),
                                   faculties=lambda: list(self.faculties),
                                   disabled=self.routing.disabled,
                                   disabled_faculties=self.routing.disabled_faculties,
                                   slots=self.slots, stop=self.stop)
        self.listener = Listener(db, self.health, opts.queues, on_work=self._mark_dirty,
                                 on_timer=self.timers.note,
                                 on_cancel=self.stops.cancel_noticed,
                                 on_engines=self.heartbeat.notified)

    @property
    def listener_connected(self) -> asyncio.Event:
        return self.listener.connected

    @property
    def memory(self) -> Memory | None:
        return self.runner.memory

    @property
    def disabled(self) -> dict[str, str]:
        """Faculties switched off at start (name -> why); their work stays queued."""
        return self.routing.disabled

    @property
    def unroutable(self) -> dict[str, float]:
        return self.routing.unroutable

    # -- running -----------------------------------------------------------------------------

    def stop(self, grace: float | None = None) -> None:
        """Ask the engine to drain and return from :meth:`run`, giving running foci
        ``grace`` seconds (None: the engine's grace period) before they are released."""
        if self._stop_deadline is None:
            grace = self.options.grace if grace is None else grace
            self._stop_deadline = time.monotonic() + grace
            self.completions.report_stopping(grace)
        self.stopping.set()
        self._wake.set()

    async def run(self) -> None:
        # The engine's own work (claims, completions, leases, seals, heartbeats, timers) runs
        # on a few connections of its own: foci busy with the database take the shared pool,
        # and a woken item's claim or a lease extension must not queue behind them.
        self.control = await self.db.reserve(CONTROL_CONNECTIONS, settings=CONTROL_SETTINGS)
        for part in (self.completions, self.leases, self.timers, self.sealer, self.heartbeat):
            part.store = self.control
        try:
            await self._run()
        finally:
            if self.control is not self.db:
                await self.control.close()

    async def _run(self) -> None:
        supervise = self.health.supervise
        # the keeper first: the start-up steps below wait for the database too
        keeper = (supervise("animus-embedded", EmbeddedKeeper(
                      self.settings.home, self.db.url, self.health, on_back=self._mark_dirty).run)
                  if self.settings.database_url is None and embedded.holds(self.settings.home)
                  else None)
        try:
            await self._start_up()
        except BaseException:
            if keeper is not None:
                keeper.cancel()
                await asyncio.gather(keeper, return_exceptions=True)
            raise
        self.collector = collector = (Collector(lambda: len(self.inflight))
                                      if self.options.schedule_gc else None)
        if collector is not None:
            collector.start()
        helpers = [
            supervise("animus-listener", self.listener.run),
            supervise("animus-leases", self.leases.run),
            supervise("animus-sealer", self.sealer.run),
            supervise("animus-deadlines", self.deadlines.run),
            supervise("animus-heartbeat", self.heartbeat.run),
            *[supervise(f"schedule-{s.name}", functools.partial(tick, self.governed, self.health, s))
              for f in self.faculties for s in f.schedules],
        ]
        if self.settings.otel_endpoint:
            helpers.append(supervise("animus-depths", functools.partial(_sample_depths, self.db)))
        if keeper is not None:
            helpers.append(keeper)
        if collector is not None:
            helpers.append(supervise("animus-collector", collector.run))
        for task in helpers:
            task.add_done_callback(self._helper_died)
        completer = supervise("animus-completer", self.completions.run)
        completer.add_done_callback(self._helper_died)
        self.started.set()
        _log.info("engine started: %d faculties, concurrency %d, queues %s, on %s",
                  len(self.faculties), self.options.concurrency, ",".join(self.options.queues),
                  loop_name(asyncio.get_running_loop()))
        quiet_pool = QuietPool(self.health)
        logging.getLogger("asyncpg.pool").addFilter(quiet_pool)
        try:
            await self._schedule_loop()
        finally:
            if collector is not None:
                collector.stop()  # first: nothing below may leave the process without it
            await self._release_reserve()
            await self._drain()
            # The completer is not cancelled mid-batch: it is told to finish and exit.
            self.completions.close()
            await asyncio.gather(completer, return_exceptions=True)
            self.timers.close()
            checks = list(self.stops.checks)
            for task in (*helpers, *checks):
                task.cancel()
            await asyncio.gather(*helpers, *checks, return_exceptions=True)
            await self.completions.flush()
            await self.sealer.final()
            await self.heartbeat.deregister()
            logging.getLogger("asyncpg.pool").removeFilter(quiet_pool)
            await call_lifecycle(self.pm, "shutdown", engine=self, failed=lambda plugin, e:
                                 _log.error("shutdown hook of %s failed", plugin, exc_info=e))
            if self._mcp is not None:
                await self._mcp.close()
            if self._foci is not None:
                self._foci.close()
            _log.info("engine stopped")

    async def _start_up(self) -> None:
        runner = self.runner
        runner.memory, runner.memory_problem = await open_memory(self.db, self.pm, self.settings)
        runner.environment_hash, env = await asyncio.to_thread(environment)
        until = self.health.until_reachable
        await until("record the environment",
                    lambda: self.db.record_environment(runner.environment_hash, env),
                    self.stopping)
        await call_lifecycle(self.pm, "startup", engine=self)
        await until("look for unroutable work", self._report_unroutable_backlog, self.stopping)
        self._foci, runner.workspace = await asyncio.to_thread(
            open_workspace, self.foci_root, self.hook_env, keep_failed=self.options.keep_foci)
        runner.traced = spans_recorded()
        if os.environ.get("ANTHROPIC_API_KEY"):  # the Claude loop's SDK, imported now in a
            # worker thread: imported by the first focus that engages Claude, it held the
            # event loop for up to a second or two on a busy machine (leases unextended)
            await asyncio.to_thread(importlib.import_module, "anthropic")
        await until("register the engine", self.heartbeat.register, self.stopping)

    def _helper_died(self, task: asyncio.Task[Any]) -> None:
        """A helper must not end while the engine runs (its loop is restarted on failure):
        if one returns, say so loudly and stop the engine rather than stall without a word."""
        if task.cancelled() or self.stopping.is_set() or task.exception() is not None:
            return
        _log.critical("engine task %s stopped unexpectedly; stopping the engine",
                      task.get_name())
        self.stop()

    async def _mcp_tools(self, servers: Sequence[McpServer]) -> dict[str, Any]:
        if self._mcp is None:  # the SDK is imported by engines whose faculties use it only
            from animus_core.faculties.mcp import McpTools

            self._mcp = McpTools()
        tools: dict[str, Any] = await self._mcp.tools(servers)
        return tools

    def _llm_access(self) -> tuple[Any, dict[str, Any]]:
        if self._client is None:
            self._client = make_client()
        return self._client, self.tools

    # -- scheduling ------------------------------------------------------------------------

    def _mark_dirty(self, work_types: Iterable[str] | None = None) -> None:
        if work_types is None:
            for slot in self.slots.values():
                slot.dirty = True
            if self.started.is_set():  # timers missed while not listening, or not yet known
                self.timers.refresh()
        else:
            for t in work_types:
                fac = self.routing.route(t)
                if fac is not None:
                    self.slots[fac.name].dirty = True
        self._wake.set()

    def _wake_later(self, slot: Slot, delay: float) -> None:
        def fire() -> None:
            slot.dirty = True
            self._wake.set()

        asyncio.get_running_loop().call_later(delay, fire)

    def _wake_for_token(self, slot: Slot) -> None:
        """Claim for ``slot`` again once its rate limit lets one more focus start (one timer
        per slot: the earliest)."""
        if slot.token_timer is not None and not slot.token_timer.cancelled():
            return

        def fire() -> None:
            slot.token_timer = None
            slot.dirty = True
            self._wake.set()

        slot.token_timer = asyncio.get_running_loop().call_later(slot.seconds_to_token(), fire)

    async def _schedule_loop(self) -> None:
        backoff = 0.5
        while not self.stopping.is_set():
            self.last_turn = time.monotonic()
            # asyncio.timeout, not wait_for: no task of its own, so a notification reaches
            # _fill two turns of the event loop sooner
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.options.poll_interval):
                    await self._wake.wait()
            if self.stopping.is_set():
                break
            if not self._wake.is_set():  # the slow fallback poll
                self._mark_dirty()
            self._wake.clear()
            try:
                await self._fill()
                backoff = 0.5
            except AnimusError as e:  # unreachable, or refused: the loop must go on either way
                delay = backoff * random.uniform(0.5, 1.5)  # jittered, as the completer's
                self.health.retrying(e, "claim failed, retrying in %.1fs: %s", delay, e)
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, 10.0)
                self._mark_dirty()

    async def _fill(self) -> None:
        total_free = self.options.concurrency - len(self.inflight)
        lease_seconds = self.options.lease_seconds
        for slot in self.slots.values():
            free = max(0, min(slot.faculty.max_concurrent - slot.running, total_free))
            while free and (held := self.reserve.take(slot, self.leases.margin)):
                self._start_held(slot, held)
                free -= 1
                total_free -= 1
            if not slot.dirty:
                continue
            topup = self.reserve.wants(slot)
            if free <= 0 and topup <= 0:
                continue  # stays dirty: a finishing focus will wake the loop
            allowed = slot.take_tokens(free) if free else 0
            if allowed <= 0 and topup <= 0:
                self._wake_for_token(slot)
                continue
            wanted = allowed + topup
            got = 0
            # Cleared before the claim: a notification that arrives while it is in flight
            # sets it again, and is not lost.
            slot.dirty = False
            slot.claiming = True
            try:
                for queue in self.options.queues:
                    # in chunks: the foci of one start while the next is claimed, and a
                    # thousand free slots do not hold the loop while their items are read
                    while got < wanted:
                        asked = time.monotonic()
                        chunk = min(wanted - got, CLAIM_CHUNK)
                        claimed = await self.control.claim_resuming(
                            queue, limit=chunk, lease_seconds=lease_seconds,
                            work_types=slot.faculty.accepts, max_attempts=slot.max_attempts)
                        self.health.reachable()
                        for c, resume in claimed:
                            held = Held(c, asked + lease_seconds, resume)
                            if got < allowed:
                                self._start_held(slot, held)
                                if not (got + 1) % START_SLICE:
                                    await asyncio.sleep(0)  # their first steps, then more
                            else:
                                self.reserve.put(slot, held)
                            got += 1
                        if len(claimed) < chunk:
                            break  # the queue has no more for now
                    if got >= wanted:
                        break
            finally:
                slot.claiming = False
            started = min(got, allowed)
            if slot.faculty.rate_limit and got < allowed:
                slot.tokens += allowed - got
            total_free -= started
            # A full claim means more may be waiting; a short one that nothing is visible now.
            if got >= free + topup:
                slot.dirty = True
            elif got >= allowed + topup:  # the rate limit, not the queue, cut the claim short
                self._wake_for_token(slot)
            if got:
                self.sealer.touch()

    def _start_held(self, slot: Slot, held: Held) -> None:
        self._start_focus(slot, held.claimed, held.held_until, held.resume)

    def _start_focus(self, slot: Slot, claimed: Claimed, held_until: float,
                     resume: Resume | None = None) -> None:
        old = self.inflight.get(claimed.item.id)
        if old is not None:  # its lease ran out and this engine claimed the item again
            self.stops.lose(old.claimed.lease, "this engine claimed the item again")
        slot.running += 1
        task = asyncio.create_task(self._run_focus(claimed.item.id),
                                   name=f"focus-{claimed.item.id}")
        # in place before the task takes its first step: the task finds its flight here
        flight = self.inflight[claimed.item.id] = Flight(claimed, task, slot, held_until,
                                                         resume)
        # a task cancelled before its first step never runs its own clean-up
        task.add_done_callback(lambda _: self._finished(flight))

    async def _run_focus(self, work_id: UUID) -> None:
        flight = self.inflight[work_id]
        try:
            await self.runner.run(flight)
        finally:
            self._finished(flight)

    def _finished(self, flight: Flight) -> None:
        """Once per focus: free its slot, and forget it (unless a newer attempt of the same
        item replaced it)."""
        if flight.finished:
            return
        flight.finished = True
        slot = flight.slot
        slot.running -= 1
        slot.observe(time.monotonic() - flight.started)
        work_id = flight.claimed.item.id
        if self.inflight.get(work_id) is flight:
            del self.inflight[work_id]
        # the next of its reserve takes the freed slot now
        if (not self.stopping.is_set() and slot.running < slot.faculty.max_concurrent
                and len(self.inflight) < self.options.concurrency):
            held = self.reserve.take(slot, self.leases.margin)
            if held is not None:
                self._start_held(slot, held)
        # its backlog was not drained, or a claim in flight may find it was not: use the
        # freed slot, or top up its reserve (the loop looks once that claim returned)
        if slot.dirty or slot.claiming or len(self.reserve):
            self._wake.set()

    async def _release_reserve(self) -> None:
        """Give back the items held in reserve: they were not started, and count no attempt."""
        for held in self.reserve.clear():
            lease = held.claimed.lease
            try:
                await self.control.release(lease, "released at shutdown (held in reserve)")
            except AnimusError as e:
                _log.warning("could not release %s (held in reserve): it will run once its "
                             "lease expires (%s)", lease.work_id, e)

    async def _drain(self) -> None:
        if not self.inflight:
            return
        # the stop's own grace period (animus stop --grace), counted from when it was asked
        grace = (self.options.grace if self._stop_deadline is None
                 else max(0.0, self._stop_deadline - time.monotonic()))
        _log.info("draining: waiting up to %.0fs for %d foci", grace, len(self.inflight))
        tasks = [f.task for f in self.inflight.values()]
        _done, pending = await asyncio.wait(tasks, timeout=grace)
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

    # -- what the database holds -------------------------------------------------------------

    async def _report_unroutable_backlog(self) -> None:
        accepted = list(self.faculties.by_type)
        for r in await read.unroutable_backlog(self.db, accepted):
            self.routing.note_unroutable(r.work_type)


async def _sample_depths(store: Db, every: float = 10.0) -> None:
    """Queue depth for the animus.queue.depth gauge (only while telemetry exports)."""
    while True:
        try:
            for q in await read.queue_depths(store):
                instruments.set_queue_depth(q.queue, q.depth)
        except AnimusError as e:
            _log.debug("queue depth sample failed: %s", e)
        await asyncio.sleep(every)


def _learn_secrets(faculties: Faculties, db: Db) -> None:
    """Teach the redactor the values it must never let out: the faculties' secrets, and the
    audit key (a Python faculty could print it)."""
    redactor.learn(os.environ, [name for f in faculties for name in f.secrets])
    for key in db.audit_keys.keys:
        for text in (key.hex(), base64.b64encode(key).decode(),
                     base64.urlsafe_b64encode(key).decode()):
            redactor.learn({"ANIMUS_AUDIT_KEY": text})

