"""Live pages: one LISTEN connection for every viewer.

While a hub runs, every transaction that changes work items notifies ``animus_changed``
(migrations 0031 and 0041: the hub says it watches, and says so again before that runs out).
The hub answers a burst of them with one read of the audit rows since the last it saw, and
sends each change to every open page over Server-Sent Events; a page updates itself from
them. However many people watch, the database sees one listener and one read per burst, and
a count of the live states at most once a second (:data:`COUNTS_EVERY`), which also feeds
the overview's chart (:mod:`animus_core.web.throughput`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import deque
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from animus_core.store.console import (
    Change,
    audit_extent,
    changes_after,
    console_users,
    finished_by_minute,
    live_counts,
    watch,
)
from animus_core.store.db import Db
from animus_core.values.errors import AnimusError
from animus_core.web.throughput import MINUTES, Chart, Throughput

__all__ = ["CHANNEL", "COUNTS_EVERY", "Hub", "Viewer"]

_log = logging.getLogger("animus.web")
CHANNEL = "animus_changed"
#: audit ids a transaction that started earlier may still commit below the newest seen
_LOOK_BACK = 256
#: audit rows read at a time (a burst of more is read in several)
_BATCH = 2000
#: seconds between two counts of the live states, at the least
COUNTS_EVERY = 1.0
#: events a viewer may fall behind before it is let go
QUEUED = 1000
#: seconds between two comments on a quiet stream, and between two checks of the viewers
KEEP_ALIVE = 15.0
#: seconds a hub's watch lasts (changes notify while it does), and between two renewals
WATCH_SECONDS, WATCH_EVERY = 60, 20.0


class Viewer(msgspec.Struct, frozen=True):
    """Whose page a stream feeds: the person, when they signed in (the database's clock)
    and until when the session lasts (a timestamp)."""

    name: str
    at: float
    until: float


class Hub:
    def __init__(self, db: Db, *, debounce: float = 0.1, keep_alive: float = KEEP_ALIVE) -> None:
        self.db = db
        self.debounce = debounce
        self.keep_alive = keep_alive
        self._subscribers: set[asyncio.Queue[bytes]] = set()
        self._dirty = asyncio.Event()
        self._last = 0
        self._seen: deque[int] = deque(maxlen=4 * _LOOK_BACK)
        self._seen_set: set[int] = set()
        self._task: asyncio.Task[None] | None = None
        #: the latest changes sent, for a page that subscribes after it was rendered
        self._recent: deque[tuple[int, bytes]] = deque(maxlen=2000)
        self.reads = 0  # reads of the changes since started (the benchmark counts them)
        self.throughput = Throughput()
        self.counts: dict[str, int] | None = None  # the latest count of the live states
        self._counted = 0.0  # when (loop time), and whether a count is due
        self._count_due = True
        self._seeding: asyncio.Task[None] | None = None
        self._started_at = 0  # the newest audit row when the hub started
        self._viewers: dict[asyncio.Queue[bytes], Viewer] = {}
        self._checking: asyncio.Task[None] | None = None
        self._watcher = f"console {socket.gethostname()} {os.getpid()} {id(self):x}"
        self._watching: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await watch(self.db, self._watcher, WATCH_SECONDS)  # from now on, changes notify
        self._last = self._started_at = (await audit_extent(self.db))[0]
        self._watching = asyncio.create_task(self._keep_watching(), name="animus-web-watch")
        self._task = asyncio.create_task(self._run(), name="animus-web-hub")
        self._seeding = asyncio.create_task(self._seed(), name="animus-web-chart")

    async def stop(self) -> None:
        for task in (self._watching, self._task, self._seeding, self._checking):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._watching is not None:
            with contextlib.suppress(AnimusError):  # else the watch runs out by itself
                await watch(self.db, self._watcher, 0)

    async def _keep_watching(self) -> None:
        """Renew the hub's watch well before it runs out, as long as the hub runs. After a
        renewal that failed, read what changed meanwhile (it may not have notified)."""
        failed = False
        while True:
            await asyncio.sleep(WATCH_EVERY)
            try:
                await watch(self.db, self._watcher, WATCH_SECONDS)
            except AnimusError as e:
                failed = True
                _log.warning("could not renew the live pages' watch (retrying): %s", e)
                continue
            if failed:
                failed = False
                self._dirty.set()

    def chart(self) -> Chart:
        return self.throughput.chart(datetime.now(UTC))

    @property
    def viewers(self) -> int:
        return len(self._subscribers)

    @property
    def latest(self) -> int:
        """The newest audit row sent: a page rendered now asks for the changes after it."""
        return self._last

    async def subscribe(self, since: int | None = None, *,
                        viewer: Viewer | None = None) -> AsyncIterator[bytes]:
        """The events for one page, as Server-Sent Events, with a comment every
        ``keep_alive`` seconds: first the changes after audit row ``since`` sent already
        (those that happened between the page's rendering and its subscription), then each
        change as it comes. It ends when the viewer falls :data:`QUEUED` events behind (its
        page reconnects and catches up), or when ``viewer``'s session is over (signed out,
        expired, or the person may no longer sign in): at each keep-alive, one query checks
        the sessions of all the viewers."""
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=QUEUED)
        self._subscribers.add(queue)
        if viewer is not None:
            self._viewers[queue] = viewer
            if self._checking is None or self._checking.done():
                self._checking = asyncio.create_task(self._check_viewers(),
                                                     name="animus-web-viewers")
        try:
            yield b"retry: 1000\n: connected\n\n"  # after a lost feed, try again in 1 s
            if since is not None:
                for audit_id, message in list(self._recent):
                    if audit_id > since:
                        yield message
            while queue in self._subscribers:
                try:
                    message = await asyncio.wait_for(queue.get(), self.keep_alive)
                except TimeoutError:
                    message = b": keep-alive\n\n"
                if queue not in self._subscribers:  # let go while it was behind
                    return
                yield message
        finally:
            self._subscribers.discard(queue)
            self._viewers.pop(queue, None)

    async def _check_viewers(self) -> None:
        """Let go of the viewers whose session is over, at each keep-alive, while there are
        any."""
        while self._viewers:
            await asyncio.sleep(self.keep_alive)
            viewers = dict(self._viewers)
            try:
                people = await console_users(self.db, sorted({v.name for v in viewers.values()}))
            except AnimusError as e:
                _log.warning("could not check the viewers' sessions: %s", e)
                continue
            now = time.time()
            for queue, v in viewers.items():
                person = people.get(v.name)
                if person is None or not person.signed_in_since(v.at) or v.until < now:
                    self._subscribers.discard(queue)  # its stream ends at its next wake

    def _publish(self, kind: str, data: Any, audit_id: int | None = None) -> None:
        message = b"event: " + kind.encode() + b"\ndata: " + msgspec.json.encode(data) + b"\n\n"
        if audit_id is not None:
            self._recent.append((audit_id, message))
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:  # a page that stopped reading: its stream ends, and
                self._subscribers.discard(queue)  # the page reloads when it reconnects

    async def _run(self) -> None:
        backoff = 0.5
        while True:
            listener = None
            try:
                listener = await self.db.listen({CHANNEL: lambda *_: self._dirty.set()})
                backoff = 0.5
                self._dirty.set()  # whatever changed while no one listened
                lost = asyncio.create_task(listener.wait_lost())
                try:
                    while not lost.done():
                        waiting = asyncio.create_task(self._dirty.wait())
                        await asyncio.wait({waiting, lost}, timeout=self._count_in(),
                                           return_when=asyncio.FIRST_COMPLETED)
                        waiting.cancel()
                        if lost.done():
                            break
                        if self._dirty.is_set():
                            await asyncio.sleep(self.debounce)  # one read for a burst
                            self._dirty.clear()
                            await self._read()
                        if self._count_in() == 0:
                            await self._count()
                finally:
                    lost.cancel()
            except AnimusError as e:
                _log.warning("live updates paused, retrying in %.1fs: %s", backoff, e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
            finally:
                if listener is not None:
                    await listener.close()

    async def _read(self) -> None:
        while True:
            self.reads += 1
            rows = await changes_after(self.db, max(0, self._last - _LOOK_BACK), _BATCH)
            self._send(rows)
            if len(rows) < _BATCH:
                return

    def _send(self, rows: list[Change]) -> None:
        fresh = [c for c in rows if c.id not in self._seen_set]
        for c in fresh:
            if len(self._seen) == self._seen.maxlen:
                self._seen_set.discard(self._seen[0])
            self._seen.append(c.id)
            self._seen_set.add(c.id)
            self._last = max(self._last, c.id)
            self._publish("change", {
                "id": c.id, "work_id": str(c.work_id), "event": c.event, "from": c.from_state,
                "to": c.to_state, "by": c.db_user, "at": c.at.isoformat(), "state": c.state,
                "work_type": c.work_type, "reason": c.reason}, c.id)
            if c.id > self._started_at:  # the seed counted what finished before
                self.throughput.add(c)
        if fresh:
            self._count_due = True

    def _count_in(self) -> float | None:
        """Seconds until the live states are to be counted again (None: no count is due)."""
        if not self._count_due:
            return None
        return max(0.0, self._counted + COUNTS_EVERY - asyncio.get_running_loop().time())

    async def _count(self) -> None:
        """The counts of the live states (an index range), once for every viewer, and the
        chart they move."""
        self._count_due = False
        self._counted = asyncio.get_running_loop().time()
        self.counts = await live_counts(self.db)
        self.throughput.depth(self.counts.get("queued", 0), datetime.now(UTC))
        self._publish("counts", self.counts)
        self._publish("chart", self.chart())

    async def _seed(self) -> None:
        """The chart's hour before the console started, read once."""
        now = datetime.now(UTC)
        try:
            minutes, upto = await finished_by_minute(self.db, now - timedelta(minutes=MINUTES))
        except Exception as e:  # the chart is not worth the console: it starts with it
            _log.warning("the chart starts with the console: %s", e)
            self.throughput.seed([], now)  # what the feed counted, and no more
            return
        self.throughput.seed(minutes, now, upto)
