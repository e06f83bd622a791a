"""Live engines as values: what an engine registers (:class:`EngineInfo`), what ``animus
status`` reads of each (:class:`Engine`), what a heartbeat answers (:class:`Beat`), and the
fleet's view of work no live engine will run (:func:`stuck_work`). See
``0026_engines.sql`` and docs/operations.md, Live engines."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec

__all__ = ["Beat", "Engine", "EngineInfo", "FacultyInfo", "ScheduleInfo", "StuckWork",
           "stuck_work"]


class FacultyInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A faculty an engine loaded: where it came from, what it accepts, its limits, and the
    sample params it declares (the console's submit form starts from them)."""

    name: str
    origin: str
    accepts: list[str]
    max_concurrent: int
    #: seconds each phase may take, foci started per second, attempts (None: no limit, or
    #: the work item's own for attempts)
    timeout: float | None = None
    rate_limit: float | None = None
    max_attempts: int | None = None
    example: dict[str, Any] | None = None


class ScheduleInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A schedule an engine runs, and its next tick as the engine last saw it."""

    name: str
    work_type: str
    next_tick: datetime | None = None


class EngineInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What an engine registers as it starts."""

    id: UUID
    host: str
    pid: int
    version: str
    heartbeat_seconds: float
    concurrency: int
    queues: list[str]
    faculties: list[FacultyInfo]
    #: faculty name -> why it is disabled on this engine (its work stays queued)
    disabled: dict[str, str] = {}
    schedules: list[ScheduleInfo] = []


class Engine(EngineInfo, frozen=True, kw_only=True):
    """A registered engine as ``animus status`` reads it: ``lost`` once its heartbeat
    lapsed (three beats missed), ``running`` its foci per faculty at its last beat."""

    db_user: str
    started_at: datetime
    last_seen: datetime
    lost: bool
    running: dict[str, int] = {}
    stop_requested_at: datetime | None = None
    stop_requested_by: str | None = None

    def accepts(self) -> dict[str, str]:
        """Work type -> the faculty that runs it here (disabled faculties left out)."""
        return {t: f.name for f in self.faculties if f.name not in self.disabled
                for t in f.accepts}


class Beat(msgspec.Struct, frozen=True, kw_only=True):
    """A heartbeat's answer: whether the engine is still registered (False: register
    again), and whether an operator asked it to stop, within ``stop_grace`` seconds (None:
    the engine's own grace period)."""

    registered: bool
    stop_requested: bool = False
    stop_grace: float | None = None


class StuckWork(msgspec.Struct, frozen=True, kw_only=True):
    """Queued work of ``work_type`` that no live engine will run, and why."""

    work_type: str
    queued: int
    reason: str


def stuck_work(engines: Iterable[Engine], queued: dict[str, int]) -> list[StuckWork]:
    """Of the queued work by type, what no live engine runs: no live engine has a faculty
    for it (unroutable), or every live engine that has one disabled it (with why)."""
    live = [e for e in engines if not e.lost]
    out = []
    for work_type, n in sorted(queued.items()):
        if n <= 0 or any(work_type in e.accepts() for e in live):
            continue
        why = sorted({f"{f.name} on {e.host}:{e.pid}: {e.disabled[f.name]}"
                      for e in live for f in e.faculties
                      if work_type in f.accepts and f.name in e.disabled})
        if why:
            reason = "its faculty is disabled on every live engine (" + "; ".join(why) + ")"
        elif live:
            reason = "no live engine has a faculty that accepts it (unroutable)"
        else:
            reason = "no engine is running"
        out.append(StuckWork(work_type=work_type, queued=n, reason=reason))
    return out
