"""``/memory``: the animus's memories, the newest or the best for a search (hybrid, by
meaning or by words), as the person reads them."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from animus_core.store.memory import Memory
from animus_core.values.errors import AnimusError
from animus_core.web.people import Person
from animus_core.web.site import PAGE, Site

__all__ = ["routes"]

MODES = ("hybrid", "vector", "text")


async def memory_page(site: Site, request: Request, person: Person) -> Response:
    q = request.query_params
    query, mode = q.get("q", "").strip(), q.get("mode", "hybrid")
    kind = q.get("type", "").strip() or None
    found, problem = [], None
    if mode not in MODES:
        problem, mode = f"a search is one of {', '.join(MODES)}, not {mode!r:.20}", "hybrid"
    elif site.embedder is None:
        problem = "this console has no embedder: memories cannot be read here"
    else:
        try:
            memory = await Memory.open(await site.db(person), site.embedder)
            found = await (memory.search(query, k=PAGE, mode=mode, memory_type=kind)  # type: ignore[arg-type]
                           if query else memory.recent(limit=PAGE, memory_type=kind))
        except AnimusError as e:
            problem = str(e)
    return site.page("memory.html", request, person, query=query, mode=mode, modes=MODES,
                     type=kind or "", found=found, problem=problem)


def routes(site: Site) -> list[Route]:
    return [Route("/memory", site.signed_in(memory_page))]
