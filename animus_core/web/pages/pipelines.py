"""Pipelines: those run (``/pipelines``), and each one's stages as a graph with their states
(drawn on the pipeline item's page): a column per wave, an arrow from each stage to those
that depend on it."""

from __future__ import annotations

from collections import defaultdict
from uuid import UUID

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from animus_core.faculties.pipelines import MAX_STAGES, order, stage_items
from animus_core.faculties.pipelines import parse as parse_pipeline
from animus_core.store.db import Db
from animus_core.values.errors import AnimusError
from animus_core.values.work import WorkItem
from animus_core.web.people import Person
from animus_core.web.site import PAGE, Site

__all__ = ["Graph", "children_of", "routes", "stage_graph"]


async def pipelines_page(site: Site, request: Request, person: Person) -> Response:
    items = await (await site.db(person)).list_work(work_type="pipeline", limit=PAGE)
    return site.page("pipelines.html", request, person, items=items)


class Box(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    work_type: str
    x: int
    y: int
    state: str
    item: UUID | None


class Graph(msgspec.Struct, frozen=True, kw_only=True):
    """A pipeline's stages laid out for an SVG: a column per wave, arrows from each stage
    to those that depend on it."""

    boxes: list[Box]
    #: (x1, y1, x2, y2) from a dependency's right edge to a dependant's left edge
    edges: list[tuple[int, int, int, int]]
    width: int
    height: int


BOX_W, BOX_H, GAP_X, GAP_Y = 170, 46, 50, 18


def stage_graph(item: WorkItem, children: list[WorkItem]) -> Graph | None:
    """The stages of pipeline ``item`` with the state of each (its child item's, or
    ``pending`` before its wave), or None when the item is not a readable pipeline."""
    try:
        p = parse_pipeline(item.params.get("pipeline"), f"pipeline item {item.id}")
    except AnimusError:
        return None
    stages = p.stages
    by_stage = stage_items(children)
    depth: dict[str, int] = {}
    columns: defaultdict[int, list[str]] = defaultdict(list)
    for name in order(p):  # each stage after its dependencies: their depth is known
        depth[name] = 1 + max((depth[d] for d in stages[name].depends_on), default=-1)
    for s in p.stage:  # in each column, in the order declared
        columns[depth[s.name]].append(s.name)
    where: dict[str, tuple[int, int]] = {}
    boxes = []
    for col, names in sorted(columns.items()):
        for row, name in enumerate(names):
            x, y = col * (BOX_W + GAP_X), row * (BOX_H + GAP_Y)
            where[name] = (x, y)
            child = by_stage.get(name)
            boxes.append(Box(name=name, work_type=stages[name].work_type, x=x, y=y,
                             state=child.state.value if child else "pending",
                             item=child.id if child else None))
    edges = [(where[d][0] + BOX_W, where[d][1] + BOX_H // 2, where[s.name][0],
              where[s.name][1] + BOX_H // 2) for s in p.stage for d in s.depends_on]
    return Graph(boxes=boxes, edges=edges,
                 width=len(columns) * (BOX_W + GAP_X) - GAP_X,
                 height=max(len(n) for n in columns.values()) * (BOX_H + GAP_Y) - GAP_Y)


async def children_of(db: Db, item: WorkItem) -> list[WorkItem]:
    """The children to draw a pipeline with: every stage's, retried ones included."""
    return await db.list_work(parent_id=item.id, limit=4 * MAX_STAGES)


def routes(site: Site) -> list[Route]:
    return [Route("/pipelines", site.signed_in(pipelines_page))]
