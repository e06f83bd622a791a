"""Suspension as values: what a waiting item waits for (:class:`Wait`) and a signal sent to
an item (:class:`Signal`). See docs/concepts.md, Waiting."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

import msgspec

from animus_core.values.errors import InvalidInput
from animus_core.values.work import check_name

__all__ = ["Signal", "Suspended", "Wait", "WaitKind"]

WaitKind = Literal["sleep", "event", "children"]


class Wait(msgspec.Struct, frozen=True, kw_only=True):
    """What a suspended focus waits for: a ``sleep`` until ``until``, the signal ``event``
    (until ``until``, or without a timeout when it is None), or its ``children`` to finish
    (the ids of the child work items, until ``until`` or without a timeout). ``position`` is
    the step position the resumed attempt records the sleep or the wait at. Stored as the
    item's ``wait`` column; ``until`` is the timer as ISO 8601 text. ``children`` is left out
    of the JSON of other waits (unset)."""

    kind: WaitKind
    position: int
    event: str | None = None
    until: str | None = None
    children: list[str] | msgspec.UnsetType = msgspec.UNSET

    def __post_init__(self) -> None:
        if self.kind not in ("sleep", "event", "children"):
            raise InvalidInput(f"a wait is a sleep, an event or children, got {self.kind!r}")
        if self.position < 1:
            raise InvalidInput(f"a wait's step position is 1 or more, got {self.position}")
        if self.kind == "children":
            if self.event is not None:
                raise InvalidInput("a wait for children waits for no event")
            if not self.children:
                raise InvalidInput("a wait for children lists at least one child work item")
        elif self.children is not msgspec.UNSET:
            raise InvalidInput(f"a {self.kind} wait lists no children")
        if self.kind == "event":
            if self.event is None:
                raise InvalidInput("a wait for an event names the event")
            check_name(self.event, "event")
        elif self.event is not None:
            raise InvalidInput("a sleep waits for no event")
        if self.kind == "sleep" and self.until is None:
            raise InvalidInput("a sleep needs the time it ends (until)")

    @classmethod
    def sleep(cls, position: int, until: datetime) -> Wait:
        return cls(kind="sleep", position=position, until=until.isoformat())

    @classmethod
    def for_event(cls, position: int, event: str, until: datetime | None = None) -> Wait:
        return cls(kind="event", position=position, event=event,
                   until=until.isoformat() if until else None)

    @classmethod
    def for_children(cls, position: int, children: list[str],
                     until: datetime | None = None) -> Wait:
        return cls(kind="children", position=position, children=list(children),
                   until=until.isoformat() if until else None)

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Wait:
        return msgspec.convert(value, cls)


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


class Suspended(BaseException):
    """Raised by a focus that suspends (``focus.sleep``, ``focus.wait_for``...): the runner
    catches it and ends the attempt ``running -> waiting`` for ``wait``, with the timer
    ``wake_at`` (None: none). A ``BaseException``, as ``asyncio.CancelledError`` is, so
    that a faculty's ``except Exception`` does not swallow it; do not catch it."""

    def __init__(self, wait: Wait, wake_at: datetime | None) -> None:
        super().__init__(f"suspended at step {wait.position}: {wait.kind}"
                         + (f" {wait.event!r}" if wait.event else "")
                         + (f" ({len(wait.children)})" if wait.children else "")
                         + (f" until {wait.until}" if wait.until else ""))
        self.wait = wait
        self.wake_at = wake_at
