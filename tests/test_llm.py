"""The Claude engage loop over the real ``anthropic`` SDK, against a local Messages API.

Nothing of the SDK is patched: :func:`animus_core.faculties.llm.make_client` builds the real
``AsyncAnthropic`` pointed at :class:`tests.messages_server.MessagesServer`, which answers
scripted turns in JSON or as a real event stream, refuses malformed requests as the API
does, and records what it was sent. Retries are the SDK's own, made fast by the server's
``retry-after-ms`` header.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict
from uuid import UUID

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import animus_core.faculties.llm as llm
from animus_core import ConfigError, Db, Faculty, GovernedWork, NewWorkItem, RuleSet, State, hookimpl
from animus_core.faculties.embedders import HashingEmbedder
from animus_core.faculties.focus import Focus
from animus_core.faculties.llm import (
    FIRST_MESSAGE,
    PRICES,
    AgentResult,
    AgentSpec,
    ClaudeRunner,
    Tool,
    Usage,
    collect_tools,
    make_client,
    run_agent,
    tool_from_function,
)
from animus_core.faculties.plugins import make_plugin_manager
from animus_core.store.memory import Memory
from animus_core.values.errors import InvalidInput, LLMError
from tests.engine_helpers import (
    engine_settings,
    run_engine,
    toml_value,
    wait_finished,
    write_toml_faculty,
)
from tests.messages_server import Fail, MessagesServer, Reply, StreamError, Tokens, ToolUse
from tests.support import raw

if TYPE_CHECKING:
    import anthropic

    # As plugin authors write it: the focus type only for the type checker. Tools must
    # still work, since ``focus`` is not part of the schema the model sees.
    from animus_core.faculties.focus import Focus as TypeCheckingFocus

pytestmark = pytest.mark.filterwarnings(
    "ignore:The model .claude-sonnet-4-5. is deprecated:DeprecationWarning")

KEY = "sk-ant-test-0000"
CANARY = "sk-ant-canary-XYZ123"
MODEL = "claude-sonnet-4-5"
SYSTEM = "You are a careful assistant. Use the tools."
EPHEMERAL = {"type": "ephemeral"}


@pytest.fixture(autouse=True)
def _hermetic_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the developer's shell holds, these tests choose the key and the endpoint."""
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL",
                 "ANTHROPIC_CUSTOM_HEADERS", "ANTHROPIC_PROFILE", "ANTHROPIC_CONFIG_DIR"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def server() -> Iterator[MessagesServer]:
    with MessagesServer(api_key=KEY) as s:
        yield s


@pytest.fixture
async def client(server: MessagesServer) -> AsyncIterator[anthropic.AsyncAnthropic]:
    c = make_client(api_key=KEY, base_url=server.url, max_retries=2, timeout=20.0)
    yield c
    await c.close()


def expected_cost(model_prices: tuple[float, float], u: Tokens | Usage) -> float:
    """The cost by hand: cache writes at 1.25x the input price, cache reads at 0.1x."""
    inp, out = model_prices
    return round((u.input_tokens * inp + u.output_tokens * out
                  + u.cache_creation_input_tokens * inp * 1.25
                  + u.cache_read_input_tokens * inp * 0.1) / 1e6, 6)


def summed(*tokens: Tokens) -> Usage:
    return Usage(input_tokens=sum(t.input_tokens for t in tokens),
                 output_tokens=sum(t.output_tokens for t in tokens),
                 cache_creation_input_tokens=sum(t.cache_creation_input_tokens for t in tokens),
                 cache_read_input_tokens=sum(t.cache_read_input_tokens for t in tokens))


# -- tools used below -------------------------------------------------------------------------


class Calls:
    def __init__(self) -> None:
        self.log: list[tuple[str, dict[str, Any]]] = []


def weather_tools(calls: Calls) -> dict[str, Tool]:
    async def lookup(city: str, units: str = "metric") -> dict[str, Any]:
        """Look up the current weather in a city."""
        calls.log.append(("lookup", {"city": city, "units": units}))
        return {"city": city, "temp": -3, "units": units}

    def add(a: int, b: int) -> int:  # a sync tool: runs in a worker thread
        """Add two integers."""
        calls.log.append(("add", {"a": a, "b": b}))
        return a + b

    def explode(reason: str) -> str:
        """Always fails."""
        calls.log.append(("explode", {"reason": reason}))
        raise RuntimeError(f"disk on fire: {reason}")

    def echo(value: dict[str, Any] | None = None) -> str:
        """Echo the value (as JSON text)."""
        calls.log.append(("echo", {"value": value}))
        return json.dumps(value)

    return {t.name: t for t in (tool_from_function(f) for f in (lookup, add, explode, echo))}


def spec(**overrides: Any) -> AgentSpec:
    fields: dict[str, Any] = {"model": MODEL, "system": SYSTEM, "tools": ["lookup", "add"],
                              "max_turns": 10, "max_tokens": 1024, "stream": True}
    fields.update(overrides)
    return AgentSpec(**fields)


# -- the loop ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_two_tool_calls_then_an_answer(server: MessagesServer,
                                             client: anthropic.AsyncAnthropic,
                                             stream: bool) -> None:
    calls = Calls()
    usages = (Tokens(120, 30, 900, 0), Tokens(60, 12, 0, 900), Tokens(80, 25, 0, 900))
    server.script(
        Reply(text="Let me look that up.", tool_uses=[ToolUse("lookup", {"city": "Oslo"}, "toolu_A")],
              usage=usages[0]),
        Reply(tool_uses=[ToolUse("add", {"a": 2, "b": 40}, "toolu_B")], usage=usages[1]),
        Reply(text="It is -3 degrees in Oslo, and 2 + 40 = 42.", usage=usages[2]),
    )
    result = await run_agent(client, spec(stream=stream), "How cold is Oslo? Also 2+40?",
                             tools=weather_tools(calls))

    assert isinstance(result, AgentResult)
    assert result.text == "It is -3 degrees in Oslo, and 2 + 40 = 42."
    assert (result.stop_reason, result.turns, result.model) == ("end_turn", 3, MODEL)
    # the tools got what the model asked for (defaults filled by Python)
    assert calls.log == [("lookup", {"city": "Oslo", "units": "metric"}),
                         ("add", {"a": 2, "b": 40})]
    reqs = server.requests
    assert [r.answered for r in reqs] == ["Reply"] * 3
    assert all(r.streamed is stream for r in reqs)
    assert all(r.api_key == KEY for r in reqs)
    assert all(r.path == "/v1/messages" for r in reqs)
    # results go back as tool_result blocks answering the tool_use ids
    assert reqs[1].tool_results() == [{"type": "tool_result", "tool_use_id": "toolu_A",
                                       "content": json.dumps({"city": "Oslo", "temp": -3,
                                                              "units": "metric"}),
                                       "is_error": False}]
    assert reqs[2].tool_results() == [{"type": "tool_result", "tool_use_id": "toolu_B",
                                       "content": "42", "is_error": False}]
    # the transcript is the conversation: what the server was sent, plus the final answer
    assert reqs[2].messages == result.transcript[:-1]
    assert [m["role"] for m in result.transcript] == ["user", "assistant"] * 3
    assert result.transcript[0] == {"role": "user", "content": "How cold is Oslo? Also 2+40?"}
    assert result.transcript[1]["content"] == [
        {"type": "text", "text": "Let me look that up."},
        {"type": "tool_use", "id": "toolu_A", "name": "lookup", "input": {"city": "Oslo"}}]
    assert result.transcript[-1] == {"role": "assistant", "content": [
        {"type": "text", "text": "It is -3 degrees in Oslo, and 2 + 40 = 42."}]}
    # token accounting: the sum of every turn's usage, priced by PRICES
    assert result.usage == summed(*usages)
    assert result.cost_usd == expected_cost(PRICES["claude-sonnet-4"], summed(*usages))
    assert result.cost_usd == pytest.approx(
        (260 * 3 + 67 * 15 + 900 * 3.75 + 1800 * 0.3) / 1e6)


async def test_parallel_tool_uses_are_all_answered_in_order(
        server: MessagesServer, client: anthropic.AsyncAnthropic) -> None:
    calls = Calls()
    server.script(
        Reply(tool_uses=[ToolUse("add", {"a": 1, "b": 2}, "toolu_1"),
                         ToolUse("lookup", {"city": "Lima", "units": "imperial"}, "toolu_2"),
                         ToolUse("echo", {"value": {"keep": None, "nested": {"n": None}}}, "toolu_3")]),
        Reply(text="done"))
    result = await run_agent(client, spec(tools=["add", "lookup", "echo"]), "go",
                             tools=weather_tools(calls))
    assert result.text == "done"
    results = server.requests[1].tool_results()
    assert [r["tool_use_id"] for r in results] == ["toolu_1", "toolu_2", "toolu_3"]
    assert results[0]["content"] == "3"
    # JSON nulls reach the tool as the model sent them
    assert calls.log[2] == ("echo", {"value": {"keep": None, "nested": {"n": None}}})
    assert json.loads(results[2]["content"]) == {"keep": None, "nested": {"n": None}}


async def test_a_failing_tool_becomes_an_error_result_and_the_loop_goes_on(
        server: MessagesServer, client: anthropic.AsyncAnthropic) -> None:
    calls = Calls()
    server.script(
        Reply(tool_uses=[ToolUse("explode", {"reason": "overheated"}, "toolu_boom"),
                         ToolUse("add", {"a": 1}, "toolu_missing_arg"),
                         ToolUse("rm_rf", {"path": "/"}, "toolu_unknown"),
                         ToolUse("lookup", {"city": "Oslo"}, "toolu_not_chosen")]),
        Reply(text="The tool failed, so I stopped."))
    result = await run_agent(client, spec(tools=["explode", "add"]), "try it",
                             tools=weather_tools(calls))
    assert (result.text, result.stop_reason, result.turns) == (
        "The tool failed, so I stopped.", "end_turn", 2)
    by_id = {r["tool_use_id"]: r for r in server.requests[1].tool_results()}
    assert set(by_id) == {"toolu_boom", "toolu_missing_arg", "toolu_unknown", "toolu_not_chosen"}
    assert all(r["is_error"] is True for r in by_id.values())
    assert by_id["toolu_boom"]["content"] == "RuntimeError: disk on fire: overheated"
    assert "TypeError" in by_id["toolu_missing_arg"]["content"]
    assert "'b'" in by_id["toolu_missing_arg"]["content"]
    assert by_id["toolu_unknown"]["content"] == "unknown tool 'rm_rf'"
    # a registered tool the spec did not choose is not run either
    assert by_id["toolu_not_chosen"]["content"] == "unknown tool 'lookup'"
    assert [name for name, _ in calls.log] == ["explode"]


async def test_token_budget_stops_before_the_next_call(server: MessagesServer,
                                                       client: anthropic.AsyncAnthropic) -> None:
    calls = Calls()
    server.script(Reply(text="Thinking...", tool_uses=[ToolUse("lookup", {"city": "Oslo"})],
                        usage=Tokens(400, 200, 0, 0)),
                  Reply(text="never sent"))
    result = await run_agent(client, spec(token_budget=500), "q", tools=weather_tools(calls))
    assert (result.stop_reason, result.turns, result.text) == ("token_budget", 1, "Thinking...")
    assert len(server.requests) == 1
    assert server.unused == 1
    assert calls.log == []  # the tool the model asked for is not run past the budget
    assert result.usage.total == 600


async def test_an_answer_that_crosses_the_budget_still_ends_its_turn(
        server: MessagesServer, client: anthropic.AsyncAnthropic) -> None:
    """The budget stops the loop from going on; a final answer is reported as final."""
    server.script(Reply(text="Here is the complete answer.", usage=Tokens(400, 200)))
    result = await run_agent(client, spec(token_budget=500), "q", tools=weather_tools(Calls()))
    assert (result.stop_reason, result.turns) == ("end_turn", 1)
    assert result.text == "Here is the complete answer."


async def test_max_turns(server: MessagesServer, client: anthropic.AsyncAnthropic) -> None:
    calls = Calls()
    server.script(*[Reply(tool_uses=[ToolUse("add", {"a": i, "b": 1})]) for i in range(3)])
    result = await run_agent(client, spec(max_turns=2), "count", tools=weather_tools(calls))
    assert (result.stop_reason, result.turns) == ("max_turns", 2)
    assert len(server.requests) == 2
    assert server.unused == 1
    assert result.usage == summed(Tokens(), Tokens())


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("status", [529, 429, 500])
async def test_transient_errors_are_retried_by_the_sdk(server: MessagesServer,
                                                        client: anthropic.AsyncAnthropic,
                                                        status: int, stream: bool) -> None:
    server.script(Fail(status, "Overloaded" if status == 529 else "try again"),
                  Reply(text="fine now", usage=Tokens(7, 3)))
    result = await run_agent(client, spec(stream=stream), "q", tools=weather_tools(Calls()))
    assert result.text == "fine now"
    reqs = server.requests
    assert [r.answered for r in reqs] == [f"Fail {status}", "Reply"]
    assert reqs[1].headers["x-stainless-retry-count"] == "1"
    assert reqs[0].body == reqs[1].body
    assert result.usage == summed(Tokens(7, 3))  # a refused call costs nothing


async def test_overloaded_after_every_retry_is_an_llm_error(server: MessagesServer,
                                                             client: anthropic.AsyncAnthropic) -> None:
    server.script(*[Fail(529, "Overloaded")] * 3)
    with pytest.raises(LLMError) as info:
        await run_agent(client, spec(), "q", tools=weather_tools(Calls()))
    assert len(server.requests) == 3  # the first try and max_retries=2
    message = str(info.value)
    assert "529" in message
    assert "Overloaded" in message
    assert MODEL in message


async def test_a_bad_request_is_invalid_input_and_not_retried(server: MessagesServer,
                                                               client: anthropic.AsyncAnthropic) -> None:
    server.script(Fail(400, "max_tokens: 999999 > 64000, which is the maximum allowed"),
                  Reply(text="never"))
    with pytest.raises(InvalidInput) as info:
        await run_agent(client, spec(), "q", tools=weather_tools(Calls()))
    message = str(info.value)
    assert "400" in message
    assert "max_tokens: 999999 > 64000, which is the maximum allowed" in message
    assert MODEL in message
    assert len(server.requests) == 1
    assert server.unused == 1


async def test_a_refused_key_is_a_config_error_that_does_not_show_the_key(
        server: MessagesServer) -> None:
    wrong = make_client(api_key=CANARY, base_url=server.url, max_retries=2)
    try:
        with pytest.raises(ConfigError) as info:
            await run_agent(wrong, spec(), "q", tools=weather_tools(Calls()))
    finally:
        await wrong.close()
    assert "401" in str(info.value)
    assert "ANTHROPIC_API_KEY" in str(info.value)
    assert CANARY not in str(info.value)
    assert len(server.requests) == 1


async def test_an_error_in_the_middle_of_a_stream_names_the_error(
        server: MessagesServer, client: anthropic.AsyncAnthropic) -> None:
    server.script(StreamError("overloaded_error", "Overloaded"))
    with pytest.raises(LLMError) as info:
        await run_agent(client, spec(stream=True), "q", tools=weather_tools(Calls()))
    message = str(info.value)
    assert "overloaded_error" in message
    assert "Overloaded" in message
    assert "returned 200" not in message  # the HTTP status was fine; the stream was not


async def test_no_key_is_a_config_error_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match="ANTHROPIC_API_KEY"):
        make_client()


async def test_make_client_reads_key_and_base_url_from_the_environment(
        server: MessagesServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
    c = make_client(max_retries=0)
    try:
        server.script(Reply(text="from env"))
        result = await run_agent(c, spec(tools=[]), "q", tools={})
    finally:
        await c.close()
    assert result.text == "from env"
    assert server.requests[0].api_key == KEY



@pytest.mark.parametrize(("messages", "refusal"), [
    ([{"role": "user", "content": "q"},
      {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "add", "input": {}}]},
      {"role": "user", "content": "no result"}],
     "`tool_use` ids were found without `tool_result` blocks immediately after: t1"),
    ([{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t9", "content": "x"}]}],
     "unexpected `tool_use_id` found in `tool_result` blocks: t9"),
    ([{"role": "user", "content": "q"},
      {"role": "assistant", "content": [{"type": "text", "text": "a", "parsed_output": None}]},
      {"role": "user", "content": "more"}],
     "messages.1.content.0.text.parsed_output: Extra inputs are not permitted"),
    ([{"role": "user", "content": "q"}, {"role": "user", "content": "q"}],
     "messages.1.role: messages must alternate"),
])
async def test_the_server_refuses_what_the_api_refuses(server: MessagesServer,
                                                       client: anthropic.AsyncAnthropic,
                                                       messages: list[dict[str, Any]],
                                                       refusal: str) -> None:
    """The checks that make a clean run of the loop meaningful."""
    import anthropic

    server.script(Reply(text="never"))
    with pytest.raises(anthropic.BadRequestError) as info:
        await client.messages.create(model=MODEL, max_tokens=10, messages=messages)  # type: ignore[arg-type]
    assert refusal in str(info.value)
    assert server.unused == 1

# -- the request: prompt caching, tool definitions -------------------------------------------


async def test_requests_cache_the_system_prompt_and_the_tool_definitions(
        server: MessagesServer, client: anthropic.AsyncAnthropic) -> None:
    tools = weather_tools(Calls())
    server.script(Reply(tool_uses=[ToolUse("add", {"a": 1, "b": 1})]), Reply(text="2"))
    await run_agent(client, spec(tools=["lookup", "add", "echo"], temperature=0.2), "q",
                    tools=tools)
    for req in server.requests:  # every turn carries the same cacheable prefix
        body = req.body
        assert body["model"] == MODEL
        assert body["max_tokens"] == 1024
        assert body["temperature"] == 0.2
        assert body["system"] == [{"type": "text", "text": SYSTEM, "cache_control": EPHEMERAL}]
        assert [t["name"] for t in body["tools"]] == ["lookup", "add", "echo"]
        assert [t.get("cache_control") for t in body["tools"]] == [None, None, EPHEMERAL]
        assert body["tools"][0] == tools["lookup"].definition()
    # the registry's definitions are not changed by the loop
    assert "cache_control" not in tools["echo"].definition()


async def test_no_system_prompt_and_no_tools(server: MessagesServer,
                                             client: anthropic.AsyncAnthropic) -> None:
    server.script(Reply(text="plain"))
    result = await run_agent(client, spec(system="", tools=[]), "q", tools={})
    assert result.text == "plain"
    body = server.requests[0].body
    assert "system" not in body
    assert "tools" not in body
    assert "temperature" not in body


async def test_unknown_tools_in_the_spec_are_a_config_error(client: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(ConfigError, match="unknown tools \\['nope'\\]"):
        await run_agent(client, spec(tools=["add", "nope"]), "q", tools=weather_tools(Calls()))


class Address(TypedDict):
    street: str
    city: str


async def forecast(focus: TypeCheckingFocus, city: str, days: int = 3,
                   units: Literal["metric", "imperial"] = "metric",
                   tags: list[str] | None = None) -> dict[str, Any]:
    """Forecast the weather.

    Uses the focus to know which work asked."""
    return {"work": str(focus.work.id), "city": city, "days": days, "units": units, "tags": tags}


def ship(to: Address, express: bool = False) -> str:
    """Ship a parcel."""
    return f"{to['street']}, {to['city']}{' (express)' if express else ''}"


def test_tool_schema_from_a_typed_signature() -> None:
    tool = tool_from_function(forecast)
    assert tool.name == "forecast"
    assert tool.takes_focus
    assert tool.description == "Forecast the weather.\n\nUses the focus to know which work asked."
    assert tool.input_schema == {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer", "default": 3},
            "units": {"enum": ["imperial", "metric"], "default": "metric"},
            "tags": {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}],
                     "default": None},
        },
        "required": ["city"],
    }
    assert "focus" not in json.dumps(tool.input_schema)


def test_named_parameter_types_keep_their_definitions() -> None:
    tool = tool_from_function(ship)
    schema = tool.input_schema
    assert schema["required"] == ["to"]
    ref = schema["properties"]["to"]["$ref"]
    assert ref == "#/$defs/Address"
    assert schema["$defs"]["Address"]["properties"] == {"street": {"type": "string"},
                                                        "city": {"type": "string"}}


def test_explicit_schema_name_and_description_win() -> None:
    schema = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
    tool = tool_from_function(ship, name="send_parcel", description="Send it.", input_schema=schema)
    assert tool.definition() == {"name": "send_parcel", "description": "Send it.",
                                 "input_schema": schema}
    assert not tool.takes_focus


def test_untyped_parameters_are_refused() -> None:
    def loose(x, y: int) -> int:  # type: ignore[no-untyped-def]
        return int(y)

    with pytest.raises(ConfigError, match="parameter 'x' has no type"):
        tool_from_function(loose)


async def test_a_tool_taking_the_focus_receives_it(server: MessagesServer,
                                                   client: anthropic.AsyncAnthropic,
                                                   db: Db, tmp_path: Path) -> None:
    created = await db.submit_work(NewWorkItem("forecasting").params({"city": "Bergen"}))
    focus = Focus(await db.get_work_item(created.id), db, attempt=1,
                  log=logging.getLogger("test"), root=tmp_path)
    server.script(Reply(tool_uses=[ToolUse("forecast", {"city": "Bergen", "tags": ["rain"]})]),
                  Reply(text="Rain."))
    await run_agent(client, spec(tools=["forecast"]), "q",
                    tools={"forecast": tool_from_function(forecast)}, focus=focus)
    [res] = server.requests[1].tool_results()
    assert json.loads(res["content"]) == {"work": str(created.id), "city": "Bergen", "days": 3,
                                          "units": "metric", "tags": ["rain"]}
    # the model sent no ``focus``: the loop added it
    assert "focus" not in server.requests[1].messages[1]["content"][0]["input"]


# -- register_tools -------------------------------------------------------------------------------


class ToolPlugin:
    """A plugin registering tools in each of the accepted ways."""

    def __init__(self) -> None:
        self.greeted: list[str] = []

    @hookimpl
    def register_tools(self, register: Callable[..., None]) -> None:
        def greet(name: str, focus: TypeCheckingFocus | None = None) -> str:
            """Greet someone by name."""
            self.greeted.append(name)
            return f"Hello, {name}!" + (f" (for {focus.work.work_type})" if focus else "")

        def loud(text: str) -> str:
            return text.upper()

        register(greet)
        register(loud, name="shout", description="Shout the text.")
        register(Tool(name="ping", description="Answer pong.",
                      input_schema={"type": "object", "properties": {}},
                      function=lambda: "pong"))


class Clash:
    @hookimpl
    def register_tools(self, register: Callable[..., None]) -> None:
        def memory_store(content: str) -> str:
            return content

        register(memory_store)


def test_register_tools_collects_plugins_and_the_built_ins(tmp_path: Path) -> None:
    pm, _ = make_plugin_manager(engine_settings("postgresql://unused/db", tmp_path))
    pm.register(ToolPlugin(), name="test-tools")
    tools = collect_tools(pm)
    assert set(tools) == {"memory_search", "memory_store", "submit_work", "greet", "shout", "ping"}
    assert tools["shout"].definition() == {
        "name": "shout", "description": "Shout the text.",
        "input_schema": {"type": "object", "properties": {"text": {"type": "string"}},
                         "required": ["text"]}}
    assert tools["greet"].takes_focus
    assert tools["greet"].input_schema["required"] == ["name"]
    for name in ("memory_search", "memory_store", "submit_work"):
        assert tools[name].takes_focus
        assert "focus" not in tools[name].input_schema["properties"]
    assert tools["memory_search"].input_schema["required"] == ["query"]
    assert tools["submit_work"].input_schema["required"] == ["work_type"]
    pm.register(Clash(), name="clash")
    with pytest.raises(ConfigError, match="'memory_store' is registered twice"):
        collect_tools(pm)


async def test_plugin_tools_run_in_the_loop(server: MessagesServer,
                                            client: anthropic.AsyncAnthropic,
                                            tmp_path: Path) -> None:
    plugin = ToolPlugin()
    pm, _ = make_plugin_manager(engine_settings("postgresql://unused/db", tmp_path))
    pm.register(plugin, name="test-tools")
    server.script(Reply(tool_uses=[ToolUse("greet", {"name": "Ada"}), ToolUse("shout", {"text": "hi"}),
                                   ToolUse("ping", {})]),
                  Reply(text="Greeted."))
    result = await run_agent(client, spec(tools=["greet", "shout", "ping"]), "q",
                             tools=collect_tools(pm))
    assert result.text == "Greeted."
    assert plugin.greeted == ["Ada"]
    assert [r["content"] for r in server.requests[1].tool_results()] == ["Hello, Ada!", "HI", "pong"]


# -- telemetry --------------------------------------------------------------------------------------


async def test_model_calls_and_tools_are_genai_spans(server: MessagesServer,
                                                     client: anthropic.AsyncAnthropic,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(llm, "tracer", provider.get_tracer("test"))
    server.script(Reply(tool_uses=[ToolUse("explode", {"reason": "x"}, "toolu_x")],
                        usage=Tokens(11, 4)),
                  Reply(text="ok", usage=Tokens(13, 2)))
    await run_agent(client, spec(tools=["explode"]), "q", tools=weather_tools(Calls()))
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == [f"chat {MODEL}", "execute_tool explode", f"chat {MODEL}"]
    chat = spans[0].attributes or {}
    assert chat["gen_ai.operation.name"] == "chat"
    assert chat["gen_ai.provider.name"] == "anthropic"
    assert chat["gen_ai.request.model"] == MODEL
    assert chat["gen_ai.response.model"] == MODEL
    assert (chat["gen_ai.usage.input_tokens"], chat["gen_ai.usage.output_tokens"]) == (11, 4)
    assert chat["gen_ai.response.finish_reasons"] == ("tool_use",)
    tool = spans[1]
    assert (tool.attributes or {})["gen_ai.tool.call.id"] == "toolu_x"
    assert tool.status.status_code is StatusCode.ERROR


# -- pricing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("model", "prices"), [
    ("claude-sonnet-4-5", (3.0, 15.0)),
    ("claude-sonnet-4-20250514", (3.0, 15.0)),
    ("claude-haiku-4-5", (1.0, 5.0)),
    ("claude-opus-4-1", (15.0, 75.0)),
    ("claude-opus-4-5", (5.0, 25.0)),
    ("claude-3-5-haiku-latest", (0.8, 4.0)),
])
def test_cost_follows_the_price_table(model: str, prices: tuple[float, float]) -> None:
    usage = Usage(input_tokens=1_000_000, output_tokens=100_000,
                  cache_creation_input_tokens=200_000, cache_read_input_tokens=3_000_000)
    assert usage.cost_usd(model) == expected_cost(prices, usage)


def test_an_unpriced_model_has_no_cost() -> None:
    assert Usage(input_tokens=5).cost_usd("some-other-model") is None


# -- built-in tools against a real database ---------------------------------------------------------


async def make_focus(db: Db, tmp_path: Path, client: anthropic.AsyncAnthropic,
                     work_type: str = "research", *, unavailable: str | None = None,
                     **params: Any) -> Focus:
    """A focus built as the engine builds one; without memory, saying ``unavailable``."""
    created = await db.submit_work(NewWorkItem(work_type).params(params))
    item = await db.get_work_item(created.id)
    memory = await Memory.open(db, HashingEmbedder(64))
    pm, _ = make_plugin_manager(engine_settings(db.url, tmp_path))
    registry = collect_tools(pm)
    return Focus(item, db, attempt=1, log=logging.getLogger("test"), root=tmp_path,
                 memory=None if unavailable else memory.for_work(source="researcher",
                                                                 work_id=item.id),
                 memory_unavailable=unavailable or "", agent=ClaudeRunner(
                     lambda: (client, registry)),
                 submitter=GovernedWork(db, RuleSet()).child_submitter(item))


async def test_builtin_tools_remember_recall_and_submit(server: MessagesServer,
                                                        client: anthropic.AsyncAnthropic,
                                                        db: Db, db_url: str,
                                                        tmp_path: Path) -> None:
    focus = await make_focus(db, tmp_path, client, topic="capitals")
    server.script(
        Reply(tool_uses=[ToolUse("memory_store", {"content": "The capital of France is Paris."})],
              usage=Tokens(100, 10)),
        Reply(tool_uses=[ToolUse("memory_search", {"query": "capital of France", "k": 3})],
              usage=Tokens(120, 12)),
        Reply(tool_uses=[ToolUse("submit_work", {"work_type": "verify", "params": {"city": "Paris"},
                                                 "dedup_key": "verify-paris"}),
                         ToolUse("submit_work", {"work_type": "verify", "params": {"city": "Paris"},
                                                 "dedup_key": "verify-paris"})],
              usage=Tokens(140, 20)),
        Reply(text="Paris, noted and queued for verification.", usage=Tokens(160, 15)))
    result = await focus.agent(model=MODEL, system=SYSTEM, oriented={"known": []},
                               tools=["memory_store", "memory_search", "submit_work"])
    assert result.text == "Paris, noted and queued for verification."
    reqs = server.requests

    [stored] = reqs[1].tool_results()
    assert stored["is_error"] is False
    memory_id = json.loads(stored["content"])["id"]
    [found] = reqs[2].tool_results()
    hits = json.loads(found["content"])
    assert hits[0]["id"] == memory_id
    assert hits[0]["content"] == "The capital of France is Paris."
    assert hits[0]["type"] == "semantic"
    async with raw(db_url) as conn:
        row = await conn.fetchrow("SELECT source, work_id FROM animus.memories WHERE id = $1",
                                  UUID(memory_id))
    assert (row["source"], row["work_id"]) == ("researcher", focus.work.id)

    first, second = (json.loads(r["content"]) for r in reqs[3].tool_results())
    assert first["status"] == "created"
    assert first["state"] == "queued"
    assert "reason" not in first
    assert second["status"] == "merged"
    assert second["canonical_id"] == first["id"]
    child = await db.get_work_item(first["id"])
    assert child.parent_id == focus.work.id
    assert child.work_type == "verify"
    assert child.params == {"city": "Paris"}
    assert child.provenance.source == "agent:research"
    assert child.state is State.QUEUED

    # the focus keeps the usage for the engine to record with the outcome
    total = summed(Tokens(100, 10), Tokens(120, 12), Tokens(140, 20), Tokens(160, 15))
    assert focus.llm_usage == {MODEL: total}
    assert focus.llm_cost_usd == pytest.approx(expected_cost(PRICES["claude-sonnet-4"], total))
    # the first message is the documented template
    assert reqs[0].messages[0]["content"] == FIRST_MESSAGE.format(
        work_type="research", work_id=focus.work.id, attempt=1,
        params=json.dumps({"topic": "capitals"}, indent=2), oriented=json.dumps({"known": []}, indent=2))


async def test_builtin_memory_tools_without_memory_report_an_error(
        server: MessagesServer, client: anthropic.AsyncAnthropic, db: Db, tmp_path: Path) -> None:
    focus = await make_focus(db, tmp_path, client,
                             unavailable="memory is unavailable: the embedder is down")
    server.script(Reply(tool_uses=[ToolUse("memory_search", {"query": "x"})]), Reply(text="ok"))
    await focus.agent(model=MODEL, tools=["memory_search"], message="remember?")
    [res] = server.requests[1].tool_results()
    assert res["is_error"] is True
    assert res["content"] == "ConfigError: memory is unavailable: the embedder is down"
    assert server.requests[0].messages[0]["content"] == "remember?"


# -- through the engine -------------------------------------------------------------------------------


ORIENT = """
printf '%s' '{"found": ["an old note about the vault"], "n": 1}' > "$ANIMUS_FOCUS_DIR/orient-out.json"
"""

CONSOLIDATE = """
python - <<'EOF'
import json, os
d = os.environ["ANIMUS_FOCUS_DIR"]
with open(os.path.join(d, "engage-out.json")) as f:
    e = json.load(f)
out = {"answer": e["text"], "stop_reason": e["stop_reason"], "turns": e["turns"],
       "model": e["model"], "input_tokens": e["usage"]["input_tokens"],
       "cost_usd": e["cost_usd"], "messages": len(e["transcript"])}
with open(os.path.join(d, "consolidate-out.json"), "w") as f:
    json.dump(out, f)
EOF
"""


def llm_faculty(root: Path, name: str, accepts: str, *, hooks: dict[str, str],
                fields: dict[str, Any] | None = None) -> Path:
    prompt = root / f"{name}-prompt.md"
    prompt.write_text(f"You are the {name}. Store what matters.\n")
    engage = (f"\n[faculty.engage]\nmodel = {toml_value(MODEL)}\n"
              f"system_prompt_file = {toml_value(str(prompt))}\n"
              f'tools = ["memory_store", "submit_work"]\nmax_turns = 5\nmax_tokens = 2048\n')
    return write_toml_faculty(root, name, accepts=[accepts], hooks=hooks, fields=fields,
                              extra=engage)


async def test_toml_faculty_engages_claude_through_the_engine(
        db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fac = llm_faculty(tmp_path, "archivist", "archive",
                      hooks={"orient": ORIENT, "consolidate": CONSOLIDATE})
    usages = (Tokens(300, 40, 1200, 0), Tokens(90, 20, 0, 1200))
    with MessagesServer(api_key=KEY) as server:
        monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
        server.script(
            Reply(text="Filing it.", tool_uses=[
                ToolUse("memory_store", {"content": "The vault opens at dawn."}),
                ToolUse("submit_work", {"work_type": "index", "params": {"doc": "vault"}})],
                usage=usages[0]),
            Reply(text="Archived: the vault opens at dawn.", usage=usages[1]))
        async with run_engine(db_url, tmp_path / "home", faculties_dir=fac.parent) as running:
            assert running.problems == []
            assert running.engine.disabled == {}
            params = {"doc": "vault", "lines": 2}
            created = await running.db.submit_work(NewWorkItem("archive").params(params))
            item = await wait_finished(running.db, created.id)
            async with raw(db_url) as conn:
                children = await conn.fetch(
                    "SELECT id, work_type, params::text, state FROM animus.work_items "
                    "WHERE parent_id = $1", created.id)
                memories = await conn.fetch(
                    "SELECT content, source, work_id FROM animus.memories")
        reqs = server.requests

    assert item.state is State.COMPLETED, item.reason
    total = summed(*usages)
    cost = expected_cost(PRICES["claude-sonnet-4"], total)
    # consolidate's outcome is what the bash hook made of engage-out.json
    assert item.outcome.data == {"answer": "Archived: the vault opens at dawn.",
                                 "stop_reason": "end_turn", "turns": 2, "model": MODEL,
                                 "input_tokens": 390, "cost_usd": cost, "messages": 4}
    # work_items.usage: tokens by model, and the cost
    assert item.usage == {"models": {MODEL: {"input_tokens": 390, "output_tokens": 60,
                                             "cache_creation_input_tokens": 1200,
                                             "cache_read_input_tokens": 1200}},
                          "cost_usd": cost}
    # the tools acted on the real database
    assert [(c["work_type"], json.loads(c["params"]), c["state"]) for c in children] == [
        ("index", {"doc": "vault"}, "queued")]
    assert [(m["content"], m["source"], m["work_id"]) for m in memories] == [
        ("The vault opens at dawn.", "archivist", created.id)]
    # the request: system prompt from the file, the two tools, the documented first message
    assert len(reqs) == 2
    assert all(r.api_key == KEY for r in reqs)
    body = reqs[0].body
    assert body["system"] == [{"type": "text", "text": "You are the archivist. Store what matters.\n",
                               "cache_control": EPHEMERAL}]
    assert [t["name"] for t in body["tools"]] == ["memory_store", "submit_work"]
    assert body["max_tokens"] == 2048
    assert body["stream"] is True
    first = body["messages"][0]["content"]
    assert first == FIRST_MESSAGE.format(
        work_type="archive", work_id=created.id, attempt=1, params=json.dumps(params, indent=2),
        oriented=json.dumps({"found": ["an old note about the vault"], "n": 1}, indent=2))
    assert '"doc": "vault"' in first
    assert "an old note about the vault" in first


ECHO_ENGAGE = """
printf '%s' '{"echoed": true}' > "$ANIMUS_FOCUS_DIR/engage-out.json"
"""


async def test_missing_key_disables_only_that_faculty(
        db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    llm_faculty(tmp_path, "thinker", "think", hooks={})
    fac_dir = write_toml_faculty(tmp_path, "echo", hooks={"engage": ECHO_ENGAGE}).parent
    caplog.set_level(logging.INFO)
    with MessagesServer(api_key=KEY) as server:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
        async with run_engine(db_url, tmp_path / "home", faculties_dir=fac_dir) as running:
            assert set(running.engine.disabled) == {"thinker"}
            assert "ANTHROPIC_API_KEY" in running.engine.disabled["thinker"]
            assert "thinker" not in running.engine.faculties.by_name
            thought = await running.db.submit_work(NewWorkItem("think").params({"q": 1}))
            echoed = await running.db.submit_work(NewWorkItem("echo"))
            done = await wait_finished(running.db, echoed.id)
            assert done.state is State.COMPLETED
            assert done.outcome.data == {"echoed": True}
            await running.wait_quiet()
            waiting = await running.db.get_work_item(thought.id)
            assert waiting.state is State.QUEUED
            assert waiting.attempts == 0
        assert server.requests == []
        [disabled] = [r for r in caplog.records
                      if "is disabled" in r.getMessage() and r.levelno == logging.ERROR]
        assert disabled.levelno == logging.ERROR
        for part in ("thinker", "ANTHROPIC_API_KEY", "stays queued"):
            assert part in disabled.getMessage()

        # with the key, the next engine takes the queued work
        monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
        server.script(Reply(text="Thought about it."))
        async with run_engine(db_url, tmp_path / "home", faculties_dir=fac_dir,
                              settle=False) as running:
            assert running.engine.disabled == {}
            item = await wait_finished(running.db, thought.id)
    assert item.state is State.COMPLETED
    assert item.outcome.data["text"] == "Thought about it."  # no consolidate: engage's output
    assert item.outcome.data["transcript"][0]["role"] == "user"


LEAKY_ORIENT = """
env > "$ANIMUS_FOCUS_DIR/orient-env.txt"
printf '%s' '{"ok": true}' > "$ANIMUS_FOCUS_DIR/orient-out.json"
"""

FAILING_CONSOLIDATE = """
env > "$ANIMUS_FOCUS_DIR/consolidate-env.txt"
cat "$ANIMUS_FOCUS_DIR/engage-out.json" > "$ANIMUS_FOCUS_DIR/seen-by-consolidate.json"
echo "consolidate broke on purpose" >&2
exit 3
"""


async def test_the_api_key_never_leaks(db_url: str, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch,
                                       caplog: pytest.LogCaptureFixture) -> None:
    fac = llm_faculty(tmp_path, "leaky", "leak",
                      hooks={"orient": LEAKY_ORIENT, "consolidate": FAILING_CONSOLIDATE},
                      fields={"keep_failed": True, "max_attempts": 1})
    caplog.set_level(logging.DEBUG)
    with MessagesServer(api_key=CANARY) as server:
        monkeypatch.setenv("ANTHROPIC_API_KEY", CANARY)
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
        server.script(
            Reply(tool_uses=[ToolUse("memory_store", {"content": "remember the canary test"}),
                             ToolUse("submit_work", {"work_type": "follow", "params": {"a": 1}})]),
            Reply(text="done"),
            Fail(401, "invalid x-api-key"))  # the second item: the key is refused
        async with run_engine(db_url, tmp_path / "home", faculties_dir=fac.parent) as running:
            first = await running.db.submit_work(NewWorkItem("leak").params({"p": 1}))
            failed = await wait_finished(running.db, first.id)
            second = await running.db.submit_work(NewWorkItem("leak").params({"p": 2}))
            refused = await wait_finished(running.db, second.id)
            foci = running.foci_root
            await running.db.seal_audit()
        reqs = server.requests
    assert [r.api_key for r in reqs] == [CANARY] * 3  # the key was really used

    assert failed.state is State.DEAD
    assert "consolidate broke on purpose" in (failed.reason or "")
    assert refused.state is State.DEAD
    assert "401" in (refused.reason or "")
    assert "ANTHROPIC_API_KEY" in (refused.reason or "")

    # focus directories kept for debugging: work.json, engage-out.json, the hooks' env dumps
    kept = sorted(p for p in foci.rglob("*") if p.is_file())
    names = {p.name for p in kept}
    assert {"work.json", "engage-out.json", "orient-env.txt", "consolidate-env.txt",
            "seen-by-consolidate.json"} <= names
    for path in kept:
        assert CANARY not in path.read_text(errors="replace"), path
    assert "ANTHROPIC_API_KEY" not in next(foci.rglob("consolidate-env.txt")).read_text()

    async with raw(db_url) as conn:
        tables = {
            "audit": await conn.fetch("SELECT row_to_json(a)::text AS r FROM animus.audit_log a"),
            "work_items": await conn.fetch(
                "SELECT row_to_json(w)::text AS r FROM animus.work_items w"),
            "memories": await conn.fetch("SELECT row_to_json(m)::text AS r FROM animus.memories m"),
        }
    assert len(tables["work_items"]) == 3
    assert len(tables["audit"]) > 5  # the search saw rows
    assert any("consolidate broke on purpose" in r["r"] for r in tables["work_items"])
    for table, rows in tables.items():
        for row in rows:
            assert CANARY not in row["r"], f"the key is in {table}: {row['r'][:300]}"

    assert len(caplog.records) > 10
    assert any("kept focus directory" in r.getMessage() for r in caplog.records)
    for record in caplog.records:
        text = record.getMessage() + (record.exc_text or "") + repr(record.__dict__)
        assert CANARY not in text, f"the key is in a log record of {record.name}"


class Forecaster(Faculty):
    """A Python faculty whose engage asks Claude, with a plugin's tool."""

    name = "forecaster"
    accepts = ("forecast",)

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        result = await focus.agent(model="claude-haiku-4-5", tools=["greet"], stream=False,
                                   oriented=oriented, max_turns=3)
        return {"text": result.text}


async def test_plugin_tools_reach_a_python_faculty_through_the_engine(
        db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plugin = ToolPlugin()
    with MessagesServer(api_key=KEY) as server:
        monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
        server.script(Reply(tool_uses=[ToolUse("greet", {"name": "Grace"})], usage=Tokens(50, 5)),
                      Reply(text="Greeted Grace.", usage=Tokens(60, 6)))
        async with run_engine(db_url, tmp_path / "home", faculties=[Forecaster()],
                              plugins={"test-tools": plugin}) as running:
            created = await running.db.submit_work(NewWorkItem("forecast").params({"x": 1}))
            item = await wait_finished(running.db, created.id)
        reqs = server.requests
    assert item.state is State.COMPLETED, item.reason
    assert item.outcome.data == {"text": "Greeted Grace."}
    assert plugin.greeted == ["Grace"]
    # the tool got the focus: its result names the work type
    assert reqs[1].tool_results()[0]["content"] == "Hello, Grace! (for forecast)"
    assert all(not r.streamed for r in reqs)
    total = summed(Tokens(50, 5), Tokens(60, 6))
    assert item.usage == {"models": {"claude-haiku-4-5": {
        "input_tokens": 110, "output_tokens": 11, "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0}}, "cost_usd": expected_cost(PRICES["claude-haiku-4"], total)}



class FlakyThinker(Faculty):
    """Asks Claude, then fails its first attempt after the call (the tokens are spent)."""

    name = "flaky-thinker"
    accepts = ("flaky-think",)
    retry_base = 0.05

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        result = await focus.agent(model="claude-haiku-4-5", stream=False, oriented=oriented)
        if focus.attempt == 1:
            raise RuntimeError("lost the answer")
        return {"text": result.text}


async def test_a_failed_attempt_pays_its_turn_once_and_the_retry_replays_it(
        db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with MessagesServer(api_key=KEY) as server:
        monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
        server.script(Reply(text="first", usage=Tokens(10, 1)),
                      Reply(text="second", usage=Tokens(20, 2)))
        async with run_engine(db_url, tmp_path / "home", faculties=[FlakyThinker()]) as running:
            created = await running.db.submit_work(NewWorkItem("flaky-think"))
            item = await wait_finished(running.db, created.id)
            records = await running.db.executions(created.id)
        assert len(server.requests) == 1  # the retry replayed the recorded response
        assert server.unused == 1
    assert item.state is State.COMPLETED, item.reason
    assert item.attempts == 2
    assert item.outcome.data == {"text": "first"}
    assert item.usage == {"models": {"claude-haiku-4-5": {
        "input_tokens": 10, "output_tokens": 1, "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0}},
        "cost_usd": expected_cost(PRICES["claude-haiku-4"], summed(Tokens(10, 1)))}
    # the first attempt called the model and ran the step; the second only replayed it
    assert [(r.result, r.models) for r in records] == [
        ("failed", ["claude-haiku-4-5"]), ("completed", [])]
    assert [r.steps for r in records] == [
        {"ran": [{"position": 1, "name": "llm 1 turn 1"}], "replayed": []},
        {"ran": [], "replayed": [{"position": 1, "name": "llm 1 turn 1"}]}]


async def test_the_submit_tool_tells_the_model_when_a_rule_denied_the_work(
        db: Db, tmp_path: Path) -> None:
    """A denied item is still created (dead, with the rule's reason): the reply says so, so
    the model does not take it for queued work."""

    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "10.toml").write_text(
        "[[rule]]\nname = 'no deploys'\neffect = 'deny'\nwork_type = 'deploy'\n"
        "reason = 'deploys are frozen'\n")
    item = await db.get_work_item((await db.submit_work(NewWorkItem("research"))).id)
    db_work = GovernedWork(db, RuleSet.load(rules))
    focus = Focus(item, db, attempt=1, log=logging.getLogger("test"), root=tmp_path,
                  submitter=db_work.child_submitter(item))
    reply = await llm.submit_work(focus, "deploy", {"to": "prod"})
    assert reply["status"] == "created"
    assert reply["state"] == "dead"
    assert "deploys are frozen" in reply["reason"]
    assert (await db.get_work_item(reply["id"])).state == State.DEAD
