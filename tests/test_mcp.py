"""MCP servers' tools for the engage loop (animus_core/faculties/mcp.py), against a real stdio
server built with the ``mcp`` SDK (tests/mcp_server.py), driven by the SDK's own client."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from animus_core import Db, NewWorkItem, State
from animus_core.faculties.llm import _call_tool
from animus_core.faculties.mcp import McpTools
from animus_core.faculties.toml import load_file
from animus_core.infra.secrets import redactor
from animus_core.values.errors import ConfigError
from animus_core.values.mcp import McpServer
from tests.engine_helpers import (
    EngineProcess,
    free_port,
    run_engine,
    server_process,
    wait_finished,
    wait_until,
)
from tests.governance_helpers import people as team
from tests.messages_server import Hold, MessagesServer, Reply, ToolUse, serving

SERVER = str(Path(__file__).parent / "mcp_server.py")


def stdio(**kw: Any) -> McpServer:
    spec = McpServer(name=kw.pop("name", "t"), command=sys.executable, args=[SERVER], **kw)
    spec.check("test")
    return spec


@pytest.fixture
async def pool() -> AsyncIterator[McpTools]:
    tools = McpTools()
    try:
        yield tools
    finally:
        await tools.close()


async def call(pool: McpTools, spec: McpServer, tool: str, **args: Any) -> tuple[str, bool]:
    tools = await pool.tools([spec])
    return await _call_tool(tools[f"mcp__{spec.name}__{tool}"], args, None)


async def test_a_servers_tools_join_with_their_schemas_and_answer(pool: McpTools) -> None:
    tools = await pool.tools([stdio()])
    assert {"mcp__t__echo", "mcp__t__slow", "mcp__t__fail", "mcp__t__env"} <= set(tools)
    echo = tools["mcp__t__echo"]
    assert echo.input_schema["properties"]["text"]["type"] == "string"
    assert echo.description.startswith("Say the text back.")
    assert await _call_tool(echo, {"text": "héllo"}, None) == ("héllo", False)


async def test_only_the_allowed_tools_are_offered(pool: McpTools) -> None:
    tools = await pool.tools([stdio(tools=["echo", "env"])])
    assert set(tools) == {"mcp__t__echo", "mcp__t__env"}


async def test_the_server_sees_only_the_environment_declared(
        pool: McpTools, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("MCP_TEST_SHARED", "shared-value")
    monkeypatch.setenv("MCP_TEST_HIDDEN", "hidden-value")
    monkeypatch.setenv("MCP_TEST_TOKEN", "token-value-123456")
    redactor.learn(os.environ, ["MCP_TEST_TOKEN"])  # a faculty's secret, as the engine learns it
    spec = stdio(env=["MCP_TEST_SHARED", "MCP_TEST_TOKEN"])
    caplog.set_level(logging.INFO, logger="animus.mcp")
    assert await call(pool, spec, "env", name="MCP_TEST_SHARED") == ("shared-value", False)
    assert await call(pool, spec, "env", name="MCP_TEST_HIDDEN") == ("<unset>", False)
    out, is_error = await call(pool, spec, "env", name="MCP_TEST_TOKEN")  # passed, not shown
    assert (out, is_error) == ("[redacted MCP_TEST_TOKEN]", False)
    def logged() -> str:  # its stderr, logged line by line as it comes
        return "\n".join(r.getMessage() for r in caplog.records)

    await wait_until(lambda: "asked for MCP_TEST_TOKEN: [redacted MCP_TEST_TOKEN]" in logged(),
                     10, message="the server's stderr")
    assert "token-value-123456" not in logged()


async def test_a_failing_tool_is_an_error_the_model_reads(pool: McpTools) -> None:
    out, is_error = await call(pool, stdio(), "fail", why="today")
    assert is_error
    assert out.startswith("ToolFailed: MCP tool fail of t: ")


async def test_a_slow_tool_times_out_and_the_server_goes_on(pool: McpTools) -> None:
    spec = stdio(timeout=0.5)
    out, is_error = await call(pool, spec, "slow", seconds=5)
    assert is_error
    assert out == "ToolFailed: MCP tool slow of t did not answer within 0.5 s"
    assert await call(pool, spec, "echo", text="still here") == ("still here", False)


async def test_a_result_over_the_limit_is_refused(pool: McpTools) -> None:
    spec = stdio(max_result_bytes=1000)
    assert await call(pool, spec, "big", n=1000) == ("x" * 1000, False)
    out, is_error = await call(pool, spec, "big", n=1001)
    assert is_error
    assert "answered 1,001 bytes, more than its limit of 1,000" in out


async def test_a_server_that_does_not_start_is_a_tool_error_not_a_crash(
        pool: McpTools, caplog: pytest.LogCaptureFixture) -> None:
    broken = McpServer(name="broken", command=sys.executable, args=[SERVER, "--crash"],
                       tools=["echo"], start_timeout=10)
    missing = McpServer(name="missing", command="/nonexistent/mcp-server", tools=["echo"])
    tools = await pool.tools([broken, missing])
    assert set(tools) == {"mcp__broken__echo", "mcp__missing__echo"}
    out, is_error = await _call_tool(tools["mcp__broken__echo"], {"text": "x"}, None)
    assert is_error
    assert out.startswith("ToolFailed: MCP server broken could not be reached")
    out, is_error = await _call_tool(tools["mcp__missing__echo"], {"text": "x"}, None)
    assert is_error
    assert "MCP server missing could not be reached" in out
    assert "could not be reached" in caplog.text


async def test_a_server_that_died_is_started_again_for_the_next_focus(
        pool: McpTools, tmp_path: Path) -> None:
    spec = stdio()
    counter = tmp_path / "calls"
    assert await call(pool, spec, "count", path=str(counter)) == ("1", False)
    [server] = pool._servers.values()
    os.kill(_child_pid(server), signal.SIGKILL)
    _out, is_error = await call(pool, spec, "count", path=str(counter))
    assert is_error  # the call in flight when it died fails
    assert await call(pool, spec, "count", path=str(counter)) == ("2", False)  # started again


async def test_a_server_over_streamable_http(pool: McpTools, tmp_path: Path) -> None:
    port = free_port()
    async with server_process([sys.executable, SERVER, "--http", str(port)], port,
                              tmp_path / "http.log"):
        spec = McpServer(name="web", url=f"http://127.0.0.1:{port}/mcp", tools=["echo", "fail"])
        spec.check("test")
        tools = await pool.tools([spec])
        assert set(tools) == {"mcp__web__echo", "mcp__web__fail"}
        assert await call(pool, spec, "echo", text="over http") == ("over http", False)
        out, is_error = await call(pool, spec, "fail")
        assert is_error
        assert "MCP tool fail of web" in out


async def test_a_server_at_a_url_gets_headers_from_declared_variables(
        pool: McpTools, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setenv("MCP_TEST_TOKEN", "t0ken-of-the-test")
    url = f"http://127.0.0.1:{port}/mcp"
    async with server_process([sys.executable, SERVER, "--http", str(port), "--token",
                               "t0ken-of-the-test"], port, tmp_path / "http.log"):
        spec = McpServer(name="auth", url=url, env=["MCP_TEST_TOKEN"],
                         headers={"Authorization": "Bearer ${MCP_TEST_TOKEN}"})
        spec.check("test")
        assert await call(pool, spec, "echo", text="let in") == ("let in", False)
        assert spec.identity()["headers"] == ["Authorization"]  # not the token
        bare = McpServer(name="bare", url=url, tools=["echo"])
        out, is_error = await call(pool, bare, "echo", text="x")
        assert is_error
        assert "MCP server bare could not be reached" in out
        assert "(HTTP 401: who are you?)" in out
        monkeypatch.setenv("MCP_TEST_TOKEN", "t0ken\r\nX-Evil: 1")
        broken = McpServer(name="broken", url=url, env=["MCP_TEST_TOKEN"], tools=["echo"],
                           headers={"Authorization": "Bearer ${MCP_TEST_TOKEN}"})
        out, is_error = await call(pool, broken, "echo", text="x")
        assert is_error
        assert "$MCP_TEST_TOKEN holds a line break" in out
        assert "X-Evil" not in out  # the value is not repeated
        monkeypatch.delenv("MCP_TEST_TOKEN")
        unset = McpServer(name="unset", url=url, env=["MCP_TEST_TOKEN"], tools=["echo"],
                          headers={"Authorization": "Bearer ${MCP_TEST_TOKEN}"})
        out, is_error = await call(pool, unset, "echo", text="x")
        assert is_error
        assert "${MCP_TEST_TOKEN}, which the engine's environment does not set" in out


def _child_pid(server: Any) -> int:
    import psutil

    me = psutil.Process()
    [child] = [c for c in me.children(recursive=True) if SERVER in " ".join(c.cmdline())]
    return int(child.pid)


@pytest.mark.parametrize(("fields", "message"), [
    ({"command": "x", "url": "http://h/mcp"}, "give command (a stdio server) or url"),
    ({}, "give command (a stdio server) or url"),
    ({"url": "ftp://h"}, "url must be http:// or https://"),
    ({"url": "http://h/mcp", "args": ["A"]}, "args are for a server animus starts"),
    ({"command": "x", "headers": {"A": "b"}}, "headers are for a server reached at a url"),
    ({"url": "http://h/mcp", "headers": {"A B": "c"}}, "'A B' is not an HTTP header name"),
    ({"url": "http://h/mcp", "headers": {"A": "b\r\nEvil: 1"}}, "not one line of text"),
    ({"url": "http://h/mcp", "headers": {"A": "Bearer ${TOKEN}"}},
     "headers.A takes ${TOKEN}, which env does not name"),
    ({"url": "http://h/mcp", "headers": {"Host": "evil.example"}},
     "headers: Host is the MCP transport's own to send"),
    ({"url": "http://h/mcp", "headers": {"Mcp-Session-Id": "x"}},
     "headers: Mcp-Session-Id is the MCP transport's own"),
    ({"command": "x", "env": ["1A"]}, "env: '1A' is not an environment variable name"),
    ({"command": "x", "timeout": 0}, "timeout must be more than 0"),
    ({"command": "x", "tools": ["a" * 60]}, "which the model's API refuses"),
    ({"command": "x", "tools": ["a"], "requires_approval": ["b"]},
     "requires_approval names ['b'], which tools does not allow"),
])
def test_a_declaration_that_cannot_work_is_refused_naming_the_field(
        fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=r"f\.toml: mcp server 'srv'") as e:
        McpServer(name="srv", **fields).check("f.toml")
    assert message in str(e.value)


@pytest.mark.parametrize(("declaration", "message"), [
    ('name = "a"\ncommand = "x"\nenv = ["HIDDEN"]',
     "env ['HIDDEN'] must be declared in the faculty's env or secrets"),
    ('name = "a"\nurl = "http://h/mcp"\nenv = ["PLAIN"]\n'
     'headers = {Authorization = "Bearer ${PLAIN}"}',
     "headers take ['PLAIN'], which must be among the faculty's secrets"),
])
def test_a_faculty_passes_its_servers_only_what_it_declares(
        declaration: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "f.toml"
    path.write_text('[faculty]\nname = "f"\naccepts = ["f"]\nenv = ["PLAIN"]\n\n'
                    '[faculty.engage]\nmodel = "claude-sonnet-4-5"\n\n'
                    f"[[faculty.engage.mcp]]\n{declaration}\n")
    with pytest.raises(ConfigError) as e:
        load_file(path, cwd=tmp_path)
    assert message in str(e.value)


# -- in the engage loop: the example faculty of docs/agents.md, a real engine ------------------

KEY = "sk-ant-test-mcp"
EXAMPLE = Path(__file__).parent.parent / "docs" / "examples" / "mcp"


@pytest.fixture
def messages(monkeypatch: pytest.MonkeyPatch) -> Iterator[MessagesServer]:
    with serving(monkeypatch, KEY) as s:
        yield s


@pytest.fixture
def notes_faculty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The example faculty, its server started with this Python, keeping notes in tmp_path."""
    faculties = tmp_path / "faculties"
    faculties.mkdir()
    text = (EXAMPLE / "notes.toml").read_text()
    text = text.replace('command = "python3"', f"command = {json.dumps(sys.executable)}")
    text = text.replace('args = ["notes_server.py"]',
                        f"args = [{json.dumps(str(EXAMPLE / 'notes_server.py'))}]")
    (faculties / "notes.toml").write_text(text)
    monkeypatch.setenv("NOTES_DIR", str(tmp_path))
    return faculties


def notes(tmp_path: Path) -> list[dict[str, Any]]:
    file = tmp_path / "notes.json"
    return json.loads(file.read_text()) if file.exists() else []


async def test_the_example_faculty_keeps_notes_through_its_mcp_server(
        db: Db, tmp_path: Path, messages: MessagesServer, notes_faculty: Path) -> None:
    messages.script(
        Reply(tool_uses=[ToolUse("mcp__notes__add_note", {"text": "boiler on Friday"})]),
        Reply(tool_uses=[ToolUse("mcp__notes__find_notes", {"query": "BOILER"})]),
        Reply(text="Noted: the boiler is serviced on Friday."))
    created = await db.submit_work(NewWorkItem("notes.ask", source="test")
                                   .params({"question": "Note the boiler."}))
    async with run_engine(db.url, tmp_path / "home", faculties_dir=notes_faculty):
        done = await wait_finished(db, created.id, timeout=60)
    assert done.state == State.COMPLETED, done.reason
    assert done.outcome.data["text"] == "Noted: the boiler is serviced on Friday."
    offered = {t["name"]: t for t in messages.requests[0].body["tools"]}
    assert set(offered) == {"mcp__notes__add_note", "mcp__notes__find_notes",
                            "mcp__notes__delete_note"}
    assert offered["mcp__notes__add_note"]["input_schema"]["required"] == ["text"]
    [found] = messages.requests[2].tool_results()  # a list: a text block for each of them
    assert json.loads(found["content"]) == {"id": 1, "text": "boiler on Friday"}
    assert notes(tmp_path) == [{"id": 1, "text": "boiler on Friday"}]
    [record] = await db.executions(created.id)
    assert record.faculty is not None
    [server] = record.faculty["mcp"]
    assert server["name"] == "notes"
    assert server["command"].endswith("notes_server.py")
    assert server["sha256"].startswith("sha256:")
    assert server["files"][str(EXAMPLE / "notes_server.py")].startswith("sha256:")
    steps = [s.name for s in await db.steps(created.id)]
    assert "llm 1 tool 1.1 mcp__notes__add_note" in steps


async def test_an_mcp_tool_that_needs_approval_waits_for_a_person(
        db: Db, db_url: str, server_url: str, tmp_path: Path, messages: MessagesServer,
        notes_faculty: Path) -> None:
    (tmp_path / "notes.json").write_text(json.dumps([{"id": 7, "text": "old"}]))
    messages.script(Reply(tool_uses=[ToolUse("mcp__notes__delete_note", {"id": 7})]),
                    Reply(text="Deleted."))
    created = await db.submit_work(NewWorkItem("notes.ask", source="test")
                                   .params({"question": "Delete note 7."}))
    async with run_engine(db.url, tmp_path / "home", faculties_dir=notes_faculty):
        await wait_until(lambda: _waits(db, created.id), 60, message="the approval")
        assert notes(tmp_path) == [{"id": 7, "text": "old"}]  # not before a person says so
        async with team(db_url, server_url, (("ann", "approver"),)) as people:
            ann = await people.db("ann")
            await ann.decide(created.id, "approve", "note 7 is obsolete")
            done = await wait_finished(db, created.id, timeout=60)
    assert done.state == State.COMPLETED, done.reason
    assert notes(tmp_path) == []
    [result] = messages.requests[1].tool_results()
    assert result["content"] == "deleted note 7"


async def _waits(db: Db, wid: Any) -> bool:
    item = await db.get_work_item(wid)
    return item.state == State.WAITING and (item.wait or {}).get("kind") == "approval"


async def test_an_mcp_call_made_before_the_engine_was_killed_is_not_made_again(
        db: Db, cli_env: dict[str, str], tmp_path: Path, messages: MessagesServer,
        notes_faculty: Path) -> None:
    messages.script(
        Reply(tool_uses=[ToolUse("mcp__notes__add_note", {"text": "only once"})]),
        Hold())  # the next turn is held: the engine is killed while it waits for it
    created = await db.submit_work(NewWorkItem("notes.ask", source="test")
                                   .params({"question": "Note it once."}))
    env = {**cli_env, "DATABASE_URL": db.url, "ANIMUS_FACULTIES": str(notes_faculty),
           "ANTHROPIC_API_KEY": KEY, "ANTHROPIC_BASE_URL": messages.url,
           "NOTES_DIR": str(tmp_path), "ANIMUS_HOME": str(tmp_path / "home")}
    first = EngineProcess(["--lease", "2"], env, tmp_path, tmp_path / "first.log")
    try:
        await wait_until(lambda: messages.holding, 60, message="the second turn")
        assert notes(tmp_path) == [{"id": 1, "text": "only once"}]
        first.signal(signal.SIGKILL)
        await first.wait(10)
    finally:
        first.close()
    messages.release()
    messages.script(Reply(text="Noted once."))
    second = EngineProcess([], env, tmp_path, tmp_path / "second.log")
    try:
        done = await wait_finished(db, created.id, timeout=90)
    finally:
        second.signal(signal.SIGTERM)
        await second.wait(30)
        second.close()
    assert done.state == State.COMPLETED, f"{done.reason}\n{second.output()}"
    assert notes(tmp_path) == [{"id": 1, "text": "only once"}]  # the call was replayed
    assert done.attempts == 2
