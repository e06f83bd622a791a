"""Durable steps as values: a recorded step (:class:`Step`) and how a step retries its body
within one attempt (:class:`StepPolicy`), and what an attempt records a step with
(:class:`StepRecord`). See docs/concepts.md, Durable steps."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec

from animus_core.values.errors import InvalidInput

__all__ = ["Step", "StepPolicy", "StepRecord"]


class Step(msgspec.Struct, frozen=True, kw_only=True):
    """One recorded step of a work item: the ``position``-th step call of its focus, named
    ``name``, run by attempt ``attempt``; its JSON ``result`` and the result's canonical
    hash. ``copied_from`` names the item that recorded it, for steps copied by a rerun or
    replay ``--from-step``."""

    work_id: UUID
    position: int
    name: str
    attempt: int
    result: Any
    result_hash: str
    started_at: datetime
    finished_at: datetime
    duration_ms: int
    copied_from: UUID | None = None

    @classmethod
    def from_row(cls, row: Any) -> Step:
        return cls(work_id=row["work_id"], position=row["position"], name=row["name"],
                   attempt=row["attempt"], result=row["result"],
                   result_hash=row["result_hash"], started_at=row["started_at"],
                   finished_at=row["finished_at"], duration_ms=row["duration_ms"],
                   copied_from=row["copied_from"])


class StepRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What an attempt records as step ``position`` (``name``): its ``result`` as JSON text
    (that :func:`animus_core.values.json_values.encode` made), the canonical hash of the
    result, when its body started and how long it ran."""

    position: int
    name: str
    result: msgspec.Raw
    result_hash: str
    started_at: datetime
    duration_ms: int


class StepPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """How a step's body is retried within one attempt before its failure fails the phase:
    up to ``attempts`` runs in all, waiting ``backoff`` seconds before the second,
    doubling each time up to ``max_backoff``."""

    attempts: int = 1
    backoff: float = 0.0
    max_backoff: float = 60.0

    def __post_init__(self) -> None:
        if not 1 <= self.attempts <= 100:
            raise InvalidInput(f"StepPolicy attempts must be from 1 to 100, got {self.attempts}")
        if not 0 <= self.backoff <= self.max_backoff <= 3600:  # also refuses NaN
            raise InvalidInput("StepPolicy needs 0 <= backoff <= max_backoff <= 3600 seconds, "
                               f"got backoff={self.backoff}, max_backoff={self.max_backoff}")

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failed run."""
        return float(min(self.backoff * 2 ** (failures - 1), self.max_backoff))
