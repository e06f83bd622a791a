"""``animus mcp``: this animus as an MCP server, driven by the ``mcp`` SDK's own client over
stdio, acting as one animus role (docs/mcp.md)."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from animus_core import Db, NewWorkItem, State
from animus_core.store.roles import setup_roles
from animus_core.web.mcp_server import TOOLS
from tests.support import raw

RULES = """
[[rule]]
name = "tasks from models"
work_type = "mcp.task"
effect = "allow"

[[rule]]
name = "no mcp deploys"
work_type = "mcp.deploy"
effect = "deny"
reason = "deploys are submitted by people"
"""


@pytest.fixture
async def roles(db_url: str) -> None:
    async with raw(db_url) as conn:
        await setup_roles(conn)


@asynccontextmanager
async def animus_mcp(cli_env: dict[str, str], tmp_path: Path,
                     role: str) -> AsyncIterator[Client]:
    rules = tmp_path / "rules"
    rules.mkdir(exist_ok=True)
    (rules / "10-mcp.toml").write_text(RULES)
    env = {**cli_env, "ANIMUS_RULES": str(rules)}
    params = StdioServerParameters(command=sys.executable,
                                   args=["-m", "animus_core", "mcp", "--role", role], env=env)
    async with Client(params, read_timeout_seconds=60) as client:
        yield client


async def call(client: Client, tool: str, **args: Any) -> tuple[Any, bool]:
    result = await client.call_tool(tool, args)
    text = "\n".join(b.text for b in result.content if b.type == "text")
    if result.is_error:
        return text, True
    return (result.structured_content or {}).get("result", json.loads(text) if text else None), False


async def test_it_lists_its_tools_and_none_that_decides(
        roles: None, cli_env: dict[str, str], tmp_path: Path) -> None:
    async with animus_mcp(cli_env, tmp_path, "reader") as client:
        names = [t.name for t in (await client.list_tools()).tools]
    assert names == list(TOOLS)
    assert not [n for n in names if "approve" in n or "decide" in n or "reject" in n]


async def test_a_reader_reads_and_is_refused_a_submission(
        roles: None, db: Db, cli_env: dict[str, str], tmp_path: Path) -> None:
    there = await db.submit_work(NewWorkItem("mcp.read", source="test").params({"n": 1}))
    async with animus_mcp(cli_env, tmp_path, "reader") as client:
        item, is_error = await call(client, "get_work", id=str(there.id))
        assert not is_error
        assert (item["state"], item["params"]) == ("queued", {"n": 1})
        listed, _ = await call(client, "list_work", work_type="mcp.read")
        assert [w["id"] for w in listed] == [str(there.id)]
        text, is_error = await call(client, "submit_work", work_type="mcp.read")
        assert is_error
        assert "permission denied" in text
        status, is_error = await call(client, "status")
        assert not is_error
        assert any(c["work_type"] == "mcp.read" for c in status["work"])
    assert len(await db.list_work(work_type="mcp.read")) == 1


async def test_a_submitter_submits_and_the_rules_apply(
        roles: None, db: Db, cli_env: dict[str, str], tmp_path: Path) -> None:
    async with animus_mcp(cli_env, tmp_path, "submitter") as client:
        made, is_error = await call(client, "submit_work", work_type="mcp.task",
                                    params={"x": "y"}, dedup_key="k1")
        assert not is_error, made
        assert (made["created"], made["state"]) == (True, "queued"), made
        again, _ = await call(client, "submit_work", work_type="mcp.task", dedup_key="k1")
        assert (again["created"], again["id"]) == (False, made["id"])
        denied, is_error = await call(client, "submit_work", work_type="mcp.deploy")
        assert not is_error
        assert denied["state"] == "dead"
        assert "deploys are submitted by people" in denied["reason"]
        bad, is_error = await call(client, "get_work", id="not-an-id")
        assert is_error
        assert "not-an-id" in bad
    item = await db.get_work_item(made["id"])
    assert (item.state, item.params, item.provenance.source) == (State.QUEUED, {"x": "y"}, "mcp")
