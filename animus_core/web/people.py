"""The console's people: who may sign in, with which animus role, and the database
connections the console opens as each of them.

Each person is a database login role (a member of ``animus_<role>``): the console connects
*as* that person, so every query and action runs with the person's rights, checked by the
database, and the audit records the person (``session_user``, which ``SET ROLE`` would not
change). The role's database password is derived from the console's secret and the name
(HMAC-SHA256), so nothing but the secret needs keeping; the password a person types is
checked against an argon2id hash in ``animus.console_users``.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import secrets
from datetime import datetime
from urllib.parse import quote, urlsplit, urlunsplit

import msgspec
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from animus_core.store.console import (
    ConsoleUser,
    console_password_hash,
    list_console_users,
    mcp_token_holder,
    remove_console_user,
    save_console_user,
    save_mcp_token,
)
from animus_core.store.db import Db
from animus_core.store.roles import set_only_role
from animus_core.values.errors import AnimusError, ConfigError, InvalidInput
from animus_core.values.roles import ROLES

__all__ = ["MIN_PASSWORD", "People", "Person", "add_person", "issue_mcp_token", "list_people",
           "person_url", "remove_person", "revoke_mcp_token"]

MIN_PASSWORD = 12
#: password checks that run at once, at the most
HASHING = 2
#: seconds a person's database connection may stay idle before it is closed
IDLE_SECONDS = 20.0
_hasher = PasswordHasher()  # argon2id, memory-hard (64 MiB, 3 passes)
#: what the console offers each role (the database has the last word)
_OFFERS: dict[str, frozenset[str]] = {
    "reader": frozenset(), "submitter": frozenset({"signal", "submit", "replay"}),
    "approver": frozenset({"decide"}),
    "operator": frozenset({"signal", "submit", "replay", "cancel", "retry", "stop"}),
    "admin": frozenset({"signal", "submit", "replay", "cancel", "retry", "stop", "decide"})}


@functools.cache
def _dummy_hash() -> str:
    """Checked when the name is unknown, so that a wrong name takes as long as a wrong
    password (made at the first sign-in, not at import: it costs as much as a sign-in)."""
    return _hasher.hash("not a password of anyone")


class Person(ConsoleUser, frozen=True, kw_only=True):
    """Someone who may sign in: their name (also their database login role) and role, as
    read at ``now`` (the database's clock)."""

    now: datetime | None = None

    def may(self, action: str) -> bool:
        """Whether the console offers ``action`` to this person. The database has the last
        word: an action offered here runs as the person, and is refused there if their role
        may not."""
        return action in _OFFERS.get(self.role, frozenset())


def _person(user: ConsoleUser, now: datetime) -> Person:
    return Person(name=user.name, role=user.role, signed_out_at=user.signed_out_at, now=now)


def db_password(secret: bytes, name: str) -> str:
    """The database password of ``name``'s login role, derived from the console's secret."""
    return hmac.new(secret, b"animus-console-db:" + name.encode(), hashlib.sha256).hexdigest()


def person_url(url: str, secret: bytes, name: str) -> str:
    """``url`` (the console's database) as ``name``'s login role, with its derived password."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    netloc = f"{quote(name, safe='')}:{db_password(secret, name)}@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


async def add_person(db: Db, secret: bytes, name: str, role: str, password: str) -> Person:
    """Create or update the sign-in of ``name`` with ``role`` (one of the animus roles): its
    login role, member of ``animus_<role>`` only, and its password's hash. The animus roles
    are set up first if they are missing."""
    if role not in ROLES:
        raise InvalidInput(f"role {role!r} is not one of {', '.join(ROLES)}")
    if len(password) < MIN_PASSWORD:
        raise InvalidInput(f"a console password has at least {MIN_PASSWORD} characters")
    hashed = await asyncio.to_thread(_hasher.hash, password)
    async with db.connection() as conn, conn.transaction():
        await set_only_role(conn, name, role, db_password(secret, name))
        saved = await save_console_user(conn, name, role, hashed)
    return Person(**msgspec.structs.asdict(saved))


async def list_people(db: Db) -> list[Person]:
    return [Person(**msgspec.structs.asdict(u)) for u in await list_console_users(db)]


async def remove_person(db: Db, name: str) -> bool:
    """Remove the sign-in (the login role stays, with its audit history: `animus roles
    remove-user` drops it)."""
    return await remove_console_user(db, name)


#: how an MCP token begins: ``animus_mcp.NAME.RANDOM``
TOKEN_PREFIX = "animus_mcp"


def _token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


async def issue_mcp_token(db: Db, name: str) -> str:
    """A new MCP token for ``name`` (someone who may sign in), in place of any before it. Only
    its SHA-256 is kept: it is shown once, here."""
    token = f"{TOKEN_PREFIX}.{name}.{secrets.token_urlsafe(32)}"
    if not await save_mcp_token(db, name, _token_digest(token)):
        raise InvalidInput(f"{name!r} may not sign in, so may have no MCP token: animus web "
                           "user add NAME --role ROLE first")
    return token


async def revoke_mcp_token(db: Db, name: str) -> bool:
    """``name``'s MCP token works no more; False when nobody of that name may sign in."""
    return await save_mcp_token(db, name, None)


class People:
    """Sign-in checks, and a small pool of connections per person signed in."""

    def __init__(self, service: Db, url: str, secret: bytes) -> None:
        self.service = service  # the console's own connection: sign-ins, the live feed
        self.url = url
        self.secret = secret
        self._dbs: dict[str, Db] = {}
        self._lock = asyncio.Lock()
        #: argon2 checks at once (each takes 64 MiB for a moment)
        self._hashing = asyncio.Semaphore(HASHING)

    async def check(self, name: str, password: str) -> Person | None:
        """The person, if ``password`` is theirs, signed in now (the database's clock:
        :meth:`Person.signed_in_since` compares with it)."""
        found = await console_password_hash(self.service, name)
        try:
            async with self._hashing:  # off the event loop, the dummy hash's making too
                await asyncio.to_thread(
                    lambda: _hasher.verify(found[1] if found else _dummy_hash(), password))
        except (VerificationError, InvalidHashError):
            return None
        return _person(found[0], found[2]) if found else None

    async def person(self, name: str) -> Person | None:
        """The person signed in as ``name``, as they are now (None once removed)."""
        found = await console_password_hash(self.service, name)
        return _person(found[0], found[2]) if found else None

    async def by_token(self, token: str) -> Person | None:
        """The person whose MCP token ``token`` is, as they are now (None for a token that is
        nobody's: malformed, replaced, revoked, or its person removed)."""
        prefix, _, rest = token.partition(".")
        name, _, _random = rest.rpartition(".")
        if prefix != TOKEN_PREFIX or not name or len(token) > 200:
            return None
        found = await mcp_token_holder(self.service, name)
        if found is None or not hmac.compare_digest(found[1], _token_digest(token)):
            if found is None:
                await self.forget(name)  # removed, or its token revoked: its pool goes
            return None
        user = found[0]
        return Person(name=user.name, role=user.role, signed_out_at=user.signed_out_at)

    async def db(self, person: Person) -> Db:
        """A connection pool that is ``person`` in the database. Its connections close after
        a short while idle: the people who are not busy hold none."""
        db = self._dbs.get(person.name)
        if db is not None:
            return db
        async with self._lock:
            if person.name not in self._dbs:
                db = await Db.connect(person_url(self.url, self.secret, person.name),
                                      min_size=0, max_size=2, actor=f"web:{person.name}",
                                      idle_seconds=IDLE_SECONDS)
                try:
                    async with db.connection():
                        pass  # the password is checked now, and said plainly if wrong
                except AnimusError as e:
                    await db.close()
                    if "password authentication failed" in str(e):
                        raise ConfigError(
                            f"the database refused {person.name}'s password: this server's "
                            "console secret (ANIMUS_WEB_SECRET or $ANIMUS_HOME/web-secret) is "
                            "not the one `animus web user add` used; use that one, or add "
                            f"{person.name} again") from None
                    raise
                self._dbs[person.name] = db
            return self._dbs[person.name]

    async def forget(self, name: str) -> None:
        """Close ``name``'s pool, if there is one (they were removed)."""
        db = self._dbs.pop(name, None)
        if db is not None:
            await db.close()

    async def close(self) -> None:
        dbs, self._dbs = list(self._dbs.values()), {}
        await asyncio.gather(*(db.close() for db in dbs), return_exceptions=True)
