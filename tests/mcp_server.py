"""A stdio MCP server for the tests, built with the ``mcp`` SDK: a few tools (one echoes,
one is slow, one fails, one says what environment it sees, one answers too much, one
counts its calls in a file).

    python tests/mcp_server.py [--crash]    # stdio; --crash: exit before answering anything
    python tests/mcp_server.py --http PORT [--token T]  # streamable HTTP on 127.0.0.1:PORT/mcp;
                                                        # --token: 401 unless Bearer T
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from mcp.server.mcpserver import MCPServer

server = MCPServer("animus-test-tools")


@server.tool()
def echo(text: str) -> str:
    """Say the text back."""
    return text


@server.tool()
def env(name: str) -> str:
    """The value of an environment variable of this server ('<unset>' if it has none)."""
    print(f"asked for {name}: {os.environ.get(name, '<unset>')}", file=sys.stderr, flush=True)
    return os.environ.get(name, "<unset>")


@server.tool()
async def slow(seconds: float) -> str:
    """Answer after some seconds."""
    await asyncio.sleep(seconds)
    return f"slept {seconds}"


@server.tool()
def fail(why: str = "on purpose") -> str:
    """Fail, always."""
    raise ValueError(f"it failed {why}")


@server.tool()
def big(n: int) -> str:
    """Answer n characters."""
    return "x" * n


@server.tool()
def count(path: str) -> int:
    """Add one to the number in a file, and answer it (how many times it was called)."""
    file = Path(path)
    n = int(file.read_text()) + 1 if file.exists() else 1
    file.write_text(str(n))
    return n


if __name__ == "__main__":
    if "--crash" in sys.argv:
        print("the test server crashes on purpose", file=sys.stderr, flush=True)
        sys.exit(3)
    if "--http" in sys.argv:
        import uvicorn
        from starlette.responses import PlainTextResponse

        port = int(sys.argv[sys.argv.index("--http") + 1])
        app = server.streamable_http_app()
        token = sys.argv[sys.argv.index("--token") + 1] if "--token" in sys.argv else None

        async def guarded(scope: Any, receive: Any, send: Any) -> None:
            headers = dict(scope.get("headers", []))
            if scope["type"] == "http" and token is not None and \
                    headers.get(b"authorization") != f"Bearer {token}".encode():
                return await PlainTextResponse("who are you?", 401)(scope, receive, send)
            return await app(scope, receive, send)
        uvicorn.run(guarded, host="127.0.0.1", port=port, log_level="warning")
    else:
        server.run()
