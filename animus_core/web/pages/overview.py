"""``/``: what the animus is doing now, and did in the last hour."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from animus_core.store import console, read
from animus_core.web import throughput
from animus_core.web.people import Person
from animus_core.web.site import Site

__all__ = ["routes"]


async def overview(site: Site, request: Request, person: Person) -> Response:
    db = await site.db(person)  # two connections: the two reads at once
    view, pending = await asyncio.gather(console.overview(db),
                                         read.pending_approvals(db, limit=20))
    return site.page("overview.html", request, person, view=view, pending=pending,
                     live_states=console.LIVE_STATES, finished_states=console.FINISHED_STATES,
                     finished_cap=console.FINISHED_COUNTED, chart=site.hub.chart(),
                     chart_size=(throughput.WIDTH, throughput.HEIGHT))


def routes(site: Site) -> list[Route]:
    return [Route("/", site.signed_in(overview))]
