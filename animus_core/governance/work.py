"""The governed way to submit work: the rules applied, the submitter's trace carried.

:class:`GovernedWork` is built from a :class:`~animus_core.store.db.Db` (the raw store, which
applies no rule) and a :class:`~animus_core.governance.rules.RuleSet`, and does not change
after. Every submission it makes goes through :meth:`RuleSet.decide` first: a denied item is
recorded ``dead`` with the rule's reason (``denied at submit: ...``), a gated one waits in
``awaiting_approval`` with the rule's role and quorum, an allowed one starts as it was built.
Items without a trace context get the submitter's current one. See docs/governance.md,
Rules, and docs/python-api.md.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from animus_core.governance.rules import RuleSet
from animus_core.infra.telemetry import current_traceparent
from animus_core.store.db import DEFAULT_QUEUE, Db
from animus_core.values.work import NewWorkItem, SubmitResult, WorkItem

__all__ = ["ChildSubmitter", "GovernedWork", "RuleRefused", "Submitter"]

#: Submits one item (as :meth:`GovernedWork.child_submitter` returns, bound to a parent).
Submitter = Callable[[NewWorkItem], Awaitable[SubmitResult]]


class RuleRefused(Exception):
    """A rule refused the work before engage: it is dead-lettered, not retried."""


@dataclass(frozen=True, slots=True)
class GovernedWork:
    """Submit work with the rules applied; check an item's rules again before engage."""

    db: Db
    rules: RuleSet

    def govern(self, item: NewWorkItem, traceparent: str | None) -> NewWorkItem:
        """``item`` as the rules let it start, carrying ``traceparent`` unless it carries a
        trace of its own. A rule's denial or gate takes precedence over the item's own gate;
        an item already refused (recorded as not run) has nothing left to decide."""
        if item.traceparent is None:
            item = item.with_trace(traceparent)
        if item.starts == "dead":
            return item
        entry = item.to_json()
        decision = self.rules.decide(entry["work_type"], entry["params"], entry["source"])
        # the rule that decided is on the item's `submitted` audit row: in the reason, or
        # in the gate
        if decision.effect == "deny":
            return item.refused(f"denied at submit: {decision.reason}" + (
                f" (rule {decision.rule!r})" if decision.rule is not None else ""))
        if decision.effect == "require_approval":
            return item.gated(rule=decision.rule, role=decision.role or "approver",
                              quorum=decision.quorum, reason=decision.reason)
        if decision.rule is not None and item.starts == "queued":
            return item.allowed(decision.rule)
        return item

    async def submit(self, item: NewWorkItem, *, queue: str = DEFAULT_QUEUE) -> SubmitResult:
        """Submit one item: :class:`Created` (queued, or dead or awaiting approval as a rule
        said) or :class:`Merged`."""
        return (await self.submit_many([item], queue=queue))[0]

    async def submit_many(self, items: Sequence[NewWorkItem], *,
                          queue: str = DEFAULT_QUEUE) -> list[SubmitResult]:
        """Submit a batch in one round trip and one transaction; results in input order."""
        traceparent = current_traceparent()  # one trace context for the whole batch
        return await self.db.submit_many([self.govern(i, traceparent) for i in items],
                                         queue=queue)

    async def submit_scheduled(self, name: str, tick: datetime, item: NewWorkItem, *,
                               queue: str = DEFAULT_QUEUE) -> SubmitResult | None:
        """Submit ``item`` for one tick of schedule ``name``, unless any engine already did
        (``None``)."""
        return await self.db.submit_scheduled(name, tick, self.govern(item, current_traceparent()),
                                              queue=queue)

    async def replay(self, work_id: UUID | str, *, source: str = "replay",
                     from_step: str | None = None) -> SubmitResult:
        """Submit a fresh copy of a dead item (linked by ``replay_of``), in its queue; with
        ``from_step``, resuming at that step (see :meth:`submit_from_step`)."""
        old = await self.db.get_work_item(work_id)
        new = old.replayed(source=source)
        if from_step is not None:
            return await self.submit_from_step(new, old.id, from_step, queue=old.queue)
        return await self.submit(new, queue=old.queue)

    async def submit_from_step(self, item: NewWorkItem, from_id: UUID, step: str, *,
                               queue: str = DEFAULT_QUEUE) -> SubmitResult:
        """Submit ``item``, a rerun or replay of ``from_id``, with the rules applied and the
        steps ``from_id`` recorded before ``step`` copied into it: it replays them and runs
        ``step`` and the steps after it afresh."""
        return await self.db.submit_from_step(self.govern(item, current_traceparent()),
                                              from_id=from_id, step=step, queue=queue)

    def child_submitter(self, parent: WorkItem) -> ChildSubmitter:
        """Submits child work of ``parent``: into its queue, with it as the parent."""
        return ChildSubmitter(self, parent)

    async def check_before_engage(self, item: WorkItem) -> None:
        """The rules again, right before engage (they may have changed since submit):
        :class:`RuleRefused` when they deny the item, or gate it and it lacks the approvals."""
        if not self.rules.active:  # the usual case, on every focus: nothing to decide
            return
        decision = self.rules.decide(item.work_type, item.params, item.provenance.source)
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


@dataclass(frozen=True, slots=True)
class ChildSubmitter:
    """A :data:`Submitter` of child work of ``parent`` (into its queue, with it as the
    parent, the rules applied); :meth:`prepare` gives the items as they would be submitted,
    for a caller that submits them in a transaction of its own (``Focus.run_children``)."""

    governed: GovernedWork
    parent: WorkItem

    async def __call__(self, item: NewWorkItem) -> SubmitResult:
        return await self.governed.submit(item.parent(self.parent.id), queue=self.parent.queue)

    def prepare(self, items: Sequence[NewWorkItem]) -> list[NewWorkItem]:
        """``items`` as children of the parent, with the rules applied (a denied item is
        built to start dead, a gated one awaiting approval), carrying the current trace."""
        traceparent = current_traceparent()
        return [self.governed.govern(i.parent(self.parent.id), traceparent) for i in items]

    @property
    def queue(self) -> str:
        return self.parent.queue
