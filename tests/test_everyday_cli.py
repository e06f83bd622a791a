"""Everyday tasks that needed SQL or Python: queues, who holds which role, memories,
the newest audit rows, and psql options passed through."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator

import pytest

from animus_core import NewWorkItem
from animus_core.faculties.embedders import HashingEmbedder
from animus_core.store.memory import Memory
from tests.engine_helpers import run_cli
from tests.governance_helpers import People
from tests.governance_helpers import people as team


@pytest.fixture
async def people(db_url: str, server_url: str) -> AsyncIterator[People]:
    async with team(db_url, server_url, (("rita", "reader"), ("otto", "operator"))) as members:
        yield members


async def test_queues_are_created_and_listed(db, cli_env, tmp_path):
    async def cli(*args: str) -> str:
        code, out, err = await run_cli(cli_env, tmp_path, "queue", *args)
        assert code == 0, err
        return out

    assert json.loads(await cli("create", "bulk", "--json")) == {"queue": "bulk",
                                                                  "created": True}
    assert (await cli("create", "bulk")).strip() == "queue bulk exists already"
    await db.submit_work(NewWorkItem("x"), queue="bulk")
    listed = {q["queue"]: q for q in json.loads(await cli("list", "--json"))}
    assert set(listed) == {"work", "bulk"}
    assert (listed["bulk"]["depth"], listed["bulk"]["engines"]) == (1, [])
    assert "no live engine" in await cli("list")
    code, _, err = await run_cli(cli_env, tmp_path, "queue", "create", "no good")
    assert code == 2
    assert "queue name 'no good' is not valid" in err


async def test_roles_are_listed_and_a_user_removed(db, people, cli_env, tmp_path):
    code, out, err = await run_cli(cli_env, tmp_path, "roles", "list", "--json")
    assert code == 0, err
    found = {m["name"]: m["roles"] for m in json.loads(out)}
    assert found[people.name("rita")] == ["reader"]
    assert found[people.name("otto")] == ["operator"]
    code, out, err = await run_cli(cli_env, tmp_path, "roles", "remove-user",
                                   people.name("rita"))
    assert code == 0, err
    assert out.strip() == f"{people.name('rita')} left animus_reader"
    code, out, err = await run_cli(cli_env, tmp_path, "roles", "list")
    assert people.name("rita") not in out
    assert people.name("otto") in out
    code, out, err = await run_cli(cli_env, tmp_path, "roles", "remove-user",
                                   people.name("rita"))
    assert code == 2
    assert "is a member of no animus role" in err


async def test_memories_are_listed_and_shown_without_an_embedder_call(db, cli_env, tmp_path):
    memory = await Memory.open(db, HashingEmbedder(384))
    ids = [(await memory.store(f"note {i}", source="notes" if i % 2 else "mail")).id
           for i in range(5)]
    env = {**cli_env, "ANIMUS_EMBEDDER": "hashing"}

    async def cli(*args: str) -> str:
        code, out, err = await run_cli(env, tmp_path, "memory", *args)
        assert code == 0, err
        return out

    listed = json.loads(await cli("list", "--source", "notes", "--json"))
    assert [m["content"] for m in listed] == ["note 3", "note 1"]
    out = await cli("list", "--limit", "2")
    assert f"(more exist: the next 2 with --before {ids[3]})" in out
    older = json.loads(await cli("list", "--before", str(ids[3]), "--json"))
    assert [m["content"] for m in older] == ["note 2", "note 1", "note 0"]
    shown = await cli("show", str(ids[0]))
    assert "source:    mail" in shown
    assert shown.rstrip().endswith("content:\nnote 0")


async def test_audit_tail_shows_the_newest_rows_and_follows(db, cli_env, tmp_path):
    first = (await db.submit_work(NewWorkItem("a"))).id
    second = (await db.submit_work(NewWorkItem("b"))).id
    code, out, err = await run_cli(cli_env, tmp_path, "audit", "tail", "-n", "1", "--json")
    assert code == 0, err
    [row] = [json.loads(line) for line in out.splitlines()]
    assert (row["work_id"], row["event"]) == (str(second), "submitted")
    code, out, err = await run_cli(cli_env, tmp_path, "audit", "show", str(first), "--since",
                                   "1h", "--json")
    assert [e["event"] for e in json.loads(out)] == ["submitted"]
    code, out, err = await run_cli(cli_env, tmp_path, "audit", "show", str(first), "--since",
                                   "2999-01-01T00:00:00+00:00", "--json")
    assert json.loads(out) == []

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "animus_core", "audit", "tail", "-n", "1", "--follow", "--json",
        env=cli_env, cwd=tmp_path, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))  # the newest
        third = (await db.submit_work(NewWorkItem("c"))).id
        followed = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        assert (followed["work_id"], followed["event"]) == (str(third), "submitted")
    finally:
        proc.terminate()
        await proc.wait()


async def test_db_psql_passes_options_that_start_with_a_dash(cli_env, tmp_path):
    code, out, err = await run_cli(cli_env, tmp_path, "db", "psql", "-At", "-c",
                                   "SELECT 40 + 2")
    assert (code, out.strip()) == (0, "42"), err
    code, out, err = await run_cli(cli_env, tmp_path, "db", "psql", "--", "-At", "-c",
                                   "SELECT 'dash'")
    assert (code, out.strip()) == (0, "dash"), err
