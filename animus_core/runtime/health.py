"""Whether the database answers, as the engine's tasks see it, and the supervision of those
tasks: an outage is reported once when it begins and once when it ends, not on every retry;
a task that fails is restarted with backoff."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from animus_core.infra.secrets import redactor
from animus_core.store.db import connection_lost
from animus_core.values.errors import AnimusError, DatabaseUnavailable

__all__ = ["Health", "QuietPool"]

_log = logging.getLogger("animus.engine")


class Health:
    """The engine's view of the database: up, or unreachable since when."""

    def __init__(self) -> None:
        #: when the database became unreachable (monotonic), while it is
        self.outage_since: float | None = None
        #: set when a task saw the database fail: the embedded server's keeper looks
        self.trouble = asyncio.Event()
        #: the completer said once in this outage that it holds finished foci
        self.holding_reported = False

    def unreachable(self, e: BaseException) -> None:
        """A task could not reach the database: the first one to see it in an outage says
        so (the others retry quietly, at DEBUG), and the embedded server's keeper looks."""
        self.trouble.set()
        if self.outage_since is None:
            self.outage_since = time.monotonic()
            _log.warning("the database is unreachable (%s); the engine retries with backoff "
                         "and logs when it answers again", redactor.text(str(e))[:300])

    def reachable(self) -> None:
        """A round trip to the database succeeded: the outage, if there was one, is over."""
        if self.outage_since is not None:
            _log.info("the database answers again, after %.0fs",
                      time.monotonic() - self.outage_since)
            self.outage_since = None
            self.holding_reported = False

    def retrying(self, e: AnimusError, message: str, *args: Any) -> None:
        """Log a failure that will be retried: a warning, or, when it is the database being
        unreachable, a note of the outage and a DEBUG line."""
        if isinstance(e, DatabaseUnavailable):
            self.unreachable(e)
            _log.debug(message, *args)
        else:
            _log.warning(message, *args)

    async def until_reachable(self, what: str, step: Callable[[], Awaitable[Any]],
                              stopping: asyncio.Event) -> None:
        """Run a start-up ``step``, retrying while the database is unreachable."""
        backoff = 0.5
        while True:
            try:
                await step()
                return
            except DatabaseUnavailable as e:
                if stopping.is_set():
                    raise
                self.trouble.set()
                _log.warning("cannot %s yet, retrying in %.1fs: %s", what, backoff, e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    def supervise(self, name: str, loop: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """Run a helper loop as a task that outlives its failures: a lost connection, or any
        other exception, is logged and the loop starts again after a backoff (1 s, doubling
        to 30 s while it keeps failing at once). Only cancellation ends it, or the loop
        returning (the completer, once the engine closes)."""
        async def supervised() -> None:
            backoff = 1.0
            while True:
                started = time.monotonic()
                try:
                    await loop()
                    return
                except Exception as e:
                    if time.monotonic() - started > 60:
                        backoff = 1.0  # it ran a good while: not failing at once
                    level = logging.ERROR
                    if isinstance(e, DatabaseUnavailable):
                        self.unreachable(e)
                        level = logging.DEBUG
                    _log.log(level, "engine task %s failed (%s: %s); restarting it in %.0fs",
                             name, type(e).__name__, redactor.text(str(e))[:300], backoff,
                             exc_info=level == logging.ERROR)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)

        return asyncio.create_task(supervised(), name=name)


class QuietPool(logging.Filter):
    """asyncpg's pool logs each failed reconnect with a traceback: a lost server is the
    engine's outage, which it reports once, so those records are dropped (and the first one
    may be what tells the engine)."""

    def __init__(self, health: Health) -> None:
        super().__init__()
        self.health = health

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and connection_lost(error):
            self.health.unreachable(error)
        return self.health.outage_since is None
