"""The engine's probes for an orchestrator (``animus up --probes HOST:PORT``): two plain HTTP
answers, served by the engine's own event loop, so an answer means that loop turns.

* ``GET /livez``: the scheduler loop has turned lately (it turns at least once per fallback
  poll). 503 when it has not: the engine is stuck, and restarting it is the cure. A database
  that does not answer is *not* a reason (the loop turns on, with backoff, and a restart
  would not bring the database back), nor are starting and draining.
* ``GET /readyz``: the engine has started, listens for work (its LISTEN connection is up),
  and is not stopping. 503 otherwise: it would not notice new work now.

Each answers a small JSON object saying why. Anything else is 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["Probed", "Probes", "serve_probes"]

_log = logging.getLogger("animus.engine")


class Probed(Protocol):
    """What the probes read from an engine."""

    last_turn: float  # when its scheduler loop last turned (monotonic)
    started: asyncio.Event
    stopping: asyncio.Event

    @property
    def listener_connected(self) -> asyncio.Event: ...


class Probes:
    """The answers for the engine ``engine()`` gives (None while it is being made: the
    probes answer from the process's start, before the database is reached)."""

    def __init__(self, engine: Callable[[], Probed | None], *, poll_interval: float) -> None:
        self._engine = engine
        #: the loop may take this long between turns before it counts as stuck: two fallback
        #: polls, and time for a claim that waits on a slow database
        self.stuck_after = 2 * poll_interval + 30.0

    def live(self) -> tuple[bool, dict[str, Any]]:
        """Starting (waiting for the database, perhaps) and draining count as live: a
        restart would cure neither, and would kill the foci a drain lets finish."""
        engine = self._engine()
        if engine is None or not engine.started.is_set() or engine.stopping.is_set():
            return True, {"started": engine is not None and engine.started.is_set(),
                          "stopping": engine is not None and engine.stopping.is_set()}
        ago = time.monotonic() - engine.last_turn
        return ago <= self.stuck_after, {"scheduler_turned_seconds_ago": round(ago, 3),
                                         "stuck_after_seconds": self.stuck_after}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        engine = self._engine()
        why = {"started": engine is not None and engine.started.is_set(),
               "listening": engine is not None and engine.listener_connected.is_set(),
               "stopping": engine is not None and engine.stopping.is_set()}
        return why["started"] and why["listening"] and not why["stopping"], why


async def serve_probes(probes: Probes, host: str, port: int) -> asyncio.Server:
    """Serve ``/livez`` and ``/readyz`` on ``host:port`` (HTTP/1.0, one answer per
    connection); the server is the caller's to close."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5.0)
            parts = line.decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) >= 2 else ""
            check = {"/livez": probes.live, "/readyz": probes.ready}.get(path)
            body: dict[str, Any]
            if check is None:
                status, body = 404, {"error": "no such probe: GET /livez or /readyz"}
            else:
                ok, why = check()
                status, body = (200 if ok else 503), {"ok": ok, **why}
            data = json.dumps(body).encode() + b"\n"
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            writer.write(f"HTTP/1.0 {status} {reason}\r\ncontent-type: application/json\r\n"
                         f"content-length: {len(data)}\r\nconnection: close\r\n\r\n".encode()
                         + data)
            await asyncio.wait_for(writer.drain(), 5.0)
        except (OSError, TimeoutError, UnicodeError):
            pass  # a probe that went away, or spoke nonsense: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    server = await asyncio.start_server(answer, host, port, limit=8192)
    _log.info("probes: http://%s:%d/livez and /readyz", host, port)
    return server
