"""What every page of the console shares: its people and their connections, the live feed,
the rules submissions go through, and how a page is rendered, signed in to and acted on.

A page module (:mod:`animus_core.web.pages`) is a few handlers, each
``async def handler(site, request, person) -> Response``, and a ``routes(site)`` list;
:meth:`Site.signed_in` turns a handler into an endpoint that needs a signed-in person (and,
for a POST, the session's CSRF token).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode
from uuid import UUID

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.templating import Jinja2Templates

from animus_core.governance.rules import RuleSet
from animus_core.governance.work import GovernedWork
from animus_core.store.db import Db
from animus_core.store.memory import Embedder
from animus_core.values.errors import AnimusError
from animus_core.values.limits import limits
from animus_core.web.live import Hub
from animus_core.web.people import People, Person
from animus_core.web.security import LoginLimiter, csrf_ok, new_csrf

__all__ = ["LOGIN_BODY", "PAGE", "SESSION_HOURS", "Handler", "Site", "form_body", "next_path"]

HERE = Path(__file__).parent
#: rows on a page of a list
PAGE = 50
SESSION_HOURS = 8
#: characters of a message shown after an action, at the most (it travels in the cookie)
FLASH = 600
#: bytes of a sign-in's body at the most
LOGIN_BODY = 16 * 1024


def form_body() -> int:
    """Bytes of a form's body at the most: a work item's largest params, URL-encoded (each
    byte three at worst), and the form's other fields."""
    return 3 * limits().params_bytes + 64 * 1024

Handler = Callable[["Site", Request, Person], Awaitable[Response]]
#: an action on one work item: what it did, as the flash message says it, and optionally
#: where to go next (else back where the form came from)
Action = Callable[["Site", Db, Person, UUID, Any], Awaitable["str | tuple[str, str]"]]

_templates = Jinja2Templates(directory=str(HERE / "templates"))
_templates.env.filters["json"] = lambda v: json.dumps(v, indent=2, ensure_ascii=False,
                                                      sort_keys=True, default=str)
_templates.env.filters["when"] = lambda t: t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") \
    if isinstance(t, datetime) else ""


class Site:
    def __init__(self, service: Db, url: str, secret: bytes, *, rules: RuleSet | None = None,
                 limiter: LoginLimiter | None = None, trace_url: str | None = None,
                 embedder: Embedder | None = None) -> None:
        self.service = service  # the console's own connection: sign-ins, the live feed
        self.people = People(service, url, secret)
        self.hub = Hub(service)
        self.rules = rules if rules is not None else RuleSet()
        self.limiter = limiter or LoginLimiter()
        #: a trace's page in the OTel backend, ``{trace_id}`` in it (None: no link)
        self.trace_url = trace_url
        #: what the memory page searches with (None: it cannot)
        self.embedder = embedder

    async def db(self, person: Person) -> Db:
        """Connections that are ``person`` in the database."""
        return await self.people.db(person)

    async def governed(self, person: Person) -> GovernedWork:
        """Submissions as ``person``, with the rules applied."""
        return GovernedWork(await self.db(person), self.rules)

    def page(self, template: str, request: Request, person: Person | None, *,
             status_code: int = 200, **context: Any) -> Response:
        session = request.session
        if "csrf" not in session:
            session["csrf"] = new_csrf()
        flash = session.pop("flash", None)
        return _templates.TemplateResponse(request, template, {
            "person": person, "csrf": session["csrf"], "flash": flash, "since": self.hub.latest,
            **context}, status_code=status_code)

    def signed_in(self, handler: Handler, *,
                  post: bool = False) -> Callable[[Request], Awaitable[Response]]:
        """``handler`` for signed-in people only; a POST also needs the session's CSRF
        token."""
        async def endpoint(request: Request) -> Response:
            person = await self.person(request)
            if person is None:
                request.session.pop("person", None)
                if post or request.url.path == "/events":
                    return Response("sign in first", status_code=401)
                here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse(f"/login?{urlencode({'next': here})}", status_code=303)
            if post:  # read once here (the handler's form() is this one), within bounds
                form = await request.form(max_fields=50, max_part_size=form_body())
                if not csrf_ok(request.session.get("csrf"), form.get("csrf")):
                    return Response("refused: the form's CSRF token is missing or wrong; "
                                    "reload the page and try again", status_code=403)
            return await handler(self, request, person)
        return endpoint

    async def person(self, request: Request) -> Person | None:
        """Who the request's session is signed in as, if it still is: not expired, not
        signed out since (anywhere), and the person not removed."""
        session = request.session
        name, at, until = session.get("person"), session.get("at"), session.get("until")
        if not (isinstance(name, str) and isinstance(at, float) and isinstance(until, float)):
            return None
        person = await self.people.person(name)
        if person is None or not person.signed_in_since(at) or until < now():
            return None
        return person

    def action(self, run: Action) -> Callable[[Request], Awaitable[Response]]:
        """A POST that acts on the work item in the path as the person, says what it did
        (or the database's refusal, in its own words) and goes back where it came from."""
        async def handler(site: Site, request: Request, person: Person) -> Response:
            form = await request.form()
            back = next_path(str(form.get("back", "/")))
            try:
                wid = UUID(request.path_params["id"])
                done = await run(site, await site.db(person), person, wid, form)
                said, back = done if isinstance(done, tuple) else (done, back)
                request.session["flash"] = said[:FLASH]
            except ValueError:
                request.session["flash"] = f"not an id: {request.path_params['id']!r:.60}"
            except AnimusError as e:
                request.session["flash"] = said_refused(e)
            return RedirectResponse(back, status_code=303)
        return self.signed_in(handler, post=True)


def said_refused(e: Exception) -> str:
    """An action's refusal as the person reads it (within a cookie's room)."""
    text = str(e)
    return (text if text.startswith("refused") else f"refused: {text}")[:FLASH]


def now() -> float:
    return datetime.now(UTC).timestamp()


def next_path(target: str) -> str:
    """Where to go after a form: a path of this console only, never another site."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target
