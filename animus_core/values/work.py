"""Work items as they cross boundaries: submissions in, items and results out.

Records are frozen msgspec structs decoded once at the edge (database rows, JSON from the CLI,
NOTIFY payloads); inside animus code trusts their types. :class:`NewWorkItem` is the builder
submitters use (docs/python-api.md); it validates as it builds, so a bad value is reported
where it was given.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final
from uuid import UUID

import msgspec

from animus_core.values import json_values
from animus_core.values.errors import IllegalTransition, InvalidInput
from animus_core.values.limits import check_text, limits
from animus_core.values.states import State

__all__ = [
    "Claimed",
    "Created",
    "Lease",
    "Merged",
    "NewWorkItem",
    "Outcome",
    "Params",
    "Provenance",
    "SubmitResult",
    "WorkItem",
    "WorkNotification",
    "as_uuid",
]

NAME_GRAMMAR: Final = "1-128 letters, digits or _ . : / -, starting with a letter or digit"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}")
_INT32_MIN: Final = -(2**31)
_INT32_MAX: Final = 2**31 - 1
_STATE_OF: Final = {s.value: s for s in State}  # a row's state, without Enum's slower call


class Provenance(msgspec.Struct, frozen=True, kw_only=True):
    """Where a work item came from: ``source`` (who) and optionally ``trigger`` (why)."""

    source: str
    trigger: str | None = None


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    """How a work item ended: ``data`` on success, ``error`` on failure."""

    data: Any = None
    error: str | None = None
    duration_ms: int | None = None


class WorkItem(msgspec.Struct, frozen=True, kw_only=True):
    """A unit of work and its whole state (docs/concepts.md, Work items)."""

    id: UUID
    work_type: str
    dedup_key: str | None
    params: dict[str, Any]
    provenance: Provenance
    priority: int
    state: State
    reason: str | None
    queue: str
    parent_id: UUID | None
    merged_into: UUID | None
    replay_of: UUID | None
    traceparent: str | None = None
    gate: dict[str, Any] | None = None
    requested_by: str | None = None
    cancel_requested: str | None = None
    attempts: int
    max_attempts: int
    outcome: Outcome
    usage: dict[str, Any] | None = None
    #: what a waiting item waits for (:class:`Wait` as JSON), kept after it is woken until
    #: the next suspension; ``wake_at`` its timer while it waits (None: none, or not waiting)
    wait: dict[str, Any] | None = None
    wake_at: datetime | None = None
    #: how many times its focus suspended: activations, not failures (the retry limit
    #: counts ``attempts - suspensions``)
    suspensions: int = 0
    created_at: datetime
    updated_at: datetime
    resolved_at: datetime | None

    def replayed(self, *, source: str) -> NewWorkItem:
        """A fresh copy of this dead item (linked by ``replay_of``, same dedup key and
        parent); :class:`IllegalTransition` unless the item is dead."""
        if self.state != State.DEAD:
            raise IllegalTransition(
                f"work item {self.id} is {self.state}: only dead items can be replayed"
            )
        new = self.again(source=source, trigger=f"replay of {self.id}")
        if self.dedup_key:
            new = new.dedup_key(self.dedup_key)
        if self.parent_id:
            new = new.parent(self.parent_id)
        return new

    def again(self, *, source: str, trigger: str) -> NewWorkItem:
        """A fresh submission of the same work (type, params, priority, attempts), linked
        to this item by ``replay_of``; dedup key and parent are the caller's choice."""
        return (NewWorkItem(self.work_type, source=source, trigger=trigger)
                .params(self.params).priority(self.priority).max_attempts(self.max_attempts)
                .replay_of(self.id))

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> WorkItem:
        return cls(
            id=row["id"],
            work_type=row["work_type"],
            dedup_key=row["dedup_key"],
            params=row["params"],
            provenance=Provenance(source=row["source"], trigger=row["trigger"]),
            priority=row["priority"],
            state=_STATE_OF[row["state"]],
            reason=row["reason"],
            queue=row["queue"],
            parent_id=row["parent_id"],
            merged_into=row["merged_into"],
            replay_of=row["replay_of"],
            traceparent=row["traceparent"],
            gate=row["gate"],
            requested_by=row["requested_by"],
            cancel_requested=row.get("cancel_requested"),
            attempts=row["attempts"],
            max_attempts=row["max_attempts"],
            outcome=Outcome(
                data=row["outcome_data"],
                error=row["outcome_error"],
                duration_ms=row["duration_ms"],
            ),
            usage=row.get("usage"),
            wait=row.get("wait"),
            wake_at=row.get("wake_at"),
            suspensions=row.get("suspensions") or 0,
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            resolved_at=row["resolved_at"],
        )


class Lease(msgspec.Struct, frozen=True, kw_only=True):
    """Proof of a claim: only the holder of the current lease may finish the item."""

    work_id: UUID
    queue: str
    msg_id: int
    token: int


class Claimed(msgspec.Struct, frozen=True, kw_only=True):
    item: WorkItem
    lease: Lease


class Created(msgspec.Struct, frozen=True, kw_only=True, tag="created"):
    """The submission made a new item, now queued."""

    item: WorkItem

    @property
    def id(self) -> UUID:
        return self.item.id

    @property
    def canonical_id(self) -> UUID:
        return self.item.id


class Merged(msgspec.Struct, frozen=True, kw_only=True, tag="merged"):
    """The submission duplicated live work: it was recorded as merged into ``canonical_id``."""

    id: UUID
    canonical_id: UUID


SubmitResult = Created | Merged


class WorkNotification(msgspec.Struct, frozen=True, kw_only=True):
    """The payload of ``NOTIFY animus_work``: which queue has new work of which types."""

    queue: str
    work_types: list[str]
    #: set when an item suspended with a timer: when it wakes (a claim of its queue then
    #: finds it)
    wake_at: datetime | None = None


class Params(dict[str, Any]):
    """A submission's params, with the JSON text they were checked as (``json``): they are
    encoded once, when they come in, and sent to the database as that text. Do not change
    them in place (a builder makes new ones)."""

    __slots__ = ("json",)

    def __init__(self, params: Mapping[str, Any], json: str) -> None:
        super().__init__(params)
        self.json = json


def check_name(value: object, what: str) -> str:
    """``value`` if it is a valid name of a work type (or of anything named alike)."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        shown = repr(value) if isinstance(value, str) and len(value) <= 140 else \
            f"of {len(value)} characters" if isinstance(value, str) else repr(value)[:80]
        raise InvalidInput(f"{what} {shown} is not a valid name: use {NAME_GRAMMAR}")
    return value


class NewWorkItem:
    """Builder for a submission: ``NewWorkItem("transform", source="user").params({...})``.

    Every builder method returns a new builder; the original is unchanged.

    An item starts ``queued``, unless built with :meth:`refused` (recorded ``dead``) or
    :meth:`gated` (``awaiting_approval``). It carries the trace context given with
    :meth:`with_trace`; the governed submit (:mod:`animus_core.governance.work`) gives an
    item without one the submitter's current trace.
    """

    __slots__ = (
        "_dedup_key",
        "_max_attempts",
        "_params",
        "_parent_id",
        "_priority",
        "_replay_of",
        "_source",
        "_start",
        "_traceparent",
        "_trigger",
        "work_type",
    )

    def __init__(self, work_type: str, source: str = "api", *, trigger: str | None = None) -> None:
        self.work_type = check_name(work_type, "work type")
        if not isinstance(source, str) or not source.strip():
            raise InvalidInput("source must be a non-empty string naming who submits the work")
        self._source = _provenance(source, "source")
        self._trigger = None if trigger is None else _provenance(trigger, "trigger")
        self._dedup_key: str | None = None
        self._params: dict[str, Any] = Params({}, "{}")
        self._priority = 0
        self._parent_id: UUID | None = None
        self._replay_of: UUID | None = None
        self._max_attempts = 3
        self._traceparent: str | None = None
        #: how the item starts when not ``queued``: state, reason and gate
        self._start: dict[str, Any] | None = None

    def _copy(self, **changes: Any) -> NewWorkItem:
        new = object.__new__(NewWorkItem)
        for slot in NewWorkItem.__slots__:
            object.__setattr__(new, slot, changes.get(slot, getattr(self, slot)))
        return new

    def dedup_key(self, key: str) -> NewWorkItem:
        if not isinstance(key, str) or not key or len(key) > 512:
            shown = f"{key!r:.80}" if not isinstance(key, str) or len(key) <= 80 else \
                f"of {len(key)} characters"
            raise InvalidInput(f"dedup key {shown} must be a non-empty string of at most "
                               "512 characters")
        json_values.check(key, "dedup key")
        return self._copy(_dedup_key=key)

    def params(self, params: Mapping[str, Any]) -> NewWorkItem:
        if not isinstance(params, Mapping):
            raise InvalidInput(f"params must be a JSON object, got {type(params).__name__}")
        encoded = json_values.encode(dict(params), "params", limit=limits().params_bytes,
                                     setting="ANIMUS_MAX_PARAMS_BYTES")
        return self._copy(_params=Params(params, encoded))

    def priority(self, priority: int) -> NewWorkItem:
        if (isinstance(priority, bool) or not isinstance(priority, int)
                or not _INT32_MIN <= priority <= _INT32_MAX):
            raise InvalidInput(f"priority must be an integer from {_INT32_MIN} to {_INT32_MAX} "
                               f"(higher runs first), got {priority!r:.40}")
        return self._copy(_priority=priority)

    def parent(self, parent_id: UUID | str) -> NewWorkItem:
        return self._copy(_parent_id=as_uuid(parent_id, "parent id"))

    def replay_of(self, work_id: UUID | str) -> NewWorkItem:
        return self._copy(_replay_of=as_uuid(work_id, "replayed id"))

    def max_attempts(self, n: int) -> NewWorkItem:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1000:
            raise InvalidInput(f"max_attempts must be an integer from 1 to 1000, got {n!r}")
        return self._copy(_max_attempts=n)

    def trigger(self, trigger: str) -> NewWorkItem:
        return self._copy(_trigger=_provenance(trigger, "trigger"))

    def with_trace(self, traceparent: str | None) -> NewWorkItem:
        """The item carrying the W3C ``traceparent`` of the trace it continues."""
        return self._copy(_traceparent=traceparent)

    def allowed(self, rule: str) -> NewWorkItem:
        """The item queued as rule ``rule`` allows it: the rule is named in its reason (and
        so in its ``submitted`` audit row)."""
        return self._copy(_start={"state": "queued",
                                  "reason": f"submitted: allowed by rule {rule!r}"})

    def refused(self, reason: str) -> NewWorkItem:
        """The item recorded ``dead`` with ``reason`` instead of queued: work that will not
        run, kept visible and audited."""
        return self._copy(_start={"state": "dead", "reason": reason})

    def gated(self, *, rule: str | None, role: str, quorum: int, reason: str) -> NewWorkItem:
        """The item waiting in ``awaiting_approval`` for ``quorum`` approvals by members of
        ``role`` (docs/governance.md, Approval gates) instead of queued."""
        return self._copy(_start={
            "state": "awaiting_approval",
            "gate": {"rule": rule, "role": role, "quorum": quorum, "reason": reason},
            "reason": f"awaiting approval ({quorum} x {role}): {reason}"})

    @property
    def traceparent(self) -> str | None:
        return self._traceparent

    @property
    def starts(self) -> str:
        """The state the item starts in: ``queued``, ``dead`` or ``awaiting_approval``."""
        return "queued" if self._start is None else str(self._start["state"])

    def to_json(self) -> dict[str, Any]:
        """The submission as the database's ``animus.submit`` reads it."""
        return {
            "work_type": self.work_type,
            "dedup_key": self._dedup_key,
            "params": self._params,
            "source": self._source,
            "trigger": self._trigger,
            "priority": self._priority,
            "parent_id": str(self._parent_id) if self._parent_id else None,
            "replay_of": str(self._replay_of) if self._replay_of else None,
            "max_attempts": self._max_attempts,
            "traceparent": self._traceparent,
            **(self._start or {}),
        }

    def __repr__(self) -> str:
        return f"NewWorkItem({self.work_type!r}, source={self._source!r}, dedup_key={self._dedup_key!r})"


def _provenance(text: str, what: str) -> str:
    return check_text(text, what, limits().source_chars, "ANIMUS_MAX_SOURCE_CHARS")


def as_uuid(value: UUID | str, what: str, kind: str = "a work item id") -> UUID:
    """``value`` as a UUID, or :class:`InvalidInput` naming ``what`` it was meant to be."""
    if isinstance(value, UUID):
        return value
    try:
        return UUID(str(value))
    except ValueError:
        raise InvalidInput(f"{what} {value!r} is not {kind} (a UUID)") from None
