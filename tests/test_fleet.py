"""A fleet's plumbing (docs/operations-kubernetes.md): engines behind a pooler LISTEN on the
server itself (ANIMUS_LISTEN_URL), and a rolling restart under load loses nothing and runs
nothing twice."""

from __future__ import annotations

import secrets
import signal
from pathlib import Path
from typing import Any

import pytest

from animus_core import NewWorkItem
from animus_core.infra.config import Settings
from animus_core.values.errors import ConfigError
from tests.engine_helpers import (
    engine_processes,
    run_cli,
    wait_finished,
    wait_listening,
    wait_until,
    write_toml_faculty,
)
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


async def test_a_rolling_restart_under_load_loses_nothing_and_runs_nothing_twice(
        db: Any, db_url: str, cli_env: dict[str, str], tmp_path: Path) -> None:
    """Three engines, each stopped with SIGTERM in turn (as a rolling update does) and
    replaced while a backlog runs: every item completes, and each focus ran exactly once (so
    never two at the same time)."""
    runs = tmp_path / "runs.log"
    write_toml_faculty(tmp_path, "roll", relative_to=tmp_path, hooks={"engage": f"""
        echo "start $ANIMUS_WORK_ID $ANIMUS_ATTEMPT $(date +%s.%N)" >> {runs}
        sleep 0.2
        echo "end $ANIMUS_WORK_ID $ANIMUS_ATTEMPT $(date +%s.%N)" >> {runs}
        echo '{{}}' > engage-out.json"""})
    env = {**cli_env, "ANIMUS_FACULTIES": "faculties", "ANIMUS_HOME": str(tmp_path / "h"),
           "ANIMUS_DISABLE_PLUGIN_AUTOLOAD": "1"}
    n = 400
    with engine_processes(env, tmp_path) as start:
        fleet = [start("--concurrency", "6", "--grace", "15") for _ in range(3)]
        await wait_listening(db_url, fleet)
        ids = [(await db.submit_work(NewWorkItem("roll", source="test").params({"i": i}))).id
               for i in range(n)]
        busy = []
        await wait_until(lambda: _completed(db_url), 30, message="progress")
        for k in range(3):  # the rolling restart: one engine at a time, under load
            old = fleet[k]
            busy.append(await _running(db_url))
            old.signal(signal.SIGTERM)
            assert await old.wait(30) == 0, old.output()
            fleet[k] = start("--concurrency", "6", "--grace", "15")
            await wait_listening(db_url, fleet)
        for wid in ids:
            assert str((await wait_finished(db, wid, 60)).state) == "completed"
    starts = [line.split()[1] for line in runs.read_text().splitlines()
              if line.startswith("start ")]
    assert len(starts) == n, "each focus ran once: a drain lets the running ones finish"
    assert sorted(starts) == sorted(str(i) for i in ids)
    assert all(busy), f"every engine was stopped while foci ran: {busy}"
    status, out, err = await run_cli(env, tmp_path, "audit", "verify")
    assert status == 0, out + err


async def _running(db_url: str) -> int:
    async with raw(db_url) as conn:
        n: int = await conn.fetchval("SELECT count(*) FROM animus.work_items "
                                     "WHERE work_type = 'roll' AND state = 'running'")
    return n


async def _completed(db_url: str) -> bool:
    async with raw(db_url) as conn:
        done: int = await conn.fetchval(
            "SELECT count(*) FROM animus.work_items WHERE work_type = 'roll' "
            "AND state = 'completed'")
    return done > 0
