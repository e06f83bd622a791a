"""Where the database is, and the connections to it: the pool, its codecs, and the URL.

JSON crosses the connection encoded once: the ``jsonb`` codec encodes a Python value (after
checking it against the JSON value model, :mod:`animus_core.values.json_values`) unless it is
already encoded (a :class:`msgspec.Raw`, which the code that made it checked), and decodes
each stored value once.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import asyncpg
import msgspec
from pgvector.asyncpg import register_vector

from animus_core.infra.config import Settings
from animus_core.infra.embedded import EMBEDDED_DATABASE, embedded_url
from animus_core.values import json_values
from animus_core.values.errors import DatabaseUnavailable
from animus_core.values.limits import limits
from animus_core.values.work import Params

__all__ = ["connection_parts", "describe_url", "init_connection", "keep_session", "resolve_url",
           "submission_json"]

_DUPLICATE_DATABASE = "42P04"


def describe_url(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    user = parts.username
    host = parse_qs(parts.query).get("host", [""])[0]
    where = f"{user + '@' if user else ''}{netloc or host}{parts.path}"
    return where


def connection_parts(url: str) -> dict[str, str]:
    """The parts of a ``postgresql://`` URL, as clients that take them one by one want them:
    ``host`` (a name, an address, or the directory of a unix socket, as libpq reads it),
    ``port``, ``database``, ``username`` and ``password`` (empty when the URL has none)."""
    parts = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    return {"host": query.get("host") or parts.hostname or "localhost",
            "port": query.get("port") or str(parts.port or 5432),
            "database": query.get("dbname") or parts.path.lstrip("/") or "postgres",
            "username": query.get("user") or parts.username or "postgres",
            "password": query.get("password") or parts.password or ""}


async def resolve_url(settings: Settings) -> str:
    """``DATABASE_URL``, or the embedded server's URL with its ``animus`` database created."""
    if settings.database_url:
        return settings.database_url
    base = await asyncio.to_thread(embedded_url, settings.home)
    parts = urlsplit(base)
    url = urlunsplit(parts._replace(path=f"/{EMBEDDED_DATABASE}"))
    try:
        conn = await asyncpg.connect(base)
    except (OSError, asyncpg.PostgresError) as e:
        raise DatabaseUnavailable(f"embedded Postgres started but refused a connection: {e}") from e
    try:
        await conn.execute(f'CREATE DATABASE "{EMBEDDED_DATABASE}"')
    except asyncpg.PostgresError as e:
        if e.sqlstate != _DUPLICATE_DATABASE:
            raise
    try:
        await _configure_embedded(conn)
    finally:
        await conn.close()
    return url


#: settings of the embedded server for a work queue's churn: with the default naptime
#: (1 min) autovacuum came back to a busy queue a minute after a long transaction ended, by
#: when 30,000 dead row versions more had piled up in work_items and the queue table
EMBEDDED_SETTINGS = {"autovacuum_naptime": "10s"}


async def _configure_embedded(conn: asyncpg.Connection) -> None:
    changed = False
    for name, value in EMBEDDED_SETTINGS.items():
        if await conn.fetchval("SELECT current_setting($1)", name) != value:
            await conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
            changed = True
    if changed:
        await conn.execute("SELECT pg_reload_conf()")


def _jsonb_decode(text: str) -> Any:
    return json_values.read_stored(text)  # a value written around animus must not crash a read


def _jsonb_encode(value: Any) -> str:
    if isinstance(value, msgspec.Raw):  # encoded (and checked) once already
        return bytes(value).decode()
    return json_values.encode(value, "value")


def submission_json(entries: list[dict[str, Any]]) -> msgspec.Raw:
    """The ``jsonb`` argument of ``animus.submit``: the entries encoded once, their params as
    the text they were checked as (:class:`~animus_core.values.work.Params`)."""
    wire = []
    for i, entry in enumerate(entries):
        params = entry["params"]
        rest = {k: v for k, v in entry.items() if k != "params"}
        json_values.check(rest, f"submission {i}")  # names, provenance, a rule's gate
        if not isinstance(params, Params):  # made without NewWorkItem.params
            params = Params(params, json_values.encode(
                params, "params", limit=limits().params_bytes, setting="ANIMUS_MAX_PARAMS_BYTES"))
        rest["params"] = msgspec.Raw(params.json)
        wire.append(rest)
    return msgspec.Raw(msgspec.json.encode(wire))


async def init_connection(conn: asyncpg.Connection) -> None:
    # Commits that survive a crash of the server: a claim lost with its commit would give its
    # message's read count back, and the next claim would hand out the same lease token while
    # the first engine still runs the focus. A server or database set to `off` (a common
    # tuning) is raised to `local`; stronger settings (`on`, `remote_apply`, ...) are kept.
    await conn.execute("SELECT set_config('synchronous_commit', 'local', false) "
                       "WHERE current_setting('synchronous_commit') = 'off'")
    await conn.set_type_codec(
        "jsonb", schema="pg_catalog", encoder=_jsonb_encode, decoder=_jsonb_decode, format="text"
    )
    with contextlib.suppress(ValueError):  # pgvector not installed yet (before migrate)
        await register_vector(conn)


async def keep_session(conn: asyncpg.Connection) -> None:
    """On release asyncpg still rolls back an unfinished transaction; this skips its extra
    RESET ALL / UNLISTEN / CLOSE ALL round trip. animus keeps no session state on pool
    connections (SET LOCAL and transaction-scoped advisory locks only), and code using
    :meth:`Db.connection` should do the same."""
