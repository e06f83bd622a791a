"""The work item state machine (docs/concepts.md, States and transitions).

The database holds the same table (``animus.transitions``) and refuses anything else with a
trigger; ``tests/test_states.py`` keeps the two equal.
"""

from __future__ import annotations

import enum

from animus_core.values.errors import IllegalTransition

__all__ = ["TERMINAL", "TRANSITIONS", "State", "require_transition"]


class State(enum.StrEnum):
    CREATED = "created"
    QUEUED = "queued"
    AWAITING_APPROVAL = "awaiting_approval"
    CLAIMED = "claimed"
    RUNNING = "running"
    WAITING = "waiting"
    FAILED = "failed"
    COMPLETED = "completed"
    DEAD = "dead"
    MERGED = "merged"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({State.COMPLETED, State.DEAD, State.MERGED, State.CANCELLED})

TRANSITIONS: dict[State, frozenset[State]] = {
    State.CREATED: frozenset(
        {State.QUEUED, State.MERGED, State.AWAITING_APPROVAL, State.DEAD}
    ),
    State.AWAITING_APPROVAL: frozenset({State.QUEUED, State.DEAD}),
    State.QUEUED: frozenset({State.CLAIMED, State.DEAD, State.CANCELLED}),
    State.CLAIMED: frozenset({State.RUNNING, State.QUEUED}),
    State.RUNNING: frozenset({State.COMPLETED, State.FAILED, State.QUEUED, State.WAITING}),
    State.WAITING: frozenset({State.QUEUED, State.CANCELLED, State.DEAD}),
    State.FAILED: frozenset({State.QUEUED, State.DEAD}),
    State.COMPLETED: frozenset(),
    State.DEAD: frozenset(),
    State.MERGED: frozenset(),
    State.CANCELLED: frozenset(),
}


def require_transition(work_id: object, current: State, target: State) -> None:
    """Raise :class:`IllegalTransition` unless ``current -> target`` is legal."""
    if target not in TRANSITIONS[current]:
        allowed = ", ".join(sorted(TRANSITIONS[current])) or "none: it is finished"
        raise IllegalTransition(
            f"illegal transition for work item {work_id}: {current} -> {target} "
            f"(from {current} the item may go to: {allowed})"
        )
