"""The fleet: its engines (``/engines``, and asking one to stop), the faculties they run
(``/faculties``: origin, limits, why one is disabled where), and their schedules
(``/schedules``: the next tick and the latest)."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from animus_core.store import console, engines
from animus_core.store.db import Db
from animus_core.values.engines import Engine, FacultyInfo, ScheduleInfo
from animus_core.web.people import Person
from animus_core.web.site import Site

__all__ = ["Faculty", "live_faculties", "routes"]


class Faculty(msgspec.Struct, frozen=True, kw_only=True):
    """A faculty as the fleet has it: as one engine declared it, which live engines run it,
    and on which it is disabled, and why."""

    info: FacultyInfo
    running_on: list[str]
    disabled_on: dict[str, str]


async def engines_page(site: Site, request: Request, person: Person) -> Response:
    fleet = await engines.registered(await site.db(person))
    return site.page("engines.html", request, person, engines=fleet)


async def faculties_page(site: Site, request: Request, person: Person) -> Response:
    fleet = await engines.registered(await site.db(person))
    return site.page("faculties.html", request, person, faculties=live_faculties(fleet))


async def schedules_page(site: Site, request: Request, person: Person) -> Response:
    db = await site.db(person)
    fleet = await engines.registered(db)
    runs: dict[str, tuple[ScheduleInfo, list[str]]] = {}
    for e in fleet:
        if e.lost:
            continue
        for s in e.schedules:
            first, where = runs.setdefault(s.name, (s, []))
            where.append(_where(e))
            if s.next_tick and (first.next_tick is None or s.next_tick < first.next_tick):
                runs[s.name] = (s, where)
    ticks = await console.latest_ticks(db, list(runs))
    return site.page("schedules.html", request, person, ticks=ticks,
                     schedules=[(runs[n][0], runs[n][1]) for n in sorted(runs)])


async def stop_engine(site: Site, db: Db, person: Person, engine: UUID, form: Any) -> str:
    asked = await engines.stop_engines(db, engine)
    return f"asked engine {engine} to drain and stop" if asked else \
        f"engine {engine} is not live: nothing to stop"


def routes(site: Site) -> list[Route]:
    return [
        Route("/engines", site.signed_in(engines_page)),
        Route("/engines/{id}/stop", site.action(stop_engine), methods=["POST"]),
        Route("/faculties", site.signed_in(faculties_page)),
        Route("/schedules", site.signed_in(schedules_page)),
    ]


def _where(e: Engine) -> str:
    return f"{e.host}:{e.pid}"


def live_faculties(fleet: list[Engine]) -> list[Faculty]:
    """Each faculty of the live engines once, by name."""
    seen: dict[str, Faculty] = {}
    for e in fleet:
        if e.lost:
            continue
        for f in e.faculties:
            entry = seen.setdefault(f.name, Faculty(info=f, running_on=[], disabled_on={}))
            if f.name in e.disabled:
                entry.disabled_on[_where(e)] = e.disabled[f.name]
            else:
                entry.running_on.append(_where(e))
    return [seen[n] for n in sorted(seen)]
