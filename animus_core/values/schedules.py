"""Recurring work declared by faculties: every N seconds, or on a 5-field cron expression.

Ticks are absolute (interval ticks are multiples of the interval since the Unix epoch, cron
ticks are wall-clock minutes in UTC), so every engine computes the same tick and the
database's ``schedule_ticks`` primary key lets exactly one of them submit it. An engine fires
the ticks that fall while it runs; it does not replay ticks missed while no engine ran.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from animus_core.values.errors import ConfigError

__all__ = ["Cron", "Schedule", "parse_every"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_every(text: str) -> float:
    """``"30s"``, ``"5m"``, ``"1h"``, ``"1d"`` or a number of seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m or float(m[1]) <= 0:
        raise ConfigError(f"every = {text!r}: use a positive duration such as 30s, 5m, 1h, 1d")
    return float(m[1]) * _UNITS[m[2] or "s"]


class Cron:
    """minute hour day-of-month month day-of-week (0 or 7 = Sunday), in UTC."""

    _RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))

    def __init__(self, expr: str) -> None:
        fields = expr.split()
        if len(fields) != 5:
            raise ConfigError(f"cron = {expr!r}: needs 5 fields (minute hour day month weekday)")
        self.expr = expr
        sets = [self._field(f, lo, hi, expr) for f, (lo, hi) in zip(fields, self._RANGES, strict=True)]
        self.minute, self.hour, self.day, self.month, dow = sets
        self.dow = {d % 7 for d in dow}
        self.day_any, self.dow_any = fields[2] == "*", fields[4] == "*"

    @staticmethod
    def _field(text: str, lo: int, hi: int, expr: str) -> set[int]:
        out: set[int] = set()
        for part in text.split(","):
            m = re.fullmatch(r"(\*|\d+)(?:-(\d+))?(?:/(\d+))?", part)
            if not m:
                raise ConfigError(f"cron = {expr!r}: cannot read {part!r}")
            start = lo if m[1] == "*" else int(m[1])
            end = hi if m[1] == "*" else int(m[2]) if m[2] else start
            step = int(m[3]) if m[3] else 1
            if m[3] and m[1] != "*" and not m[2]:
                end = hi
            if not (lo <= start <= hi and lo <= end <= hi) or step < 1:
                raise ConfigError(f"cron = {expr!r}: {part!r} is outside {lo}-{hi}")
            out.update(range(start, end + 1, step))
        return out

    def matches(self, t: datetime) -> bool:
        if t.minute not in self.minute or t.hour not in self.hour or t.month not in self.month:
            return False
        day_ok, dow_ok = t.day in self.day, (t.isoweekday() % 7) in self.dow
        if self.day_any or self.dow_any:
            return day_ok and dow_ok
        return day_ok or dow_ok  # cron's rule when both are restricted

    def next_after(self, t: datetime) -> datetime:
        t = t.astimezone(UTC).replace(second=0, microsecond=0) + timedelta(minutes=1)
        for _ in range(366 * 24 * 60):
            if self.matches(t):
                return t
            t += timedelta(minutes=1)
        raise ConfigError(f"cron = {self.expr!r} never fires")


class Schedule(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    work_type: str
    params: dict[str, Any] = {}
    priority: int = 0
    every: float | None = None
    cron: str | None = None

    def next_tick(self, after: datetime) -> datetime:
        if self.every is not None:
            n = int(after.timestamp() // self.every) + 1
            return datetime.fromtimestamp(n * self.every, UTC)
        assert self.cron is not None
        return Cron(self.cron).next_after(after)
