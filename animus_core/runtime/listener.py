"""The listener: a dedicated connection on ``LISTEN``, reconnected by itself. It only
reports what woke it: work of some types in some queue, or a cancel request for an item."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from datetime import datetime
from uuid import UUID

import msgspec

from animus_core.infra.secrets import redactor
from animus_core.runtime.health import Health
from animus_core.store import engines
from animus_core.store.db import Db
from animus_core.values.errors import AnimusError, DatabaseUnavailable
from animus_core.values.work import WorkNotification

__all__ = ["CANCEL_CHANNEL", "CHANNEL", "ENGINES_CHANNEL", "Listener"]

_log = logging.getLogger("animus.engine")
CHANNEL = "animus_work"
CANCEL_CHANNEL = "animus_cancel"
ENGINES_CHANNEL = engines.CHANNEL


class Listener:
    def __init__(self, store: Db, health: Health, queues: Iterable[str], *,
                 on_work: Callable[[Iterable[str] | None], None],
                 on_timer: Callable[[Iterable[str], datetime], None],
                 on_cancel: Callable[[UUID], None],
                 on_engines: Callable[[str], None] = lambda _payload: None) -> None:
        """``on_work(work_types)`` when work may be waiting (``None``: of any type, as after
        a reconnect); ``on_timer(work_types, wake_at)`` when an item of those types
        suspended until ``wake_at``; ``on_cancel(work_id)`` when a cancellation may have
        been requested (anyone may NOTIFY: the receiver checks the request before
        acting); ``on_engines(payload)`` when an operator may have asked engines to stop
        (the receiver reads its request from the database)."""
        self.store = store
        self.health = health
        self.queues = frozenset(queues)
        self._on_work = on_work
        self._on_timer = on_timer
        self._on_cancel = on_cancel
        self._on_engines = on_engines
        self.connected = asyncio.Event()

    def _notified(self, conn: object, pid: int, channel: str, payload: str) -> None:
        try:
            note = msgspec.json.decode(payload, type=WorkNotification)
        except (ValueError, TypeError):
            _log.warning("ignoring a malformed %s notification: %s", CHANNEL,
                         redactor.text(payload)[:200])  # a cut secret would no longer match
            self._on_work(None)
            return
        if note.queue not in self.queues:
            return
        if note.wake_at is not None:  # a suspension: nothing is claimable before its timer
            self._on_timer(note.work_types, note.wake_at)
        else:
            self._on_work(note.work_types)

    def _cancel_notified(self, conn: object, pid: int, channel: str, payload: str) -> None:
        try:
            work_id = UUID(payload)
        except ValueError:
            return
        self._on_cancel(work_id)

    async def run(self) -> None:
        backoff = 0.2
        while True:
            conn = None
            try:
                conn = await self.store.listen({
                    CHANNEL: self._notified, CANCEL_CHANNEL: self._cancel_notified,
                    ENGINES_CHANNEL: lambda _c, _p, _ch, payload: self._on_engines(payload)})
                self.connected.set()
                self.health.reachable()
                if backoff > 0.2:
                    _log.info("listener reconnected")
                backoff = 0.2
                self._on_work(None)  # catch up on anything sent while not listening
                await conn.wait_lost()
                _log.warning("listener connection lost; reconnecting")
                self.health.trouble.set()  # the server may have gone: the keeper looks
            except AnimusError as e:
                if isinstance(e, DatabaseUnavailable):
                    self.health.unreachable(e)
                    _log.debug("listener cannot connect (retrying in %.1fs): %s", backoff, e)
                else:
                    _log.warning("listener cannot connect (retrying in %.1fs): %s", backoff, e)
            finally:
                self.connected.clear()
                if conn is not None:
                    await conn.close()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
            self._on_work(None)
