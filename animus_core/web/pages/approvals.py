"""``/approvals``: the decisions people owe, and the forms to make them."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from animus_core.store import read
from animus_core.web.people import Person
from animus_core.web.site import Site

__all__ = ["routes"]


async def approvals(site: Site, request: Request, person: Person) -> Response:
    pending = await read.pending_approvals(await site.db(person))
    return site.page("approvals.html", request, person, pending=pending)


def routes(site: Site) -> list[Route]:
    return [Route("/approvals", site.signed_in(approvals))]
