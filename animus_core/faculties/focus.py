"""A focus: one activation of a faculty on one work item, as the faculty sees it."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from animus_core.faculties.children import run_children
from animus_core.faculties.steps import StepJournal
from animus_core.governance.work import ChildSubmitter
from animus_core.values.agents import AgentResult, AgentSpec, Usage
from animus_core.values.children import ChildResult
from animus_core.values.errors import ConfigError
from animus_core.values.mcp import McpServer
from animus_core.values.steps import StepPolicy
from animus_core.values.waits import Decision
from animus_core.values.work import NewWorkItem, SubmitResult, WorkItem

if TYPE_CHECKING:
    from animus_core.governance.work import Submitter
    from animus_core.store.db import Db
    from animus_core.store.memory import Memory

__all__ = ["AgentRunner", "Focus"]

#: What :meth:`Focus.agent` runs: ``runner(focus, spec, message, oriented)`` runs an agent
#: loop (the Claude loop of :mod:`animus_core.faculties.llm`) with the first user
#: ``message``, or when it is ``None`` one made from the work and ``oriented``. It tells
#: the focus what each model call it makes used (:meth:`Focus.spent`).
AgentRunner = Callable[["Focus", AgentSpec, "str | None", Any], Awaitable[AgentResult]]

class Focus:
    """What a faculty phase receives: the work item, its attempt, a place to work, and
    ways to act (memory, the agent loop, child work).

    ``directory`` is a fresh private directory for this focus (the command hook contract's
    focus directory) under ``root``, made on first use and removed when the focus ends,
    unless kept for debugging after a failure: then it moves to ``keep_root``, if given.

    The focus is built whole: ``memory`` is its memory store (``None``: unavailable, and
    ``memory_unavailable`` says why), ``consolidate_memory`` the one that replaces it
    once :meth:`consolidating` is called (writing in the completion's transaction),
    ``agent`` what :meth:`agent` runs (``None``: no agent loop), and ``submitter`` what
    :meth:`submit` hands child work to (``None``: no child work), and ``steps`` the
    journal :meth:`step` records in (``None``: no durable steps).
    """

    def __init__(self, work: WorkItem, db: Db, *, attempt: int, log: logging.Logger,
                 root: Path, traceparent: str | None = None,
                 hook_env: dict[str, str] | None = None,
                 keep_root: Path | None = None, memory: Memory | None = None,
                 consolidate_memory: Memory | None = None,
                 memory_unavailable: str = "memory is not configured for this engine",
                 agent: AgentRunner | None = None, submitter: Submitter | None = None,
                 steps: StepJournal | None = None) -> None:
        self.work = work
        self.attempt = attempt
        self.log = log
        self.traceparent = traceparent
        self.hook_env = hook_env or {}
        self._db = db
        #: submits child work of this focus's item with the rules applied (the engine gives
        #: :meth:`animus_core.governance.work.GovernedWork.child_submitter`)
        self._submitter = submitter
        self._root = root
        self._keep_root = keep_root
        self._directory: Path | None = None
        self._memory = memory
        self._consolidate_memory = consolidate_memory
        self._memory_unavailable = memory_unavailable
        self._agent = agent
        #: the durable steps of this attempt (``None``: not available)
        self.steps = steps
        #: model -> token usage of the model calls this attempt made, and their cost (a
        #: turn replayed from its durable step is no call)
        self.llm_usage: dict[str, Usage] = {}
        self.llm_cost_usd = 0.0
        #: the part of them no durable step added to the item's usage (see :meth:`spent`)
        self._unrecorded: dict[str, Usage] = {}
        self._unrecorded_cost = 0.0
        #: agent loops this focus started (each names its durable steps ``llm N ...``)
        self.agent_loops = 0

    @property
    def memory(self) -> Memory:
        """Semantic memory (:class:`animus_core.store.memory.Memory`). During consolidate, what is
        written here commits together with the item's completion, or not at all."""
        if self._memory is None:
            raise ConfigError(self._memory_unavailable)
        return self._memory

    def consolidating(self) -> None:
        """The consolidate phase begins: from now on :attr:`memory` is the
        ``consolidate_memory`` the focus was built with (when there is one)."""
        if self._consolidate_memory is not None:
            self._memory = self._consolidate_memory

    @property
    def db(self) -> Db:
        """The engine's database (for faculties that coordinate other work)."""
        return self._db

    @property
    def params(self) -> dict[str, Any]:
        return self.work.params

    @property
    def directory(self) -> Path:
        if self._directory is None:
            self._root.mkdir(parents=True, exist_ok=True)
            # a work type may contain "/" (and ".."): never a path of its own
            label = self.work.work_type.replace("/", "_")
            self._directory = Path(tempfile.mkdtemp(
                prefix=f"{label}-{self.work.id}-{self.attempt}-", dir=self._root))
        return self._directory

    def cleanup(self, *, keep: bool) -> Path | None:
        """Remove the directory (if one was made); return it instead when ``keep``."""
        if self._directory is None:
            return None
        if keep:
            if self._keep_root is None or self._keep_root == self._directory.parent:
                return self._directory
            # out of the engine's directory, which an engine starting after this one's
            # death would remove
            kept = self._keep_root / self._directory.name
            try:
                self._directory.rename(kept)
            except OSError:
                return self._directory
            return kept
        shutil.rmtree(self._directory, ignore_errors=True)
        return None

    async def agent(self, *, model: str, system: str = "", tools: Sequence[str] = (),
                    max_turns: int = 20, max_tokens: int = 4096,
                    token_budget: int | None = None, stream: bool = True,
                    message: str | None = None, oriented: Any = None,
                    mcp: Sequence[McpServer] = ()) -> AgentResult:
        """Run the Claude agent loop (:mod:`animus_core.faculties.llm`) for this focus. ``message`` is
        the first user message; by default the documented template over the work's params
        and ``oriented``. Each model response and tool result is a durable step (see
        docs/agents.md); usage and cost are added to the item's usage once per call. The
        tools of the ``mcp`` servers join ``tools`` (docs/agents.md, Tools from MCP
        servers)."""
        if self._agent is None:
            raise ConfigError("the Claude engage loop is not available in this focus")
        for server in mcp:
            server.check("focus.agent(mcp=...)")
        spec = AgentSpec(model=model, system=system, tools=list(tools), max_turns=max_turns,
                         max_tokens=max_tokens, token_budget=token_budget, stream=stream,
                         mcp=list(mcp))
        return await self._agent(self, spec, message, oriented)

    def spent(self, model: str, usage: Usage, *, recorded: bool) -> None:
        """A model call of this attempt used ``usage``. ``recorded``: the durable step that
        recorded the call added it to the item's usage already; otherwise the attempt's end
        adds it (:meth:`unrecorded_usage`)."""
        cost = usage.cost_usd(model) or 0.0
        self.llm_usage.setdefault(model, Usage()).add(usage)
        self.llm_cost_usd += cost
        if not recorded:
            self._unrecorded.setdefault(model, Usage()).add(usage)
            self._unrecorded_cost += cost

    def unrecorded_usage(self) -> dict[str, Any] | None:
        """What the attempt's end adds to the item's usage (``{"models": {model: tokens},
        "cost_usd": x}``): the model calls no durable step recorded; ``None``: none."""
        if not self._unrecorded:
            return None
        return {"models": {m: msgspec.structs.asdict(u) for m, u in self._unrecorded.items()},
                "cost_usd": round(self._unrecorded_cost, 6)}

    async def step(self, name: str, fn: Callable[..., Any], /, *args: Any,
                   policy: StepPolicy | None = None, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` once per work item, as the durable step ``name``: an
        async ``fn`` is awaited, a sync one runs in a worker thread. Its result (a JSON
        value, within ``ANIMUS_MAX_OUTCOME_BYTES``) is committed before ``step`` returns it,
        and every later attempt of the item is given the stored result without running
        ``fn``. The n-th call of an attempt must have the name recorded at position n, else
        :class:`~animus_core.values.errors.StepOrderChanged` (the item is dead-lettered).
        ``policy`` (:class:`~animus_core.values.steps.StepPolicy`) retries ``fn`` within the
        attempt; a step that raises is not recorded. See docs/writing-faculties.md."""
        return await self._journal("a durable step").run(name, fn, args, kwargs,
                                                       policy or StepPolicy())

    async def sleep(self, seconds: float | timedelta) -> None:
        """Sleep durably: the focus suspends (its item goes ``waiting``, holding no slot,
        lease or connection) and resumes after ``seconds``, on whichever engine claims it,
        replaying its recorded steps up to here. The sleep is a step (named ``sleep``)."""
        delta = seconds if isinstance(seconds, timedelta) else timedelta(seconds=seconds)
        await self.sleep_until(datetime.now(UTC) + delta)

    async def sleep_until(self, until: datetime) -> None:
        """Sleep durably until ``until`` (timezone-aware), as :meth:`sleep`."""
        await self._journal("a durable sleep").sleep_until(until)

    async def wait_for(self, event: str, *, timeout: float | timedelta | None = None) -> Any:
        """Wait durably for the signal ``event`` (``animus work signal ID EVENT --data
        JSON``, ``Db.signal``) and return its payload. A signal sent before the wait is
        kept for it, and the first one not taken by an earlier wait wins. While it waits,
        the focus is suspended as for :meth:`sleep`. After ``timeout`` (seconds; None:
        none) without a signal it raises
        :class:`~animus_core.values.errors.WaitTimedOut`, which the faculty may catch.
        The wait is a step (named ``wait for EVENT``)."""
        return await self._journal("a wait for a signal").wait_for(event, timeout)

    async def run_children(self, items: Sequence[NewWorkItem], *,
                           timeout: float | timedelta | None = None) -> list[ChildResult]:
        """Submit ``items`` as child work of this focus's item (as :meth:`submit` does: the
        rules applied) and wait until every one has finished (completed, dead or cancelled;
        a merged child follows the item it was merged into); how each ended, in the order
        given (:class:`~animus_core.values.children.ChildResult`). A child that failed does
        not raise: ``outcomes(results)`` (:mod:`animus_core.values.children`) does. While it
        waits the focus is suspended as for :meth:`sleep`; the last child to finish wakes
        it. The children are submitted once per work item, and both the submission and the
        wait are steps (``submit children``, ``wait for children``). After ``timeout``
        (seconds; None: none) with children unfinished it raises
        :class:`~animus_core.values.children.ChildrenTimedOut`."""
        if not isinstance(self._submitter, ChildSubmitter):
            raise ConfigError("child work is not available in this focus: it was built "
                              "without the engine's child submitter")
        return await run_children(self._journal("a wait for child work"), self._db,
                                  self._submitter, items, timeout)

    async def approval(self, why: str, *, role: str = "approver", quorum: int = 1,
                       timeout: float | timedelta | None = None) -> Decision:
        """An approval gate inside the focus: suspend it (as :meth:`sleep` does) until
        ``quorum`` different members of ``animus_<role>`` approve, or one rejects, with
        ``animus approve|reject ID --reason R`` (``Db.decide``), by the rules of a submit
        gate (docs/governance.md). Returns the
        :class:`~animus_core.values.waits.Decision`; a rejection does not raise: the
        faculty decides what it means. After ``timeout`` (seconds; None: none) undecided it
        raises :class:`~animus_core.values.errors.ApprovalTimedOut`, which the faculty may
        catch. The decision is a step (named ``approval``)."""
        return await self._journal("an approval").approval(why, role, quorum, timeout)

    def _journal(self, what: str) -> StepJournal:
        if self.steps is None:
            raise ConfigError(f"{what} is not available in this focus: it was built without "
                              "durable steps (an engine gives every focus its steps)")
        return self.steps

    async def submit(self, item: NewWorkItem) -> SubmitResult:
        """Submit child work: ``item`` with this focus's work item as its parent, in its
        queue, the rules applied (a denied item comes back dead, a gated one awaiting
        approval)."""
        if self._submitter is None:
            raise ConfigError("submitting child work is not available in this focus")
        return await self._submitter(item.parent(self.work.id))

    def __repr__(self) -> str:
        return f"<Focus {self.work.work_type} {self.work.id} attempt {self.attempt}>"
