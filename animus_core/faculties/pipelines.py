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
``pipeline``; the built-in pipeline faculty runs the stages in waves: each wave is every
stage whose dependencies have all finished, submitted together as child work with
``focus.run_children``, passing outputs forward. The pipeline waits for a wave suspended
(no slot, no polling) and the last stage of the wave to end wakes it. A failed stage stops
its dependents: they are recorded dead with a reason naming it, and the pipeline ends dead
too.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import msgspec

from animus_core.faculties.contract import hookimpl
from animus_core.faculties.faculty import Faculty
from animus_core.faculties.focus import Focus
from animus_core.faculties.plugins import Faculties
from animus_core.governance.rules import Decision, RuleSet
from animus_core.infra.toml_files import convert, load_toml
from animus_core.store.roles import check_gate_role
from animus_core.values.children import ChildResult
from animus_core.values.errors import ConfigError, InvalidInput
from animus_core.values.work import NewWorkItem, WorkItem

__all__ = ["MAX_STAGES", "Pipeline", "PipelineFaculty", "Stage", "load", "order", "plan",
           "stage_items"]

#: stages of one pipeline at the most (its plan, its graph and each wave are read whole)
MAX_STAGES = 500
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
    """Stage names in dependency order (each after its dependencies, else in the order
    declared); raises on unknown dependencies and cycles. Linear in stages and dependencies,
    with no recursion."""
    stages = p.stages
    for s in p.stage:
        for dep in s.depends_on:
            if dep not in stages:
                raise ConfigError(f"{where}: stage {s.name!r} depends on unknown stage {dep!r}")
        if s.gate is not None:
            check_gate_role(s.gate.role, f"{where}: stage {s.name!r} gate")
    done: dict[str, None] = {}  # ordered, and a set
    for s in p.stage:
        if s.name in done:
            continue
        path: list[str] = [s.name]  # the stages being visited, outermost first
        todo = [iter(stages[s.name].depends_on)]
        on_path = {s.name}
        while todo:
            nxt: str | None = next(todo[-1], None)
            if nxt is None:
                todo.pop()
                name = path.pop()
                on_path.discard(name)
                done[name] = None
            elif nxt in on_path:
                cycle = [*path[path.index(nxt):], nxt]
                raise ConfigError(f"{where}: stages form a cycle: {' -> '.join(cycle)}")
            elif nxt not in done:
                path.append(nxt)
                on_path.add(nxt)
                todo.append(iter(stages[nxt].depends_on))
    return list(done)


def _ancestors(stages: dict[str, Stage], name: str) -> set[str]:
    out: set[str] = set()
    todo = list(stages[name].depends_on)
    while todo:
        dep = todo.pop()
        if dep not in out:
            out.add(dep)
            todo.extend(stages[dep].depends_on)
    return out


def stage_items(children: Iterable[WorkItem]) -> dict[str, WorkItem]:
    """Each stage's work item among a pipeline item's ``children``: the latest submitted for
    it that was not merged into another."""
    by_stage: dict[str, WorkItem] = {}
    for c in sorted(children, key=lambda c: c.created_at):
        trigger = c.provenance.trigger or ""
        if trigger.startswith("stage:") and c.state != "merged":
            by_stage[trigger.removeprefix("stage:")] = c
    return by_stage


def load(path: Path) -> Pipeline:
    return _checked(load_toml(path, Pipeline), str(path))


def parse(raw: Any, where: str) -> Pipeline:
    return _checked(convert(raw, Pipeline, where), where)


def _checked(p: Pipeline, where: str) -> Pipeline:
    if not p.stage:
        raise ConfigError(f"{where}: a pipeline needs at least one [[stage]]")
    if len(p.stage) > MAX_STAGES:
        raise ConfigError(f"{where}: a pipeline has at most {MAX_STAGES} stages, this one has "
                          f"{len(p.stage)}; split it into smaller ones")
    dupes = {n for n, k in Counter(s.name for s in p.stage).items() if k > 1}
    if dupes:
        raise ConfigError(f"{where}: stage names must be unique: {sorted(dupes)}")
    order(p, where)
    stages = p.stages
    for s in p.stage:
        refs = _refs(s.params)
        ancestors = _ancestors(stages, s.name) if refs else set()
        for ref in refs:
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
    stages = p.stages
    for name in order(p):
        s = stages[name]
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
    """Runs a declared pipeline: submits each wave of stages whose dependencies have
    finished as child work, waits for it suspended, and ends with every stage's outcome."""

    name = "pipeline"
    accepts = ("pipeline",)
    max_concurrent = 16
    timeout = None
    max_attempts = 3

    async def orient(self, focus: Focus) -> Any:
        return parse(focus.params.get("pipeline"), f"pipeline item {focus.work.id}")

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        p: Pipeline = oriented
        names = order(p)
        stages = p.stages
        ended: dict[str, ChildResult] = {}
        while len(ended) < len(names):
            # a wave: every stage whose dependencies have all finished, submitted together
            wave = [n for n in names
                    if n not in ended and all(d in ended for d in stages[n].depends_on)]
            items = [self._stage_item(p, stages[n], focus, ended) for n in wave]
            # the pipeline waits holding no slot; the last stage of the wave to end wakes it
            ended.update(zip(wave, await focus.run_children(items), strict=True))
        return {"pipeline": p.pipeline.name, "stages": {
            n: {"id": str(r.id), "state": str(r.state), "outcome": r.outcome,
                "reason": r.reason} for n, r in ended.items()}}

    def _stage_item(self, p: Pipeline, s: Stage, focus: Focus,
                    ended: dict[str, ChildResult]) -> NewWorkItem:
        """Stage ``s`` as it is to be submitted, its dependencies having ``ended``: recorded
        as not run (dead) when one of them did not complete, or its references do not
        resolve; gated when the stage declares a gate."""
        bad = [d for d in s.depends_on if not ended[d].ok]
        if bad:
            why = ended[bad[0]].reason or ended[bad[0]].state
            return self._item(p, s, focus, {}).refused(f"not run: stage {bad[0]!r} failed ({why})")
        try:
            params = resolve(s.params, {n: r.outcome for n, r in ended.items()})
        except InvalidInput as e:
            return self._item(p, s, focus, {}).refused(f"not run: {e}")
        item = self._item(p, s, focus, params)
        if s.gate is not None:  # a rule's denial or gate takes precedence
            gate = f"pipeline {p.pipeline.name} stage {s.name}"
            item = item.gated(rule=gate, role=s.gate.role, quorum=s.gate.quorum, reason=gate)
        return item

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
