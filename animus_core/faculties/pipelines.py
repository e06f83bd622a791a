"""Declarative pipelines: stages of work with dependencies, planned without running.

    [pipeline]
    name = "weekly-report"

    [[stage]]
    name = "summary"
    work_type = "summarize"
    params = { text = "..." }

    [[stage]]
    name = "tags"
    work_type = "keywords"
    depends_on = ["summary"]
    params = { text = "${summary.summary}" }     # an earlier stage's outcome field
    gate = { role = "approver", quorum = 1 }     # optional: wait for approval first

``plan`` resolves every stage to a faculty, evaluates the rules, rejects cycles, unknown
work types and bad references, and writes nothing. ``run`` submits a parent item of type
``pipeline``; the built-in pipeline faculty submits each stage as a child when its
dependencies complete, passing outputs forward. A failed stage stops its dependents: they
are recorded dead with a reason naming it, and the pipeline ends dead too.
"""

from __future__ import annotations

import asyncio
import json
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from animus_core.faculties.contract import hookimpl
from animus_core.faculties.faculty import Faculty
from animus_core.faculties.focus import Focus
from animus_core.faculties.plugins import Faculties
from animus_core.governance.rules import Decision, RuleSet
from animus_core.store.roles import check_gate_role
from animus_core.values.errors import ConfigError, InvalidInput
from animus_core.values.states import State
from animus_core.values.work import NewWorkItem, WorkItem

__all__ = ["Pipeline", "PipelineFaculty", "Stage", "load", "order", "plan"]

_REF = re.compile(r"\$\{([A-Za-z0-9_-]+)((?:\.[A-Za-z0-9_-]+)*)\}")


class Gate(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    role: str = "approver"
    quorum: int = 1


class Stage(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    work_type: str
    params: dict[str, Any] = {}
    depends_on: list[str] = []
    gate: Gate | None = None
    priority: int = 0
    max_attempts: int = 3


class _Meta(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    description: str = ""


class Pipeline(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pipeline: _Meta
    stage: list[Stage]

    @property
    def stages(self) -> dict[str, Stage]:
        return {s.name: s for s in self.stage}


def _refs(value: Any) -> list[str]:
    if isinstance(value, str):
        return [m.group(1) for m in _REF.finditer(value)]
    if isinstance(value, dict):
        return [r for v in value.values() for r in _refs(v)]
    if isinstance(value, list):
        return [r for v in value for r in _refs(v)]
    return []


def order(p: Pipeline, where: str = "pipeline") -> list[str]:
    """Stage names in dependency order; raises on unknown dependencies and cycles."""
    stages = p.stages
    for s in p.stage:
        for dep in s.depends_on:
            if dep not in stages:
                raise ConfigError(f"{where}: stage {s.name!r} depends on unknown stage {dep!r}")
        if s.gate is not None:
            check_gate_role(s.gate.role, f"{where}: stage {s.name!r} gate")
    done: list[str] = []
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in done:
            return
        if name in visiting:
            cycle = [*visiting[visiting.index(name):], name]
            raise ConfigError(f"{where}: stages form a cycle: {' -> '.join(cycle)}")
        visiting.append(name)
        for dep in stages[name].depends_on:
            visit(dep)
        visiting.pop()
        done.append(name)

    for s in p.stage:
        visit(s.name)
    return done


def _ancestors(p: Pipeline, name: str) -> set[str]:
    out: set[str] = set()
    todo = list(p.stages[name].depends_on)
    while todo:
        dep = todo.pop()
        if dep not in out:
            out.add(dep)
            todo.extend(p.stages[dep].depends_on)
    return out


def load(path: Path) -> Pipeline:
    try:
        raw = tomllib.loads(path.read_text("utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: malformed TOML: {e}") from None
    return parse(raw, str(path))


def parse(raw: Any, where: str) -> Pipeline:
    try:
        p = msgspec.convert(raw, Pipeline)
    except msgspec.ValidationError as e:
        raise ConfigError(f"{where}: {str(e).replace('`$.', '`')}") from None
    if not p.stage:
        raise ConfigError(f"{where}: a pipeline needs at least one [[stage]]")
    names = [s.name for s in p.stage]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ConfigError(f"{where}: stage names must be unique: {sorted(dupes)}")
    order(p, where)
    for s in p.stage:
        ancestors = _ancestors(p, s.name)
        for ref in _refs(s.params):
            if ref not in ancestors:
                raise ConfigError(f"{where}: stage {s.name!r} refers to ${{{ref}...}}, which "
                                  f"is not one of its dependencies")
    return p


class PlannedStage(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    work_type: str
    depends_on: list[str]
    faculty: str | None
    origin: str | None
    decision: str
    reason: str


def plan(p: Pipeline, faculties: Faculties, rules: RuleSet, *, source: str) -> list[PlannedStage]:
    """What would run, in order; raises ConfigError for work types no faculty accepts."""
    out = []
    unknown = []
    for name in order(p):
        s = p.stages[name]
        fac = faculties.by_type.get(s.work_type)
        if fac is None:
            unknown.append(f"{name} ({s.work_type})")
        decision: Decision = rules.decide(s.work_type, s.params, source)
        effect, reason = decision.effect, decision.reason
        if s.gate is not None and effect == "allow":
            effect, reason = "require_approval", f"stage gate: {s.gate.quorum} x {s.gate.role}"
        out.append(PlannedStage(name=name, work_type=s.work_type, depends_on=s.depends_on,
                                faculty=fac.name if fac else None,
                                origin=fac.origin if fac else None,
                                decision=effect, reason=reason))
    if unknown:
        raise ConfigError(f"pipeline {p.pipeline.name!r}: no faculty accepts the work type of "
                          f"stage(s) {', '.join(unknown)}")
    return out


def _lookup(outcome: Any, path: str, ref: str) -> Any:
    value = outcome
    for key in [k for k in path.split(".") if k]:
        if isinstance(value, dict) and key in value:
            value = value[key]
        elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            raise InvalidInput(f"${{{ref}{path}}}: the outcome of stage {ref!r} has no {key!r}")
    return value


def _text(value: Any) -> str:
    """A value inside a string: strings as they are, anything else as (compact) JSON, so
    that ``${a.flag}`` reads ``true``, not Python's ``True``."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False,
                                                           separators=(",", ":"))


def resolve(value: Any, outcomes: dict[str, Any]) -> Any:
    """Substitute ``${stage.field}`` references with earlier stages' outcomes: a string that
    is one reference becomes the value itself (any JSON type); a reference inside a longer
    string is replaced by its text."""
    if isinstance(value, str):
        whole = _REF.fullmatch(value)
        if whole:
            return _lookup(outcomes.get(whole.group(1)), whole.group(2), whole.group(1))
        return _REF.sub(lambda m: _text(_lookup(outcomes.get(m.group(1)), m.group(2),
                                                  m.group(1))), value)
    if isinstance(value, dict):
        return {k: resolve(v, outcomes) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, outcomes) for v in value]
    return value


class PipelineFailed(Exception):
    pass


class PipelineFaculty(Faculty):
    """Runs a declared pipeline: submits each stage as child work when its dependencies
    complete, and ends with every stage's outcome."""

    name = "pipeline"
    accepts = ("pipeline",)
    max_concurrent = 16
    timeout = None
    max_attempts = 3
    poll_seconds = 0.25

    async def orient(self, focus: Focus) -> Any:
        return parse(focus.params.get("pipeline"), f"pipeline item {focus.work.id}")

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        p: Pipeline = oriented
        db = focus.db
        names = order(p)
        while True:
            children = await db.list_work(parent_id=focus.work.id, limit=10_000)
            by_stage: dict[str, WorkItem] = {}
            for child in sorted(children, key=lambda c: c.created_at):
                stage = (child.provenance.trigger or "").removeprefix("stage:")
                if stage in p.stages and child.state != State.MERGED:
                    by_stage[stage] = child
            outcomes = {n: c.outcome.data for n, c in by_stage.items()
                        if c.state == State.COMPLETED}
            failed = {n: c for n, c in by_stage.items()
                      if c.state in (State.DEAD, State.CANCELLED)}
            for name in names:
                if name in by_stage:
                    continue
                s = p.stages[name]
                bad = [d for d in s.depends_on if d in failed]
                if bad:
                    why = failed[bad[0]].reason or failed[bad[0]].state
                    await focus.submit(self._item(p, s, focus, {}).refused(
                        f"not run: stage {bad[0]!r} failed ({why})"))
                    continue
                if all(d in outcomes for d in s.depends_on):
                    try:
                        params = resolve(s.params, outcomes)
                    except InvalidInput as e:
                        await focus.submit(self._item(p, s, focus, {}).refused(f"not run: {e}"))
                        continue
                    item = self._item(p, s, focus, params)
                    if s.gate is not None:  # a rule's denial or gate takes precedence
                        gate = f"pipeline {p.pipeline.name} stage {s.name}"
                        item = item.gated(rule=gate, role=s.gate.role, quorum=s.gate.quorum,
                                          reason=gate)
                    await focus.submit(item)
            if len(by_stage) == len(names) and all(c.state.terminal for c in by_stage.values()):
                return {"pipeline": p.pipeline.name, "stages": {
                    n: {"id": str(c.id), "state": str(c.state), "outcome": c.outcome.data,
                        "reason": c.reason} for n, c in by_stage.items()}}
            await asyncio.sleep(self.poll_seconds)

    @staticmethod
    def _item(p: Pipeline, s: Stage, focus: Focus, params: dict[str, Any]) -> NewWorkItem:
        return (NewWorkItem(s.work_type, source=f"pipeline:{p.pipeline.name}",
                            trigger=f"stage:{s.name}")
                .params(params).priority(s.priority).max_attempts(s.max_attempts)
                .dedup_key(f"pipeline:{focus.work.id}:{s.name}").parent(focus.work.id))

    async def consolidate(self, focus: Focus, engaged: Any) -> Any:
        bad = {n: s for n, s in engaged["stages"].items() if s["state"] != "completed"}
        if bad:
            first = next(iter(bad))
            raise PipelineFailed(f"stage {first!r} {bad[first]['state']}: {bad[first]['reason']}"
                                 + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
        return engaged

    def recover(self, focus: Focus, error: str, phase: str) -> bool | None:
        return "PipelineFailed" not in error  # a failed stage will not succeed on a retry


@hookimpl
def register_faculties(register: Callable[[Faculty], None]) -> None:
    register(PipelineFaculty())
