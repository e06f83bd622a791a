"""``animus mcp``: this animus as an MCP server, driven by the ``mcp`` SDK's own client over
stdio, acting as one animus role, and over streamable HTTP, as the console's person whose
token each request carries (docs/mcp.md)."""

from __future__ import annotations

import json
import secrets
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from animus_core import Db, NewWorkItem, State
from animus_core.store.roles import setup_roles
from animus_core.values.errors import PermissionDenied
from animus_core.web import add_person, issue_mcp_token, remove_person, revoke_mcp_token
from animus_core.web.mcp_server import TOOLS
from tests.engine_helpers import free_port, run_cli, server_process
from tests.support import raw

SECRET = "an MCP test secret of at least 32 characters"
PASSWORD = "a long enough password"

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


def rules_env(cli_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    rules = tmp_path / "rules"
    rules.mkdir(exist_ok=True)
    (rules / "10-mcp.toml").write_text(RULES)
    return {**cli_env, "ANIMUS_RULES": str(rules), "ANIMUS_WEB_SECRET": SECRET}


@asynccontextmanager
async def animus_mcp(cli_env: dict[str, str], tmp_path: Path,
                     role: str) -> AsyncIterator[Client]:
    env = rules_env(cli_env, tmp_path)
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


# -- over streamable HTTP, as the console's people -----------------------------------------------


@pytest.fixture
async def people(db: Db, server_url: str) -> AsyncIterator[dict[str, str]]:
    """A reader and a submitter of the console (login roles of their own), by role."""
    suffix = secrets.token_hex(3)
    names = {"reader": f"mcp_rita_{suffix}", "submitter": f"mcp_sam_{suffix}"}
    try:
        for role, name in names.items():
            await add_person(db, SECRET.encode(), name, role, PASSWORD)
        yield names
    finally:
        async with raw(server_url) as conn:
            for name in names.values():
                await conn.execute(f'DROP OWNED BY "{name}"')
                await conn.execute(f'DROP ROLE IF EXISTS "{name}"')


@asynccontextmanager
async def animus_mcp_http(cli_env: dict[str, str], tmp_path: Path) -> AsyncIterator[str]:
    """``animus mcp --bind`` on a free port: its endpoint."""
    port = free_port()
    argv = [sys.executable, "-m", "animus_core", "mcp", "--bind", f"127.0.0.1:{port}"]
    async with server_process(argv, port, tmp_path / "mcp-http.log", rules_env(cli_env, tmp_path),
                              "animus mcp --bind"):
        yield f"http://127.0.0.1:{port}/mcp"


@asynccontextmanager
async def http_client(endpoint: str, token: str) -> AsyncIterator[Client]:
    headers = {"authorization": f"Bearer {token}"}
    async with httpx2.AsyncClient(headers=headers, timeout=60) as http, \
            Client(streamable_http_client(endpoint, http_client=http),
                   read_timeout_seconds=60) as client:
        yield client


async def test_over_http_each_call_runs_as_the_person_whose_token_it_carries(
        db: Db, people: dict[str, str], cli_env: dict[str, str], tmp_path: Path) -> None:
    there = await db.submit_work(NewWorkItem("mcp.read", source="test"))
    tokens = {role: await issue_mcp_token(db, name) for role, name in people.items()}
    async with animus_mcp_http(cli_env, tmp_path) as endpoint:
        async with http_client(endpoint, tokens["reader"]) as reader:
            assert [t.name for t in (await reader.list_tools()).tools] == list(TOOLS)
            item, is_error = await call(reader, "get_work", id=str(there.id))
            assert (item["state"], is_error) == ("queued", False)
            text, is_error = await call(reader, "submit_work", work_type="mcp.task")
            assert is_error
            assert "permission denied" in text
        async with http_client(endpoint, tokens["submitter"]) as submitter:
            made, is_error = await call(submitter, "submit_work", work_type="mcp.task",
                                        params={"by": "http"})
            assert (made["state"], is_error) == ("queued", False), made
            denied, _ = await call(submitter, "submit_work", work_type="mcp.deploy")
            assert denied["state"] == "dead"
            assert "deploys are submitted by people" in denied["reason"]
            # a reader's token in the next request is the reader again: no session carries over
        async with http_client(endpoint, tokens["reader"]) as reader:
            _text, is_error = await call(reader, "submit_work", work_type="mcp.task")
            assert is_error
    assert [w.work_type for w in await db.list_work(work_type="mcp.task")] == ["mcp.task"]
    history = await db.history(made["id"])  # the audit names the person, not the server
    assert history[0].db_user == people["submitter"]


async def refused(endpoint: str, headers: dict[str, str]) -> tuple[int, str, str]:
    async with httpx2.AsyncClient(timeout=30) as http:
        reply = await http.post(endpoint, headers={**headers, "accept": "application/json"},
                                json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    return reply.status_code, reply.headers.get("www-authenticate", ""), reply.text


async def test_a_request_without_a_live_token_is_refused(
        db: Db, people: dict[str, str], cli_env: dict[str, str], tmp_path: Path) -> None:
    sam = people["submitter"]
    env = rules_env(cli_env, tmp_path)
    status, out, err = await run_cli(env, tmp_path, "web", "user", "token", sam)
    assert status == 0, err
    first = out.strip()
    assert first.startswith(f"animus_mcp.{sam}.")
    assert "shown once" in err
    async with animus_mcp_http(cli_env, tmp_path) as endpoint:
        async with http_client(endpoint, first) as client:
            assert (await call(client, "status"))[1] is False
        status_code, challenge, text = await refused(endpoint, {})
        assert (status_code, challenge) == (401, 'Bearer realm="animus"')
        assert "Authorization: Bearer" in text
        assert "animus web user token" in text
        forged = first[:-4] + ("aaaa" if not first.endswith("aaaa") else "bbbb")
        for bad in (forged, f"animus_mcp.{people['reader']}.{first.rsplit('.', 1)[1]}",
                    "animus_mcp..x", "not a token", "x" * 5000):
            assert (await refused(endpoint, {"authorization": f"Bearer {bad}"}))[0] == 401
        second = await issue_mcp_token(db, sam)  # the first works no more
        assert (await refused(endpoint, {"authorization": f"Bearer {first}"}))[0] == 401
        async with http_client(endpoint, second) as client:
            assert (await call(client, "status"))[1] is False
        assert await revoke_mcp_token(db, sam)
        status_code, _, text = await refused(endpoint, {"authorization": f"Bearer {second}"})
        assert status_code == 401
        assert "nobody's" in text
        with pytest.raises((MCPError, BaseExceptionGroup)) as e:  # a client reads why
            async with http_client(endpoint, second) as client:
                await client.list_tools()
        assert "that token is nobody's" in _messages(e.value)
        third = await issue_mcp_token(db, sam)
        await add_person(db, SECRET.encode(), sam, "submitter", PASSWORD + "!")  # a new password
        assert (await refused(endpoint, {"authorization": f"Bearer {third}"}))[0] == 401
        fourth = await issue_mcp_token(db, sam)
        assert await remove_person(db, sam)  # removed from the console: the token goes too
        assert (await refused(endpoint, {"authorization": f"Bearer {fourth}"}))[0] == 401
    status, _, err = await run_cli(env, tmp_path, "web", "user", "token", sam)
    assert status != 0
    assert "animus web user add" in err


async def test_a_role_that_cannot_be_taken_says_how_to_make_it(db_url: str) -> None:
    with pytest.raises(PermissionDenied, match=r"animus_no_such.*does not exist.*animus roles setup"):
        await Db.connect(db_url, role="animus_no_such")


async def test_it_holds_no_stream_open_and_says_what_is_wrong_with_a_header(
        db: Db, people: dict[str, str], cli_env: dict[str, str], tmp_path: Path) -> None:
    token = await issue_mcp_token(db, people["reader"])
    async with animus_mcp_http(cli_env, tmp_path) as endpoint, \
            httpx2.AsyncClient(timeout=30) as http:
        stream = await http.get(endpoint, headers={"authorization": f"Bearer {token}",
                                                   "accept": "text/event-stream"})
        assert (stream.status_code, stream.headers["allow"]) == (405, "POST")
        status, _, text = await refused(endpoint, {"authorization": "Basic cml0YTp4"})
        assert status == 401
        assert "not a bearer token" in text
        twice = await http.post(endpoint, json={}, headers=[
            ("authorization", "Bearer nonsense"), ("authorization", f"Bearer {token}")])
        assert twice.status_code == 400
        assert "more than one Authorization header" in twice.text
        proxied = await http.post(  # behind a proxy that sends its own Host
            endpoint, headers={"authorization": f"Bearer {token}", "host": "animus.example",
                               "accept": "application/json, text/event-stream"},
            json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
        assert proxied.status_code == 200, proxied.text


async def test_without_the_consoles_secret_it_will_not_serve_people(
        cli_env: dict[str, str], tmp_path: Path) -> None:
    env = {k: v for k, v in cli_env.items() if k != "ANIMUS_WEB_SECRET"}
    env["ANIMUS_HOME"] = str(tmp_path / "elsewhere")  # no web-secret file there
    status, _, err = await run_cli(env, tmp_path, "mcp", "--bind", f"127.0.0.1:{free_port()}")
    assert status != 0
    assert "no console secret: set ANIMUS_WEB_SECRET" in err
    assert not (tmp_path / "elsewhere" / "web-secret").exists()


def _messages(e: BaseException) -> str:
    if isinstance(e, BaseExceptionGroup):
        return " ".join(_messages(x) for x in e.exceptions)
    return str(e)
