"""The web console (``animus web``): what an animus is doing, what it did and why, and an
inbox for the people who approve its work. See docs/console.md."""

from __future__ import annotations

from starlette.applications import Starlette

from animus_core.web.app import console_app
from animus_core.web.people import People, Person, add_person, list_people, remove_person
from animus_core.web.security import LoginLimiter, console_secret

__all__ = ["LoginLimiter", "People", "Person", "add_person", "console_app", "console_secret",
           "list_people", "remove_person", "serve"]


async def serve(app: Starlette, host: str, port: int) -> None:
    """Serve ``app`` with uvicorn until interrupted (SIGINT or SIGTERM)."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            lifespan="on", proxy_headers=True, server_header=False)
    await uvicorn.Server(config).serve()
