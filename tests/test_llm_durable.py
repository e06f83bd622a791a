"""The durable Claude loop (docs/agents.md, Durable loop): each model response and each tool
result is a step, so an attempt that follows a failed, suspended or killed one replays the
recorded turns from Postgres instead of asking the API again, and does not run recorded tool
calls again. A real engine, real Postgres, the real ``anthropic`` SDK against the local
Messages API of tests/messages_server.py, which counts what it is asked."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from animus_core import Db, Faculty, Focus, NewWorkItem, State, hookimpl
from animus_core.faculties.llm import AgentSpec, make_client, run_agent, tool_from_function
from animus_core.faculties.steps import StepJournal
from animus_core.testing import run_faculties
from animus_core.values.agents import PRICES, Usage
from animus_core.values.errors import InvalidInput
from animus_core.values.limits import limits
from tests.messages_server import Fail, MessagesServer, Reply, Tokens, ToolUse, serving

KEY = "sk-ant-test-durable"
MODEL = "claude-sonnet-4-5"


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[MessagesServer]:
    with serving(monkeypatch, KEY) as s:
        yield s


class Notebook:
    """Tools with side effects the tests count."""

    def __init__(self) -> None:
        self.notes: list[str] = []
        self.lookups: list[str] = []

    @hookimpl
    def register_tools(self, register: Callable[..., None]) -> None:
        def note(text: str) -> str:
            """Write a note down."""
            self.notes.append(text)
            return f"noted {text}"

        def lookup(city: str) -> dict[str, Any]:
            """Look up a city."""
            self.lookups.append(city)
            return {"city": city, "temp": -3}

        def big() -> str:
            """Return a lot."""
            return "y" * 5000

        def passphrase() -> str:
            """Tell the passphrase."""
            import os

            return f"it is {os.environ['LLM_PASSPHRASE']}"

        async def nested(focus: Focus) -> str:
            """Try to run a step of its own."""
            return str(await focus.step("inner", lambda: 1))

        for fn in (note, lookup, big, passphrase, nested):
            register(fn)


class Researcher(Faculty):
    """Runs the agent loops of ``params["loops"]`` one after the other: each ``{"tools":
    [...]}`` (``"retry_tools"``: its tools on later attempts), optionally after ``"sleep"``
    seconds or a step ``"step_on_retry"`` (later attempts only). Consolidate fails on the
    first attempt when ``params["fail"] == "consolidate"``."""

    name = "researcher"
    accepts = ("research",)
    retry_base = 0.0
    retry_max = 0.0
    secrets = ("LLM_PASSPHRASE",)

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        answers = []
        for loop in focus.params["loops"]:
            if "sleep" in loop:
                await focus.sleep(loop["sleep"])
            if focus.attempt > 1 and "step_on_retry" in loop:
                await focus.step(loop["step_on_retry"], lambda: 1)
            tools = loop.get("retry_tools", loop["tools"]) if focus.attempt > 1 else loop["tools"]
            result = await focus.agent(model=MODEL, tools=tools, max_turns=10,
                                       stream=focus.params.get("stream", True))
            answers.append({"text": result.text, "turns": result.turns,
                            "stop_reason": result.stop_reason,
                            "usage": msgspec.structs.asdict(result.usage),
                            "first": result.transcript[0]["content"]})
        return answers

    async def consolidate(self, focus: Focus, engaged: Any) -> Any:
        if focus.params.get("fail") == "consolidate" and focus.attempt == 1:
            raise RuntimeError("consolidate failed on purpose")
        return engaged


def summed(*tokens: Tokens) -> dict[str, int]:
    total = Usage()
    for t in tokens:
        total.add(t)
    return msgspec.structs.asdict(total)


def cost(*tokens: Tokens) -> float:
    inp, out = PRICES["claude-sonnet-4"]
    return sum((t.input_tokens * inp + t.output_tokens * out
                + t.cache_creation_input_tokens * inp * 1.25
                + t.cache_read_input_tokens * inp * 0.1) / 1e6 for t in tokens)


def answered(server: MessagesServer) -> list[Any]:
    """The requests the stand-in answered with a message: what was paid for."""
    return [r for r in server.requests if r.answered == "Reply"]


USAGES = (Tokens(100, 10, 800, 0), Tokens(200, 20, 0, 800), Tokens(300, 30, 0, 800),
          Tokens(400, 40, 0, 800))


def four_turns() -> list[Reply]:
    return [Reply(text="Noting.", tool_uses=[ToolUse("note", {"text": "a"}, "toolu_1a"),
                                             ToolUse("lookup", {"city": "Oslo"}, "toolu_1b")],
                  usage=USAGES[0]),
            Reply(tool_uses=[ToolUse("note", {"text": "b"}, "toolu_2a")], usage=USAGES[1]),
            Reply(tool_uses=[ToolUse("note", {"text": "c"}, "toolu_3a")], usage=USAGES[2]),
            Reply(text="Oslo is cold; noted a, b and c.", usage=USAGES[3])]


STEPS = ["llm 1 turn 1", "llm 1 tool 1.1 note", "llm 1 tool 1.2 lookup", "llm 1 turn 2",
         "llm 1 tool 2.1 note", "llm 1 turn 3", "llm 1 tool 3.1 note", "llm 1 turn 4"]


@pytest.mark.parametrize(("failure", "stream"), [("model", True), ("consolidate", False)])
async def test_a_loop_that_failed_resumes_without_asking_again(
        db_url: str, tmp_path: Path, server: MessagesServer, failure: str,
        stream: bool) -> None:
    """``model``: turn 3 is refused (529) through every retry of the SDK, so the attempt
    fails after turn 2 and the next one resumes at turn 3. ``consolidate``: the whole loop
    ran, consolidate fails once, and the next attempt replays every turn."""
    replies = four_turns()
    if failure == "model":
        server.script(*replies[:2], *[Fail(529, "Overloaded")] * 5, *replies[2:])
    else:
        server.script(*replies)
    tools = Notebook()
    async with run_faculties([Researcher()], home=tmp_path, database_url=db_url,
                             plugins={"notebook": tools}) as animus:
        item = await animus.run(NewWorkItem("research").params(
            {"loops": [{"tools": ["note", "lookup"]}], "fail": failure, "stream": stream}))
        steps = await animus.db.steps(item.id)
        records = await animus.db.executions(item.id)

    assert item.state is State.COMPLETED, item.reason
    assert item.attempts == 2
    # one model request per turn: none was paid twice
    paid = answered(server)
    assert len(paid) == 4
    assert [len(r.messages) for r in paid] == [1, 3, 5, 7]
    assert server.unused == 0
    assert all(r.streamed is stream for r in server.requests)
    # every tool ran once
    assert tools.notes == ["a", "b", "c"]
    assert tools.lookups == ["Oslo"]
    # the item's usage is what the four turns cost, once each
    assert item.usage is not None
    assert item.usage["models"] == {MODEL: summed(*USAGES)}
    assert item.usage["cost_usd"] == pytest.approx(cost(*USAGES), abs=1e-6)
    [answer] = item.outcome.data
    assert answer["text"] == "Oslo is cold; noted a, b and c."
    assert (answer["turns"], answer["stop_reason"]) == (4, "end_turn")
    assert answer["usage"] == summed(*USAGES)  # the result counts the whole conversation
    # the conversation goes on from its recorded first message (the first attempt's)
    assert answer["first"] == paid[0].messages[0]["content"]
    assert "attempt 1." in answer["first"]

    assert [s.name for s in steps] == STEPS
    resumed_at = 5 if failure == "model" else 8
    assert [s.attempt for s in steps] == [1] * resumed_at + [2] * (8 - resumed_at)
    turn = steps[0].result
    assert turn["content"][1] == {"type": "tool_use", "id": "toolu_1a", "name": "note",
                                  "input": {"text": "a"}}
    assert (turn["stop_reason"], turn["model"]) == ("tool_use", MODEL)
    assert turn["usage"] == summed(USAGES[0])
    assert steps[1].result == {"content": "noted a", "is_error": False}
    assert steps[2].result == {"content": json.dumps({"city": "Oslo", "temp": -3}),
                               "is_error": False}
    assert [r.result for r in records] == ["failed", "completed"]
    first, second = (r.steps or {} for r in records)
    assert [m["name"] for m in first["ran"]] == STEPS[:resumed_at]
    assert [m["name"] for m in second["replayed"]] == STEPS[:resumed_at]
    assert [m["name"] for m in second["ran"]] == STEPS[resumed_at:]
    if failure == "model":
        # the conversation rebuilt from the record is the one the first attempt sent
        refused = [r for r in server.requests if r.answered == "Fail 529"]
        assert len(refused) == 5
        assert paid[2].body == refused[0].body
        assert records[1].models == [MODEL]
    else:
        assert records[1].models == []  # it called no model


async def test_each_loop_of_a_focus_has_its_own_steps_and_a_wait_between_them(
        db_url: str, tmp_path: Path, server: MessagesServer) -> None:
    """Two loops with a durable sleep between them: the attempt that resumes after the
    sleep replays the first loop and asks only for the second."""
    usages = (Tokens(10, 1), Tokens(20, 2), Tokens(30, 3))
    server.script(Reply(tool_uses=[ToolUse("note", {"text": "x"})], usage=usages[0]),
                  Reply(text="first loop done", usage=usages[1]),
                  Reply(text="second loop done", usage=usages[2]))
    tools = Notebook()
    async with run_faculties([Researcher()], home=tmp_path, database_url=db_url,
                             plugins={"notebook": tools}) as animus:
        item = await animus.run(NewWorkItem("research").params(
            {"loops": [{"tools": ["note"]}, {"sleep": 0.2, "tools": []}]}))
        steps = await animus.db.steps(item.id)
    assert item.state is State.COMPLETED, item.reason
    assert (item.attempts, item.suspensions) == (2, 1)
    assert len(server.requests) == 3
    assert tools.notes == ["x"]
    assert [a["text"] for a in item.outcome.data] == ["first loop done", "second loop done"]
    assert [(s.name, s.attempt) for s in steps] == [
        ("llm 1 turn 1", 1), ("llm 1 tool 1.1 note", 1), ("llm 1 turn 2", 1), ("sleep", 2),
        ("llm 2 turn 1", 2)]
    assert item.usage is not None
    assert item.usage["models"] == {MODEL: summed(*usages)}


@pytest.mark.parametrize(("change", "expected"), [
    ({"retry_tools": ["lookup", "note"]},
     "tools ['note', 'lookup'] then, ['lookup', 'note'] now"),
    ({"step_on_retry": "prepare"},
     "step 1 is 'llm 1 turn 1' in the record"),
], ids=["tool order", "a step first"])
async def test_a_loop_run_another_way_on_replay_is_step_order_changed(
        db_url: str, tmp_path: Path, server: MessagesServer, change: dict[str, Any],
        expected: str) -> None:
    server.script(Reply(tool_uses=[ToolUse("note", {"text": "a"}), ToolUse("lookup",
                                                                          {"city": "Oslo"})]),
                  Reply(text="done"), Reply(text="never asked"))
    tools = Notebook()
    async with run_faculties([Researcher()], home=tmp_path, database_url=db_url,
                             plugins={"notebook": tools}) as animus:
        item = await animus.run(NewWorkItem("research").params(
            {"loops": [{"tools": ["note", "lookup"], **change}], "fail": "consolidate"}))
        steps = await animus.db.steps(item.id)
    assert item.state is State.DEAD
    assert item.attempts == 2
    assert "StepOrderChanged" in (item.reason or "")
    assert expected in (item.reason or "")
    assert "'llm 1 turn 1'" in (item.reason or "")
    assert len(server.requests) == 2  # the changed attempt asked nothing
    assert (tools.notes, tools.lookups) == (["a"], ["Oslo"])
    assert len(steps) == 4


async def test_a_response_or_tool_result_too_large_for_a_step(
        db_url: str, tmp_path: Path, server: MessagesServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A tool result too large to keep becomes an error result the model sees; a response
    too large fails the attempt, saying which and what to do, and is still paid for."""
    monkeypatch.setenv("ANIMUS_MAX_OUTCOME_BYTES", "1024")
    limits.cache_clear()
    try:
        usages = (Tokens(10, 1), Tokens(20, 900))
        server.script(Reply(tool_uses=[ToolUse("big", {})], usage=usages[0]),
                      Reply(text="z" * 3000, usage=usages[1]))
        async with run_faculties([Researcher()], home=tmp_path, database_url=db_url,
                                 plugins={"notebook": Notebook()}) as animus:
            item = await animus.run(NewWorkItem("research").max_attempts(1).params(
                {"loops": [{"tools": ["big"]}]}))
            steps = await animus.db.steps(item.id)
    finally:
        monkeypatch.delenv("ANIMUS_MAX_OUTCOME_BYTES")
        limits.cache_clear()
    [result] = server.requests[1].tool_results()
    assert result["is_error"] is True
    assert result["content"].startswith("the tool's result is 5")
    assert "over the limit of 1024 bytes (ANIMUS_MAX_OUTCOME_BYTES)" in result["content"]
    assert item.state is State.DEAD
    reason = item.reason or ""
    assert "the model's response of 'llm 1 turn 2' is 3" in reason
    assert ("bytes of JSON, over the limit of 1024 bytes (ANIMUS_MAX_OUTCOME_BYTES) of what a "
            "step keeps: raise ANIMUS_MAX_OUTCOME_BYTES, or lower max_tokens") in reason
    assert [s.name for s in steps] == ["llm 1 turn 1", "llm 1 tool 1.1 big"]
    assert item.usage is not None
    assert item.usage["models"] == {MODEL: summed(*usages)}  # the refused response was paid


async def test_what_the_steps_keep_is_redacted(db_url: str, tmp_path: Path,
                                               server: MessagesServer,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "correct-horse-battery-staple"
    monkeypatch.setenv("LLM_PASSPHRASE", secret)
    server.script(Reply(tool_uses=[ToolUse("passphrase", {})]),
                  Reply(text=f"The passphrase is {secret}."))
    async with run_faculties([Researcher()], home=tmp_path, database_url=db_url,
                             plugins={"notebook": Notebook()}) as animus:
        item = await animus.run(NewWorkItem("research").params(
            {"loops": [{"tools": ["passphrase"]}]}))
        steps = await animus.db.steps(item.id)
    assert item.state is State.COMPLETED, item.reason
    stored = json.dumps([s.result for s in steps])
    assert secret not in stored
    assert steps[1].result == {"content": "it is [redacted LLM_PASSPHRASE]", "is_error": False}
    assert steps[2].result["content"] == [
        {"type": "text", "text": "The passphrase is [redacted LLM_PASSPHRASE]."}]
    # the model is sent what a replay would send: the kept result
    assert server.requests[1].tool_results()[0]["content"] == "it is [redacted LLM_PASSPHRASE]"


# -- a property: a loop cut anywhere and resumed is the loop that was never cut ----------------


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(uses=st.lists(st.integers(min_value=1, max_value=2), min_size=0, max_size=3),
       data=st.data())
async def test_a_loop_cut_before_any_turn_resumes_to_the_same_conversation(
        db: Db, tmp_path: Path, server: MessagesServer, uses: list[int],
        data: st.DataObject) -> None:
    """A loop of ``len(uses) + 1`` turns (turn t asks for ``uses[t-1]`` tools, the last
    answers) whose first attempt is cut by a refused request (400) before turn ``cut``
    resumes in a second attempt: together they make one request per turn, run each tool
    once, charge each turn once, and give the conversation an uncut loop gives."""
    turns = len(uses) + 1
    cut = data.draw(st.integers(min_value=1, max_value=turns + 1), label="cut before turn")
    ran: list[str] = []

    def count(n: int) -> int:
        """Count."""
        ran.append(f"count {n}")
        return n + 1

    tools = {"count": tool_from_function(count)}
    usages = [Tokens(10 * t, t) for t in range(1, turns + 1)]
    replies = [Reply(text=f"turn {t}", usage=usages[t - 1], tool_uses=[
        ToolUse("count", {"n": 10 * t + i}, f"toolu_{t}_{i}") for i in range(uses[t - 1])])
        for t in range(1, turns)] + [Reply(text="done", usage=usages[-1])]
    spec = AgentSpec(model=MODEL, tools=["count"], stream=False)
    client = make_client(api_key=KEY, base_url=server.url, max_retries=0)
    try:
        server.reset()
        server.script(*replies)
        uncut = await run_agent(client, spec, "count", tools=tools)
        server.reset()
        ran.clear()
        server.script(*replies[:cut - 1], Fail(400, "cut"), *replies[cut - 1:])
        work_type = f"count-{len(server.state.requests)}-{id(ran)}"
        await db.submit_work(NewWorkItem(work_type, source="t"))
        [claimed] = await db.claim(lease_seconds=300, start=True, work_types=[work_type])
        results = []
        for attempt in (1, 2):
            focus = Focus(claimed.item, db, attempt=attempt, log=logging.getLogger("test"),
                          root=tmp_path, steps=StepJournal(db, claimed.lease))
            try:
                results.append(await run_agent(client, spec, "count", tools=tools,
                                               focus=focus))
            except InvalidInput:
                assert attempt == 1
    finally:
        await client.close()
    assert len(results) == (1 if cut <= turns else 2)  # the first attempt was cut, or not
    assert [r.answered for r in server.requests].count("Reply") == turns
    assert ran == [f"count {10 * t + i}" for t in range(1, turns) for i in range(uses[t - 1])]
    item = await db.get_work_item(claimed.item.id)
    assert item.usage is not None
    assert item.usage["models"] == {MODEL: summed(*usages)}
    resumed = results[-1]
    assert (resumed.text, resumed.turns, resumed.usage) == (uncut.text, uncut.turns,
                                                             uncut.usage)
    assert resumed.transcript == uncut.transcript


async def test_a_tool_cannot_run_steps_of_its_own(db_url: str, tmp_path: Path,
                                                 server: MessagesServer) -> None:
    """A tool's call is one step: a step inside it is refused, and the model is told."""
    server.script(Reply(tool_uses=[ToolUse("nested", {})]), Reply(text="I see."))
    async with run_faculties([Researcher()], home=tmp_path, database_url=db_url,
                             plugins={"notebook": Notebook()}) as animus:
        item = await animus.run(NewWorkItem("research").params({"loops": [{"tools": ["nested"]}]}))
        steps = await animus.db.steps(item.id)
    assert item.state is State.COMPLETED, item.reason
    [result] = server.requests[1].tool_results()
    assert result["is_error"] is True
    assert result["content"].startswith(
        "InvalidInput: 'inner' was called inside the body of step 'llm 1 tool 1.1 nested'")
    assert [s.name for s in steps] == ["llm 1 turn 1", "llm 1 tool 1.1 nested", "llm 1 turn 2"]
