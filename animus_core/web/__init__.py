"""The web console (``animus web``): what an animus is doing, what it did and why, and an
inbox for the people who approve its work. See docs/console.md."""

from __future__ import annotations

from starlette.types import ASGIApp

from animus_core.web.app import console_app
from animus_core.web.people import (
    People,
    Person,
    add_person,
    issue_mcp_token,
    list_people,
    remove_person,
    revoke_mcp_token,
)
from animus_core.web.security import LoginLimiter, console_secret

__all__ = ["LoginLimiter", "People", "Person", "add_person", "console_app", "console_secret",
           "issue_mcp_token", "list_people", "remove_person", "revoke_mcp_token", "serve"]


async def serve(app: ASGIApp, host: str, port: int, *,
                limit_concurrency: int | None = None) -> None:
    """Serve ``app`` with uvicorn until interrupted (SIGINT or SIGTERM); beyond
    ``limit_concurrency`` requests and connections at once, 503 at once."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            lifespan="on", proxy_headers=True, server_header=False,
                            limit_concurrency=limit_concurrency)
    await uvicorn.Server(config).serve()
