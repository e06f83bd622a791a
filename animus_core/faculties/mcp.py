"""Tools from MCP servers for the Claude engage loop, through the official ``mcp`` SDK.

An engine keeps one connection per declared server (:class:`McpTools`), opened when a focus
first needs its tools and kept for the foci after it: a stdio server is started once, not per
call. Each allowed tool becomes a :class:`~animus_core.faculties.llm.Tool` named
``mcp__SERVER__TOOL``, so the loop treats it as any tool: each call is a durable step (not
made again on resume), a rule or ``requires_approval`` can make it wait for a person, and its
name is in the step's record. What can go wrong becomes a tool error the model reads and a log
line, never a crashed engine: a server that does not start (its allowed tools answer why), a
call that times out or fails, a result over the size limit, a server that died (the next focus
starts it again).

A stdio server gets only the environment variables its declaration names (and the few the SDK
passes so that a program can run: PATH, HOME, ...); what it writes to stderr is logged with
the engine's secrets redacted, and so are its results before the model or the record sees
them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any, TextIO

import msgspec
from mcp.shared.exceptions import MCPError
from mcp_types import CONNECTION_CLOSED, REQUEST_TIMEOUT

from animus_core.faculties.llm import Tool
from animus_core.infra.secrets import redactor
from animus_core.values.mcp import McpServer, tool_name

__all__ = ["McpTools"]

_log = logging.getLogger("animus.mcp")
#: the schema of a tool whose server did not start (its real one is not known)
_ANY = {"type": "object", "properties": {}}


class McpTools:
    """The engine's MCP connections, by declaration."""

    def __init__(self) -> None:
        self._servers: dict[bytes, _Server] = {}
        self._lock = asyncio.Lock()

    async def tools(self, servers: Sequence[McpServer]) -> dict[str, Tool]:
        """The tools of ``servers`` as the model gets them, connecting to those not
        connected (at the same time)."""
        connected = await asyncio.gather(*(self._server(s) for s in servers))
        out: dict[str, Tool] = {}
        for server in connected:
            out.update(server.tools())
        return out

    async def close(self) -> None:
        servers, self._servers = list(self._servers.values()), {}
        await asyncio.gather(*(s.close() for s in servers), return_exceptions=True)

    async def _server(self, spec: McpServer) -> _Server:
        key = msgspec.json.encode(spec)
        async with self._lock:
            server = self._servers.get(key)
            if server is None or server.dead:
                if server is not None:
                    await server.close()
                server = self._servers[key] = _Server(spec)
        await server.started()
        return server


class _Server:
    """One connection: a task that holds the SDK's client open until closed (the SDK wants
    it entered and left in one task); calls go through it from any focus."""

    def __init__(self, spec: McpServer) -> None:
        self.spec = spec
        self.client: Any = None
        self.listed: list[Any] = []
        self.problem: str | None = None  # why it is not connected
        #: a server at a url: what it answered last with an HTTP error (its own words)
        self.refusal: str | None = None
        self.dead = False
        self._ready = asyncio.Event()
        self._closing = asyncio.Event()
        self._task = asyncio.create_task(self._hold(), name=f"animus-mcp-{spec.name}")

    async def started(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), self.spec.start_timeout + 1)
        if not self._ready.is_set():
            self.problem = (f"MCP server {self.spec.name} did not start within "
                            f"{self.spec.start_timeout:g} s")
            self.dead = True

    async def close(self) -> None:
        self._closing.set()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(self._task, 10)

    def tools(self) -> dict[str, Tool]:
        spec = self.spec
        allowed = set(spec.tools) if spec.tools is not None else None
        out: dict[str, Tool] = {}
        if self.problem is not None or self.client is None:
            for name in spec.tools or []:  # the model learns why each allowed tool fails
                out[tool_name(spec.name, name)] = self._tool(name, "", _ANY)
            return out
        for t in self.listed:
            if allowed is None or t.name in allowed:
                out[tool_name(spec.name, t.name)] = self._tool(
                    t.name, t.description or "", dict(t.input_schema or _ANY))
        return out

    def _tool(self, name: str, description: str, schema: dict[str, Any]) -> Tool:
        async def call(**arguments: Any) -> str:
            return await self.call(name, arguments)

        spec = self.spec
        return Tool(name=tool_name(spec.name, name),
                    description=f"{description} (from the MCP server {spec.name})".strip(),
                    input_schema=schema, function=call,
                    requires_approval=name in spec.requires_approval,
                    approval_role=spec.approval_role, approval_quorum=spec.approval_quorum)

    async def call(self, name: str, arguments: dict[str, Any]) -> str:
        """The text of the tool's result; raises :class:`ToolFailed` (the model reads it)."""
        spec = self.spec
        if self.client is None:
            raise ToolFailed(self.problem or f"MCP server {spec.name} is not connected")
        self.refusal = None  # what this call's HTTP answers say, not an earlier one's
        try:
            result = await self.client.call_tool(name, arguments,
                                                 read_timeout_seconds=spec.timeout)
        except Exception as e:  # the SDK's error, a timeout, a dead server: the model's to read
            refusal = self.refusal
            text = redactor.text(_why(e) + (f" ({refusal})" if refusal else ""))
            code = getattr(e, "code", None)
            if self._task.done() or code == CONNECTION_CLOSED or not isinstance(e, MCPError):
                self.dead = True  # the next focus starts it again
            _log.warning("MCP server %s: tool %s: %s", spec.name, name, text)
            if code == REQUEST_TIMEOUT or "timed out" in text:
                raise ToolFailed(f"MCP tool {name} of {spec.name} did not answer within "
                                 f"{spec.timeout:g} s") from None
            raise ToolFailed(f"MCP tool {name} of {spec.name} failed: {text}") from None
        out = redactor.text(_text(result))
        size = len(out.encode())
        if size > spec.max_result_bytes:
            raise ToolFailed(f"MCP tool {name} of {spec.name} answered {size:,} bytes, more "
                             f"than its limit of {spec.max_result_bytes:,} (max_result_bytes)")
        if getattr(result, "is_error", False):
            raise ToolFailed(f"MCP tool {name} of {spec.name}: {out}")
        return out

    async def _hold(self) -> None:
        from mcp import Client

        spec = self.spec
        errlog: TextIO | None = None
        http: Any = None
        try:
            if spec.url is not None:
                import httpx2
                from mcp.client.streamable_http import streamable_http_client

                async def refused(response: Any) -> None:
                    if response.status_code >= 400:  # the SDK says only that it failed
                        await response.aread()
                        self.refusal = f"HTTP {response.status_code}: {response.text[:300]}"

                # the SDK's own timeouts: a server may hold a response stream open a while
                http = httpx2.AsyncClient(headers=spec.http_headers(os.environ),
                                          timeout=httpx2.Timeout(30.0, read=300.0),
                                          event_hooks={"response": [refused]})
                transport: Any = streamable_http_client(spec.url, http_client=http)
            else:
                from mcp.client.stdio import StdioServerParameters, stdio_client

                assert spec.command is not None
                env = {n: os.environ[n] for n in spec.env if n in os.environ}
                errlog = _stderr_logger(spec.name)
                transport = stdio_client(StdioServerParameters(
                    command=spec.command, args=list(spec.args), env=env), errlog=errlog)
            # the SDK's read timeout bounds the handshake and the listing (its task group must
            # be entered and left in this task, so no timeout of ours goes around it)
            client = Client(transport, read_timeout_seconds=spec.start_timeout)
            await client.__aenter__()
            try:
                self.listed = list((await client.list_tools()).tools)
                self.client = client
                unknown = sorted(set(spec.tools or []) - {t.name for t in self.listed})
                if unknown:
                    _log.warning("MCP server %s lists no tool %s (it has %s)", spec.name,
                                 ", ".join(unknown), ", ".join(t.name for t in self.listed))
                self._ready.set()
                await self._closing.wait()
            finally:
                self.client = None
                await client.__aexit__(None, None, None)
        except Exception as e:  # a server that does not start is the model's to hear of
            why = _why(e) + (f" ({self.refusal})" if self.refusal else "")
            self.problem = f"MCP server {spec.name} could not be reached: {redactor.text(why)}"
            _log.warning("%s", self.problem)
        finally:
            self.dead = True
            self._ready.set()
            if errlog is not None:
                errlog.close()
            if http is not None:
                await http.aclose()


def _why(e: BaseException) -> str:
    """What went wrong, in words: the errors inside a task group's, not its name."""
    if isinstance(e, BaseExceptionGroup):
        return "; ".join(dict.fromkeys(_why(inner) for inner in e.exceptions))
    return str(e) or type(e).__name__


class ToolFailed(Exception):
    """An MCP call that did not give the model a result: what it reads instead."""

    def __str__(self) -> str:
        return str(self.args[0])


def _text(result: Any) -> str:
    """A call's result as the model reads it: its text blocks, else its structured content,
    else a description of each block."""
    parts = []
    for block in getattr(result, "content", None) or []:
        kind = getattr(block, "type", "")
        if kind == "text":
            parts.append(block.text)
        else:
            parts.append(json.dumps({"type": kind, "note": "not text: left out"}))
    if not parts and getattr(result, "structured_content", None) is not None:
        return json.dumps(result.structured_content, ensure_ascii=False, default=str)
    return "\n".join(parts)


def _stderr_logger(name: str) -> TextIO:
    """A file a stdio server writes its stderr to: each line is logged, secrets redacted."""
    read_fd, write_fd = os.pipe()

    def pump() -> None:
        with os.fdopen(read_fd, "r", errors="replace") as lines:
            for line in lines:
                if line.strip():
                    _log.info("MCP server %s: %s", name, redactor.text(line.rstrip()))

    threading.Thread(target=pump, name=f"animus-mcp-{name}-stderr", daemon=True).start()
    return os.fdopen(write_fd, "w")
