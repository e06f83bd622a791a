"""animus: a substrate for long-running AI agents that lives on Postgres."""

from animus_core.faculties.contract import hookimpl
from animus_core.faculties.faculty import Faculty
from animus_core.faculties.focus import Focus
from animus_core.governance.rules import RuleSet
from animus_core.governance.work import GovernedWork
from animus_core.store.db import Db, DeadLetter, Retry
from animus_core.values.errors import (
    AnimusError,
    ConfigError,
    DatabaseError,
    DatabaseUnavailable,
    IllegalTransition,
    InvalidInput,
    LeaseLost,
    MigrationError,
    StepOrderChanged,
    WaitTimedOut,
    WorkNotFound,
)
from animus_core.values.states import State
from animus_core.values.steps import Step, StepPolicy
from animus_core.values.version import __version__
from animus_core.values.work import (
    Claimed,
    Created,
    Lease,
    Merged,
    NewWorkItem,
    Outcome,
    Provenance,
    SubmitResult,
    WorkItem,
)

__all__ = [
    "AnimusError",
    "Claimed",
    "ConfigError",
    "Created",
    "DatabaseError",
    "DatabaseUnavailable",
    "Db",
    "DeadLetter",
    "Faculty",
    "Focus",
    "GovernedWork",
    "IllegalTransition",
    "InvalidInput",
    "Lease",
    "LeaseLost",
    "Merged",
    "MigrationError",
    "NewWorkItem",
    "Outcome",
    "Provenance",
    "Retry",
    "RuleSet",
    "State",
    "Step",
    "StepOrderChanged",
    "StepPolicy",
    "SubmitResult",
    "WaitTimedOut",
    "WorkItem",
    "WorkNotFound",
    "__version__",
    "hookimpl",
]
