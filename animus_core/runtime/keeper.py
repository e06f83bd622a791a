"""On the embedded default the engine holds the server (with the other animus processes of
its ANIMUS_HOME). If the server dies under it (its postmaster killed, ``pg_ctl stop``),
nothing else would start it again: work would wait for the next animus command. The keeper
looks whenever a task loses the database, and every few seconds."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from animus_core.infra import embedded
from animus_core.runtime.health import Health
from animus_core.values.errors import DatabaseUnavailable

__all__ = ["EmbeddedKeeper"]

_log = logging.getLogger("animus.engine")


class EmbeddedKeeper:
    def __init__(self, home: Path, url: str, health: Health, *,
                 on_back: Callable[[], None]) -> None:
        self.home = home
        self.url = url
        self.health = health
        self._on_back = on_back

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.health.trouble.wait(), 5.0)
            self.health.trouble.clear()
            if not await asyncio.to_thread(embedded.server_running, self.home):
                await self._restart()

    async def _restart(self) -> None:
        began, attempts, backoff = time.monotonic(), 0, 0.5
        _log.warning("the embedded Postgres in %s stopped under this engine; starting it again "
                     "(retrying with backoff until it starts)", self.home / "pgdata")
        while True:
            attempts += 1
            try:
                url = await asyncio.to_thread(embedded.embedded_url, self.home)
                break
            except DatabaseUnavailable as e:
                _log.debug("the embedded Postgres did not start yet (attempt %d): %s", attempts, e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
        _log.info("the embedded Postgres is back: started again after %.1fs (%d attempt%s)",
                  time.monotonic() - began, attempts, "" if attempts == 1 else "s")
        if urlsplit(url).query != urlsplit(self.url).query:
            _log.error("the embedded Postgres came back on another socket (%s, was %s): restart "
                       "this engine to reach it", url, self.url)
        self._on_back()
