"""What every part of the store shares: the pool, its connections and transactions, the
schema, the queues, and a dedicated LISTEN connection. :class:`~animus_core.store.db.Db`
is built on it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Self
from uuid import UUID

import asyncpg

from animus_core.infra.telemetry import instruments
from animus_core.infra.witness import AuditKeys
from animus_core.store import migrations
from animus_core.store.errors import connection_lost, errors
from animus_core.store.tx import TxScope
from animus_core.values.errors import InvalidInput
from animus_core.values.limits import check_text, limits
from animus_core.values.work import as_uuid

__all__ = ["DEFAULT_QUEUE", "DbBase", "Listener"]

DEFAULT_QUEUE = "work"

#: ``callback(connection, pid, channel, payload)``, as asyncpg calls a listener
Notified = Callable[[Any, int, str, str], None]


class Listener:
    """A dedicated connection LISTENing on some channels (:meth:`DbBase.listen`)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        self._lost = asyncio.Event()
        conn.add_termination_listener(lambda _c: self._lost.set())

    async def wait_lost(self) -> None:
        """Return once the connection is gone (the server went away, or it was closed)."""
        await self._lost.wait()

    async def close(self) -> None:
        if not self._conn.is_closed():
            with contextlib.suppress(Exception):
                await self._conn.close(timeout=2)


class DbBase:
    """The pool and what every store operation needs from it."""

    pool: asyncpg.Pool
    url: str
    listen_url: str
    #: the keys this process seals the audit chain with and verifies it by
    #: (:mod:`animus_core.infra.witness`); none: keyless seals, and keyed ones go unchecked
    audit_keys: AuditKeys

    async def close(self) -> None:
        await self.pool.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection; one left broken by an error is closed, not pooled again."""
        with errors():
            async with self.pool.acquire() as conn:
                try:
                    yield conn
                except BaseException as e:
                    # cancelled in the middle of a query, the connection may still be busy
                    if connection_lost(e) or isinstance(e, asyncio.CancelledError):
                        with contextlib.suppress(asyncpg.InterfaceError):  # already released
                            conn.terminate()
                    raise

    def transaction(self) -> TxScope:
        """A transaction opened on first use, finished by its owner (see :class:`TxScope`)."""
        return TxScope(self.pool)

    async def listen(self, channels: Mapping[str, Notified]) -> Listener:
        """A connection of its own (``application_name`` ``animus-listener``), outside the
        pool, LISTENing on each channel with its callback. Close it when done."""
        with errors():
            conn = await asyncpg.connect(
                self.listen_url, server_settings={"application_name": "animus-listener"})
            listener = Listener(conn)
            try:
                for channel, callback in channels.items():
                    await conn.add_listener(channel, callback)
            except BaseException:
                await listener.close()
                raise
        return listener

    # -- schema and queues ------------------------------------------------------------------

    async def migrate(self) -> list[migrations.Migration]:
        """Apply pending migrations and create the default queue."""
        async with self.connection() as conn:
            done = await migrations.apply(conn)
        await self.create_queue(DEFAULT_QUEUE)
        return done

    async def migration_status(self) -> migrations.MigrationStatus:
        async with self.connection() as conn:
            return await migrations.status(conn)

    async def create_queue(self, name: str) -> None:
        """Create a pgmq queue (idempotent)."""
        check_queue(name)
        async with self.connection() as conn:
            await conn.execute("SELECT animus.create_queue($1)", name)

    async def queues(self) -> list[str]:
        async with self.connection() as conn:
            rows = await conn.fetch("SELECT queue_name FROM pgmq.meta ORDER BY queue_name")
        return [r[0] for r in rows]


def transition(from_state: str, to_state: str, n: int = 1) -> None:
    """Count ``n`` items moved (the animus.work.transitions counter)."""
    instruments.transitions.add(n, {"from": from_state, "to": to_state})


def work_id(value: UUID | str) -> UUID:
    return as_uuid(value, "id")


def memory_id(value: UUID | str) -> UUID:
    """``value`` as a memory's id (:class:`InvalidInput` naming it one otherwise)."""
    return as_uuid(value, "id", "a memory id")


def check_reason(reason: str) -> None:
    check_text(reason, "reason", limits().reason_chars, "ANIMUS_MAX_REASON_CHARS")


def check_queue(name: str) -> None:
    if not name or len(name) > 47 or not name.replace("_", "").isalnum() or not name.isascii():
        raise InvalidInput(
            f"queue name {name!r} is not valid: use 1-47 ASCII letters, digits and underscores"
        )
