"""Declarative pipelines: plan (writes nothing), run through a real engine, status.

The engine runs in this event loop with TOML faculties whose engage hooks are bash:

* ``fetch`` outputs ``{"rows": 3, "name": "alpha", "items": ["a", "b"], "ok": true}``;
* ``echo`` outputs its own params (so a stage's outcome shows what it was given);
* ``boom`` prints ``kaput`` and fails.

``animus pipeline plan|run|status`` and ``animus approve`` run as subprocesses without
blocking the loop.
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from animus_core import NewWorkItem, State
from animus_core.faculties.pipelines import MAX_STAGES, load, order, parse, plan, resolve
from animus_core.faculties.plugins import Faculties
from animus_core.faculties.toml import load_dir
from animus_core.governance.rules import RuleSet
from animus_core.governance.work import GovernedWork
from animus_core.store.db import Db
from animus_core.values.errors import ConfigError, InvalidInput
from tests.engine_helpers import (
    RunningEngine,
    run_cli,
    run_engine,
    wait_finished,
    wait_until,
    write_toml_faculty,
)
from tests.governance_helpers import People
from tests.governance_helpers import people as team
from tests.support import counts, raw

NIGHTLY = """
[pipeline]
name = "nightly"
description = "fetch, count, fail, report"

[[stage]]
name = "fetch"
work_type = "fetch"

[[stage]]
name = "count"
work_type = "echo"
depends_on = ["fetch"]

[stage.params]
n = "${fetch.rows}"
label = "name=${fetch.name} rows=${fetch.rows}"
first = "${fetch.items.0}"
all = "${fetch.items}"
flag = "ok=${fetch.ok}"
fixed = 7

[[stage]]
name = "explode"
work_type = "boom"
depends_on = ["fetch"]
max_attempts = 1

[[stage]]
name = "report"
work_type = "echo"
depends_on = ["count", "explode"]
params = { total = "${count.n}" }

[[stage]]
name = "archive"
work_type = "echo"
depends_on = ["count"]
params = { n = "${count.n}", label = "${count.label}" }
"""

GATED = """
[pipeline]
name = "gated"

[[stage]]
name = "fetch"
work_type = "fetch"

[[stage]]
name = "ship"
work_type = "echo"
depends_on = ["fetch"]
params = { rows = "${fetch.rows}" }
gate = { role = "approver", quorum = 1 }

[[stage]]
name = "after"
work_type = "echo"
depends_on = ["ship"]
params = { shipped = "${ship.rows}" }
"""

ECHO_PARAMS = ("python -c 'import json; print(json.dumps(json.load(open(\"work.json\"))"
               "[\"params\"]))' > engage-out.json")


@pytest.fixture
def faculties(tmp_path: Path) -> Path:
    write_toml_faculty(tmp_path, "fetch", hooks={"engage": """
        echo '{"rows": 3, "name": "alpha", "items": ["a", "b"], "ok": true}' > engage-out.json
    """})
    write_toml_faculty(tmp_path, "echo", hooks={"engage": ECHO_PARAMS},
                       fields={"max_concurrent": 4})
    write_toml_faculty(tmp_path, "boom", hooks={"engage": """
        echo "kaput" >&2
        exit 1
    """})
    return tmp_path / "faculties"


@pytest.fixture
def env(cli_env: dict[str, str], tmp_path: Path, faculties: Path) -> dict[str, str]:
    return {**cli_env, "ANIMUS_HOME": str(tmp_path / "home"),
            "ANIMUS_FACULTIES": str(faculties), "ANIMUS_RULES": str(tmp_path / "no-rules")}


@pytest.fixture
async def engine(db_url: str, tmp_path: Path, faculties: Path) -> AsyncIterator[RunningEngine]:
    async with run_engine(db_url, tmp_path / "home", faculties_dir=faculties) as running:
        yield running


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


async def animus(env: dict[str, str], cwd: Path, *args: str) -> str:
    code, out, err = await run_cli(env, cwd, *args)
    assert code == 0, f"animus {' '.join(args)}: exit {code}\n{out}\n{err}"
    assert "Traceback" not in err, err
    return out


async def stages(db: Db, parent: Any) -> dict[str, Any]:
    return {(c.provenance.trigger or "").removeprefix("stage:"): c
            for c in await db.list_work(parent_id=parent)}


# -- plan ---------------------------------------------------------------------------------------


async def everything(db_url: str) -> dict[str, int]:
    found = await counts(db_url)
    async with raw(db_url) as conn:
        for table in ("execution_records", "approvals", "environments", "schema_migrations"):
            found[table] = await conn.fetchval(f"SELECT count(*) FROM animus.{table}")
        found["queues"] = await conn.fetchval("SELECT count(*) FROM pgmq.meta")
    return found


async def test_plan_writes_nothing_and_shows_the_rules(db, db_url, env, tmp_path):
    path = write(tmp_path, "nightly.toml", NIGHTLY)
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "10.toml").write_text(textwrap.dedent("""
        [[rule]]
        name = "no booms"
        work_type = "boom"
        effect = "deny"
        reason = "booms are banned"

        [[rule]]
        name = "echo needs a look"
        work_type = "echo"
        params = { total = "${count.n}" }
        effect = "require_approval"
        reason = "reports are read first"

        [[rule]]
        name = "the rest"
        effect = "allow"
    """))
    before = await everything(db_url)
    out = await animus({**env, "ANIMUS_RULES": str(rules)}, tmp_path, "pipeline", "plan",
                       str(path))
    assert await everything(db_url) == before
    lines = out.splitlines()
    assert lines[0] == "pipeline nightly: 5 stages (plan only: nothing written)"
    assert lines[1].split() == ["stage", "after", "work", "type", "faculty", "rules", "why"]
    rows = {line.split()[0]: line.split() for line in lines[2:7]}
    assert list(rows) == ["fetch", "count", "explode", "report", "archive"]  # dependency order
    assert rows["fetch"][:5] == ["fetch", "-", "fetch", "fetch", "allow"]
    assert rows["count"][:5] == ["count", "fetch", "echo", "echo", "allow"]
    assert rows["explode"][:5] == ["explode", "fetch", "boom", "boom", "deny"]
    assert rows["report"][:5] == ["report", "count,explode", "echo", "echo", "require_approval"]
    assert lines[-1] == "would be denied: explode (and everything after them)"

    data = json.loads(await animus(env, tmp_path, "pipeline", "plan", str(path), "--json"))
    assert data["pipeline"] == "nightly"
    assert [(s["name"], s["depends_on"], s["faculty"], s["decision"]) for s in data["stages"]] == [
        ("fetch", [], "fetch", "allow"), ("count", ["fetch"], "echo", "allow"),
        ("explode", ["fetch"], "boom", "allow"), ("report", ["count", "explode"], "echo", "allow"),
        ("archive", ["count"], "echo", "allow")]
    assert data["stages"][0]["origin"] == str(tmp_path / "faculties" / "fetch.toml")
    gated = json.loads(await animus(env, tmp_path, "pipeline", "plan",
                                    str(write(tmp_path, "gated.toml", GATED)), "--json"))
    assert [(s["name"], s["decision"], s["reason"]) for s in gated["stages"]] == [
        ("fetch", "allow", "no rules configured"),
        ("ship", "require_approval", "stage gate: 1 x approver"),
        ("after", "allow", "no rules configured")]
    assert await everything(db_url) == before


@pytest.mark.parametrize(("stages_toml", "expected"), [
    ("""
     [[stage]]
     name = "a"
     work_type = "fetch"
     depends_on = ["c"]
     [[stage]]
     name = "b"
     work_type = "fetch"
     depends_on = ["a"]
     [[stage]]
     name = "c"
     work_type = "fetch"
     depends_on = ["b"]
     """, "stages form a cycle: a -> c -> b -> a"),
    ("""
     [[stage]]
     name = "self"
     work_type = "fetch"
     depends_on = ["self"]
     """, "stages form a cycle: self -> self"),
    ("""
     [[stage]]
     name = "a"
     work_type = "fetch"
     depends_on = ["ghost"]
     """, "stage 'a' depends on unknown stage 'ghost'"),
    ("""
     [[stage]]
     name = "a"
     work_type = "fetch"
     [[stage]]
     name = "b"
     work_type = "fetch"
     [[stage]]
     name = "c"
     work_type = "echo"
     depends_on = ["a"]
     params = { x = "${b.rows}" }
     """, "stage 'c' refers to ${b...}, which is not one of its dependencies"),
    ("""
     [[stage]]
     name = "a"
     work_type = "fetch"
     params = { x = ["keep", { y = "${nobody.z}" }] }
     """, "stage 'a' refers to ${nobody...}, which is not one of its dependencies"),
    ("""
     [[stage]]
     name = "a"
     work_type = "fetch"
     [[stage]]
     name = "a"
     work_type = "echo"
     """, "stage names must be unique: ['a']"),
    ("""
     [[stage]]
     name = "a"
     work_type = "fetch"
     colour = "red"
     """, "unknown field `colour` in stage[0] (it takes: name, work_type, params,"),
    ("""
     [[stage]]
     name = "a"
     work_type = "fetch"
     gate = { role = "approvers" }
     """, "stage 'a' gate: role 'approvers' is not an animus role; use one of reader,"),
    ("", "a pipeline needs at least one [[stage]]"),
])
def test_bad_pipelines_are_rejected_naming_the_problem(tmp_path: Path, stages_toml: str,
                                                       expected: str) -> None:
    path = write(tmp_path, "bad.toml", '[pipeline]\nname = "bad"\n' + textwrap.dedent(stages_toml)
                 .replace("\n[[", "\n\n[["))
    if not stages_toml:
        path.write_text('stage = []\n[pipeline]\nname = "bad"\n')
    with pytest.raises(ConfigError) as e:
        load(path)
    assert str(e.value).startswith(f"{path}: "), str(e.value)
    assert expected in str(e.value)


def test_a_transitive_dependency_may_be_referenced(tmp_path: Path) -> None:
    p = load(write(tmp_path, "ok.toml", """
        [pipeline]
        name = "chain"
        [[stage]]
        name = "a"
        work_type = "fetch"
        [[stage]]
        name = "b"
        work_type = "echo"
        depends_on = ["a"]
        [[stage]]
        name = "c"
        work_type = "echo"
        depends_on = ["b"]
        params = { x = "${a.rows}", y = "${b}" }
    """))
    assert order(p) == ["a", "b", "c"]


def chain(n: int) -> dict[str, Any]:
    """A pipeline of ``n`` stages, each depending on (and referring to) the one before,
    listed last first."""
    stages = [{"name": f"s{i}", "work_type": "echo",
               **({"depends_on": [f"s{i - 1}"], "params": {"x": f"${{s{i - 1}.x}}"}} if i else {})}
              for i in range(n)]
    return {"pipeline": {"name": "long"}, "stage": stages[::-1]}


def test_a_pipeline_of_the_most_stages_parses_in_order() -> None:
    p = parse(chain(MAX_STAGES), "long")  # a chain, listed backwards: no recursion limit
    assert order(p) == [f"s{i}" for i in range(MAX_STAGES)]


def test_a_pipeline_of_too_many_stages_is_refused_saying_so() -> None:
    with pytest.raises(ConfigError, match=rf"long: a pipeline has at most {MAX_STAGES} "
                                          rf"stages, this one has {MAX_STAGES + 1}"):
        parse(chain(MAX_STAGES + 1), "long")


def test_plan_rejects_work_types_no_faculty_accepts(tmp_path: Path, faculties: Path) -> None:
    loaded, errors = load_dir(faculties)
    assert not errors
    registry = Faculties()
    for f in loaded:
        registry.add(f)
    p = parse({"pipeline": {"name": "p"}, "stage": [
        {"name": "a", "work_type": "fetch"}, {"name": "b", "work_type": "teleport"},
        {"name": "c", "work_type": "warp", "depends_on": ["b"]}]}, "p.toml")
    with pytest.raises(ConfigError, match=r"pipeline 'p': no faculty accepts the work type of "
                                          r"stage\(s\) b \(teleport\), c \(warp\)"):
        plan(p, registry, RuleSet([]), source="pipeline:p")


async def test_the_plan_command_reports_errors_in_one_line(env, tmp_path):
    cycle = write(tmp_path, "cycle.toml", """
        [pipeline]
        name = "loop"
        [[stage]]
        name = "a"
        work_type = "fetch"
        depends_on = ["b"]
        [[stage]]
        name = "b"
        work_type = "fetch"
        depends_on = ["a"]
    """)
    unknown = write(tmp_path, "unknown.toml", """
        [pipeline]
        name = "far"
        [[stage]]
        name = "go"
        work_type = "teleport"
    """)
    for path, message in ((cycle, f"{cycle}: stages form a cycle: a -> b -> a"),
                          (unknown, "pipeline 'far': no faculty accepts the work type of "
                                    "stage(s) go (teleport)")):
        code, out, err = await run_cli(env, tmp_path, "pipeline", "plan", str(path))
        assert code == 2, (out, err)
        assert err.strip().splitlines() == [f"animus: error: {message}"]


async def test_the_plan_command_says_why_a_faculty_it_needs_did_not_load(env, tmp_path,
                                                                         faculties):
    """A stage no faculty accepts because that faculty's file is broken: the plan says both."""
    (faculties / "teleport.toml").write_text(
        '[faculty]\nname = "teleport"\naccepts = ["teleport"]\ncolour = "red"\n')
    path = write(tmp_path, "far.toml", """
        [pipeline]
        name = "far"
        [[stage]]
        name = "go"
        work_type = "teleport"
    """)
    code, out, err = await run_cli(env, tmp_path, "pipeline", "plan", str(path))
    assert code == 2, (out, err)
    problem, error = err.strip().splitlines()
    assert problem.startswith(f"animus: plugin problem: animus (built-in): {faculties}/"
                              "teleport.toml: unknown field `colour` in faculty")
    assert error == ("animus: error: pipeline 'far': no faculty accepts the work type of "
                     "stage(s) go (teleport)")


async def test_running_a_pipeline_warns_of_stages_no_live_engine_would_run(env, tmp_path):
    """As work submit does: submitted all the same (engines may come), with a warning per
    work type that no live engine would run now."""
    path = write(tmp_path, "far.toml", """
        [pipeline]
        name = "far"
        [[stage]]
        name = "go"
        work_type = "teleport"
        [[stage]]
        name = "back"
        work_type = "teleport"
        depends_on = ["go"]
    """)
    code, out, err = await run_cli(env, tmp_path, "pipeline", "run", str(path))
    assert code == 0, err
    assert out.startswith("pipeline far submitted: ")
    [warning] = err.strip().splitlines()
    assert warning.startswith("animus: warning: no live engine would run stage(s) go, back "
                              "(work type 'teleport') now: ")
    assert warning.endswith("; they wait until one does")


def test_references_resolve_whole_values_and_inside_strings() -> None:
    outcomes = {"s": {"n": 3, "ok": True, "none": None, "l": [1, "a"], "d": {"k": 1.5},
                      "text": "caf\u00e9"}}
    assert resolve({"a": "${s.n}", "b": "${s.l}", "c": "${s.d.k}", "d": "${s.l.1}",
                    "e": ["${s.ok}", {"f": "${s}"}], "g": 5},
                   outcomes) == {"a": 3, "b": [1, "a"], "c": 1.5, "d": "a",
                                 "e": [True, {"f": outcomes["s"]}], "g": 5}
    assert resolve("n=${s.n} ok=${s.ok} none=${s.none} l=${s.l} d=${s.d} t=${s.text}",
                   outcomes) == 'n=3 ok=true none=null l=[1,"a"] d={"k":1.5} t=caf\u00e9'
    with pytest.raises(InvalidInput, match=r"\$\{s.missing\}: the outcome of stage 's' has no "
                                           r"'missing'"):
        resolve("${s.missing}", outcomes)
    with pytest.raises(InvalidInput, match="has no '5'"):
        resolve("x ${s.l.5}", outcomes)


# -- run ----------------------------------------------------------------------------------------


async def test_a_pipeline_runs_stages_in_order_and_stops_what_depends_on_a_failure(
        db, engine, env, tmp_path):
    path = write(tmp_path, "nightly.toml", NIGHTLY)
    out = await animus(env, tmp_path, "pipeline", "run", str(path))
    assert out.startswith("pipeline nightly submitted: ")
    pid = out.split()[-1]
    parent = await wait_finished(db, pid, timeout=30)
    by = await stages(db, parent.id)
    assert set(by) == {"fetch", "count", "explode", "report", "archive"}

    # outputs passed forward: whole values keep their type, references in strings are text
    count = by["count"]
    assert count.state == State.COMPLETED, count.reason
    assert count.params == {"n": 3, "label": "name=alpha rows=3", "first": "a",
                            "all": ["a", "b"], "flag": "ok=true", "fixed": 7}
    assert count.outcome.data == count.params
    archive = by["archive"]
    assert archive.state == State.COMPLETED, archive.reason  # the branch that did not fail
    assert archive.params == {"n": 3, "label": "name=alpha rows=3"}

    # each stage was submitted only after its dependencies completed
    for name, deps in (("count", ["fetch"]), ("explode", ["fetch"]), ("archive", ["count"])):
        for dep in deps:
            assert by[dep].resolved_at is not None
            assert by[name].created_at >= by[dep].resolved_at, (name, dep)
    for child in by.values():
        assert child.provenance.source == "pipeline:nightly"
        assert child.parent_id == parent.id

    # the failed stage, and what depended on it, with reasons naming it
    explode = by["explode"]
    assert explode.state == State.DEAD
    assert explode.attempts == 1
    assert "kaput" in (explode.reason or "")
    report = by["report"]
    assert report.state == State.DEAD
    assert report.attempts == 0, "a stage after a failed one never runs"
    assert report.reason == f"not run: stage 'explode' failed ({explode.reason})"
    assert report.params == {}
    # the pipeline ends dead, naming the failed stage
    assert parent.state == State.DEAD
    assert "stage 'explode' dead: attempts exhausted (1/1)" in (parent.reason or ""), parent.reason
    assert "(and 1 more)" in (parent.reason or "")
    # an attempt for each wave of stages it waited for (resumed from a suspension), no retry
    assert parent.suspensions >= 1
    assert parent.attempts - parent.suspensions == 1, "a failed stage does not make the " \
        "pipeline retry"

    # status draws the stages as a tree, with their states
    status = await animus(env, tmp_path, "pipeline", "status", pid)
    lines = status.splitlines()
    assert lines[0] == f"pipeline nightly  {pid}  dead"
    assert lines[1].split()[:3] == ["stage", "state", "work"]
    assert lines[2].startswith("fetch ")
    assert "  └─ count  (after fetch)" in status
    assert "  └─ explode  (after fetch)" in status
    assert "    └─ report  (after count, explode)" in status
    assert "    └─ archive  (after count)" in status
    for name, state in (("fetch", "completed"), ("count", "completed"), ("explode", "dead"),
                        ("report", "dead"), ("archive", "completed")):
        (line,) = [line for line in lines[2:] if line.lstrip(" └─").startswith(name + " ")]
        assert f" {state} " in line, line
        assert str(by[name].id) in line
    data = json.loads(await animus(env, tmp_path, "pipeline", "status", pid, "--json"))
    assert data["state"] == "dead"
    assert [(s["stage"], s["state"]) for s in data["stages"]] == [
        ("fetch", "completed"), ("count", "completed"), ("explode", "dead"),
        ("report", "dead"), ("archive", "completed")]
    code, out, err = await run_cli(env, tmp_path, "pipeline", "status", str(by["fetch"].id))
    assert code == 2
    assert err.strip() == (f"animus: error: work item {by['fetch'].id} is a 'fetch' item, not "
                           "a pipeline (animus pipeline run submits one)")
    # stage items purged since (finished work may be deleted): not "pending"
    async with db.connection() as conn:
        await conn.execute("DELETE FROM animus.work_items WHERE parent_id = $1", parent.id)
    data = json.loads(await animus(env, tmp_path, "pipeline", "status", pid, "--json"))
    assert {s["state"] for s in data["stages"]} == {"purged"}  # a dead pipeline keeps no outcome


async def test_pipeline_run_wait_follows_the_waves_of_stages(db, engine, env, tmp_path):
    """``pipeline run --wait`` was silent until the end."""
    path = write(tmp_path, "nightly.toml", NIGHTLY)
    code, out, err = await run_cli(env, tmp_path, "pipeline", "run", str(path), "--wait",
                                   "--timeout", "60")
    assert code == 1, out + err  # a stage fails: the pipeline ends dead
    pid = out.splitlines()[0].split()[-1]
    assert out.splitlines()[0] == f"pipeline nightly submitted: {pid}"
    assert re.search(r"^state: +dead$", out, re.MULTILINE), out
    progress = [line.split(None, 1)[1] for line in err.splitlines() if line.startswith("  ")]
    assert progress[0].startswith("submitted by ")
    assert "attempt 1 running" in progress
    waits = [p for p in progress if p.startswith("waiting for ")]
    wakes = [p for p in progress if p.startswith("woken: its ")]  # said once
    assert waits  # each wave of stages, as it happens
    assert len(wakes) == len(waits)
    assert progress[-1].startswith("dead: ")
    assert "stage 'explode' dead" in progress[-1]


async def test_a_stage_gate_waits_for_approval_by_another_role(db, db_url, server_url, engine,
                                                               env, tmp_path):
    async with team(db_url, server_url, (("ann", "approver"), ("rita", "reader"))) as people:
        await run_gated(db, env, tmp_path, people)


async def run_gated(db: Db, env: dict[str, str], tmp_path: Path, people: People) -> None:
    path = write(tmp_path, "gated.toml", GATED)
    pid = (await animus(env, tmp_path, "pipeline", "run", str(path))).split()[-1]

    async def ship_waits() -> Any:
        ship = (await stages(db, pid)).get("ship")
        return ship if ship is not None and ship.state == State.AWAITING_APPROVAL else None

    ship = await wait_until(ship_waits, 20, message="the gated stage to await approval")
    assert ship.params == {"rows": 3}
    assert ship.gate == {"rule": "pipeline gated stage ship", "role": "approver", "quorum": 1,
                         "reason": "pipeline gated stage ship"}
    status = await animus(env, tmp_path, "pipeline", "status", pid)
    assert f"pipeline gated  {pid}  waiting" in status  # for its stages, holding no slot
    assert "awaiting_approval" in status
    after_line = next(line for line in status.splitlines() if "└─ after" in line)
    assert " pending " in after_line + " "
    # it stays there: nothing runs past a gate by itself
    assert (await db.get_work_item(ship.id)).state == State.AWAITING_APPROVAL
    assert "after" not in await stages(db, pid)

    # a reader may not approve; an approver (not the engine that submitted it) may
    base = {k: v for k, v in env.items() if k != "DATABASE_URL"}
    code, _, err = await run_cli({**base, "DATABASE_URL": people.url("rita")}, tmp_path,
                                 "approve", str(ship.id), "--reason", "lgtm")
    assert code == 3, err
    assert "permission denied for function decide" in err
    out = await animus({**base, "DATABASE_URL": people.url("ann")}, tmp_path,
                       "approve", str(ship.id), "--reason", "numbers checked")
    assert out.strip() == f"{ship.id}: queued (approved by {people.name('ann')})"

    parent = await wait_finished(db, pid, timeout=30)
    assert parent.state == State.COMPLETED, parent.reason
    by = await stages(db, pid)
    assert by["after"].params == {"shipped": 3}
    assert by["after"].created_at >= by["ship"].resolved_at
    assert parent.outcome.data["stages"]["after"]["outcome"] == {"shipped": 3}
    assert {n: s["state"] for n, s in parent.outcome.data["stages"].items()} == {
        "fetch": "completed", "ship": "completed", "after": "completed"}
    decisions = [(e.event, e.db_user) for e in await db.history(ship.id)
                 if e.event == "approval"]
    assert decisions == [("approval", people.name("ann"))]
    # stage items purged since: the status takes how they ended from its outcome
    async with db.connection() as conn:  # (the approved one keeps its approvals' rows)
        await conn.execute("DELETE FROM animus.work_items WHERE parent_id = $1 AND id <> $2",
                           parent.id, ship.id)
    data = json.loads(await animus(env, tmp_path, "pipeline", "status", pid, "--json"))
    assert [(s["stage"], s["state"], s["id"]) for s in data["stages"]] == [
        ("fetch", "completed (purged)", str(by["fetch"].id)),
        ("ship", "completed", str(ship.id)),
        ("after", "completed (purged)", str(by["after"].id))]


async def test_a_stage_gate_does_not_weaken_a_rule_gate(db, tmp_path):
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "10.toml").write_text(textwrap.dedent("""
        [[rule]]
        name = "two for echo"
        work_type = "echo"
        effect = "require_approval"
        quorum = 2
        reason = "two people"
    """))
    db_work = GovernedWork(db, RuleSet.load(rules))
    gate = "pipeline p stage s"
    result = await db_work.submit(NewWorkItem("echo", source="pipeline:p").gated(
        rule=gate, role="approver", quorum=1, reason=gate))
    item = await db.get_work_item(result.id)
    assert item.gate is not None
    assert item.gate["quorum"] >= 2



async def test_a_pipeline_waits_for_its_stages_holding_no_slot_and_polling_nothing(
        db, db_url, env, tmp_path, faculties):
    """While a stage runs, the pipeline item is waiting (suspended): it is not among the
    engine's foci, and nothing lists work to see whether its stages have ended; the stage
    that ends a wave wakes it."""
    release = tmp_path / "release"
    write_toml_faculty(tmp_path, "slow", hooks={"engage": f"""
        while [ ! -e {release} ]; do sleep 0.05; done
        python -c 'import json; print(json.dumps(json.load(open("work.json"))["params"]))' \\
            > engage-out.json
    """})
    path = write(tmp_path, "slow.toml", """
        [pipeline]
        name = "slow"
        [[stage]]
        name = "fetch"
        work_type = "fetch"
        [[stage]]
        name = "crawl"
        work_type = "slow"
        depends_on = ["fetch"]
        params = { rows = "${fetch.rows}" }
        [[stage]]
        name = "after"
        work_type = "echo"
        depends_on = ["crawl"]
        params = { crawled = "${crawl.rows}" }
    """)
    async with run_engine(db_url, tmp_path / "home", faculties_dir=faculties) as engine:
        pid = (await animus(env, tmp_path, "pipeline", "run", str(path))).split()[-1]

        async def crawling() -> Any:
            crawl = (await stages(db, pid)).get("crawl")
            parent = await db.get_work_item(pid)
            return crawl if crawl is not None and crawl.state == State.RUNNING \
                and parent.state == State.WAITING else None

        crawl = await wait_until(crawling, 20, message="the slow stage to run")
        assert crawl.id in engine.engine.inflight
        assert UUID(pid) not in engine.engine.inflight  # the pipeline holds no slot
        release.touch()
        parent = await wait_finished(db, pid, timeout=30)
        assert parent.state == State.COMPLETED, parent.reason
        assert parent.outcome.data["stages"]["after"]["outcome"] == {"crawled": 3}
        assert engine.db.seams.list_work_calls == 0  # nothing polled the stages
    history = await db.history(pid)
    # each wave of one stage that suspended the pipeline was ended by that stage (a quick one
    # may end before the pipeline suspends: then it does not, or is woken at once)
    reasons = [e.payload["reason"] for e in history if e.event == "woken"]
    assert "woken: its 1 child finished" in reasons  # the slow stage's wave, at least
    assert set(reasons) <= {"woken: its 1 child finished", "woken: its 1 child had finished"}
