"""``animus pipeline``: plan, run and show declarative pipelines."""

from __future__ import annotations

import argparse
import contextlib
import getpass
import sys
from pathlib import Path
from typing import Any

import msgspec

from animus_core.cli.context import cli_animus, open_db
from animus_core.cli.follow import no_engine_for_each
from animus_core.cli.output import print_json, print_table, seconds
from animus_core.faculties.pipelines import Pipeline, load, order, parse, plan, stage_items
from animus_core.governance.rules import RuleSet
from animus_core.infra.config import Settings
from animus_core.store.db import DEFAULT_QUEUE
from animus_core.values.errors import AnimusError, InvalidInput
from animus_core.values.work import Created, NewWorkItem


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pipe = sub.add_parser("pipeline", help="plan, run and show declarative pipelines")
    cmds = pipe.add_subparsers(dest="pipeline_command", metavar="COMMAND", required=True)
    p = cmds.add_parser("plan", help="resolve and check a pipeline file; writes nothing")
    p.add_argument("file", type=Path, help="the pipeline file (TOML)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=plan_cmd)
    p = cmds.add_parser("run", help="submit a pipeline (an engine runs it)")
    p.add_argument("file", type=Path, help="the pipeline file (TOML)")
    p.add_argument("--wait", action="store_true", help="follow the pipeline until it finishes "
                                                        "(its changes on standard error)")
    p.add_argument("--timeout", type=seconds, default=600.0, help="seconds to --wait")
    p.add_argument("--json", action="store_true", help="print the submission (with --wait, "
                                                      "the finished item) as JSON")
    p.set_defaults(handler=run_cmd)
    p = cmds.add_parser("status", help="the pipeline's stages, in order, with their states")
    p.add_argument("id", metavar="ID", help="the work item (its id)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=status_cmd)


def _source() -> str:
    return f"pipeline:{getpass.getuser()}"


async def plan_cmd(args: argparse.Namespace) -> int:
    from animus_core.cli.context import load_faculties

    settings = Settings.from_env()
    pipeline = load(args.file)
    _, faculties, problems = await load_faculties(settings)
    for p in problems:  # a faculty that did not load is one the plan cannot route to
        print(f"animus: plugin problem: {p.plugin}: {p.error}", file=sys.stderr)
    stages = plan(pipeline, faculties, RuleSet.load(settings.rules_dir),
                  source=f"pipeline:{pipeline.pipeline.name}")
    if args.json:
        print_json({"pipeline": pipeline.pipeline.name, "stages": stages})
        return 0
    print(f"pipeline {pipeline.pipeline.name}: {len(stages)} stages (plan only: nothing written)")
    print_table(["stage", "after", "work type", "faculty", "rules", "why"],
                [(s.name, ",".join(s.depends_on) or "-", s.work_type, s.faculty, s.decision,
                  s.reason[:60]) for s in stages])
    denied = [s.name for s in stages if s.decision == "deny"]
    if denied:
        print(f"would be denied: {', '.join(denied)} (and everything after them)")
    return 0


async def run_cmd(args: argparse.Namespace) -> int:
    from animus_core.cli.work_cmd import follow_to_end

    pipeline = load(args.file)
    raw = msgspec.to_builtins(pipeline)
    async with cli_animus() as animus:
        stuck: dict[str, str] = {}
        with contextlib.suppress(AnimusError):  # a check, never a reason not to submit
            stuck = await no_engine_for_each(
                animus.db, sorted({s.work_type for s in pipeline.stage}), DEFAULT_QUEUE)
        for work_type, why in stuck.items():
            names = ", ".join(s.name for s in pipeline.stage if s.work_type == work_type)
            print(f"animus: warning: no live engine would run stage(s) {names} (work type "
                  f"{work_type!r}) now: {why}; they wait until one does", file=sys.stderr)
        result = await animus.governed.submit(
            NewWorkItem("pipeline", source=_source(), trigger=str(args.file))
            .params({"pipeline": raw}).max_attempts(3))
        if args.wait:  # its changes (each wave of stages) on standard error, as they happen
            print(f"pipeline {pipeline.pipeline.name} submitted: {result.canonical_id}",
                  file=sys.stderr if args.json else sys.stdout, flush=True)
            return await follow_to_end(animus.db, result.canonical_id, args.timeout,
                                       as_json=args.json)
        if args.json:
            print_json(result)
            return 0
        if not isinstance(result, Created):
            print(f"merged into {result.canonical_id}")
            return 0
        state = result.item.state  # the rules may gate or deny work type "pipeline" too
        print(f"pipeline {pipeline.pipeline.name} submitted: {result.id}"
              + ("" if state == "queued" else f" ({state}: {result.item.reason})"))
    return 0


async def status_cmd(args: argparse.Namespace) -> int:
    async with await open_db() as db:
        parent = await db.get_work_item(args.id)
        children = await db.list_work(parent_id=parent.id, limit=10_000)
    if parent.work_type != "pipeline":
        raise InvalidInput(f"work item {parent.id} is a {parent.work_type!r} item, not a "
                           "pipeline (animus pipeline run submits one)")
    pipeline: Pipeline = parse(parent.params.get("pipeline"), f"pipeline item {parent.id}")
    by_stage = stage_items(children)
    # a finished pipeline's outcome keeps each stage's end, for stage items purged since
    ended = parent.outcome.data.get("stages") if isinstance(parent.outcome.data, dict) else None
    stages = pipeline.stages
    rows: list[dict[str, Any]] = []
    for name in order(pipeline):
        s = stages[name]
        child = by_stage.get(name)
        kept = ended.get(name) if isinstance(ended, dict) and child is None else None
        wid: str | None
        if child is not None:
            state, wid, reason = str(child.state), str(child.id), child.reason
        elif isinstance(kept, dict):
            state, wid, reason = f"{kept.get('state')} (purged)", kept.get("id"), None
        elif parent.state.terminal:  # it ended before its stages did: their items are gone
            state, wid, reason = "purged", None, None
        else:
            state, wid, reason = "pending", None, None
        rows.append({"stage": name, "after": s.depends_on, "work_type": s.work_type,
                     "state": state, "id": wid, "reason": reason})
    if args.json:
        print_json({"pipeline": pipeline.pipeline.name, "id": str(parent.id),
                    "state": str(parent.state), "stages": rows})
        return 0
    print(f"pipeline {pipeline.pipeline.name}  {parent.id}  {parent.state}")
    depth: dict[str, int] = {}
    for r in rows:
        depth[r["stage"]] = 1 + max((depth[d] for d in r["after"]), default=-1)
    print_table(["stage", "state", "work type", "id", "reason"],
                [("  " * depth[r["stage"]] + ("└─ " if r["after"] else "") + r["stage"]
                  + (f"  (after {', '.join(r['after'])})" if r["after"] else ""),
                  r["state"], r["work_type"], r["id"] or "", (r["reason"] or "")[:50])
                 for r in rows])
    return 0
