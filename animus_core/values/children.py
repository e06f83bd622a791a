"""Child work as a focus waits for it: what :meth:`Focus.run_children
<animus_core.faculties.focus.Focus.run_children>` returns (:class:`ChildResult`, one per child,
in the order given) and the errors a faculty may raise from them. See
docs/writing-faculties.md, Waiting for child work."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from uuid import UUID

import msgspec

from animus_core.values.errors import PhaseFailed, WaitTimedOut
from animus_core.values.states import State

__all__ = ["ChildFailed", "ChildResult", "ChildrenTimedOut", "outcomes"]


class ChildResult(msgspec.Struct, frozen=True, kw_only=True):
    """How one child ended. ``id`` is the child submitted; a child merged into live work
    with its dedup key follows the item it was merged into (``merged_into``): ``state``,
    ``outcome``, ``error`` and ``reason`` are that item's. ``state`` is ``completed``,
    ``dead`` or ``cancelled``; ``outcome`` is the completed child's outcome (None
    otherwise), ``error`` a failed child's error, ``reason`` why it ended as it did."""

    id: UUID
    work_type: str
    state: State
    outcome: Any = None
    error: str | None = None
    reason: str | None = None
    merged_into: UUID | None = None

    @property
    def ok(self) -> bool:
        """Whether the child completed."""
        return self.state == State.COMPLETED

    def result(self) -> Any:
        """The child's outcome; :class:`ChildFailed` when it did not complete."""
        if not self.ok:
            raise ChildFailed(self)
        return self.outcome

    def to_json(self) -> dict[str, Any]:
        """As recorded in the step of the wait (and read back by :meth:`from_json`)."""
        return {"id": str(self.id), "work_type": self.work_type, "state": str(self.state),
                "outcome": self.outcome, "error": self.error, "reason": self.reason,
                "merged_into": None if self.merged_into is None else str(self.merged_into)}

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> ChildResult:
        return msgspec.convert(value, cls)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> ChildResult:
        """From a row of the child (``id``, ``work_type``, ``merged_into``) and of the item it
        follows (``state``, ``outcome_data``, ``outcome_error``, ``reason``)."""
        return cls(id=row["id"], work_type=row["work_type"], state=State(row["state"]),
                   outcome=row["outcome_data"], error=row["outcome_error"],
                   reason=row["reason"], merged_into=row["merged_into"])


class ChildFailed(PhaseFailed):
    """A child work item did not complete (``child``: how it ended). Raised by
    :meth:`ChildResult.result` and :func:`outcomes`; uncaught, it fails the phase and the
    item is dead-lettered (a retry would replay the same finished children)."""

    final = True

    def __init__(self, child: ChildResult) -> None:
        why = child.reason or child.error or "no reason given"
        super().__init__(f"child work item {child.id} ({child.work_type}) ended {child.state}: "
                         f"{why}", kind="child_failed")
        self.child = child


class ChildrenTimedOut(WaitTimedOut):
    """A wait for children ended at its timeout with ``unfinished`` of them (of ``total``)
    not finished. The children go on; a faculty may catch it (it is a
    :class:`~animus_core.values.errors.WaitTimedOut`) and cancel them or wait again."""

    def __init__(self, unfinished: int, total: int, until: str | None) -> None:
        PhaseFailed.__init__(self, f"wait for children timed out at {until}: {unfinished} of "
                                   f"{total} not finished", kind="wait_timeout")
        self.event = "children"
        self.until = until
        self.unfinished = unfinished
        self.total = total


def outcomes(results: Sequence[ChildResult]) -> list[Any]:
    """The outcomes of ``results``, in order; :class:`ChildFailed` for the first child that
    did not complete."""
    return [r.result() for r in results]
