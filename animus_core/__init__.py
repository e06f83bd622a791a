"""animus: a substrate for long-running AI agents that lives on Postgres."""

from animus_core.db import Db
from animus_core.errors import (
    AnimusError,
    ConfigError,
    DatabaseError,
    DatabaseUnavailable,
    IllegalTransition,
    InvalidInput,
    LeaseLost,
    MigrationError,
    WorkNotFound,
)
from animus_core.faculty import Faculty
from animus_core.focus import Focus
from animus_core.plugins import hookimpl
from animus_core.states import State
from animus_core.work import (
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

__version__ = "0.1.0"

__all__ = [
    "AnimusError",
    "Claimed",
    "ConfigError",
    "Created",
    "DatabaseError",
    "DatabaseUnavailable",
    "Db",
    "Faculty",
    "Focus",
    "IllegalTransition",
    "InvalidInput",
    "Lease",
    "LeaseLost",
    "Merged",
    "MigrationError",
    "NewWorkItem",
    "Outcome",
    "Provenance",
    "State",
    "SubmitResult",
    "WorkItem",
    "WorkNotFound",
    "__version__",
    "hookimpl",
]
