"""An animus as an MCP server (``animus mcp``): what a model, or Claude Code or Claude
Desktop, may ask of it, built with the official ``mcp`` SDK.

Every tool runs on the server's database connection, which acts as one animus role (``animus
mcp --role ROLE``: ``SET ROLE animus_ROLE`` on each connection), so the database decides what
a call may do and the audit names the login. Submissions go through the rules, as any
submission does. Deciding an approval is not a tool: approval is a person's act, and a model
that could approve could approve its own work (docs/mcp.md says why at more length).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from animus_core import __version__
from animus_core.governance.work import GovernedWork
from animus_core.store import read
from animus_core.store.db import Db
from animus_core.store.memory import Embedder, Memory
from animus_core.values.errors import AnimusError
from animus_core.values.work import Created, NewWorkItem, WorkItem

__all__ = ["TOOLS", "mcp_server"]

T = TypeVar("T")

#: the tools, in the order they are listed
TOOLS = ("submit_work", "get_work", "list_work", "signal_work", "pending_approvals",
         "search_memory", "store_memory", "status")
INSTRUCTIONS = """This is an animus: work items queued in Postgres and run by its engines'
faculties. Submit work with submit_work (the animus's rules may deny it or hold it for a
person's approval), follow it with get_work, and find work with list_work. Approvals are
decided by people, never through this server."""


def mcp_server(db: Db, governed: GovernedWork, embedder: Embedder | None) -> MCPServer:
    """The MCP server over ``db`` (connections acting as one animus role)."""
    server = MCPServer("animus", version=__version__, instructions=INSTRUCTIONS)

    @server.tool()
    async def submit_work(work_type: str, params: dict[str, Any] | None = None,
                          dedup_key: str | None = None, priority: int = 0) -> dict[str, Any]:
        """Submit a work item of work_type with JSON params. Answers its id and state:
        queued, or dead or awaiting_approval when a rule denied or gated it (with the reason);
        merged, with the id of the live item it joined, when one of the type holds the same
        dedup_key."""
        async def run() -> dict[str, Any]:
            item = NewWorkItem(work_type, source="mcp").params(params or {}).priority(priority)
            if dedup_key is not None:
                item = item.dedup_key(dedup_key)
            result = await governed.submit(item)
            if isinstance(result, Created):
                return {"id": str(result.id), "created": True, "state": str(result.item.state),
                        "reason": result.item.reason}
            return {"id": str(result.canonical_id), "created": False, "state": "merged"}
        return await _answer(run)

    @server.tool()
    async def get_work(id: str) -> dict[str, Any]:
        """A work item: its type, state and reason, params, outcome or error, what it waits
        for, its attempts, parent and times."""
        return await _answer(lambda: _item(db, id))

    @server.tool()
    async def list_work(state: str | None = None, work_type: str | None = None,
                        source: str | None = None, parent: str | None = None,
                        limit: int = 20, before: str | None = None) -> list[dict[str, Any]]:
        """Work items, newest first, filtered by state, work_type, source and parent; at most
        limit (1-200). For the next page, pass before: the id of the last item of this one."""
        async def run() -> list[dict[str, Any]]:
            if not 1 <= limit <= 200:
                raise ToolError(f"limit must be from 1 to 200, got {limit}")
            items = await db.list_work(state=state, work_type=work_type, source=source,
                                       parent_id=parent, limit=limit, before=before)
            return [_brief(w) for w in items]
        return await _answer(run)

    @server.tool()
    async def signal_work(id: str, event: str, data: Any = None) -> dict[str, Any]:
        """Send the signal event (with JSON data) to a work item: it wakes the item if it
        waits for that event, else it is kept until it does."""
        async def run() -> dict[str, Any]:
            sent = await db.signal(id, event, data)
            return {"signal": sent.signal_id, "woke": sent.woke}
        return await _answer(run)

    @server.tool()
    async def pending_approvals() -> list[dict[str, Any]]:
        """The decisions people owe, oldest first (people decide them, not this server)."""
        async def run() -> list[dict[str, Any]]:
            return [_plain(p) for p in await read.pending_approvals(db, limit=200)]
        return await _answer(run)

    @server.tool()
    async def search_memory(query: str, k: int = 5, memory_type: str | None = None,
                            mode: str = "hybrid") -> list[dict[str, Any]]:
        """The k (1-50) memories that best match query: by meaning and words (hybrid), by
        meaning (vector), or by words (text)."""
        async def run() -> list[dict[str, Any]]:
            if not 1 <= k <= 50:
                raise ToolError(f"k must be from 1 to 50, got {k}")
            if mode not in ("hybrid", "vector", "text"):
                raise ToolError(f"mode is hybrid, vector or text, not {mode!r:.20}")
            found = await (await _memory(db, embedder)).search(
                query, k=k, mode=mode, memory_type=memory_type)  # type: ignore[arg-type]
            return [{"id": str(m.id), "content": m.content, "memory_type": m.memory_type,
                     "score": m.score, "source": m.source} for m in found]
        return await _answer(run)

    @server.tool()
    async def store_memory(content: str, memory_type: str = "semantic") -> dict[str, Any]:
        """Keep a memory (source: mcp); answers its id."""
        async def run() -> dict[str, Any]:
            record = await (await _memory(db, embedder)).store(content, memory_type=memory_type,
                                                               source="mcp")
            return {"id": str(record.id)}
        return await _answer(run)

    @server.tool()
    async def status() -> dict[str, Any]:
        """The animus now: its engines (live and lost), queue depths, live work by type and
        state, waiting work by what it waits for, the latest dead letters."""
        async def run() -> dict[str, Any]:
            view: dict[str, Any] = _plain(await read.status(db, dead_letters=10, waiting=10))
            return view
        return await _answer(run)

    return server


async def _answer(run: Callable[[], Awaitable[T]]) -> T:
    """What a tool answers; an animus error (the database refused, bad input) becomes the
    tool error the client reads, in animus's words."""
    try:
        return await run()
    except AnimusError as e:
        raise ToolError(str(e)) from None


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
