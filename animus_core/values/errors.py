"""Every error animus raises on purpose derives from :class:`AnimusError`.

Each one says what was wrong, where (file, field, work id, server) and what to do. The CLI
prints ``str(error)`` and exits with ``error.exit_code``; a traceback only with ``--debug``.

    AnimusError
    ├── ConfigError            a setting, file or field is wrong           (exit 2)
    ├── InvalidInput           a value given to the API or CLI is wrong    (exit 2)
    ├── WorkNotFound           no work item with that id                   (exit 2)
    ├── IllegalTransition      the state machine forbids the change        (exit 2)
    ├── PermissionDenied       the database or a rule refuses this person  (exit 3)
    ├── LeaseLost              the claim expired and someone else holds it (exit 1)
    ├── PhaseFailed            a faculty phase failed, in its own words    (exit 1)
    │   ├── StepOrderChanged       steps called in another order than recorded
    │   ├── WaitTimedOut           a wait for a signal ended without one
    │   └── ApprovalTimedOut       an approval inside a focus ended undecided
    ├── EmbedderError          the embedding service failed or answered nonsense (exit 1)
    ├── LLMError               the model API failed after its retries        (exit 1)
    └── DatabaseError          the database said no                        (exit 1)
        ├── DatabaseUnavailable    cannot reach or start the server
        └── MigrationError         schema history does not match the files
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "AnimusError",
    "ApprovalTimedOut",
    "ConfigError",
    "DatabaseError",
    "DatabaseUnavailable",
    "EmbedderError",
    "IllegalTransition",
    "InvalidInput",
    "LLMError",
    "LeaseLost",
    "MigrationError",
    "PermissionDenied",
    "PhaseFailed",
    "StepOrderChanged",
    "WaitTimedOut",
    "WorkNotFound",
]


class AnimusError(Exception):
    """Root of every error animus raises on purpose."""

    exit_code = 1


class PhaseFailed(AnimusError):
    """A faculty phase failed in a way the faculty has already put in words: the message is
    the whole failure reason (the exception's class name is not added to it). ``kind`` says
    what went wrong, for metrics: ``exit_status``, ``timeout``, ``bad_output`` or
    ``exception``. ``final``: retrying cannot change the outcome (a replay of the item's
    record would meet it again), so the item is dead-lettered without recover or retry."""

    final: ClassVar[bool] = False

    def __init__(self, message: str, *, kind: str = "exception") -> None:
        super().__init__(message)
        self.kind = kind


class StepOrderChanged(PhaseFailed):
    """An attempt called its steps in another order than the item's record: the record
    cannot be replayed, and retrying cannot help (the item is dead-lettered)."""

    final = True

    def __init__(self, message: str) -> None:
        super().__init__(message, kind="step_order")


class WaitTimedOut(PhaseFailed):
    """A focus's wait for a signal ended at its timeout without one (``event``, the time it
    ended ``until`` as ISO 8601 text). A faculty may catch it and go on; uncaught, it fails
    the phase and the item is dead-lettered (a retry replays the same timed-out wait)."""

    final = True

    def __init__(self, event: str, until: str | None) -> None:
        super().__init__(f"wait for signal {event!r} timed out at {until}", kind="wait_timeout")
        self.event = event
        self.until = until


class ApprovalTimedOut(PhaseFailed):
    """A focus's approval (``focus.approval``) was not decided by its timeout: ``why``,
    ``role`` and ``quorum`` are the gate's, ``approvals`` how many approvals that count it
    had, ``until`` the time it ended (ISO 8601 text). Like :class:`WaitTimedOut`, a faculty
    may catch it; uncaught, the item is dead-lettered."""

    final = True

    def __init__(self, why: str, role: str, quorum: int, approvals: int,
                 until: str | None) -> None:
        super().__init__(f"approval ({quorum} x {role}) {why!r} timed out at {until} with "
                         f"{approvals} of {quorum} approvals", kind="wait_timeout")
        self.why = why
        self.role = role
        self.quorum = quorum
        self.approvals = approvals
        self.until = until


class ConfigError(AnimusError):
    exit_code = 2


class InvalidInput(AnimusError):
    exit_code = 2


class WorkNotFound(AnimusError):
    exit_code = 2


class IllegalTransition(AnimusError):
    exit_code = 2


class PermissionDenied(AnimusError):
    exit_code = 3


class LeaseLost(AnimusError):
    pass


class EmbedderError(AnimusError):
    pass


class LLMError(AnimusError):
    pass


class DatabaseError(AnimusError):
    pass


class DatabaseUnavailable(DatabaseError):
    pass


class MigrationError(DatabaseError):
    pass
