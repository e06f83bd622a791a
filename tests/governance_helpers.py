"""Helpers for the governance tests: people as real Postgres login roles.

The embedded server trusts every local user on its unix socket, so a test connects as a
person by putting the role name in the URL (``postgresql://alice@/db?host=...``); the
database then sees ``session_user = alice``, exactly as it would with passwords.

Login roles are cluster-wide and tests share one server: a :class:`People` names its roles
after the test's own database and :func:`people` drops them when the test ends. The
``animus_*`` group roles stay (``animus roles setup`` is idempotent).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable
from urllib.parse import urlsplit, urlunsplit

from animus_core.store.db import Db
from animus_core.store.roles import add_user, setup_roles
from tests.support import raw

__all__ = ["People", "as_user", "people"]


def as_user(url: str, user: str) -> str:
    """The same server and database, connecting as ``user``."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{user}@{parts.netloc.rsplit('@', 1)[-1]}"))


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


class People:
    """Login roles of one test: ``people.name("ann")``, ``people.url("ann")``,
    ``await people.db("ann")`` (a :class:`Db` connected as her, closed at the end)."""

    def __init__(self, db_url: str) -> None:
        self.db_url = db_url
        self.suffix = database_name(db_url)
        self.names: dict[str, str] = {}
        self._open: list[Db] = []

    def name(self, who: str) -> str:
        return self.names[who]

    def url(self, who: str) -> str:
        return as_user(self.db_url, self.names[who])

    async def add(self, who: str, role: str) -> str:
        name = f"{who}_{self.suffix}"
        async with raw(self.db_url) as conn:
            await add_user(conn, name, role)
        self.names[who] = name
        return name

    async def db(self, who: str) -> Db:
        db = await Db.connect(self.url(who), max_size=2, actor=f"test:{who}")
        self._open.append(db)
        return db

    async def close(self) -> None:
        for db in self._open:
            await db.close()


@contextlib.asynccontextmanager
async def people(db_url: str, server_url: str,
                 members: Iterable[tuple[str, str]]) -> AsyncIterator[People]:
    """``animus roles setup`` on the test database, then one login role per
    ``(who, role)``; every one of them is dropped afterwards."""
    async with raw(db_url) as conn:
        await setup_roles(conn)
    team = People(db_url)
    try:
        for who, role in members:
            await team.add(who, role)
        yield team
    finally:
        await team.close()
        async with raw(server_url) as conn:
            for name in team.names.values():
                await conn.execute(f'DROP ROLE IF EXISTS "{name}"')
