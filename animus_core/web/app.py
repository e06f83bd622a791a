"""The console: a Starlette application rendered on the server from Jinja2 templates. This
module assembles it (sign-in, the event stream, security headers, sessions); the pages are in
:mod:`animus_core.web.pages`, what they share in :mod:`animus_core.web.site`.

Every page needs a signed-in person, but ``/healthz``. Each query and action of a page runs
on a connection that *is* the person in the database (:class:`~animus_core.web.people.People`),
so the database refuses what their role may not do, and the audit names them. State changes
are POSTs carrying the session's CSRF token; values from work items are escaped by the
templates (autoescape), and the pages load no script but the console's own.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from animus_core.governance.rules import RuleSet
from animus_core.store import console
from animus_core.store.db import Db
from animus_core.store.memory import Embedder
from animus_core.values.errors import AnimusError, DatabaseUnavailable, PermissionDenied
from animus_core.web import pages
from animus_core.web.live import Viewer
from animus_core.web.people import Person
from animus_core.web.security import LoginLimiter, csrf_ok, new_csrf
from animus_core.web.site import (
    HERE,
    LOGIN_BODY,
    SESSION_HOURS,
    Site,
    form_body,
    next_path,
    now,
)

__all__ = ["console_app"]

_log = logging.getLogger("animus.web")


class _Headers:
    """Security headers on every response: only the console's own scripts and styles, no
    framing, no sniffing."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def sending(message: Any) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).extend([
                    (b"content-security-policy", b"default-src 'self'; script-src 'self'; "
                     b"style-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
                     b"form-action 'self'; base-uri 'none'"),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"same-origin"),
                    (b"x-frame-options", b"DENY")])
            await send(message)
        await self.app(scope, receive, sending)


class _BodyLimit:
    """Requests with a body say how long it is (Content-Length), and it is not longer than
    the console reads: a sign-in a few KiB, a form a work item's params and then some. A
    longer body is refused before it is read. A query string with a NUL character (which no
    text in Postgres holds) is refused too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and b"%00" in scope.get("query_string", b""):
            await _plain(send, 400, "the query string has a NUL character (%00): no value "
                                    "of animus holds one")
            return
        if scope["type"] == "http" and scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            length = dict(scope["headers"]).get(b"content-length")
            limit = LOGIN_BODY if scope["path"] == "/login" else form_body()
            if length is None or not length.isdigit():
                await _plain(send, 411, "a request with a body must say its length "
                                        "(Content-Length)")
                return
            if int(length) > limit:
                await _plain(send, 413, f"the request is {int(length):,} bytes, more than the "
                                        f"{limit:,} this page reads")
                return
        await self.app(scope, receive, send)


def _audit_id(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 18


async def _plain(send: Send, status: int, text: str) -> None:
    body = (text + "\n").encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def console_app(service: Db, url: str, secret: bytes, *, secure_cookies: bool = False,
                limiter: LoginLimiter | None = None, rules: RuleSet | None = None,
                trace_url: str | None = None, embedder: Embedder | None = None) -> Starlette:
    """The console over ``service`` (the console's own connection: sign-ins and the live
    feed), opening each person's connections to ``url``; submissions go through ``rules``.
    ``secure_cookies``: send the session cookie over HTTPS only (behind a TLS proxy);
    ``trace_url``: an item's trace in the tracing backend, ``{trace_id}`` in it;
    ``embedder``: what the memory page searches with."""
    site = Site(service, url, secret, rules=rules, limiter=limiter, trace_url=trace_url,
                embedder=embedder)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        await site.hub.start()
        try:
            yield
        finally:
            await site.hub.stop()
            await site.people.close()

    async def healthz(_request: Request) -> Response:
        try:
            await console.audit_extent(service)
        except AnimusError as e:
            return JSONResponse({"ok": False, "database": str(e)}, status_code=503)
        return JSONResponse({"ok": True, "viewers": site.hub.viewers})

    async def login_form(request: Request) -> Response:
        return site.page("login.html", request, None,
                         next=next_path(request.query_params.get("next", "/")), name="")

    async def login(request: Request) -> Response:
        form = await request.form(max_fields=10)
        name, password = str(form.get("name", "")), str(form.get("password", ""))
        target = next_path(str(form.get("next", "/")))
        if not csrf_ok(request.session.get("csrf"), form.get("csrf")):
            return Response("refused: the sign-in form's CSRF token is missing or wrong; "
                            "reload the page", status_code=403)
        client = request.client.host if request.client else "?"
        wait = site.limiter.attempt(name, client)
        if wait > 0:
            request.session["flash"] = (f"too many failed sign-ins: try again in "
                                        f"{int(wait) + 1} s")
            return site.page("login.html", request, None, next=target, name=name,
                             status_code=429)
        person = await site.people.check(name, password) if "\x00" not in name else None
        if person is None:
            request.session["flash"] = "wrong name or password"
            return site.page("login.html", request, None, next=target, name=name,
                             status_code=401)
        site.limiter.succeeded(name, client)
        request.session.clear()  # a new session: nothing carried over from before sign-in
        signed_at = person.now.timestamp() if person.now else now()  # the database's clock
        request.session.update(person=person.name, csrf=new_csrf(), at=signed_at,
                               until=now() + SESSION_HOURS * 3600.0)
        return RedirectResponse(target, status_code=303)

    async def logout(_site: Site, request: Request, person: Person) -> Response:
        await console.sign_out(service, person.name)  # every session of theirs, everywhere
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    async def events(_site: Site, request: Request, person: Person) -> Response:
        since = request.query_params.get("since", "")
        session = request.session  # signed in: Site.person found "at" and "until" in it
        viewer = Viewer(person.name, session["at"], session["until"])
        return StreamingResponse(site.hub.subscribe(int(since) if _audit_id(since) else None,
                                                    viewer=viewer),
                                 media_type="text/event-stream",
                                 headers={"cache-control": "no-store",
                                          "x-accel-buffering": "no"})

    async def refused(request: Request, exc: Exception) -> Response:
        """An animus error a page did not expect (the database refused the person's role,
        or went away): said plainly, with the status it deserves."""
        status = 403 if isinstance(exc, PermissionDenied) else \
            503 if isinstance(exc, DatabaseUnavailable) else 500
        _log.warning("%s %s: %s", request.method, request.url.path, exc)
        return Response(f"{exc}\n", status_code=status, media_type="text/plain")

    routes = [
        Route("/healthz", healthz),
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", site.signed_in(logout, post=True), methods=["POST"]),
        Route("/events", site.signed_in(events)),
        *pages.routes(site),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={AnimusError: refused},
                     middleware=[
        Middleware(_Headers),
        Middleware(_BodyLimit),
        Middleware(SessionMiddleware, secret_key=secret.decode(), session_cookie="animus_session",
                   max_age=SESSION_HOURS * 3600, same_site="strict", https_only=secure_cookies)])
