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
``async def`` for quick work. Signatures follow :mod:`animus_core.faculties.contract`; they are
checked when the faculty is registered.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final

from animus_core.faculties.retry import RetryPolicy
from animus_core.values import json_values
from animus_core.values.errors import ConfigError, InvalidInput
from animus_core.values.schedules import Schedule
from animus_core.values.work import NAME_GRAMMAR, check_name

if TYPE_CHECKING:
    from animus_core.faculties.focus import Focus

__all__ = ["PHASES", "Faculty", "check_faculty", "check_number", "check_variable"]

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
    #: Recurring work this faculty wants (see :mod:`animus_core.values.schedules`).
    schedules: ClassVar[tuple[Schedule, ...]] = ()
    #: Environment variables the faculty cannot work without (checked at engine start: a
    #: faculty missing one is reported and disabled, and its work stays queued).
    requires_env: ClassVar[tuple[str, ...]] = ()
    #: Sample params for ``animus demo`` (``None``: the demo skips this faculty).
    example: ClassVar[dict[str, object] | None] = None

    #: Environment variables whose values are secret: redacted wherever they could appear
    #: (logs, spans, audit rows, outcomes).
    secrets: tuple[str, ...] = ()
    #: Keep the focus directory of a failed attempt for debugging (as ``animus up
    #: --keep-foci`` does for every faculty).
    keep_failed: bool = False

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

    @property
    def retry_policy(self) -> RetryPolicy:
        """What follows a failed attempt (override for a policy of your own)."""
        return RetryPolicy(self.retry_base, self.retry_max, self.max_attempts)

    def identity(self) -> dict[str, Any]:
        """What this faculty is, for execution records: for a Python faculty its class and
        the distribution (and version) it was installed from. Called for every attempt."""
        cls = type(self)
        return {"kind": "python", "class": f"{cls.__module__}.{cls.__qualname__}",
                "origin": self.origin}

    def source_files(self) -> dict[str, Path]:
        """The files this faculty runs, by the digest its :meth:`identity` names them with
        (a command faculty's TOML file and hook scripts): their text is kept so ``work
        diff`` can show what changed. A Python faculty's code is named by its distribution."""
        return {}

    def describe(self) -> str:
        """One line for ``animus faculty list``."""
        doc = (type(self).__doc__ or "").strip().splitlines()
        return doc[0] if doc else ""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} accepts={list(self.accepts)}>"


_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_DAY: Final = 86_400.0


def check_number(value: object, field: str, where: str, *, low: float, high: float,
                 low_open: bool = False, integer: bool = False, meaning: str = "") -> None:
    """Refuse ``value`` unless it is a (finite) number in its range: ``low < value`` when
    ``low_open``, else ``low <= value``, and ``value <= high``."""
    ok = (not isinstance(value, bool)
          and isinstance(value, int if integer else int | float)
          and math.isfinite(value)
          and (value > low if low_open else value >= low) and value <= high)
    if not ok:
        kind = "an integer" if integer else "a number"
        bound = f"above {low:g}" if low_open else f"from {low:g}"
        raise ConfigError(f"{where}: {field} = {value!r:.40} must be {kind} {bound} to {high:g}"
                          + (f" ({meaning})" if meaning else ""))


def check_variable(name: object, field: str, where: str) -> None:
    """An environment variable's name: letters, digits and _, not starting with a digit."""
    if not isinstance(name, str) or not _VARIABLE.fullmatch(name):
        raise ConfigError(f"{where}: {field}: {name!r:.60} is not an environment variable name "
                          "(use 1-128 letters, digits and _, not starting with a digit)")


def check_faculty(faculty: Faculty, where: str, prefix: str) -> None:
    """Refuse a faculty whose settings would break the engine, naming the field
    (``prefix`` + field name) and ``where`` the faculty comes from."""
    def name_ok(value: object, field: str) -> None:
        try:
            check_name(value, field)
        except InvalidInput:
            raise ConfigError(f"{where}: {prefix}{field} = {value!r:.60} is not a valid name: "
                              f"use {NAME_GRAMMAR}") from None

    name_ok(faculty.name, "name")
    if not faculty.accepts:
        raise ConfigError(f"{where}: {prefix}accepts is empty: list the work types it takes")
    for i, work_type in enumerate(faculty.accepts):
        name_ok(work_type, f"accepts[{i}]")
    f = prefix
    check_number(faculty.max_concurrent, f"{f}max_concurrent", where, low=1, high=10_000,
                 integer=True, meaning="foci at once per engine")
    if faculty.max_attempts is not None:
        check_number(faculty.max_attempts, f"{f}max_attempts", where, low=1, high=1000,
                     integer=True)
    if faculty.timeout is not None:
        check_number(faculty.timeout, f"{f}timeout", where, low=0, high=7 * _DAY,
                     low_open=True, meaning="seconds each phase may take")
    if faculty.rate_limit is not None:
        check_number(faculty.rate_limit, f"{f}rate_limit", where, low=0, high=100_000,
                     low_open=True, meaning="foci started per second; leave it out for no limit")
    check_number(faculty.retry_base, f"{f}retry_base", where, low=0, high=_DAY,
                 meaning="seconds before the first retry")
    check_number(faculty.retry_max, f"{f}retry_max", where, low=faculty.retry_base,
                 high=7 * _DAY, meaning="the longest retry delay, at least retry_base")
    for i, variable in enumerate(faculty.requires_env):
        check_variable(variable, f"{f}requires_env[{i}]", where)
    for i, schedule in enumerate(faculty.schedules):
        field = f"{f}schedule[{i}]"
        name_ok(schedule.work_type, f"schedule[{i}].work_type")
        check_number(schedule.priority, f"{field}.priority", where, low=-(2**31),
                     high=2**31 - 1, integer=True)
        try:
            json_values.check(schedule.params, f"{field}.params")
        except InvalidInput as e:
            raise ConfigError(f"{where}: {e}") from None
    if faculty.example is not None:
        try:
            json_values.check(faculty.example, f"{f}example")
        except InvalidInput as e:
            raise ConfigError(f"{where}: {e}") from None
