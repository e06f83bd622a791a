"""The durable Claude loop across a killed engine: ``python -m animus_core up`` processes
running a Python faculty (tests/llm_faculty.py, loaded through an ``animus`` entry point)
against the local Messages API of tests/messages_server.py, which runs in the test process.
The first engine is SIGKILLed while the API holds the response of turn 3, or inside a tool
call of turn 2; a second engine completes the item. No turn is paid for twice, and the
item's usage is the sum over the turns."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from animus_core import Created, NewWorkItem, State
from animus_core.values.agents import Usage
from tests.conftest import ROOT
from tests.engine_helpers import (
    engine_processes,
    events,
    plugin_site,
    wait_finished,
    wait_listening,
    wait_until,
)
from tests.messages_server import Hold, MessagesServer, Reply, Tokens, ToolUse

pytestmark = pytest.mark.slow

KEY = "sk-ant-test-processes"
MODEL = "claude-sonnet-4-5"
USAGES = (Tokens(100, 10), Tokens(200, 20), Tokens(300, 30), Tokens(400, 40))
STEPS = ["llm 1 turn 1", "llm 1 tool 1.1 jot", "llm 1 turn 2", "llm 1 tool 2.1 jot",
         "llm 1 turn 3", "llm 1 tool 3.1 jot", "llm 1 turn 4"]


@pytest.fixture
def server() -> Iterator[MessagesServer]:
    with MessagesServer(api_key=KEY) as s:
        yield s


@pytest.fixture
def engines(cli_env: dict[str, str], tmp_path: Path, server: MessagesServer) -> Iterator[Any]:
    """``engines(*args)`` starts an engine process that loads tests/llm_faculty.py and
    talks to ``server``; all are killed at the end."""
    site = plugin_site(tmp_path, "tests.llm_faculty", "testllm")
    env = {k: v for k, v in cli_env.items()
           if k != "ANIMUS_DISABLE_PLUGIN_AUTOLOAD" and not k.startswith("ANTHROPIC_")}
    env.update(ANIMUS_FACULTIES="faculties", ANIMUS_HOME=str(tmp_path / "home"),
               ANIMUS_PLUGINS="testllm", LOG_LEVEL="info", PYTHONPATH=f"{site}:{ROOT}",
               ANTHROPIC_API_KEY=KEY, ANTHROPIC_BASE_URL=server.url)
    with engine_processes(env, tmp_path) as start:
        yield start


def reply(turn: int) -> Reply:
    if turn == 4:
        return Reply(text="Jotted a, b and c.", usage=USAGES[3])
    text = "abc"[turn - 1]
    return Reply(tool_uses=[ToolUse("jot", {"text": text}, f"toolu_{text}")],
                 usage=USAGES[turn - 1])


@pytest.mark.parametrize("hold", ["response", "tool"])
async def test_an_engine_killed_in_the_loop_resumes_it_without_paying_twice(
        db, db_url, tmp_path, server, engines, hold):
    """``response``: the API holds turn 3's response and the engine dies waiting for it
    (that request is never answered, so never paid); ``tool``: the engine dies inside turn
    2's tool call, which runs again (at least once until its result is recorded)."""
    if hold == "response":
        server.script(reply(1), reply(2), Hold(), reply(3), reply(4))
    else:
        server.script(reply(1), reply(2), reply(3), reply(4))
    root = tmp_path / "effects"
    root.mkdir()
    first = engines("--lease", "2", "--poll", "0.5")
    await wait_listening(db_url, [first])
    created = await db.submit_work(NewWorkItem("durable-llm", source="test").params(
        {"dir": str(root), "hold": "b" if hold == "tool" else None}))
    assert isinstance(created, Created)
    wid = created.id
    held = (lambda: server.holding) if hold == "response" else (root / "held").exists
    await wait_until(held, 30, message=f"the first engine to reach the hold\n{first.output()}")
    first.signal(signal.SIGKILL)
    assert await first.wait(10) == -signal.SIGKILL
    server.release()
    recorded = [s.name for s in await db.steps(wid)]
    assert recorded == (STEPS[:4] if hold == "response" else STEPS[:3])

    second = engines("--lease", "2", "--poll", "0.5")
    await wait_listening(db_url, [second])
    item = await wait_finished(db, wid, 60)
    assert item.state == State.COMPLETED, second.output()

    # one answered request per turn: none was paid twice
    answered = [r for r in server.requests if r.answered == "Reply"]
    assert [len(r.messages) for r in answered] == [1, 3, 5, 7]
    assert len(server.requests) == (5 if hold == "response" else 4)
    if hold == "response":  # the held request is the one asked again, the same request
        [held_request] = [r for r in server.requests if r.answered == "Hold"]
        assert held_request.body == answered[2].body
    jots = [line.split()[0] for line in (root / "jots").read_text().splitlines()]
    assert jots == (["a", "b", "c"] if hold == "response" else ["a", "b", "b", "c"])

    total = Usage()
    for t in USAGES:
        total.add(t)
    assert item.outcome.data == {"text": "Jotted a, b and c.", "turns": 4,
                                 "usage": msgspec.structs.asdict(total)}
    assert item.usage is not None
    assert item.usage["models"] == {MODEL: msgspec.structs.asdict(total)}
    assert item.usage["cost_usd"] == pytest.approx(total.cost_usd(MODEL), abs=1e-6)
    steps = await db.steps(wid)
    assert [(s.name, s.attempt) for s in steps] == [
        (name, 1 if i < len(recorded) else 2) for i, name in enumerate(STEPS)]
    assert (await events(db, wid)).count("completed") == 1
    records = await db.executions(wid)
    assert [r.result for r in records] == ["lost", "completed"]
    assert records[-1].steps is not None
    assert [m["name"] for m in records[-1].steps["replayed"]] == recorded
