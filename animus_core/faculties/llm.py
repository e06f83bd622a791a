"""Engage with Claude: an agent loop over the ``anthropic`` SDK, with tools and budgets.

The loop sends the conversation, runs the tools the model asks for, sends their results
back, and stops when the model ends its turn, when ``max_turns`` is reached, or when the
token budget is spent. A tool that raises becomes an error tool result the model can react
to; it never crashes the focus. Every model call is a GenAI span with token usage.

Tools are plain functions (sync or async) registered through the ``register_tools`` hook;
their JSON schema is derived from the typed signature unless given. The built-ins
(``memory_search``, ``memory_store``, ``submit_work``) are registered the same way.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import time
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, get_type_hints

import msgspec
from opentelemetry import trace

from animus_core.faculties.contract import hookimpl
from animus_core.faculties.plugins import await_me_maybe
from animus_core.infra.secrets import redactor
from animus_core.infra.telemetry import instruments, tracer
from animus_core.values.agents import PRICES, AgentResult, AgentSpec, Usage
from animus_core.values.errors import ConfigError, InvalidInput, LLMError

if TYPE_CHECKING:
    import anthropic
    import pluggy

    from animus_core.faculties.focus import Focus

__all__ = [
    "PRICES",
    "AgentResult",
    "AgentSpec",
    "ClaudeRunner",
    "Tool",
    "Usage",
    "collect_tools",
    "make_client",
    "run_agent",
    "tool_from_function",
]

FIRST_MESSAGE = """Work item {work_type} ({work_id}), attempt {attempt}.

Parameters:
{params}

What orient found:
{oriented}"""


class Tool(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    description: str
    input_schema: dict[str, Any]
    function: Callable[..., Any]
    #: the tool wants the focus as its ``focus`` keyword argument
    takes_focus: bool = False

    def definition(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description,
                "input_schema": self.input_schema}


def _schema_for(annotation: Any, defs: dict[str, Any]) -> dict[str, Any]:
    """The JSON schema of ``annotation``; named types (TypedDict, dataclass, Struct) go to
    ``defs``, which the tool's ``input_schema`` carries so their ``#/$defs/..`` refs resolve."""
    schema = msgspec.json.schema(annotation)
    defs.update(schema.pop("$defs", {}))
    return schema


def _param_hints(function: Callable[..., Any]) -> dict[str, Any]:
    """The evaluated annotations of ``function``'s parameters except ``focus``: the model never
    sees it, and its type (``Focus``) is often imported only under ``TYPE_CHECKING``."""
    target = inspect.unwrap(function)
    annotations = {k: v for k, v in getattr(target, "__annotations__", {}).items()
                   if k not in ("focus", "return")}
    holder = types.SimpleNamespace(__annotations__=annotations)
    try:
        return get_type_hints(holder, globalns=getattr(target, "__globals__", None))
    except NameError as e:
        raise ConfigError(f"tool {getattr(function, '__name__', function)!r}: cannot resolve "
                          f"a parameter type: {e}") from None


def tool_from_function(function: Callable[..., Any], *, name: str | None = None,
                       description: str | None = None,
                       input_schema: dict[str, Any] | None = None) -> Tool:
    """A tool whose schema comes from ``function``'s typed signature (unless given)."""
    sig = inspect.signature(function)
    hints = _param_hints(function)
    takes_focus = "focus" in sig.parameters
    if input_schema is None:
        props: dict[str, Any] = {}
        defs: dict[str, Any] = {}
        required = []
        for pname, param in sig.parameters.items():
            if pname == "focus":
                continue
            if pname not in hints:
                raise ConfigError(f"tool {function.__name__}: parameter {pname!r} has no type")
            props[pname] = _schema_for(hints[pname], defs)
            if param.default is inspect.Parameter.empty:
                required.append(pname)
            else:
                props[pname]["default"] = param.default
        input_schema = {"type": "object", "properties": props, "required": required}
        if defs:
            input_schema["$defs"] = defs
    doc = inspect.getdoc(function) or ""
    return Tool(name=name or function.__name__, description=description or doc or function.__name__,
                input_schema=input_schema, function=function, takes_focus=takes_focus)


def collect_tools(pm: pluggy.PluginManager) -> dict[str, Tool]:
    tools: dict[str, Tool] = {}

    def register(tool: Tool | Callable[..., Any], **kwargs: Any) -> None:
        t = tool if isinstance(tool, Tool) else tool_from_function(tool, **kwargs)
        if t.name in tools:
            raise ConfigError(f"tool name {t.name!r} is registered twice")
        tools[t.name] = t

    pm.hook.register_tools(register=register)
    return tools


def make_client(*, api_key: str | None = None, base_url: str | None = None,
                max_retries: int = 4, timeout: float = 600.0) -> anthropic.AsyncAnthropic:
    """The SDK client, configured on purpose: retries with backoff on 408/409/429/5xx and
    529 (the SDK's own policy), a long read timeout for long generations, and an
    explicit error when no key is configured."""
    import anthropic

    key = api_key or os.environ.get("ANTHROPIC_API_KEY")
    if not key:
        raise ConfigError("ANTHROPIC_API_KEY is not set: faculties that engage Claude need it")
    return anthropic.AsyncAnthropic(
        api_key=key, base_url=base_url or os.environ.get("ANTHROPIC_BASE_URL") or None,
        max_retries=max_retries, timeout=anthropic.Timeout(timeout, connect=10.0))


async def _call_tool(tool: Tool, args: dict[str, Any], focus: Focus | None) -> tuple[str, bool]:
    kwargs = dict(args)
    if tool.takes_focus:
        kwargs["focus"] = focus
    try:
        if inspect.iscoroutinefunction(tool.function):
            result = await tool.function(**kwargs)
        else:
            result = await await_me_maybe(await asyncio.to_thread(tool.function, **kwargs))
    except Exception as e:
        return f"{type(e).__name__}: {e}", True
    if isinstance(result, str):
        return result, False
    try:
        return json.dumps(result, ensure_ascii=False, default=str), False
    except (TypeError, ValueError) as e:
        return f"tool result is not JSON: {e}", True


async def run_agent(client: anthropic.AsyncAnthropic, spec: AgentSpec, first_message: str, *,
                    tools: dict[str, Tool], focus: Focus | None = None) -> AgentResult:
    """Run the loop; see the module docstring."""
    import anthropic

    unknown = [t for t in spec.tools if t not in tools]
    if unknown:
        raise ConfigError(f"unknown tools {unknown}; known: {sorted(tools)}")
    chosen = [tools[t] for t in spec.tools]
    definitions = [t.definition() for t in chosen]
    if definitions:  # cache the tool definitions (and, with them, the system prompt)
        definitions[-1] = {**definitions[-1], "cache_control": {"type": "ephemeral"}}
    system = ([{"type": "text", "text": spec.system, "cache_control": {"type": "ephemeral"}}]
              if spec.system else [])
    messages: list[dict[str, Any]] = [{"role": "user", "content": first_message}]
    usage = Usage()
    text, stop_reason, turns = "", "max_turns", 0
    for turns in range(1, spec.max_turns + 1):  # noqa: B007
        request: dict[str, Any] = {"model": spec.model, "max_tokens": spec.max_tokens,
                                   "messages": messages}
        if system:
            request["system"] = system
        if definitions:
            request["tools"] = definitions
        if spec.temperature is not None:  # not a keyword of every SDK version's create/stream
            request["extra_body"] = {"temperature": spec.temperature}
        started = time.perf_counter()
        with tracer.start_as_current_span(f"chat {spec.model}", kind=trace.SpanKind.CLIENT,
                                          attributes={"gen_ai.operation.name": "chat",
                                                      "gen_ai.system": "anthropic",
                                                      "gen_ai.provider.name": "anthropic",
                                                      "gen_ai.request.model": spec.model,
                                                      "gen_ai.request.max_tokens": spec.max_tokens}
                                          ) as span:
            try:
                if spec.stream:
                    async with client.messages.stream(**request) as stream:
                        response = await stream.get_final_message()
                else:
                    response = await client.messages.create(**request)
            except anthropic.APIStatusError as e:
                span.set_status(trace.StatusCode.ERROR, redactor.text(str(e))[:300])
                span.set_attribute("error.type", str(e.status_code))
                raise _api_error(e, spec.model) from None
            except anthropic.APIConnectionError as e:
                span.set_status(trace.StatusCode.ERROR, redactor.text(str(e))[:300])
                raise LLMError(f"cannot reach the Anthropic API: {e}") from None
            finally:
                elapsed = time.perf_counter() - started
                attrs = {"gen_ai.operation.name": "chat", "gen_ai.system": "anthropic",
                         "gen_ai.request.model": spec.model}
                instruments.llm_duration.record(elapsed, attrs)
            span.set_attribute("gen_ai.response.model", response.model)
            span.set_attribute("gen_ai.response.id", response.id)
            span.set_attribute("gen_ai.response.finish_reasons", [response.stop_reason or ""])
            span.set_attribute("gen_ai.usage.input_tokens", response.usage.input_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", response.usage.output_tokens)
        usage.add(response.usage)
        base = {"gen_ai.system": "anthropic", "gen_ai.request.model": spec.model}
        instruments.tokens.record(response.usage.input_tokens,
                                  {**base, "gen_ai.token.type": "input"})
        instruments.tokens.record(response.usage.output_tokens,
                                  {**base, "gen_ai.token.type": "output"})
        content = [block.model_dump(exclude_none=True) for block in response.content]
        messages.append({"role": "assistant", "content": content})
        text = "".join(b.get("text", "") for b in content if b.get("type") == "text")
        stop_reason = response.stop_reason or "end_turn"
        uses = [b for b in content if b.get("type") == "tool_use"]
        if response.stop_reason != "tool_use" or not uses:
            break  # the model is done: its answer is final, whatever the budget says
        if spec.token_budget is not None and usage.total >= spec.token_budget:
            stop_reason = "token_budget"
            break
        results = []
        for use in uses:
            tool = tools.get(use["name"])
            if tool is None or use["name"] not in spec.tools:
                out, is_error = f"unknown tool {use['name']!r}", True
            else:
                with tracer.start_as_current_span(f"execute_tool {use['name']}", attributes={
                        "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": use["name"],
                        "gen_ai.tool.call.id": use["id"]}) as tspan:
                    out, is_error = await _call_tool(tool, use.get("input") or {}, focus)
                    if is_error:
                        tspan.set_status(trace.StatusCode.ERROR, redactor.text(out)[:300])
            results.append({"type": "tool_result", "tool_use_id": use["id"], "content": out,
                            "is_error": is_error})
        messages.append({"role": "user", "content": results})
    else:
        stop_reason = "max_turns"
    return AgentResult(text=text, stop_reason=stop_reason, turns=turns, usage=usage,
                       cost_usd=usage.cost_usd(spec.model), model=spec.model,
                       transcript=messages)


class ClaudeRunner:
    """The agent runner a focus is built with (:data:`animus_core.faculties.focus.AgentRunner`):
    runs :func:`run_agent` with the client and tools ``access()`` returns, made on first use
    (so an engine without ``ANTHROPIC_API_KEY`` fails only the foci that engage Claude)."""

    def __init__(self, access: Callable[[], tuple[anthropic.AsyncAnthropic, dict[str, Tool]]]
                 ) -> None:
        self._access = access

    async def __call__(self, focus: Focus, spec: AgentSpec, message: str | None,
                       oriented: Any) -> AgentResult:
        client, tools = self._access()
        return await run_agent(client, spec, message or first_message(focus, oriented),
                               tools=tools, focus=focus)


def _api_error(e: Any, model: str) -> Exception:
    body = getattr(e, "body", None)
    error = body.get("error", {}) if isinstance(body, dict) else {}
    message = error.get("message") if isinstance(error, dict) else None
    if e.status_code < 400:  # an ``error`` event inside a stream that had started fine
        kind = error.get("type") if isinstance(error, dict) else None
        return LLMError(f"the Anthropic API stream for model {model} failed mid-way with "
                        f"{kind or 'an error'}: {message or e}")
    text = f"Anthropic API returned {e.status_code} for model {model}: {message or e}"
    if e.status_code in (401, 403):
        return ConfigError(f"{text} (check ANTHROPIC_API_KEY)")
    if e.status_code in (400, 404, 413, 422):
        return InvalidInput(f"{text} (the request was refused; retrying will not help)")
    return LLMError(f"{text} (after the SDK's retries)")


def first_message(focus: Focus, oriented: Any) -> str:
    """The documented template for the first user message."""
    return FIRST_MESSAGE.format(
        work_type=focus.work.work_type, work_id=focus.work.id, attempt=focus.attempt,
        params=json.dumps(focus.work.params, indent=2, ensure_ascii=False),
        oriented=json.dumps(oriented, indent=2, ensure_ascii=False, default=str))


# -- built-in tools ----------------------------------------------------------------------------


async def memory_search(focus: Focus, query: str, k: int = 5) -> list[dict[str, Any]]:
    """Search long-term memory (hybrid keyword + semantic). Returns the best matches."""
    found = await focus.memory.search(query, k=max(1, min(k, 50)))
    return [{"id": str(m.id), "content": m.content, "type": m.memory_type, "score": m.score}
            for m in found]


async def memory_store(focus: Focus, content: str, memory_type: str = "semantic") -> dict[str, str]:
    """Store something worth remembering in long-term memory."""
    record = await focus.memory.store(content, memory_type=memory_type)
    return {"id": str(record.id)}


async def submit_work(focus: Focus, work_type: str, params: dict[str, Any] | None = None,
                      dedup_key: str | None = None) -> dict[str, str]:
    """Submit follow-up work (a child of the current work item) for another faculty."""
    from animus_core.values.work import Created, NewWorkItem

    item = NewWorkItem(work_type, source=f"agent:{focus.work.work_type}").params(params or {})
    if dedup_key:
        item = item.dedup_key(dedup_key)
    result = await focus.submit(item)
    reply = {"id": str(result.id), "status": "created" if isinstance(result, Created) else "merged",
             "canonical_id": str(result.canonical_id)}
    if isinstance(result, Created):
        # queued, or what a rule made of it: awaiting_approval, or dead with the reason
        reply["state"] = str(result.item.state)
        if result.item.state != "queued":
            reply["reason"] = result.item.reason or ""
    return reply


@hookimpl
def register_tools(register: Callable[..., None]) -> None:
    for fn in (memory_search, memory_store, submit_work):
        register(fn)

