"""Migrations: applied once each under concurrency, recorded with their checksums, and the
extensions they rely on recorded with how they were installed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from pgmq.install import get_embedded_sql_version

from animus_core import Db, MigrationError, NewWorkItem
from animus_core.store import migrations
from animus_core.store.migrations import load
from tests.conftest import scratch_database
from tests.support import raw


@pytest.fixture
async def empty_db_url(server_url: str) -> AsyncIterator[str]:
    """A brand-new, empty database (not cloned from the migrated template)."""
    async with scratch_database(server_url) as url:
        yield url


async def test_concurrent_migrations_apply_each_file_once(empty_db_url):
    files = load()
    assert [m.version for m in files] == sorted({m.version for m in files})
    one = await Db.connect(empty_db_url, max_size=2)
    two = await Db.connect(empty_db_url, max_size=2)
    try:
        done_one, done_two = await asyncio.gather(one.migrate(), two.migrate())
        # One of them applied everything, the other found nothing left to do.
        applied = sorted([done_one, done_two], key=len)
        assert applied[0] == []
        assert [m.version for m in applied[1]] == [m.version for m in files]
        assert await one.migrate() == []  # and again: nothing

        status = await two.migration_status()
        assert status.applied == [m.version for m in files]
        assert status.pending == []
        assert await one.queues() == ["work"]
        # The schema works.
        created = await one.submit_work(NewWorkItem("t", source="s"))
        [claimed] = await two.claim()
        assert claimed.item.id == created.id
    finally:
        await one.close()
        await two.close()
    async with raw(empty_db_url) as conn:
        rows = await conn.fetch(
            "SELECT version, name, checksum FROM animus.schema_migrations ORDER BY version"
        )
    assert [(r["version"], r["name"], r["checksum"]) for r in rows] == [
        (m.version, m.name, m.checksum) for m in files
    ]


async def test_components_record_pgmq_and_pgvector(db, db_url):
    async with raw(db_url) as conn:
        rows = {r["name"]: r for r in await conn.fetch("SELECT * FROM animus.components")}
        vector = await conn.fetchval("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
        pgmq_ext = await conn.fetchval("SELECT extversion FROM pg_extension WHERE extname = 'pgmq'")
    assert {"pgmq", "pgvector"} <= set(rows)
    assert (rows["pgvector"]["install"], rows["pgvector"]["version"]) == ("extension", vector)
    # This server has no pgmq extension: the SQL-only install bundled with the pgmq package.
    assert pgmq_ext is None
    assert (rows["pgmq"]["install"], rows["pgmq"]["version"]) == (
        "sql-only", get_embedded_sql_version()
    )
    status = await db.migration_status()
    assert {(c.name, c.install) for c in status.components} >= {
        ("pgmq", "sql-only"), ("pgvector", "extension"),
    }


async def test_changed_migration_is_refused_by_name(db, db_url):
    first = load()[0]
    async with raw(db_url) as conn:
        await conn.execute(
            "UPDATE animus.schema_migrations SET checksum = 'x' WHERE version = $1", first.version
        )
    with pytest.raises(MigrationError) as err:
        await db.migrate()
    message = str(err.value)
    assert f"{first.version:04d}_{first.name}.sql" in message
    assert "changed after it was applied" in message


async def test_unknown_applied_migration_is_refused(db, db_url):
    async with raw(db_url) as conn:
        await conn.execute(
            "INSERT INTO animus.schema_migrations (version, name, checksum) "
            "VALUES (9999, 'from_the_future', 'y')"
        )
    with pytest.raises(MigrationError, match=r"9999_from_the_future.*upgrade animus"):
        await db.migrate()


async def test_a_server_too_old_is_refused_before_anything_is_written(empty_db_url,
                                                                       monkeypatch):
    # no older server here: raise the bar above this one instead
    monkeypatch.setattr(migrations, "MIN_SERVER_VERSION", 990000)
    async with raw(empty_db_url) as conn:
        with pytest.raises(MigrationError, match=r"needs Postgres 99 or newer; this server runs"):
            await migrations.apply(conn)
        assert not await conn.fetchval("SELECT to_regnamespace('animus') IS NOT NULL")


async def test_cli_db_status_and_migrate(animus):
    proc = animus("db", "status")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.strip()}
    assert rows["pgmq"][1:] == ["sql-only", get_embedded_sql_version()]
    assert rows["pgvector"][1] == "extension"
    assert rows["pending:"][1] == "none"
    assert "PostgreSQL" in rows["server:"][1]

    proc = animus("db", "migrate")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "up to date"


async def test_upgrading_to_0009_keeps_roles_and_seals_what_was_waiting(empty_db_url):
    """A database made by migrations 0001-0008, with submit made a definer function (as
    `animus roles setup` does) and an audit row whose marker waits below the sealed range
    (it committed after a later row was sealed), upgrades in place: submit stays a definer
    function, and the new sealer seals the waiting row."""
    from animus_core.store import audit
    from animus_core.store.migrations import apply

    files = load()
    async with raw(empty_db_url) as conn:
        await apply(conn, [m for m in files if m.version < 9])
        await conn.execute("SELECT animus.create_queue('work')")
        await conn.execute("ALTER FUNCTION animus.submit(text, jsonb) SECURITY DEFINER")
        await conn.execute("ALTER FUNCTION animus.submit(text, jsonb) "
                           "SET search_path = pg_catalog, pg_temp")
        await conn.execute("SELECT animus.submit('work', $1::text::jsonb)",
                           json.dumps([{"work_type": "old", "source": "t"}] * 2))
        # the old sealer sealed the second row while the first still waited
        rows = await conn.fetch(
            f"SELECT {audit._HASHED_COLUMNS} FROM animus.audit_log a ORDER BY a.id")
        first, second = rows
        digest = audit.record_hash(audit.GENESIS, second)
        await conn.execute("INSERT INTO animus.audit_seal (seq, audit_id, prev_hash, hash) "
                           "VALUES (1, $1, $2, $3)", second["id"], audit.GENESIS, digest)
        await conn.execute("DELETE FROM animus.audit_unsealed WHERE audit_id = $1", second["id"])

        applied = await apply(conn, files)
        assert [m.version for m in applied] == [m.version for m in files if m.version >= 9]
        definer, config = await conn.fetchrow(
            "SELECT prosecdef, proconfig FROM pg_proc "
            "WHERE oid = 'animus.submit(text, jsonb)'::regprocedure")
        assert definer
        assert config == ["search_path=pg_catalog, pg_temp"]
        assert await conn.fetchval("SELECT to_regclass('animus.audit_unsealed')") is None
        assert await conn.fetchval("SELECT array_agg(audit_id) FROM animus.audit_gaps") == [
            first["id"]]
        assert await audit.seal(conn) == 1
        check = await audit.verify(conn)
    assert check.ok, check.problem
    assert check.checked == 2
    assert check.unsealed == 0


async def test_upgrading_to_0010_keeps_create_queue_a_definer_and_reshapes_queues(empty_db_url):
    """`animus roles setup` makes create_queue a definer function (operators create queues
    without rights on schema pgmq); 0010 replaces it and must keep that. Existing queues lose
    the vt index and get room for in-place updates."""
    from animus_core.store.migrations import apply
    from animus_core.store.roles import setup_roles

    files = load()
    async with raw(empty_db_url) as conn:
        await apply(conn, [m for m in files if m.version < 10])
        await conn.execute("SELECT animus.create_queue('work')")
        await setup_roles(conn)
        assert await conn.fetchval("SELECT to_regclass('pgmq.q_work_vt_idx')") is not None

        applied = await apply(conn, [m for m in files if m.version <= 10])
        assert [m.version for m in applied] == [10]
        definer, config = await conn.fetchrow(
            "SELECT prosecdef, proconfig FROM pg_proc "
            "WHERE oid = 'animus.create_queue(text)'::regprocedure")
        assert definer
        assert config == ["search_path=pg_catalog, pg_temp"]
        assert await conn.fetchval("SELECT to_regclass('pgmq.q_work_vt_idx')") is None
        assert "fillfactor=50" in await conn.fetchval(
            "SELECT reloptions FROM pg_class WHERE oid = 'pgmq.q_work'::regclass")
        await conn.execute("SELECT animus.create_queue('second')")  # a new queue, as definer
        assert await conn.fetchval("SELECT to_regclass('pgmq.q_second_prio')") is not None
        assert await conn.fetchval("SELECT to_regclass('pgmq.q_second_vt_idx')") is None


async def test_upgrading_to_waiting_commits_the_new_state_before_using_it(empty_db_url):
    """0016 adds the state `waiting` to the enum, which cannot be used in the transaction
    that adds it: it is committed before 0017 (which uses it) runs, on a database in use
    before as on a new one."""
    from animus_core.store.migrations import apply
    from animus_core.store.roles import setup_roles

    files = load()
    async with raw(empty_db_url) as conn:
        await apply(conn, [m for m in files if m.version < 16])
        await conn.execute("SELECT animus.create_queue('work')")
        await setup_roles(conn)
        applied = await apply(conn, files)
        assert [m.version for m in applied] == [m.version for m in files if m.version >= 16]
        assert await conn.fetchval(
            "SELECT count(*) FROM animus.transitions WHERE 'waiting' IN (from_state, to_state)"
        ) == 4
        assert await conn.fetchval(
            "SELECT has_function_privilege('animus_submitter', "
            "'animus.signal(uuid, text, jsonb)', 'EXECUTE')")


async def test_work_items_are_vacuumed_after_a_fiftieth_of_them_changed(db_url):
    """0045: autovacuum's default waits for a fifth of a table dead; work_items keeps every
    item and each takes two updates that cannot be HOT."""
    async with raw(db_url) as conn:
        options = await conn.fetchval(
            "SELECT reloptions FROM pg_class WHERE oid = 'animus.work_items'::regclass")
    assert set(options) >= {"autovacuum_vacuum_scale_factor=0.02",
                            "autovacuum_vacuum_threshold=1000"}


async def test_the_embedded_server_visits_each_database_for_autovacuum_every_ten_seconds(
        server_url):
    """Set as the embedded server is resolved (docs/operations.md, "The embedded server");
    the default minute let dead row versions of a busy queue pile up after a long
    transaction."""
    from animus_core.store.connect import EMBEDDED_SETTINGS

    async with raw(server_url) as conn:
        for name, value in EMBEDDED_SETTINGS.items():
            assert await conn.fetchval("SELECT current_setting($1)", name) == value
            assert await conn.fetchval(
                "SELECT setting FROM pg_file_settings WHERE name = $1 AND applied", name)
