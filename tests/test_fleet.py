"""A fleet's plumbing (docs/operations-kubernetes.md): engines behind a pooler LISTEN on the
server itself (ANIMUS_LISTEN_URL)."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest

from animus_core import NewWorkItem
from animus_core.infra.config import Settings
from animus_core.values.errors import ConfigError
from tests.engine_helpers import engine_processes, wait_finished, wait_until, write_toml_faculty
from tests.governance_helpers import as_user
from tests.support import raw

pytestmark = pytest.mark.slow


async def test_the_engine_listens_where_animus_listen_url_says(
        db: Any, db_url: str, server_url: str, cli_env: dict[str, str], tmp_path: Path) -> None:
    listener = f"listen_{secrets.token_hex(3)}"  # LISTEN needs no rights at all
    async with raw(server_url) as conn:
        await conn.execute(f'CREATE ROLE "{listener}" LOGIN')
    try:
        write_toml_faculty(tmp_path, "quick", relative_to=tmp_path,
                           hooks={"engage": "echo '{}' > engage-out.json"})
        env = {**cli_env, "ANIMUS_FACULTIES": "faculties", "ANIMUS_HOME": str(tmp_path / "h"),
               "ANIMUS_DISABLE_PLUGIN_AUTOLOAD": "1",
               "ANIMUS_LISTEN_URL": as_user(db_url, listener)}
        with engine_processes(env, tmp_path) as start:
            engine = start("--poll", "60")  # woken by its listener, not by polling

            async def listening_as() -> list[str]:
                async with raw(db_url) as conn:
                    rows = await conn.fetch(
                        "SELECT usename FROM pg_stat_activity WHERE datname = current_database()"
                        " AND application_name = 'animus-listener'")
                return [r[0] for r in rows]

            await wait_until(listening_as, 30, message="the engine's listener")
            assert await listening_as() == [listener]
            made = await db.submit_work(NewWorkItem("quick", source="test"))
            assert str((await wait_finished(db, made.id, 20)).state) == "completed"
            engine.close()
    finally:
        async with raw(server_url) as conn:
            await conn.execute(f'DROP ROLE IF EXISTS "{listener}"')


def test_a_listen_url_must_be_a_postgres_url_beside_a_database_url() -> None:
    with pytest.raises(ConfigError, match="ANIMUS_LISTEN_URL='redis://x' is not a Postgres URL"):
        Settings.from_env({"DATABASE_URL": "postgresql://a@b/c", "ANIMUS_LISTEN_URL": "redis://x"})
    with pytest.raises(ConfigError, match="the embedded server needs none"):
        Settings.from_env({"ANIMUS_LISTEN_URL": "postgresql://a@b/c"})
