"""An animus as an MCP server (``animus mcp``): what a model, or Claude Code or Claude
Desktop, may ask of it, built with the official ``mcp`` SDK.

Every call runs on a database connection that is someone: over stdio, the server's, acting as
one animus role (``animus mcp --role ROLE``: ``SET ROLE animus_ROLE`` on each connection);
over HTTP, the connection of the console's person whose token the request carries (their own
login role, as in the console). So the database decides what a call may do and the audit names
who made it. Submissions go through the rules, as any submission does. Deciding an approval
is not a tool: approval is a person's act, and a model that could approve could approve its
own work (docs/mcp.md says why at more length).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import ASGIApp, Receive, Scope, Send

from animus_core import __version__
from animus_core.governance.rules import RuleSet
from animus_core.governance.work import GovernedWork
from animus_core.store import read
from animus_core.store.db import Db
from animus_core.store.memory import Embedder, Memory
from animus_core.values.errors import AnimusError
from animus_core.values.work import Created, NewWorkItem, WorkItem
from animus_core.web.people import People, Person

__all__ = ["TOOLS", "Access", "mcp_http_app", "mcp_server"]

T = TypeVar("T")
#: the database a call runs on, as whoever makes it
Access = Callable[[Context], Awaitable[Db]]

#: the tools, in the order they are listed
TOOLS = ("submit_work", "get_work", "list_work", "signal_work", "pending_approvals",
         "search_memory", "store_memory", "status")
INSTRUCTIONS = """This is an animus: work items queued in Postgres and run by its engines'
faculties. Submit work with submit_work (the animus's rules may deny it or hold it for a
person's approval), follow it with get_work, and find work with list_work. Approvals are
decided by people, never through this server."""


def mcp_server(access: Access, rules: RuleSet, embedder: Embedder | None) -> MCPServer:
    """The MCP server whose calls run on the database ``access`` gives for each."""
    server = MCPServer("animus", version=__version__, instructions=INSTRUCTIONS)

    async def answer(ctx: Context, run: Callable[[Db], Awaitable[T]]) -> T:
        """What a tool answers, run on the caller's database; an animus error (the database
        refused, bad input) becomes the tool error the client reads, in animus's words."""
        try:
            return await run(await access(ctx))
        except AnimusError as e:
            raise ToolError(str(e)) from None

    @server.tool()
    async def submit_work(ctx: Context, work_type: str, params: dict[str, Any] | None = None,
                          dedup_key: str | None = None, priority: int = 0) -> dict[str, Any]:
        """Submit a work item of work_type with JSON params. Answers its id and state:
        queued, or dead or awaiting_approval when a rule denied or gated it (with the reason);
        merged, with the id of the live item it joined, when one of the type holds the same
        dedup_key."""
        async def run(db: Db) -> dict[str, Any]:
            item = NewWorkItem(work_type, source="mcp").params(params or {}).priority(priority)
            if dedup_key is not None:
                item = item.dedup_key(dedup_key)
            result = await GovernedWork(db, rules).submit(item)
            if isinstance(result, Created):
                return {"id": str(result.id), "created": True, "state": str(result.item.state),
                        "reason": result.item.reason}
            return {"id": str(result.canonical_id), "created": False, "state": "merged"}
        return await answer(ctx, run)

    @server.tool()
    async def get_work(ctx: Context, id: str) -> dict[str, Any]:
        """A work item: its type, state and reason, params, outcome or error, what it waits
        for, its attempts, parent and times."""
        return await answer(ctx, lambda db: _item(db, id))

    @server.tool()
    async def list_work(ctx: Context, state: str | None = None, work_type: str | None = None,
                        source: str | None = None, parent: str | None = None,
                        limit: int = 20, before: str | None = None) -> list[dict[str, Any]]:
        """Work items, newest first, filtered by state, work_type, source and parent; at most
        limit (1-200). For the next page, pass before: the id of the last item of this one."""
        if not 1 <= limit <= 200:
            raise ToolError(f"limit must be from 1 to 200, got {limit}")

        async def run(db: Db) -> list[dict[str, Any]]:
            items = await db.list_work(state=state, work_type=work_type, source=source,
                                       parent_id=parent, limit=limit, before=before)
            return [_brief(w) for w in items]
        return await answer(ctx, run)

    @server.tool()
    async def signal_work(ctx: Context, id: str, event: str, data: Any = None) -> dict[str, Any]:
        """Send the signal event (with JSON data) to a work item: it wakes the item if it
        waits for that event, else it is kept until it does."""
        async def run(db: Db) -> dict[str, Any]:
            sent = await db.signal(id, event, data)
            return {"signal": sent.signal_id, "woke": sent.woke}
        return await answer(ctx, run)

    @server.tool()
    async def pending_approvals(ctx: Context) -> list[dict[str, Any]]:
        """The decisions people owe, oldest first (people decide them, not this server)."""
        async def run(db: Db) -> list[dict[str, Any]]:
            return [_plain(p) for p in await read.pending_approvals(db, limit=200)]
        return await answer(ctx, run)

    @server.tool()
    async def search_memory(ctx: Context, query: str, k: int = 5, memory_type: str | None = None,
                            mode: str = "hybrid") -> list[dict[str, Any]]:
        """The k (1-50) memories that best match query: by meaning and words (hybrid), by
        meaning (vector), or by words (text)."""
        if not 1 <= k <= 50:
            raise ToolError(f"k must be from 1 to 50, got {k}")
        if mode not in ("hybrid", "vector", "text"):
            raise ToolError(f"mode is hybrid, vector or text, not {mode!r:.20}")

        async def run(db: Db) -> list[dict[str, Any]]:
            found = await (await _memory(db, embedder)).search(
                query, k=k, mode=mode, memory_type=memory_type)  # type: ignore[arg-type]
            return [{"id": str(m.id), "content": m.content, "memory_type": m.memory_type,
                     "score": m.score, "source": m.source} for m in found]
        return await answer(ctx, run)

    @server.tool()
    async def store_memory(ctx: Context, content: str,
                           memory_type: str = "semantic") -> dict[str, Any]:
        """Keep a memory (source: mcp); answers its id."""
        async def run(db: Db) -> dict[str, Any]:
            memory = await _memory(db, embedder)
            record = await memory.store(content, memory_type=memory_type, source="mcp")
            return {"id": str(record.id)}
        return await answer(ctx, run)

    @server.tool()
    async def status(ctx: Context) -> dict[str, Any]:
        """The animus now: its engines (live and lost), queue depths, live work by type and
        state, waiting work by what it waits for, the latest dead letters."""
        async def run(db: Db) -> dict[str, Any]:
            view: dict[str, Any] = _plain(await read.status(db, dead_letters=10, waiting=10))
            return view
        return await answer(ctx, run)

    return server


def mcp_http_app(people: People, rules: RuleSet, embedder: Embedder | None) -> ASGIApp:
    """The MCP server over streamable HTTP at ``/mcp``, for the console's people: each
    request carries a person's token (``Authorization: Bearer ...``, ``animus web user token``)
    and its calls run on that person's own connection. Stateless: a request is whole in
    itself, so no session outlives the token that opened it, and no stream stays open (a GET
    is refused). The SDK's DNS-rebinding guard (a Host of localhost only) is off: a browser
    page a rebinding attack runs has no token to send, and a proxy in front sends its own
    Host."""
    async def access(ctx: Context) -> Db:
        request = ctx.request_context.request
        person: Person = request.scope[_PERSON]  # type: ignore[union-attr]
        return await people.db(person)

    server = mcp_server(access, rules, embedder)
    open_to_any_host = TransportSecuritySettings(enable_dns_rebinding_protection=False)
    return _Bearer(server.streamable_http_app(stateless_http=True, json_response=True,
                                              transport_security=open_to_any_host), people)


_PERSON = "animus.person"


class _Bearer:
    """Lets through the requests whose bearer token is a person's, with the person in the
    request's scope; answers any other 401 (and ``/healthz`` to anyone)."""

    def __init__(self, app: ASGIApp, people: People) -> None:
        self.app = app
        self.people = people

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"] == "/healthz":
            return await _reply(send, 200, {"ok": True})
        if scope["method"] == "GET":  # a stream no stateless server ever writes to
            return await _reply(send, 405, {"error": "this server keeps no streams open: "
                                            "POST each request"}, [(b"allow", b"POST")])
        given = [v for k, v in scope["headers"] if k == b"authorization"]
        if len(given) > 1:
            return await _reply(send, 400, {"error": "more than one Authorization header"})
        header = given[0].decode("latin-1") if given else ""
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        person = await self.people.by_token(token) \
            if scheme.lower() == "bearer" and token else None
        if person is None:
            why = ("no token: send Authorization: Bearer TOKEN" if not header else
                   "that is not a bearer token: send Authorization: Bearer TOKEN"
                   if scheme.lower() != "bearer" or not token else
                   "that token is nobody's (replaced, revoked, or its person removed)")
            # as a JSON-RPC error too, so that an MCP client shows the reason, not a status
            return await _reply(send, 401, {
                "jsonrpc": "2.0", "id": None,
                "error": {"code": -32001, "message": f"{why}; a person of the console gets one "
                                                     "with `animus web user token NAME`"}},
                [(b"www-authenticate", b'Bearer realm="animus"')])
        scope = {**scope, _PERSON: person}
        await self.app(scope, receive, send)


async def _reply(send: Send, status: int, body: dict[str, Any],
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
    data = json.dumps(body).encode() + b"\n"
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": data})


async def _item(db: Db, work_id: str) -> dict[str, Any]:
    item = await db.get_work_item(work_id)
    return {**_brief(item), "params": item.params, "outcome": item.outcome.data,
            "error": item.outcome.error, "wait": item.wait,
            "wake_at": item.wake_at.isoformat() if item.wake_at else None,
            "attempts": item.attempts, "max_attempts": item.max_attempts,
            "updated_at": item.updated_at.isoformat()}


def _brief(item: WorkItem) -> dict[str, Any]:
    return {"id": str(item.id), "work_type": item.work_type, "state": str(item.state),
            "reason": item.reason, "source": item.provenance.source,
            "parent": str(item.parent_id) if item.parent_id else None,
            "created_at": item.created_at.isoformat()}


def _plain(value: Any) -> Any:
    """A value as JSON would carry it (UUIDs and times as text)."""
    return json.loads(msgspec.json.encode(value))


async def _memory(db: Db, embedder: Embedder | None) -> Memory:
    if embedder is None:
        raise ToolError("this server has no embedder: memory is not available here")
    return await Memory.open(db, embedder)
