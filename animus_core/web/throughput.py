"""The overview's chart: work finished per minute over the last hour (of it, the dead), and
the queue's depth at the end of each minute, kept in memory from the live feed.

The finished work of the hour before the console started is read once
(:func:`~animus_core.store.console.finished_by_minute`); from then on each change the feed
reads counts, so a chart costs no query, however many people watch it. The depth is what
the feed's counts said at each minute's end, so it starts when the console did. The
geometry is computed here, once for every viewer: the page draws it, and the live feed sends
it again when it changes, for the page to move its bars (no drawing code in the browser).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime

import msgspec

from animus_core.store.console import FINISHED_STATES, Change, Minute

__all__ = ["MINUTES", "Bar", "Chart", "Throughput"]

MINUTES = 60
WIDTH, HEIGHT = 600, 100  # the SVG's viewBox
_STEP = WIDTH // MINUTES


class Bar(msgspec.Struct, frozen=True, kw_only=True):
    """One minute's bar: its finished and dead heights (in viewBox units), and what it says
    on hover."""

    x: int
    finished: float
    dead: float
    title: str


class Chart(msgspec.Struct, frozen=True, kw_only=True):
    bars: list[Bar]
    #: each bar's width
    bar: int
    #: the queue's depth as an SVG polyline's points ('' before the first count)
    depth: str
    most_finished: int
    most_queued: int
    total_finished: int
    total_dead: int


class Throughput:
    def __init__(self) -> None:
        self._finished: defaultdict[int, int] = defaultdict(int)
        self._dead: defaultdict[int, int] = defaultdict(int)
        self._queued: dict[int, int] = {}
        self._seeded = (0, 0)  # the minute the seed was read in, and its newest audit row
        #: what the feed counted before the seed came: (minute, audit row, dead)
        self._early: list[tuple[int, int, bool]] | None = []

    def seed(self, minutes: Iterable[Minute], now: datetime, upto: int = 0) -> None:
        """The minutes up to ``now``'s, as the database counted them up to audit row
        ``upto``: they replace what the feed counted of them, but for its rows after
        ``upto``, and the feed's rows up to ``upto`` in them are not counted again. (The
        console may start mid-minute: what finished in that minute before it started is the
        seed's.) ``seed([], now)`` keeps what the feed counted: the chart then starts with
        the console."""
        current = _minute(now)
        self._seeded = (current, upto)
        early, self._early = self._early or [], None
        for counts in (self._finished, self._dead):
            for m in [m for m in counts if m <= current]:
                del counts[m]
        for row in minutes:
            m = _minute(row.at)
            if m <= current:
                self._finished[m] = row.finished
                self._dead[m] = row.dead
        for m, audit_id, dead in early:
            if m <= current and audit_id > upto:
                self._count(m, dead)

    def add(self, change: Change) -> None:
        """Count a change the feed read, if it finished an item (a change to an item that
        had finished already, a reason mended say, is not counted again)."""
        if change.to_state in FINISHED_STATES and change.from_state not in FINISHED_STATES:
            m, dead = _minute(change.at), change.to_state == "dead"
            if self._early is not None:  # the seed will say which of these it counted
                self._early.append((m, change.id, dead))
            elif m <= self._seeded[0] and change.id <= self._seeded[1]:
                return  # the seed counted it
            self._count(m, dead)

    def _count(self, minute: int, dead: bool) -> None:
        self._finished[minute] += 1
        if dead:
            self._dead[minute] += 1

    def depth(self, queued: int, at: datetime) -> None:
        """The queue's depth as counted at ``at``."""
        self._queued[_minute(at)] = queued

    def chart(self, now: datetime) -> Chart:
        """The last :data:`MINUTES` minutes up to ``now``'s, as bars and a line."""
        last = _minute(now)
        minutes = range(last - MINUTES + 1, last + 1)
        self._forget(minutes.start)
        finished = [self._finished.get(m, 0) for m in minutes]
        dead = [self._dead.get(m, 0) for m in minutes]
        queued: list[int | None] = []
        known = next((q for m, q in self._queued.items() if m < minutes.start), None)
        for m in minutes:  # a minute with no count kept the depth of the one before
            known = self._queued.get(m, known)
            queued.append(known)
        top = max(finished) or 1
        bars = [Bar(x=i * _STEP, finished=_height(f, top), dead=_height(d, top),
                    title=f"{_clock(m)}: {f} finished" + (f", {d} dead" if d else ""))
                for i, (m, f, d) in enumerate(zip(minutes, finished, dead, strict=True))]
        deepest = max((q for q in queued if q is not None), default=0)
        depth = " ".join(f"{i * _STEP + _STEP / 2:g},{HEIGHT - _height(q, deepest or 1):g}"
                         for i, q in enumerate(queued) if q is not None)
        return Chart(bars=bars, bar=_STEP - 2, depth=depth, most_finished=max(finished),
                     most_queued=deepest, total_finished=sum(finished), total_dead=sum(dead))

    def _forget(self, first: int) -> None:
        """Drop the minutes before ``first``, but the latest depth before it (the depth
        until the next count)."""
        for counts in (self._finished, self._dead):
            for m in [m for m in counts if m < first]:
                del counts[m]
        before = [m for m in self._queued if m < first]
        for m in sorted(before)[:-1]:
            del self._queued[m]


def _minute(at: datetime) -> int:
    return int(at.timestamp() // 60)


def _clock(minute: int) -> str:
    return datetime.fromtimestamp(minute * 60, UTC).strftime("%H:%M")


def _height(n: int, top: int) -> float:
    return round(n / top * (HEIGHT - 4), 1)
