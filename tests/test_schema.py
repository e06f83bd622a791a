"""animus_core/store/sql/schema.sql is exactly the schema a fresh database has once migrated."""

from __future__ import annotations

import asyncio
import difflib
import os

import pytest

from animus_core.store.db import Db
from animus_core.store.schema import SCHEMA_FILE, dump
from tests.conftest import scratch_database

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("DATABASE_URL")),
    reason="schema.sql is made on the embedded server (its Postgres version and pg_dump)")


async def test_schema_sql_is_what_the_migrations_make(server_url):
    async with scratch_database(server_url) as url:
        db = await Db.connect(url, max_size=1)
        try:
            await db.migrate()
        finally:
            await db.close()
        actual = await asyncio.to_thread(dump, url)
    expected = SCHEMA_FILE.read_text() if SCHEMA_FILE.exists() else ""
    if actual != expected:
        diff = "".join(difflib.unified_diff(
            expected.splitlines(keepends=True), actual.splitlines(keepends=True),
            fromfile="animus_core/store/sql/schema.sql", tofile="the migrated database"))
        pytest.fail("schema.sql does not match what the migrations make: run scripts/schema "
                    f"and commit the file.\n{diff}", pytrace=False)
