"""Numbered SQL migrations, applied in order, each once, under an advisory lock.

Files live in ``animus_core/store/sql/migrations/NNNN_name.sql``. Each applied file is recorded
with its sha256; a recorded file whose text changed since is refused. The extensions come
first: pgvector, then pgmq as an extension where the server has it, otherwise the SQL-only
install bundled with the ``pgmq`` package (which one, and its version, is recorded).
"""

from __future__ import annotations

import hashlib
import re
from importlib import resources
from typing import Any

import msgspec

from animus_core.values.errors import MigrationError

__all__ = ["Component", "Migration", "MigrationStatus", "apply", "load", "status"]

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_LOCK = "SELECT pg_advisory_xact_lock(hashtext('animus.migrate'))"


class Migration(msgspec.Struct, frozen=True, kw_only=True):
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


class Component(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    install: str  # "extension" or "sql-only"
    version: str


class MigrationStatus(msgspec.Struct, frozen=True, kw_only=True):
    applied: list[int]
    pending: list[int]
    components: list[Component]
    server_version: str


def load() -> list[Migration]:
    found = []
    folder = resources.files("animus_core.store") / "sql" / "migrations"
    for entry in folder.iterdir():
        m = _FILE.match(entry.name)
        if m:
            found.append(Migration(version=int(m[1]), name=m[2], sql=entry.read_text("utf-8")))
        elif entry.name.endswith(".sql"):
            raise MigrationError(f"migration file {entry.name} is not named NNNN_name.sql")
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migration files share a number: {versions}")
    return found


_BOOTSTRAP = """
CREATE SCHEMA IF NOT EXISTS animus;
CREATE TABLE IF NOT EXISTS animus.schema_migrations (
    version    int PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS animus.components (
    name         text PRIMARY KEY,
    install      text NOT NULL,
    version      text NOT NULL,
    installed_at timestamptz NOT NULL DEFAULT now()
);
"""


# JSON_OBJECT(... ABSENT ON NULL) in the audit triggers came with Postgres 16
MIN_SERVER_VERSION = 160000


async def _install_extensions(conn: Any) -> None:
    await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    vector = await conn.fetchval("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
    await _record(conn, "pgvector", "extension", vector)

    have_ext = await conn.fetchval(
        "SELECT extversion FROM pg_extension WHERE extname = 'pgmq'"
    )
    installed = await conn.fetchval("SELECT to_regnamespace('pgmq') IS NOT NULL")
    if have_ext:
        await _record(conn, "pgmq", "extension", have_ext)
        return
    available = await conn.fetchval(
        "SELECT default_version FROM pg_available_extensions WHERE name = 'pgmq'"
    )
    if available and not installed:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pgmq")
        await _record(conn, "pgmq", "extension", available)
    elif not installed:
        from pgmq.install import get_embedded_install_sql, get_embedded_sql_version

        await conn.execute(get_embedded_install_sql())
        await _record(conn, "pgmq", "sql-only", get_embedded_sql_version())


async def _record(conn: Any, name: str, install: str, version: str) -> None:
    await conn.execute(
        """INSERT INTO animus.components (name, install, version) VALUES ($1, $2, $3)
           ON CONFLICT (name) DO UPDATE SET install = excluded.install,
               version = excluded.version
           WHERE (components.install, components.version) <> (excluded.install, excluded.version)""",
        name, install, version,
    )


async def apply(conn: Any, migrations: list[Migration] | None = None) -> list[Migration]:
    """Apply pending migrations in one transaction; return the ones applied.

    A migration marked ``-- animus: commit after`` (one that adds a value to an enum, which
    cannot be used in the transaction that adds it) is committed before the next one runs:
    the migrations after it are applied in a transaction of their own."""
    migrations = load() if migrations is None else migrations
    if await _up_to_date(conn, migrations):
        return []  # no DDL at all: roles without CREATE rights can start engines
    version = await conn.fetchval("SELECT current_setting('server_version_num')::int")
    if version < MIN_SERVER_VERSION:
        shown = await conn.fetchval("SHOW server_version")
        raise MigrationError(
            f"animus needs Postgres {MIN_SERVER_VERSION // 10000} or newer; this server runs "
            f"{shown} (set DATABASE_URL to a newer server, or unset it for the embedded one)")
    done: list[Migration] = []
    for batch in _batches(migrations):
        done += await _apply_batch(conn, migrations, batch)
    return done


def _batches(migrations: list[Migration]) -> list[list[Migration]]:
    """The migrations, cut after each one marked ``-- animus: commit after``."""
    batches: list[list[Migration]] = [[]]
    for m in migrations:
        batches[-1].append(m)
        if _COMMIT_AFTER.search(m.sql):
            batches.append([])
    return [b for b in batches if b]


_COMMIT_AFTER = re.compile(r"^-- animus: commit after$", re.MULTILINE)


async def _apply_batch(conn: Any, known_files: list[Migration],
                       batch: list[Migration]) -> list[Migration]:
    async with conn.transaction():
        await conn.execute(_LOCK)
        await conn.execute(_BOOTSTRAP)
        await _install_extensions(conn)
        recorded = {
            r["version"]: r for r in await conn.fetch("SELECT * FROM animus.schema_migrations")
        }
        known = {m.version for m in known_files}
        for version, row in sorted(recorded.items()):
            if version not in known:
                raise MigrationError(
                    f"the database has migration {version:04d}_{row['name']} applied, which this "
                    "version of animus does not know: upgrade animus before using this database"
                )
        done = []
        for m in batch:
            row = recorded.get(m.version)
            if row is not None:
                if row["checksum"] != m.checksum:
                    raise MigrationError(
                        f"migration {m.version:04d}_{m.name}.sql changed after it was applied "
                        f"(recorded sha256 {row['checksum'][:12]}, file {m.checksum[:12]}): "
                        "restore the file; write a new numbered migration for the change"
                    )
                continue
            try:
                await conn.execute(m.sql)
            except Exception as e:
                raise MigrationError(f"migration {m.version:04d}_{m.name}.sql failed: {e}") from e
            await conn.execute(
                "INSERT INTO animus.schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                m.version, m.name, m.checksum,
            )
            done.append(m)
        return done


async def _up_to_date(conn: Any, migrations: list[Migration]) -> bool:
    if not await conn.fetchval("SELECT to_regclass('animus.schema_migrations') IS NOT NULL"):
        return False
    recorded = {r["version"]: r["checksum"] for r in await conn.fetch(
        "SELECT version, checksum FROM animus.schema_migrations")}
    return recorded == {m.version: m.checksum for m in migrations}


async def status(conn: Any) -> MigrationStatus:
    migrations = load()
    exists = await conn.fetchval("SELECT to_regclass('animus.schema_migrations') IS NOT NULL")
    applied: list[int] = []
    components: list[Component] = []
    if exists:
        applied = [r[0] for r in await conn.fetch(
            "SELECT version FROM animus.schema_migrations ORDER BY version")]
        components = [
            Component(name=r["name"], install=r["install"], version=r["version"])
            for r in await conn.fetch("SELECT * FROM animus.components ORDER BY name")
        ]
    return MigrationStatus(
        applied=applied,
        pending=[m.version for m in migrations if m.version not in applied],
        components=components,
        server_version=await conn.fetchval("SHOW server_version"),
    )
