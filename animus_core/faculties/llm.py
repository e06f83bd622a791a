"""Engage with Claude: an agent loop over the ``anthropic`` SDK, with tools and budgets.

The loop sends the conversation, runs the tools the model asks for, sends their results
back, and stops when the model ends its turn, when ``max_turns`` is reached, or when the
token budget is spent. A tool that raises becomes an error tool result the model can react
to; it never crashes the focus (only the focus's own ``LeaseLost`` and ``StepOrderChanged``
go through). Every model call is a GenAI span with token usage.

In a focus, the loop is durable: each model response and each tool result is a step of the
focus (``llm N turn T``, ``llm N tool T.I NAME``), so a later attempt replays the recorded
turns instead of asking the API again and does not run recorded tool calls again. A turn's
usage is added to the item's usage with its step, once (see :class:`_Loop`, docs/agents.md).

Tools are plain functions (sync or async) registered through the ``register_tools`` hook;
their JSON schema is derived from the typed signature unless given. The built-ins
(``memory_search``, ``memory_store``, ``submit_work``) are registered the same way.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import os
import time
import types
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, get_type_hints

import msgspec
from opentelemetry import trace

from animus_core.faculties.contract import hookimpl
from animus_core.faculties.plugins import await_me_maybe
from animus_core.governance.rules import RuleSet
from animus_core.infra.secrets import redactor
from animus_core.infra.telemetry import instruments, tracer
from animus_core.values import json_values
from animus_core.values.agents import PRICES, AgentResult, AgentSpec, Usage
from animus_core.values.errors import (
    ConfigError,
    InvalidInput,
    LeaseLost,
    LLMError,
    StepOrderChanged,
)
from animus_core.values.limits import limits
from animus_core.values.mcp import McpServer
from animus_core.values.steps import StepPolicy
from animus_core.values.waits import check_approval

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
    #: each call waits for a person's approval (``focus.approval``) before it runs: by
    #: ``approval_quorum`` members of ``animus_<approval_role>``
    requires_approval: bool = False
    approval_role: str = "approver"
    approval_quorum: int = 1

    def __post_init__(self) -> None:
        if self.requires_approval:
            check_approval(f"tool {self.name}", self.approval_role, self.approval_quorum)

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
                       input_schema: dict[str, Any] | None = None,
                       requires_approval: bool = False, approval_role: str = "approver",
                       approval_quorum: int = 1) -> Tool:
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
                input_schema=input_schema, function=function, takes_focus=takes_focus,
                requires_approval=requires_approval, approval_role=approval_role,
                approval_quorum=approval_quorum)


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
    except (LeaseLost, StepOrderChanged):
        raise  # the attempt cannot go on: not the tool's failure for the model to see
    except Exception as e:
        return f"{type(e).__name__}: {e}", True
    if isinstance(result, str):
        return result, False
    try:
        return json.dumps(result, ensure_ascii=False, default=str), False
    except (TypeError, ValueError) as e:
        return f"tool result is not JSON: {e}", True


async def run_agent(client: anthropic.AsyncAnthropic, spec: AgentSpec, first_message: str, *,
                    tools: dict[str, Tool], focus: Focus | None = None,
                    rules: RuleSet | None = None,
                    mcp_tools: dict[str, Tool] | None = None) -> AgentResult:
    """Run the loop; see the module docstring. In a focus with durable steps each model
    response and each tool result is a step (:class:`_Loop`). ``rules``' tool rules decide
    each tool call (allowed, refused, or waiting for an approval). ``mcp_tools``: the tools of
    ``spec.mcp``'s servers, offered besides ``spec.tools``."""
    unknown = [t for t in spec.tools if t not in tools]
    if unknown:
        raise ConfigError(f"unknown tools {unknown}; known: {sorted(tools)}")
    return await _Loop(client, spec, tools, focus, rules, mcp_tools or {}).run(first_message)


class _Loop:
    """One run of the agent loop.

    In a focus with durable steps (``focus.steps``), the n-th loop of the focus (counted by
    ``focus.agent_loops``) records turn T's response as the step ``llm N turn T`` and the
    I-th tool call of turn T as ``llm N tool T.I NAME``. A later attempt replays them: a
    recorded turn is not requested again, a recorded tool call is not run again, and the
    conversation is rebuilt from the record (its first message is the recorded one). A
    turn's usage is added to the item's usage in the transaction that records it, and only
    then; a replayed turn adds nothing. Without steps (or without a focus) nothing is
    recorded and every turn is requested.
    """

    def __init__(self, client: anthropic.AsyncAnthropic, spec: AgentSpec,
                 tools: dict[str, Tool], focus: Focus | None,
                 rules: RuleSet | None = None, mcp_tools: dict[str, Tool] | None = None) -> None:
        self.client = client
        self.rules = rules
        self.spec = spec
        self.tools = {**(mcp_tools or {}), **tools}
        #: what the model is offered: the named tools, then the MCP servers'
        self.offered = [*spec.tools, *(t for t in (mcp_tools or {}) if t not in spec.tools)]
        self.focus = focus
        self.journal = focus.steps if focus is not None else None
        if focus is not None:
            focus.agent_loops += 1
        self.prefix = f"llm {focus.agent_loops if focus is not None else 1}"
        definitions = [self.tools[t].definition() for t in self.offered]
        if definitions:  # cache the tool definitions (and, with them, the system prompt)
            definitions[-1] = {**definitions[-1], "cache_control": {"type": "ephemeral"}}
        self.definitions = definitions
        self.system = ([{"type": "text", "text": spec.system,
                         "cache_control": {"type": "ephemeral"}}] if spec.system else [])

    async def run(self, first_message: str) -> AgentResult:
        spec = self.spec
        messages: list[dict[str, Any]] = [{"role": "user", "content": first_message}]
        usage = Usage()  # of the whole conversation, replayed turns included
        text, stop_reason, turns = "", "max_turns", 0
        for turns in range(1, spec.max_turns + 1):
            response = await self._turn(turns, messages)
            if turns == 1:  # the conversation goes on from the message it was started with
                messages[0] = {"role": "user", "content": response["request"]["message"]}
            usage.add(msgspec.convert(response["usage"], Usage))
            content = response["content"]
            messages.append({"role": "assistant", "content": content})
            text = "".join(b.get("text", "") for b in content if b.get("type") == "text")
            stop_reason = response["stop_reason"] or "end_turn"
            uses = [b for b in content if b.get("type") == "tool_use"]
            if response["stop_reason"] != "tool_use" or not uses:
                break  # the model is done: its answer is final, whatever the budget says
            if spec.token_budget is not None and usage.total >= spec.token_budget:
                stop_reason = "token_budget"
                break
            results = [await self._tool(turns, index, use)
                       for index, use in enumerate(uses, 1)]
            messages.append({"role": "user", "content": results})
        else:
            stop_reason = "max_turns"
        return AgentResult(text=text, stop_reason=stop_reason, turns=turns, usage=usage,
                           cost_usd=usage.cost_usd(spec.model), model=spec.model,
                           transcript=messages)

    # -- a turn: one model response ----------------------------------------------------------

    def _request(self) -> dict[str, Any]:
        """What identifies the loop's requests apart from the conversation: a recorded turn
        answers a request made with these."""
        spec = self.spec
        request = {"model": spec.model, "tools": list(spec.tools), "max_tokens": spec.max_tokens,
                   "system_sha256": hashlib.sha256(spec.system.encode()).hexdigest(),
                   "temperature": spec.temperature}
        if spec.mcp:  # the servers declared, not the tools they list (which may change)
            request["mcp"] = [s.name for s in spec.mcp]
        return request

    async def _turn(self, turn: int, messages: list[dict[str, Any]]) -> dict[str, Any]:
        """The response of turn ``turn`` to ``messages``, as JSON (``content``,
        ``stop_reason``, ``usage``, ``model``, ``id``; turn 1 also the ``request``: the
        first message and what :meth:`_request` says): requested, or replayed."""
        name = f"{self.prefix} turn {turn}"
        paid: list[Usage] = []  # set once the API answered: the call is paid for

        async def call() -> dict[str, Any]:
            response = await self._create(messages)
            used = Usage()
            used.add(response.usage)
            paid.append(used)
            result: dict[str, Any] = {
                "id": response.id, "model": response.model,
                "content": [block.model_dump(exclude_none=True) for block in response.content],
                "stop_reason": response.stop_reason, "usage": msgspec.structs.asdict(used)}
            if turn == 1:
                result["request"] = {**self._request(), "message": messages[0]["content"]}
            if self.journal is not None:
                what = f"the model's response of {name!r}"
                _check_size(result, what + (" with the first message" if turn == 1 else ""),
                            "raise ANIMUS_MAX_OUTCOME_BYTES, or lower max_tokens so that "
                            "a response fits")
            return result

        def charge(_: Any) -> dict[str, Any]:
            return _usage_record(self.spec.model, paid[0])

        try:
            result = await self._durable(name, call, charge)
        except BaseException:
            if paid and self.focus is not None:  # paid, but no step recorded it
                self.focus.spent(self.spec.model, paid[0], recorded=False)
            raise
        if paid:
            if self.focus is not None:
                self.focus.spent(self.spec.model, paid[0], recorded=self.journal is not None)
        elif turn == 1:
            self._check_replay(name, result)
        return result

    def _check_replay(self, name: str, recorded: dict[str, Any]) -> None:
        """A replayed first turn must answer this loop's request: else StepOrderChanged."""
        was = {k: v for k, v in recorded["request"].items() if k != "message"}
        now = self._request()
        changed = [f"{k} {was.get(k)!r} then, {now[k]!r} now" for k in now if was.get(k) != now[k]]
        if changed:
            work = self.focus.work.id if self.focus is not None else None
            raise StepOrderChanged(
                f"StepOrderChanged: step {name!r} in the record of work item {work} answered "
                f"another agent loop than this attempt's ({'; '.join(changed)}): a focus must "
                "run its agent loops the same way on every attempt, so the record cannot be "
                "replayed and retrying cannot help (rerun or replay the item, with "
                f"--from-step {name!r} to keep the steps before it)")

    async def _create(self, messages: list[dict[str, Any]]) -> anthropic.types.Message:
        """One call of the Messages API, as a GenAI span."""
        import anthropic

        spec = self.spec
        request: dict[str, Any] = {"model": spec.model, "max_tokens": spec.max_tokens,
                                   "messages": messages}
        if self.system:
            request["system"] = self.system
        if self.definitions:
            request["tools"] = self.definitions
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
                if spec.stream:  # the step records the final message, as assembled
                    async with self.client.messages.stream(**request) as stream:
                        response = await stream.get_final_message()
                else:
                    response = await self.client.messages.create(**request)
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
        base = {"gen_ai.system": "anthropic", "gen_ai.request.model": spec.model}
        instruments.tokens.record(response.usage.input_tokens,
                                  {**base, "gen_ai.token.type": "input"})
        instruments.tokens.record(response.usage.output_tokens,
                                  {**base, "gen_ai.token.type": "output"})
        return response

    # -- tool calls --------------------------------------------------------------------------

    async def _tool(self, turn: int, index: int, use: dict[str, Any]) -> dict[str, Any]:
        """The ``tool_result`` block answering ``use``, the ``index``-th tool use of turn
        ``turn``: every tool call of the loop is dispatched here, as the step
        ``llm N tool T.I NAME`` (a check before the tool runs, such as an approval, goes
        here too, before the step)."""
        tool_name = str(use.get("name", ""))
        tool = self.tools.get(tool_name) if tool_name in self.offered else None
        name = f"{self.prefix} tool {turn}.{index} {tool_name[:64]}"
        # decided before the tool's step (an approval is a step of its own), on every
        # attempt: a replay meets the same decision, recorded
        refusal = await self._gate(tool, tool_name, use) if tool is not None else None

        async def call() -> dict[str, Any]:
            if tool is None:
                return {"content": f"unknown tool {tool_name!r}", "is_error": True}
            if refusal is not None:
                return {"content": refusal, "is_error": True}
            with tracer.start_as_current_span(f"execute_tool {tool_name}", attributes={
                    "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": tool_name,
                    "gen_ai.tool.call.id": use["id"]}) as span:
                out, is_error = await _call_tool(tool, use.get("input") or {}, self.focus)
                if self.journal is not None:
                    out, is_error = _fitted(out, is_error, name)
                if is_error:
                    span.set_status(trace.StatusCode.ERROR, redactor.text(out)[:300])
            return {"content": out, "is_error": is_error}

        result = await self._durable(name, call)
        return {"type": "tool_result", "tool_use_id": use["id"], "content": result["content"],
                "is_error": result["is_error"]}

    async def _gate(self, tool: Tool, tool_name: str, use: dict[str, Any]) -> str | None:
        """Whether the call ``use`` of ``tool`` may run: None, or why not (the tool result
        the model gets). A tool rule denies it, or makes it wait for an approval, as
        ``requires_approval`` on the tool does; a rejection is a refusal with its reason."""
        args = use.get("input") or {}
        role, quorum = tool.approval_role, tool.approval_quorum
        needs = tool.requires_approval
        if self.rules is not None and self.focus is not None:
            work = self.focus.work
            decision = self.rules.decide_tool(tool_name, args, work_type=work.work_type,
                                              source=work.provenance.source)
            if decision.effect == "deny":
                return f"refused by rule {decision.rule!r}: {decision.reason}"
            if decision.effect == "require_approval":
                needs, role = True, decision.role or role
                quorum = max(quorum if tool.requires_approval else 1, decision.quorum)
        if not needs:
            return None
        if self.journal is None or self.focus is None:
            return (f"tool {tool_name!r} needs a person's approval, which only a focus with "
                    "durable steps can wait for")
        shown = redactor.text(json.dumps(args, ensure_ascii=False, default=str))
        why = f"the model calls tool {tool_name} with {shown[:500]}"
        verdict = await self.focus.approval(why, role=role, quorum=quorum)
        if verdict.approved:
            return None
        return (f"a person rejected this call ({', '.join(verdict.by)}): "
                f"{verdict.reason}")

    async def _durable(self, name: str, fn: Callable[[], Awaitable[dict[str, Any]]],
                       usage: Callable[[Any], dict[str, Any]] | None = None) -> dict[str, Any]:
        """``fn()`` as the durable step ``name`` (when the loop has steps)."""
        if self.journal is None:
            return await fn()
        result: dict[str, Any] = await self.journal.run(name, fn, (), {}, StepPolicy(),
                                                        usage=usage)
        return result


def _usage_record(model: str, usage: Usage) -> dict[str, Any]:
    """One call's usage as the item's totals take it."""
    return {"models": {model: msgspec.structs.asdict(usage)},
            "cost_usd": usage.cost_usd(model) or 0.0}


def _json_bytes(value: Any, where: str) -> int:
    """The size of ``value`` as a step stores it (redacted, compact JSON)."""
    return len(json_values.encode(redactor.json(value), where).encode())


def _check_size(value: Any, what: str, advice: str) -> None:
    limit = limits().outcome_bytes
    size = _json_bytes(value, what)
    if size > limit:
        raise InvalidInput(f"{what} is {size} bytes of JSON, over the limit of {limit} bytes "
                           f"(ANIMUS_MAX_OUTCOME_BYTES) of what a step keeps: {advice}")


def _fitted(out: str, is_error: bool, name: str) -> tuple[str, bool]:
    """A tool's result as its step can keep it: one too large for the step becomes an
    error result saying so (the model can ask for less)."""
    limit = limits().outcome_bytes
    size = _json_bytes({"content": out, "is_error": is_error}, name)
    if size <= limit:
        return out, is_error
    return (f"the tool's result is {size} bytes of JSON, over the limit of {limit} bytes "
            "(ANIMUS_MAX_OUTCOME_BYTES) of what a step keeps: ask for less"), True


class ClaudeRunner:
    """The agent runner a focus is built with (:data:`animus_core.faculties.focus.AgentRunner`):
    runs :func:`run_agent` with the client and tools ``access()`` returns, made on first use
    (so an engine without ``ANTHROPIC_API_KEY`` fails only the foci that engage Claude)."""

    def __init__(self, access: Callable[[], tuple[anthropic.AsyncAnthropic, dict[str, Tool]]],
                 *, rules: RuleSet | None = None,
                 mcp: Callable[[Sequence[McpServer]], Awaitable[dict[str, Tool]]] | None = None,
                 ) -> None:
        """``mcp(servers)``: the tools of MCP servers (the engine's
        :class:`~animus_core.faculties.mcp.McpTools`)."""
        self._access = access
        self._rules = rules
        self._mcp = mcp

    async def __call__(self, focus: Focus, spec: AgentSpec, message: str | None,
                       oriented: Any) -> AgentResult:
        client, tools = self._access()
        mcp_tools: dict[str, Tool] = {}
        if spec.mcp:
            if self._mcp is None:
                raise ConfigError("this engine cannot reach MCP servers")
            mcp_tools = await self._mcp(spec.mcp)
        return await run_agent(client, spec, message or first_message(focus, oriented),
                               tools=tools, focus=focus, rules=self._rules,
                               mcp_tools=mcp_tools)


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

