"""The class-based API for Python faculties.

    class Summarize(Faculty):
        name = "summarize"
        accepts = ("summarize",)
        max_concurrent = 4

        async def engage(self, focus, oriented):
            return {"summary": ...}

Override any of :meth:`orient`, :meth:`engage`, :meth:`consolidate`, :meth:`recover`,
sync or ``async def``. The defaults pass values through: orient returns the work's params,
engage returns what orient returned, consolidate returns what engage returned, recover
retries. Sync methods run in a worker thread so they cannot stall the engine; prefer
``async def`` for quick work. Signatures follow :mod:`animus_core.hookspecs`; they are
checked when the faculty is registered.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from animus_core.schedules import Schedule

if TYPE_CHECKING:
    from animus_core.focus import Focus

__all__ = ["PHASES", "Faculty"]

PHASES = ("orient", "engage", "consolidate", "recover")


class Faculty:
    """A cognitive specialization: which work types it accepts and how it works on them."""

    #: Unique name, shown by ``animus faculty list``.
    name: ClassVar[str] = ""
    #: Work types routed to this faculty.
    accepts: ClassVar[tuple[str, ...]] = ()
    #: Foci of this faculty running at once in one engine.
    max_concurrent: ClassVar[int] = 1
    #: Attempts before an item is dead-lettered (when the work item does not say otherwise).
    max_attempts: ClassVar[int | None] = None
    #: Seconds each phase may take; ``None`` for no limit.
    timeout: ClassVar[float | None] = 300.0
    #: Foci started per second at most; ``None`` for no limit.
    rate_limit: ClassVar[float | None] = None
    #: First retry delay in seconds; doubles per attempt (with jitter) up to ``retry_max``.
    retry_base: ClassVar[float] = 1.0
    retry_max: ClassVar[float] = 300.0
    #: Recurring work this faculty wants (see :mod:`animus_core.schedules`).
    schedules: ClassVar[tuple[Schedule, ...]] = ()
    #: Environment variables the faculty cannot work without (checked at engine start: a
    #: faculty missing one is reported and disabled, and its work stays queued).
    requires_env: ClassVar[tuple[str, ...]] = ()
    #: Sample params for ``animus demo`` (``None``: the demo skips this faculty).
    example: ClassVar[dict[str, object] | None] = None

    #: Where the faculty came from; set by the engine when registering it.
    origin: str = ""

    def orient(self, focus: Focus) -> Any:
        return focus.work.params

    def engage(self, focus: Focus, oriented: Any) -> Any:
        return oriented

    def consolidate(self, focus: Focus, engaged: Any) -> Any:
        return engaged

    def recover(self, focus: Focus, error: str, phase: str) -> bool | None:
        return None

    def identity(self) -> dict[str, Any]:
        """What this faculty is, for execution records: for a Python faculty its class and
        the distribution (and version) it was installed from. Called for every attempt."""
        cls = type(self)
        return {"kind": "python", "class": f"{cls.__module__}.{cls.__qualname__}",
                "origin": self.origin}

    def describe(self) -> str:
        """One line for ``animus faculty list``."""
        doc = (type(self).__doc__ or "").strip().splitlines()
        return doc[0] if doc else ""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} accepts={list(self.accepts)}>"
