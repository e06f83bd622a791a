"""The console: a Starlette application rendered on the server from Jinja2 templates.

Every page needs a signed-in person, but ``/healthz``. Each query and action of a page runs
on a connection that *is* the person in the database (:class:`~animus_core.web.people.People`),
so the database refuses what their role may not do, and the audit names them. State changes
are POSTs carrying the session's CSRF token; values from work items are escaped by the
templates (autoescape), and the pages load no script but the console's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Receive, Scope, Send

from animus_core.store import console, read
from animus_core.store.db import Db
from animus_core.values.errors import (
    AnimusError,
    DatabaseUnavailable,
    InvalidInput,
    PermissionDenied,
    WorkNotFound,
)
from animus_core.values.states import State
from animus_core.values.work import WorkItem
from animus_core.web import throughput
from animus_core.web.live import Hub
from animus_core.web.people import People, Person
from animus_core.web.security import LoginLimiter, csrf_ok, new_csrf

__all__ = ["console_app"]

_log = logging.getLogger("animus.web")
HERE = Path(__file__).parent
PAGE = 50
SESSION_HOURS = 8
_templates = Jinja2Templates(directory=str(HERE / "templates"))
_templates.env.filters["json"] = lambda v: json.dumps(v, indent=2, ensure_ascii=False,
                                                      sort_keys=True, default=str)
_templates.env.filters["when"] = lambda t: t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") \
    if isinstance(t, datetime) else ""

Handler = Callable[[Request, Person], Awaitable[Response]]


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


def console_app(service: Db, url: str, secret: bytes, *, secure_cookies: bool = False,
                limiter: LoginLimiter | None = None) -> Starlette:
    """The console over ``service`` (the console's own connection: sign-ins and the live
    feed), opening each person's connections to ``url``. ``secure_cookies``: send the session
    cookie over HTTPS only (behind a TLS proxy)."""
    people = People(service, url, secret)
    hub = Hub(service)
    limiter = limiter or LoginLimiter()

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        await hub.start()
        try:
            yield
        finally:
            await hub.stop()
            await people.close()

    def page(template: str, request: Request, person: Person | None, *,
             status_code: int = 200, **context: Any) -> Response:
        session = request.session
        if "csrf" not in session:
            session["csrf"] = new_csrf()
        flash = session.pop("flash", None)
        return _templates.TemplateResponse(request, template, {
            "person": person, "csrf": session["csrf"], "flash": flash, "since": hub.latest,
            **context},
            status_code=status_code)

    def signed_in(handler: Handler, *, post: bool = False) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            name = request.session.get("person")
            person = await people.person(name) if isinstance(name, str) else None
            if person is None or request.session.get("until", 0) < _now():
                request.session.pop("person", None)
                if post or request.url.path == "/events":
                    return Response("sign in first", status_code=401)
                return RedirectResponse(f"/login?next={request.url.path}", status_code=303)
            if post:
                form = await request.form()
                if not csrf_ok(request.session.get("csrf"), form.get("csrf")):
                    return Response("refused: the form's CSRF token is missing or wrong; "
                                    "reload the page and try again", status_code=403)
            return await handler(request, person)
        return endpoint

    async def healthz(_request: Request) -> Response:
        try:
            await console.audit_extent(service)
        except AnimusError as e:
            return JSONResponse({"ok": False, "database": str(e)}, status_code=503)
        return JSONResponse({"ok": True, "viewers": hub.viewers})

    async def login_form(request: Request) -> Response:
        return page("login.html", request, None, next=_next(request), name="")

    async def login(request: Request) -> Response:
        form = await request.form()
        name, password = str(form.get("name", "")), str(form.get("password", ""))
        target = _next(request, str(form.get("next", "/")))
        if not csrf_ok(request.session.get("csrf"), form.get("csrf")):
            return Response("refused: the sign-in form's CSRF token is missing or wrong; "
                            "reload the page", status_code=403)
        client = request.client.host if request.client else "?"
        wait = limiter.retry_after(name, client)
        if wait > 0:
            request.session["flash"] = (f"too many failed sign-ins: try again in "
                                        f"{int(wait) + 1} s")
            return page("login.html", request, None, next=target, name=name, status_code=429)
        person = await people.check(name, password)
        if person is None:
            limiter.failed(name, client)
            request.session["flash"] = "wrong name or password"
            return page("login.html", request, None, next=target, name=name, status_code=401)
        limiter.succeeded(name)
        request.session.clear()  # a new session: nothing carried over from before sign-in
        request.session.update(person=person.name, csrf=new_csrf(),
                               until=_now() + SESSION_HOURS * 3600)
        return RedirectResponse(target, status_code=303)

    async def logout(request: Request, _person: Person) -> Response:
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    async def overview(request: Request, person: Person) -> Response:
        db = await people.db(person)  # two connections: the two reads at once
        view, pending = await asyncio.gather(console.overview(db),
                                             read.pending_approvals(db, limit=20))
        return page("overview.html", request, person, view=view, pending=pending,
                    live_states=console.LIVE_STATES, finished_states=console.FINISHED_STATES,
                    finished_cap=console.FINISHED_COUNTED, chart=hub.chart(),
                    chart_size=(throughput.WIDTH, throughput.HEIGHT))

    async def work_list(request: Request, person: Person) -> Response:
        q = request.query_params
        state = q.get("state") or None
        try:
            items = await (await people.db(person)).list_work(
                state=state, work_type=q.get("type") or None, source=q.get("source") or None,
                parent_id=q.get("parent") or None, before=q.get("before") or None,
                limit=PAGE + 1)
        except (InvalidInput, WorkNotFound) as e:
            request.session["flash"] = str(e)
            items = []
        more = len(items) > PAGE
        items = items[:PAGE]
        filters = {k: q.get(k, "") for k in ("state", "type", "source", "parent")}
        return page("work_list.html", request, person, items=items, filters=filters,
                    states=[s.value for s in State],
                    next_page=items[-1].id if more and items else None)

    async def work_item(request: Request, person: Person) -> Response:
        db = await people.db(person)
        try:
            wid = UUID(request.path_params["id"])
            item = await db.get_work_item(wid)
        except (ValueError, WorkNotFound):
            return page("missing.html", request, person, what=request.path_params["id"],
                        status_code=404)
        history = await db.history(wid)
        pending = [p for p in await read.pending_approvals(db) if p.id == wid] \
            if _awaits_decision(item) else []  # else no decision is pending: no query
        children = await db.list_work(parent_id=wid, limit=PAGE)
        return page("work_item.html", request, person,
                    item=item, history=history, pending=pending[0] if pending else None,
                    children=children)

    async def approvals(request: Request, person: Person) -> Response:
        pending = await read.pending_approvals(await people.db(person))
        return page("approvals.html", request, person, pending=pending)

    def action(run: Callable[[Db, UUID, Any], Awaitable[str]]) -> Handler:
        async def handler(request: Request, person: Person) -> Response:
            form = await request.form()
            back = _next(request, str(form.get("back", "/")))
            try:
                wid = UUID(request.path_params["id"])
                done = await run(await people.db(person), wid, form)
                request.session["flash"] = done
            except ValueError:
                request.session["flash"] = "not a work item id"
            except AnimusError as e:  # the database's refusal, in its own words
                request.session["flash"] = f"refused: {e}"
            return RedirectResponse(back, status_code=303)
        return handler

    async def decide(db: Db, wid: UUID, form: Any) -> str:
        decision = str(form.get("decision", ""))
        if decision not in ("approve", "reject"):
            raise InvalidInput("a decision is approve or reject")
        item = await db.decide(wid, decision, str(form.get("reason", "")).strip())
        done = {"approve": "approved", "reject": "rejected"}[decision]
        return f"{done} {wid}: now {item.state}"

    async def cancel(db: Db, wid: UUID, form: Any) -> str:
        result = await db.cancel(wid, str(form.get("reason", "")).strip() or "cancelled in "
                                 "the console")
        return f"cancel {wid}: {result.state}"

    async def signal(db: Db, wid: UUID, form: Any) -> str:
        text = str(form.get("data", "")).strip()
        try:
            payload = json.loads(text) if text else None
        except json.JSONDecodeError as e:
            raise InvalidInput(f"the signal's data is not JSON: {e}") from None
        sent = await db.signal(wid, str(form.get("event", "")).strip(), payload)
        return f"signal {sent.signal_id} sent" + (": it woke the item" if sent.woke else
                                                  ", kept until the item waits for it")

    async def events(request: Request, _person: Person) -> Response:
        since = request.query_params.get("since", "")
        return StreamingResponse(hub.subscribe(int(since) if since.isdigit() else None),
                                 media_type="text/event-stream",
                                 headers={"cache-control": "no-store",
                                          "x-accel-buffering": "no"})

    routes = [
        Route("/healthz", healthz),
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", signed_in(logout, post=True), methods=["POST"]),
        Route("/", signed_in(overview)),
        Route("/work", signed_in(work_list)),
        Route("/work/{id}", signed_in(work_item)),
        Route("/work/{id}/decide", signed_in(action(decide), post=True), methods=["POST"]),
        Route("/work/{id}/cancel", signed_in(action(cancel), post=True), methods=["POST"]),
        Route("/work/{id}/signal", signed_in(action(signal), post=True), methods=["POST"]),
        Route("/approvals", signed_in(approvals)),
        Route("/events", signed_in(events)),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    async def refused(request: Request, exc: Exception) -> Response:
        """An animus error a page did not expect (the database refused the person's role,
        or went away): said plainly, with the status it deserves."""
        status = 403 if isinstance(exc, PermissionDenied) else \
            503 if isinstance(exc, DatabaseUnavailable) else 500
        _log.warning("%s %s: %s", request.method, request.url.path, exc)
        return Response(f"{exc}\n", status_code=status, media_type="text/plain")

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={AnimusError: refused},
                    middleware=[
        Middleware(_Headers),
        Middleware(SessionMiddleware, secret_key=secret.decode(), session_cookie="animus_session",
                   max_age=SESSION_HOURS * 3600, same_site="strict", https_only=secure_cookies)])
    return app


def _awaits_decision(item: WorkItem) -> bool:
    """Whether people owe ``item`` a decision: held at its submit gate, or its focus waiting
    at an approval."""
    return item.state == State.AWAITING_APPROVAL or (
        item.state == State.WAITING and (item.wait or {}).get("kind") == "approval")


def _now() -> float:
    return datetime.now(UTC).timestamp()


def _next(request: Request, given: str | None = None) -> str:
    """Where to go after a form: a path of this console only, never another site."""
    target = given if given is not None else request.query_params.get("next", "/")
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target
