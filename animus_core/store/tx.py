"""A transaction scope: opened on first use, finished by its owner."""

from __future__ import annotations

from typing import Any

import asyncpg

from animus_core.store.errors import errors

__all__ = ["TxScope"]


class TxScope:
    """A transaction opened on first use and finished by its owner (the engine, around a
    consolidate phase): everything written through it commits or rolls back together.
    Errors are translated as for every store call (:mod:`animus_core.store.errors`).

    Get one from :meth:`Db.transaction`."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.conn: asyncpg.Connection | None = None
        self.used = False  # a transaction was opened and committed through this scope
        self._tx: Any = None

    async def connection(self) -> asyncpg.Connection:
        """The scope's connection, in its transaction (begun on the first call)."""
        if self.conn is None:
            with errors():
                conn = await self.pool.acquire()
                try:
                    tx = conn.transaction()
                    await tx.start()
                except BaseException:
                    await self.pool.release(conn)
                    raise
            self.conn, self._tx = conn, tx
        return self.conn

    async def finish(self, *, commit: bool) -> None:
        """Commit or roll back, and give the connection back; nothing to do if unused."""
        if self.conn is None:
            return
        conn, self.conn = self.conn, None
        with errors():
            try:
                if commit:
                    await self._tx.commit()
                    self.used = True
                else:
                    await self._tx.rollback()
            finally:
                await self.pool.release(conn)
