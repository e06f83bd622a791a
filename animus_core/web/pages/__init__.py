"""The console's pages, a module for each part of its menu. Each has ``routes(site)``; see
:mod:`animus_core.web.site` for what a page handler is given."""

from __future__ import annotations

from starlette.routing import Route

from animus_core.web.pages import approvals, fleet, memory, overview, pipelines, work
from animus_core.web.site import Site

__all__ = ["routes"]


def routes(site: Site) -> list[Route]:
    return [*overview.routes(site), *work.routes(site), *approvals.routes(site),
            *fleet.routes(site), *pipelines.routes(site), *memory.routes(site)]
