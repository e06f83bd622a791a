"""Work items: the list (``/work``), one item (``/work/{id}``), two compared (``/diff``), dead
letters (``/dead``), submitting (``/submit``), and the actions on an item (decide, cancel,
signal, retry or replay, run again), each a POST that runs as the person."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from animus_core.governance.records import compare
from animus_core.store import engines, read
from animus_core.store.db import Db
from animus_core.values import json_values
from animus_core.values.engines import FacultyInfo
from animus_core.values.errors import AnimusError, InvalidInput, PermissionDenied, WorkNotFound
from animus_core.values.states import State
from animus_core.values.work import Created, NewWorkItem, WorkItem
from animus_core.web.pages.fleet import live_faculties
from animus_core.web.pages.pipelines import BOX_H, BOX_W, children_of, stage_graph
from animus_core.web.people import Person
from animus_core.web.site import PAGE, Site

__all__ = ["routes"]

_TRACE_ID = re.compile(r"(?!0{32})[0-9a-f]{32}")
#: the list's "since" filter: label -> how far back
SINCE = {"1h": timedelta(hours=1), "24h": timedelta(days=1), "7d": timedelta(days=7),
         "30d": timedelta(days=30)}


async def work_list(site: Site, request: Request, person: Person) -> Response:
    q = request.query_params
    filters = {k: q.get(k, "") for k in ("state", "type", "source", "parent", "since")}
    since = SINCE.get(filters["since"])
    if filters["since"] and since is None:
        request.session["flash"] = (f"since {filters['since']!r:.20} is not one of "
                                    f"{', '.join(SINCE)}: showing any time")
    try:
        items = await (await site.db(person)).list_work(
            state=filters["state"] or None, work_type=filters["type"] or None,
            source=filters["source"] or None, parent_id=filters["parent"] or None,
            created_since=datetime.now(UTC) - since if since else None,
            before=q.get("before") or None, limit=PAGE + 1)
    except (InvalidInput, WorkNotFound) as e:
        request.session["flash"] = str(e)
        items = []
    more = len(items) > PAGE
    items = items[:PAGE]
    return site.page("work_list.html", request, person, items=items, filters=filters,
                     states=[s.value for s in State], since_options=list(SINCE),
                     next_page=items[-1].id if more and items else None)


async def work_item(site: Site, request: Request, person: Person) -> Response:
    db = await site.db(person)
    try:
        wid = UUID(request.path_params["id"])
        item = await db.get_work_item(wid)
    except (ValueError, WorkNotFound):
        return site.page("missing.html", request, person, what=request.path_params["id"],
                         status_code=404)
    history = await db.history(wid)
    pending = [p for p in await read.pending_approvals(db) if p.id == wid] \
        if _awaits_decision(item) else []  # else no decision is pending: no query
    pipeline = item.work_type == "pipeline"  # its graph needs every stage's child
    children = await (children_of(db, item) if pipeline
                      else db.list_work(parent_id=wid, limit=PAGE))
    return site.page("work_item.html", request, person,
                     item=item, history=history, pending=pending[0] if pending else None,
                     children=children[:PAGE], records=await db.executions(wid),
                     steps=await db.steps(wid), trace=_trace_link(site, item),
                     graph=stage_graph(item, children) if pipeline else None,
                     box=(BOX_W, BOX_H))


async def diff(site: Site, request: Request, person: Person) -> Response:
    a, b = request.query_params.get("a", "").strip(), request.query_params.get("b", "").strip()
    comparison, problem = None, None
    if a and b:
        try:
            comparison = await compare(await site.db(person), a, b)
        except (InvalidInput, WorkNotFound) as e:
            problem = str(e)
    return site.page("diff.html", request, person, a=a, b=b, comparison=comparison,
                     problem=problem)


async def dead_letters(site: Site, request: Request, person: Person) -> Response:
    q = request.query_params
    try:
        items = await (await site.db(person)).list_work(
            state="dead", work_type=q.get("type") or None, before=q.get("before") or None,
            limit=PAGE + 1)
    except (InvalidInput, WorkNotFound) as e:
        request.session["flash"] = str(e)
        items = []
    more = len(items) > PAGE
    items = items[:PAGE]
    return site.page("dead.html", request, person, items=items, type=q.get("type", ""),
                     next_page=items[-1].id if more and items else None)


async def submit_form(site: Site, request: Request, person: Person) -> Response:
    faculties = await _faculties(site, person)
    chosen = request.query_params.get("type", "")
    example = next((f.example for f in faculties if chosen in f.accepts and f.example), None)
    return site.page("submit.html", request, person, faculties=faculties, work_type=chosen,
                     params=json.dumps(example, indent=2, ensure_ascii=False) if example
                     else "{}")


async def submit(site: Site, request: Request, person: Person) -> Response:
    form = await request.form()
    work_type = str(form.get("work_type", "")).strip()
    text = str(form.get("params", "")).strip() or "{}"
    try:
        params = json_values.decode(text, "params")
        if not isinstance(params, dict):
            raise InvalidInput(f"params must be a JSON object, got {type(params).__name__}")
        new = NewWorkItem(work_type, source="console").params(params)
        priority = str(form.get("priority", "")).strip()
        if priority:
            new = new.priority(_int(priority, "priority"))
        result = await (await site.governed(person)).submit(new)
    except AnimusError as e:
        request.session["flash"] = f"not submitted: {e}"
        return site.page("submit.html", request, person,
                         faculties=await _faculties(site, person), work_type=work_type,
                         params=text, status_code=403 if isinstance(e, PermissionDenied)
                         else 400)
    if isinstance(result, Created):
        request.session["flash"] = f"submitted {result.id}: {result.item.state}"
        return RedirectResponse(f"/work/{result.id}", status_code=303)
    request.session["flash"] = (f"merged into {result.canonical_id}: live work of this type "
                                "holds the same dedup key")
    return RedirectResponse(f"/work/{result.canonical_id}", status_code=303)


# -- actions on one item ------------------------------------------------------------------------


async def decide(site: Site, db: Db, person: Person, wid: UUID, form: Any) -> str:
    decision = str(form.get("decision", ""))
    if decision not in ("approve", "reject"):
        raise InvalidInput("a decision is approve or reject")
    item = await db.decide(wid, decision, str(form.get("reason", "")).strip())
    done = {"approve": "approved", "reject": "rejected"}[decision]
    return f"{done} {wid}: now {item.state}"


async def cancel(site: Site, db: Db, person: Person, wid: UUID, form: Any) -> str:
    result = await db.cancel(wid, str(form.get("reason", "")).strip() or "cancelled in "
                             "the console")
    return f"cancel {wid}: {result.state}"


async def signal(site: Site, db: Db, person: Person, wid: UUID, form: Any) -> str:
    text = str(form.get("data", "")).strip()
    payload = json_values.decode(text, "the signal's data") if text else None
    sent = await db.signal(wid, str(form.get("event", "")).strip(), payload)
    return f"signal {sent.signal_id} sent" + (": it woke the item" if sent.woke else
                                              ", kept until the item waits for it")


async def retry(site: Site, db: Db, person: Person, wid: UUID,
                form: Any) -> str | tuple[str, str]:
    """A failed item queued again; a dead one replayed as a new item (from a step, if
    given)."""
    item = await db.get_work_item(wid)
    step = str(form.get("from_step", "")).strip() or None
    if item.state == State.DEAD:
        result = await (await site.governed(person)).replay(wid, source="console",
                                                            from_step=step)
        if isinstance(result, Created):
            return (f"replayed {wid} as {result.id}" + (f" from step {step}" if step else ""),
                    f"/work/{result.id}")
        return f"merged into {result.canonical_id}", f"/work/{result.canonical_id}"
    if step:
        raise InvalidInput(f"work item {wid} is {item.state}: a replay from a step is of a "
                           "dead item")
    await db.retry(wid, reason="retried in the console")
    return f"queued {wid} for another attempt"


async def again(site: Site, db: Db, person: Person, wid: UUID,
                form: Any) -> str | tuple[str, str]:
    """A finished item's work submitted again, as ``animus work rerun --no-wait`` does."""
    old = await db.get_work_item(wid)
    if not old.state.terminal or old.state == State.MERGED:
        raise InvalidInput(f"work item {wid} is {old.state}: run a finished item again")
    step = str(form.get("from_step", "")).strip() or None
    new = old.again(source="console", trigger=f"rerun of {wid}"
                    + (f" from step {step}" if step else ""))
    governed = await site.governed(person)
    result = await (governed.submit_from_step(new, wid, step, queue=old.queue) if step
                    else governed.submit(new, queue=old.queue))
    if isinstance(result, Created):
        return f"ran {wid} again as {result.id}", f"/diff?a={wid}&b={result.id}"
    return f"merged into {result.canonical_id}", f"/work/{result.canonical_id}"


def routes(site: Site) -> list[Route]:
    return [
        Route("/work", site.signed_in(work_list)),
        Route("/work/{id}", site.signed_in(work_item)),
        Route("/work/{id}/decide", site.action(decide), methods=["POST"]),
        Route("/work/{id}/cancel", site.action(cancel), methods=["POST"]),
        Route("/work/{id}/signal", site.action(signal), methods=["POST"]),
        Route("/work/{id}/retry", site.action(retry), methods=["POST"]),
        Route("/work/{id}/again", site.action(again), methods=["POST"]),
        Route("/diff", site.signed_in(diff)),
        Route("/dead", site.signed_in(dead_letters)),
        Route("/submit", site.signed_in(submit_form), methods=["GET"]),
        Route("/submit", site.signed_in(submit, post=True), methods=["POST"]),
    ]


def _awaits_decision(item: WorkItem) -> bool:
    """Whether people owe ``item`` a decision: held at its submit gate, or its focus waiting
    at an approval."""
    return item.state == State.AWAITING_APPROVAL or (
        item.state == State.WAITING and (item.wait or {}).get("kind") == "approval")


def _trace_link(site: Site, item: WorkItem) -> str | None:
    """The item's trace in the tracing backend, when one is configured and the item has a
    trace context (``00-<trace id>-<span id>-<flags>``)."""
    parts = (item.traceparent or "").split("-")
    if site.trace_url is None or len(parts) != 4 or not _TRACE_ID.fullmatch(parts[1]):
        return None
    return site.trace_url.replace("{trace_id}", parts[1])


async def _faculties(site: Site, person: Person) -> list[FacultyInfo]:
    """The faculties of the live engines, each once, in name order."""
    return [f.info for f in live_faculties(await engines.registered(await site.db(person)))]


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InvalidInput(f"{what} must be a whole number, got {text!r:.40}") from None
