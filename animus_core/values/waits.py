"""Suspension as values: what a waiting item waits for (:class:`Wait`), a signal sent to an
item (:class:`Signal`), and the decisions on an approval inside a focus (:class:`Approval`,
:class:`Decision`). See docs/concepts.md, Waiting, and docs/governance.md, Approval gates."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

import msgspec

from animus_core.values.errors import InvalidInput
from animus_core.values.limits import check_text, limits
from animus_core.values.roles import ROLES
from animus_core.values.steps import Step
from animus_core.values.work import check_name

__all__ = ["Approval", "Decision", "Resume", "Signal", "Suspended", "Wait", "WaitKind"]

WaitKind = Literal["sleep", "event", "approval", "children"]


class Wait(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What a suspended focus waits for: a ``sleep`` until ``until``, the signal ``event``
    (until ``until``, or without a timeout when it is None), or an ``approval``: ``quorum``
    different members of ``animus_<role>`` approving, or one rejecting, the gate ``why``
    (until ``until``, or without a timeout), or its ``children`` to finish (the ids of the
    child work items, until ``until`` or without a timeout). ``position`` is the step
    position the resumed attempt records the sleep, the wait or the decision at (and an
    approval's decisions are kept under). Stored as the item's ``wait`` column, without the
    fields that are None; ``until`` is the timer as ISO 8601 text."""

    kind: WaitKind
    position: int
    event: str | None = None
    until: str | None = None
    why: str | None = None
    role: str | None = None
    quorum: int | None = None
    children: list[str] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("sleep", "event", "approval", "children"):
            raise InvalidInput(f"a wait is a sleep, an event, an approval or children, got "
                               f"{self.kind!r}")
        if not isinstance(self.position, int) or isinstance(self.position, bool) \
                or self.position < 1:
            raise InvalidInput(f"a wait's step position is 1 or more, got {self.position!r}")
        if self.kind == "event":
            if self.event is None:
                raise InvalidInput("a wait for an event names the event")
            check_name(self.event, "event")
        elif self.event is not None:
            raise InvalidInput(f"a wait of kind {self.kind!r} waits for no event")
        if self.kind == "sleep" and self.until is None:
            raise InvalidInput("a sleep needs the time it ends (until)")
        if self.kind == "approval":
            check_approval(self.why, self.role, self.quorum)
        elif (self.why, self.role, self.quorum) != (None, None, None):
            raise InvalidInput(f"only an approval has a why, a role and a quorum, not a "
                               f"wait of kind {self.kind!r}")
        if self.kind == "children":
            if not self.children:
                raise InvalidInput("a wait for children lists at least one child work item")
        elif self.children is not None:
            raise InvalidInput(f"a wait of kind {self.kind!r} lists no children")

    def ends_at(self) -> datetime | None:
        """When the wait ends by its timer (``until``), or None: it has no timer."""
        return datetime.fromisoformat(self.until) if self.until is not None else None

    def ran_out(self, now: datetime) -> bool:
        """Whether its timer has run out at ``now`` (never, without one)."""
        ends = self.ends_at()
        return ends is not None and ends <= now

    @classmethod
    def sleep(cls, position: int, until: datetime) -> Wait:
        return cls(kind="sleep", position=position, until=until.isoformat())

    @classmethod
    def for_event(cls, position: int, event: str, until: datetime | None = None) -> Wait:
        return cls(kind="event", position=position, event=event,
                   until=until.isoformat() if until else None)

    @classmethod
    def approval(cls, position: int, why: str, role: str, quorum: int,
                 until: datetime | None = None) -> Wait:
        return cls(kind="approval", position=position, why=why, role=role, quorum=quorum,
                   until=until.isoformat() if until else None)

    @classmethod
    def for_children(cls, position: int, children: list[str],
                     until: datetime | None = None) -> Wait:
        return cls(kind="children", position=position, children=list(children),
                   until=until.isoformat() if until else None)

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Wait:
        return msgspec.convert(value, cls)

    def describe(self) -> str:
        """What it waits for, in words (without its timer): ``sleep``, ``'EVENT'``,
        ``approval (2 x approver): WHY``, or ``3 children``."""
        if self.kind == "approval":
            return f"approval ({self.quorum} x {self.role}): {self.why}"
        if self.kind == "children":
            n = len(self.children or ())
            return "1 child" if n == 1 else f"{n} children"
        return "sleep" if self.kind == "sleep" else repr(self.event)


def check_approval(why: object, role: object, quorum: object) -> None:
    """An approval gate inside a focus: a reason why people must decide (text that is not
    blank), one of the governance :data:`~animus_core.values.roles.ROLES`, and a quorum of
    at least 1 person."""
    check_text(why, "an approval's why", limits().reason_chars, "ANIMUS_MAX_REASON_CHARS")
    if not isinstance(why, str) or not why.strip():
        raise InvalidInput("an approval needs a why: say what people are asked to decide")
    if role not in ROLES:
        raise InvalidInput(f"an approval's role {role!r} is not an animus role: use one of "
                           f"{', '.join(ROLES)} (its members, animus_<role>, decide)")
    if not isinstance(quorum, int) or isinstance(quorum, bool) or quorum < 1:
        raise InvalidInput(f"an approval's quorum is how many different people must approve: "
                           f"a whole number of 1 or more, got {quorum!r}")


class Approval(msgspec.Struct, frozen=True, kw_only=True):
    """One person's decision on a gate of a work item (a row of ``animus.approvals``):
    ``position`` is the step position of an approval inside a focus (None: the gate the
    item was submitted with); ``counts`` whether the approver holds the gate's role (or is a
    superuser) now."""

    approver: str
    decision: Literal["approve", "reject"]
    reason: str
    at: datetime
    position: int | None = None
    counts: bool = True

    @classmethod
    def from_row(cls, row: Any) -> Approval:
        return cls(approver=row["approver"], decision=row["decision"], reason=row["reason"],
                   at=row["at"], position=row["position"], counts=row["counts"])


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    """What people decided on an approval inside a focus (``focus.approval``): ``approved``
    or not, by whom (``by``: the approvers who made the quorum, or the one who rejected), why
    (``reason``: the rejection's, or the approvals' reasons joined by ``"; "``) and when the
    decision was made (``decided_at``: the rejection, or the approval that made the
    quorum)."""

    approved: bool
    reason: str
    by: list[str]
    decided_at: datetime

    @classmethod
    def of(cls, approvals: list[Approval], quorum: int) -> Decision | None:
        """The decision that ``approvals`` (one gate's, oldest first) make with ``quorum``:
        one rejection rejects; ``quorum`` approvals that count approve; None: not decided
        yet."""
        for a in approvals:
            if a.decision == "reject":
                return cls(approved=False, reason=a.reason, by=[a.approver], decided_at=a.at)
        counted: dict[str, Approval] = {}
        for a in approvals:
            if a.counts and a.approver not in counted:
                counted[a.approver] = a
                if len(counted) == quorum:
                    return cls(approved=True, by=list(counted),
                               reason="; ".join(c.reason for c in counted.values()),
                               decided_at=a.at)
        return None

    def to_json(self) -> dict[str, Any]:
        """As a step records it."""
        return {"approved": self.approved, "reason": self.reason, "by": self.by,
                "decided_at": self.decided_at.isoformat()}

    @classmethod
    def from_json(cls, value: Any) -> Decision:
        return msgspec.convert(value, cls, strict=False)


class Signal(msgspec.Struct, frozen=True, kw_only=True):
    """A signal sent to a work item: kept until a wait of the item takes it (the first to
    arrive is taken first); ``consumed_by_position`` is the step position of that wait."""

    id: int
    work_id: UUID
    event: str
    payload: Any
    sent_by: str
    sent_at: datetime
    consumed_by_position: int | None = None
    consumed_at: datetime | None = None

    @classmethod
    def from_row(cls, row: Any) -> Signal:
        return cls(id=row["id"], work_id=row["work_id"], event=row["event"],
                   payload=row["payload"], sent_by=row["sent_by"], sent_at=row["sent_at"],
                   consumed_by_position=row["consumed_by_position"],
                   consumed_at=row["consumed_at"])


class Resume(msgspec.Struct, frozen=True, kw_only=True):
    """What an attempt that resumes or retries reads of its item's record before it runs,
    read with its claim: the recorded ``steps``, by position, and ``woken_by``, the signal
    its kept wait took when it woke the item (None: it took none)."""

    steps: tuple[Step, ...]
    woken_by: Signal | None = None


class Suspended(BaseException):
    """Raised by a focus that suspends (``focus.sleep``, ``focus.wait_for``...): the runner
    catches it and ends the attempt ``running -> waiting`` for ``wait``, with the timer
    ``wake_at`` (the wait's end, None: none). A ``BaseException``, as ``asyncio.CancelledError`` is, so
    that a faculty's ``except Exception`` does not swallow it; do not catch it."""

    def __init__(self, wait: Wait) -> None:
        super().__init__(f"suspended at step {wait.position}: {wait.kind}"
                         + (f" {wait.event!r}" if wait.event else "")
                         + (f" ({wait.quorum} x {wait.role}) {wait.why!r}"
                            if wait.kind == "approval" else "")
                         + (f" ({len(wait.children)})" if wait.children else "")
                         + (f" until {wait.until}" if wait.until else ""))
        self.wait = wait
        self.wake_at = wait.ends_at()
