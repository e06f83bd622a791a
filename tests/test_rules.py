"""Rules, approval gates and database roles.

* rule files: parse errors name the file and the field; the first matching rule decides;
  with rules present and none matching, work is denied (fail closed);
* at submit: a denied item is recorded dead with its reason (no queue message, an audit row);
  a gated one waits in ``awaiting_approval``;
* approvals: real login roles (``animus roles setup`` / ``add-user``) connect as themselves
  over the server's unix socket (trust authentication), so ``session_user`` is the person:
  the requester cannot approve their own item, a submitter cannot approve, two distinct
  approvers queue it, a third decision is refused, a rejection kills it with the reason, and
  the audit trail names each approver;
* before engage: the engine evaluates the rules again, so a rule changed after submit (or a
  submitter who bypassed the rules with raw SQL) ends the item dead, without retries;
* roles: each role connects as itself and the database refuses what it may not do.

Login roles are cluster-wide: each test names its roles after its own database and drops them
afterwards. The ``animus_*`` group roles stay (``roles setup`` is idempotent).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import textwrap
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from animus_core import Created, Faculty, Focus, NewWorkItem, State
from animus_core.governance.rules import RuleSet
from animus_core.governance.work import GovernedWork
from animus_core.values.errors import ConfigError, IllegalTransition, PermissionDenied
from tests.engine_helpers import (
    EngineProcess,
    events,
    run_cli,
    run_engine,
    run_process,
    wait_finished,
    wait_listening,
    wait_until,
    write_toml_faculty,
)
from tests.governance_helpers import People, database_name
from tests.governance_helpers import people as team
from tests.support import code_blocks, raw

RULES = """
[[rule]]
name = "no friday deploys"
work_type = "deploy"
params = { day = "friday" }
effect = "deny"
reason = "we do not deploy on fridays"

[[rule]]
name = "prod needs two"
work_type = "deploy"
params = { env = "prod" }
effect = "require_approval"
role = "approver"
quorum = 2
reason = "two people look at every production deploy"

[[rule]]
name = "other deploys"
work_type = "deploy"
effect = "allow"

[[rule]]
name = "pings from tests"
work_type = "ping*"
source = "test*"
effect = "allow"
"""


def write_rules(directory: Path, text: str, name: str = "10-rules.toml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def rules_from(tmp_path: Path, text: str) -> RuleSet:
    return RuleSet.load(write_rules(tmp_path / "rules", text).parent)


# -- parsing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("[[rule]\nname = 'x'\n", "malformed TOML"),
    ("[[rule]]\nname = 'x'\neffect = 'allow'\ncolour = 'red'\n", "unknown field `colour`"),
    ("[[rule]]\nname = 'x'\neffect = 'maybe'\n", "`rule[0].effect`"),
    ("[[rule]]\neffect = 'allow'\n", "missing required field `name`"),
    ("[[rule]]\nname = 'x'\neffect = 'allow'\nquorum = 'two'\n", "`rule[0].quorum`"),
    ("[[rule]]\nname = 'ok'\neffect = 'allow'\n[[rule]]\nname = 'shh'\neffect = 'deny'\n",
     "rule[1] (shh): a deny rule needs a reason"),
    ("[[rule]]\nname = 'q'\neffect = 'require_approval'\nquorum = 0\n",
     "rule[0] (q): quorum must be at least 1"),
    ("[[rule]]\nname = 'r'\neffect = 'require_approval'\nrole = 'x; drop'\n",
     "rule[0] (r): role 'x; drop' is not an animus role; use one of reader, submitter, "
     "approver, operator, admin"),
    ("[[rule]]\nname = 'r'\neffect = 'require_approval'\nrole = 'approvers'\n",
     "rule[0] (r): role 'approvers' is not an animus role"),
    ("[rules]\nname = 'x'\n", "unknown field `rules`"),
])
def test_rule_file_errors_name_the_file_and_the_field(tmp_path: Path, text: str,
                                                      expected: str) -> None:
    path = write_rules(tmp_path / "rules", text, "20-broken.toml")
    with pytest.raises(ConfigError) as e:
        RuleSet.load(path.parent)
    assert str(e.value).startswith(f"{path}: "), str(e.value)
    assert expected in str(e.value)


async def test_the_cli_reports_a_broken_rule_file_in_one_line(cli_env, tmp_path):
    path = write_rules(tmp_path / "rules", "[[rule]]\nname = 'x'\neffect = 'perhaps'\n")
    code, out, err = await run_cli({**cli_env, "ANIMUS_RULES": str(path.parent)}, tmp_path,
                                   "work", "submit", "deploy")
    assert code == 2, (out, err)
    assert "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith(f"animus: error: {path}: ")
    assert "`rule[0].effect`" in line


def test_no_rule_files_allow_everything(tmp_path: Path) -> None:
    rules = RuleSet.load(tmp_path / "absent")
    assert not rules.active
    assert rules.decide("anything", {}, "anyone").effect == "allow"
    (tmp_path / "empty").mkdir()
    assert not RuleSet.load(tmp_path / "empty").active


# -- evaluation ---------------------------------------------------------------------------------


def test_the_first_matching_rule_decides(tmp_path: Path) -> None:
    rules = rules_from(tmp_path, RULES)
    # matches both the deny and the approval rule: the first one (deny) wins
    d = rules.decide("deploy", {"env": "prod", "day": "friday"}, "cli")
    assert (d.effect, d.rule, d.reason) == ("deny", "no friday deploys",
                                            "we do not deploy on fridays")
    d = rules.decide("deploy", {"env": "prod", "day": "monday", "extra": 1}, "cli")
    assert (d.effect, d.rule, d.role, d.quorum) == ("require_approval", "prod needs two",
                                                    "approver", 2)
    assert d.gate() == {"rule": "prod needs two", "role": "approver", "quorum": 2,
                        "reason": "two people look at every production deploy"}
    d = rules.decide("deploy", {"env": "staging"}, "cli")
    assert (d.effect, d.rule, d.reason) == ("allow", "other deploys",
                                            "allow by rule 'other deploys'")
    assert rules.decide("ping-fast", {}, "tests").effect == "allow"


def test_files_are_read_in_name_order(tmp_path: Path) -> None:
    write_rules(tmp_path / "rules", """
        [[rule]]
        name = "late allow"
        effect = "allow"
    """, "20-later.toml")
    write_rules(tmp_path / "rules", """
        [[rule]]
        name = "early deny"
        work_type = "x"
        effect = "deny"
        reason = "first file"
    """, "10-first.toml")
    rules = RuleSet.load(tmp_path / "rules")
    assert [r.name for _, r in rules.rules] == ["early deny", "late allow"]
    assert rules.decide("x", {}, "s").rule == "early deny"
    assert rules.decide("y", {}, "s").rule == "late allow"


def test_rules_fail_closed_when_none_matches(tmp_path: Path) -> None:
    rules = rules_from(tmp_path, RULES)
    for work_type, source in (("unknown", "cli"), ("ping", "cli"), ("pingx", "other")):
        d = rules.decide(work_type, {}, source)
        assert d.effect == "deny"
        assert d.rule is None
        assert d.reason == f"no rule allows {work_type!r} from {source!r} (rules fail closed)"


def test_params_match_by_json_containment(tmp_path: Path) -> None:
    rules = rules_from(tmp_path, """
        [[rule]]
        name = "nested"
        params = { target = { region = "eu" }, tags = ["gpu"] }
        effect = "allow"
    """)
    assert rules.decide("t", {"target": {"region": "eu", "zone": 2},
                                "tags": ["big", "gpu"]}, "s").effect == "allow"
    for params in ({"target": {"region": "us"}, "tags": ["gpu"]},
                   {"target": {"region": "eu"}, "tags": ["cpu"]},
                   {"target": "eu", "tags": ["gpu"]}, {}):
        assert rules.decide("t", params, "s").effect == "deny", params


def test_tool_rules_govern_tool_calls_only_and_are_opt_in(tmp_path: Path) -> None:
    rules = rules_from(tmp_path, """
        [[rule]]
        name = "no wire transfers"
        tool = "pay_*"
        params = { method = "wire" }
        effect = "deny"
        reason = "wires are done by hand"

        [[rule]]
        name = "payments need two"
        tool = "pay_*"
        work_type = "billing*"
        effect = "require_approval"
        quorum = 2
    """)
    assert not rules.active  # tool rules alone govern no submitted work
    assert rules.decide("billing", {"method": "wire"}, "cli").effect == "allow"
    d = rules.decide_tool("pay_invoice", {"method": "wire", "n": 1}, work_type="billing",
                          source="cli")
    assert (d.effect, d.rule, d.reason) == ("deny", "no wire transfers",
                                            "wires are done by hand")
    d = rules.decide_tool("pay_invoice", {"method": "card"}, work_type="billing-eu",
                          source="cli")
    assert (d.effect, d.rule, d.role, d.quorum) == ("require_approval", "payments need two",
                                                    "approver", 2)
    for tool, work_type in (("pay_invoice", "support"), ("search", "billing")):
        d = rules.decide_tool(tool, {"method": "card"}, work_type=work_type, source="cli")
        assert (d.effect, d.rule) == ("allow", None)
        assert d.reason == f"no rule governs tool {tool!r}"


def test_the_documented_tool_rules_decide_as_the_docs_say(tmp_path: Path) -> None:
    (text,) = code_blocks("governance.md", "### Rules on tools", "toml")
    rules = rules_from(tmp_path, text)
    d = rules.decide_tool("refund", {"amount": 500}, work_type="clerk", source="cli")
    assert (d.effect, d.reason) == ("deny", "refunds over 100 go through finance")
    d = rules.decide_tool("refund_eu", {"amount": 5}, work_type="clerk", source="cli")
    assert (d.effect, d.quorum) == ("require_approval", 2)
    assert rules.decide_tool("pay", {}, work_type="clerk", source="cli").effect == "allow"


def test_work_rules_do_not_decide_tool_calls(tmp_path: Path) -> None:
    rules = rules_from(tmp_path, RULES)
    assert rules.active
    d = rules.decide_tool("anything", {}, work_type="deploy", source="cli")
    assert (d.effect, d.rule) == ("allow", None)


# -- at submit ----------------------------------------------------------------------------------


async def test_a_denied_submission_is_dead_unqueued_and_audited(db, db_url, tmp_path):
    db_work = GovernedWork(db, rules_from(tmp_path, RULES))
    friday = await db_work.submit(NewWorkItem("deploy", source="cli").params(
        {"env": "prod", "day": "friday"}))
    unknown = await db_work.submit(NewWorkItem("launch-rockets", source="cli"))
    # the rule that decided is named in the reason, and so on the `submitted` audit row
    for result, reason in ((friday, "denied at submit: we do not deploy on fridays "
                                    "(rule 'no friday deploys')"),
                           (unknown, "denied at submit: no rule allows 'launch-rockets' from "
                                     "'cli' (rules fail closed)")):
        assert isinstance(result, Created)
        item = await db.get_work_item(result.id)
        assert (item.state, item.reason) == (State.DEAD, reason)
        assert item.resolved_at is not None
        (submitted,) = await db.history(item.id)
        assert (submitted.event, submitted.from_state, submitted.to_state) == (
            "submitted", None, State.DEAD)
        assert submitted.payload["reason"] == reason
    allowed = await db_work.submit(NewWorkItem("deploy", source="cli").params({"env": "dev"}))
    [submitted] = await db.history(allowed.id)
    assert submitted.payload["reason"] == "submitted: allowed by rule 'other deploys'"
    gated = await db_work.submit(NewWorkItem("deploy", source="cli").params({"env": "prod"}))
    [submitted] = await db.history(gated.id)
    assert submitted.payload["gate"] == {
        "rule": "prod needs two", "role": "approver", "quorum": 2,
        "reason": "two people look at every production deploy"}
    async with raw(db_url) as conn:
        messages = await conn.fetch("SELECT message->>'id' AS id FROM pgmq.q_work")
    assert [m["id"] for m in messages] == [str(allowed.id)]


async def test_the_cli_submits_under_the_rules(db, cli_env, tmp_path):
    rules = write_rules(tmp_path / "rules", RULES).parent
    code, out, err = await run_cli({**cli_env, "ANIMUS_RULES": str(rules)}, tmp_path,
                                   "work", "submit", "deploy", "--param", "day=friday",
                                   "--json")
    assert code == 0, err
    item = json.loads(out)["item"]
    assert (item["state"], item["reason"]) == ("dead", "denied at submit: we do not deploy on "
                                                       "fridays (rule 'no friday deploys')")
    # without --json it says so too, instead of a bare "created <id>"
    code, out, err = await run_cli({**cli_env, "ANIMUS_RULES": str(rules)}, tmp_path,
                                   "work", "submit", "deploy", "--param", "env=prod")
    assert code == 0, err
    created, wid, rest = out.strip().split(" ", 2)
    assert created == "created"
    assert rest == ("(awaiting_approval: awaiting approval (2 x approver): two people look at "
                    "every production deploy)")
    assert (await db.get_work_item(wid)).state == State.AWAITING_APPROVAL


async def test_a_gated_submission_waits_without_a_message(db, db_url, tmp_path):
    db_work = GovernedWork(db, rules_from(tmp_path, RULES))
    result = await db_work.submit(NewWorkItem("deploy", source="cli").params({"env": "prod"}))
    item = await db.get_work_item(result.id)
    assert item.state == State.AWAITING_APPROVAL
    assert item.reason == ("awaiting approval (2 x approver): two people look at every "
                           "production deploy")
    assert item.gate == {"rule": "prod needs two", "role": "approver", "quorum": 2,
                         "reason": "two people look at every production deploy"}
    async with raw(db_url) as conn:
        assert await conn.fetchval("SELECT count(*) FROM pgmq.q_work") == 0
    with pytest.raises(IllegalTransition):
        await db.cancel(item.id)  # only queued work can be cancelled; reject it instead


# -- people -------------------------------------------------------------------------------------


TEAM = (("rita", "reader"), ("sam", "submitter"), ("ann", "approver"), ("bob", "approver"),
        ("cid", "approver"), ("otto", "operator"), ("ada", "admin"))


@pytest.fixture
async def people(db_url: str, server_url: str) -> AsyncIterator[People]:
    async with team(db_url, server_url, TEAM) as members:
        yield members


async def test_approval_needs_a_quorum_of_other_people(db, db_url, tmp_path, people):
    rules = rules_from(tmp_path, RULES)
    ada = await people.db("ada")  # an admin: may submit and approve, but not her own work
    ada_work = GovernedWork(ada, rules)
    submitted = await ada_work.submit(NewWorkItem("deploy", source="cli").params(
        {"env": "prod", "version": "1.2"}))
    wid = submitted.id
    item = await db.get_work_item(wid)
    assert (item.state, item.requested_by) == (State.AWAITING_APPROVAL, people.name("ada"))

    with pytest.raises(PermissionDenied, match=f"{people.name('ada')} requested work item "
                                                f"{wid} and cannot approve it"):
        await ada.decide(wid, "approve", "looks fine to me")
    sam = await people.db("sam")
    with pytest.raises(PermissionDenied, match="permission denied for function decide"):
        await sam.decide(wid, "approve", "I am only a submitter")
    otto = await people.db("otto")  # operators may call decide(), but lack the approver role
    with pytest.raises(PermissionDenied, match="requires role animus_approver"):
        await otto.decide(wid, "approve", "I run engines")

    ann = await people.db("ann")
    after_one = await ann.decide(wid, "approve", "diff reviewed")
    assert (after_one.state, after_one.reason) == (State.AWAITING_APPROVAL,
                                                   "approved by 1 of 2 needed")
    with pytest.raises(PermissionDenied, match="already decided"):
        await ann.decide(wid, "approve", "again, with feeling")
    async with raw(db_url) as conn:
        assert await conn.fetchval("SELECT count(*) FROM pgmq.q_work") == 0

    # the second approver through the real command, connected as himself
    code, out, err = await run_cli({"PATH": "/usr/bin:/bin", "DATABASE_URL": people.url("bob"),
                                    "ANIMUS_HOME": str(tmp_path / "home")}, tmp_path,
                                   "approve", str(wid), "--reason", "tested on staging")
    assert code == 0, err
    expected_reason = f"approved by {people.name('ann')}, {people.name('bob')}"
    assert out.strip() == f"{wid}: queued ({expected_reason})"
    item = await db.get_work_item(wid)
    assert (item.state, item.reason) == (State.QUEUED, expected_reason)
    async with raw(db_url) as conn:
        messages = await conn.fetch("SELECT message FROM pgmq.q_work")
    assert [json.loads(m["message"]) for m in messages] == [
        {"id": str(wid), "t": "deploy", "p": 0}]

    cid = await people.db("cid")
    with pytest.raises(IllegalTransition, match="is queued: only items awaiting approval"):
        await cid.decide(wid, "approve", "late to the party")

    # every decision is in the audit trail, by the database user who made it
    history = await db.history(wid)
    decisions = [(e.event, e.db_user, e.payload["reason"]) for e in history
                 if e.event in ("approval", "rejection")]
    assert decisions == [("approval", people.name("ann"), "diff reviewed"),
                         ("approval", people.name("bob"), "tested on staging")]
    queued = [e for e in history if e.to_state == State.QUEUED]
    assert [(e.from_state, e.db_user) for e in queued] == [
        (State.AWAITING_APPROVAL, people.name("bob"))]
    assert history[0].db_user == people.name("ada")  # the submission
    approvals = await db.approvals(wid)
    assert [(a["approver"], a["decision"]) for a in approvals] == [
        (people.name("ann"), "approve"), (people.name("bob"), "approve")]

    # the engine checks the quorum again before engage, and runs it
    write_toml_faculty(tmp_path, "deploy", hooks={"engage": "echo '{\"deployed\": true}' > engage-out.json"})
    async with engine_with_rules(db_url, tmp_path, RULES):
        done = await wait_finished(db, wid)
    assert (done.state, done.outcome.data) == (State.COMPLETED, {"deployed": True}), done.reason


async def test_a_rejection_ends_the_item_with_the_reason(db, tmp_path, people):
    sam = await people.db("sam")
    sam_work = GovernedWork(sam, rules_from(tmp_path, RULES))
    wid = (await sam_work.submit(NewWorkItem("deploy", source="cli").params(
        {"env": "prod"}))).id
    ann = await people.db("ann")
    await ann.decide(wid, "approve", "fine by me")
    # a reason is required
    bob = await people.db("bob")
    with pytest.raises(PermissionDenied, match="needs a reason"):
        await bob.decide(wid, "reject", "   ")
    code, out, err = await run_cli({"PATH": "/usr/bin:/bin", "DATABASE_URL": people.url("bob"),
                                    "ANIMUS_HOME": str(tmp_path / "home")}, tmp_path,
                                   "reject", str(wid), "--reason", "the change window is closed")
    assert code == 0, err
    reason = f"rejected by {people.name('bob')}: the change window is closed"
    assert out.strip() == f"{wid}: dead ({reason})"
    item = await db.get_work_item(wid)
    assert (item.state, item.reason) == (State.DEAD, reason)
    assert item.resolved_at is not None
    history = await db.history(wid)
    assert [(e.event, e.db_user) for e in history] == [
        ("submitted", people.name("sam")), ("approval", people.name("ann")),
        ("rejection", people.name("bob")), ("dead", people.name("bob"))]
    rejection = history[2]
    assert rejection.payload["decision"] == "reject"
    assert rejection.payload["approver"] == people.name("bob")
    assert rejection.payload["gate"]["quorum"] == 2
    cid = await people.db("cid")
    with pytest.raises(IllegalTransition):
        await cid.decide(wid, "approve", "too late")


async def test_a_gate_asks_for_its_role(db, tmp_path, people):
    # a gate for admins: approvers may not decide it, an admin may
    sam = await people.db("sam")
    sam_work = GovernedWork(sam, rules_from(tmp_path, """
        [[rule]]
        name = "admins only"
        effect = "require_approval"
        role = "admin"
        reason = "only admins"
    """))
    wid = (await sam_work.submit(NewWorkItem("drop-table", source="cli"))).id
    ann = await people.db("ann")
    with pytest.raises(PermissionDenied, match="requires role animus_admin"):
        await ann.decide(wid, "approve", "sure")
    ada = await people.db("ada")
    decided = await ada.decide(wid, "approve", "I am an admin")
    assert decided.state == State.QUEUED


# -- before engage ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def engine_with_rules(db_url: str, tmp_path: Path, rules: str,
                            faculties: Sequence[Faculty] = ()) -> AsyncIterator[Any]:
    """An in-process engine whose rules directory (``./rules``, the default of
    ``ANIMUS_RULES``) holds ``rules``, with the Python ``faculties`` given."""
    write_rules(tmp_path / "rules", rules, "10-rules.toml")
    previous = os.getcwd()
    os.chdir(tmp_path)
    try:
        async with run_engine(db_url, tmp_path / "home", faculties=faculties,
                              faculties_dir=tmp_path / "faculties") as running:
            yield running
    finally:
        os.chdir(previous)


async def test_rules_are_evaluated_again_before_engage(db, db_url, tmp_path):
    write_toml_faculty(tmp_path, "deploy", hooks={
        "engage": "touch ran; echo '{\"deployed\": true}' > engage-out.json"},
        fields={"max_attempts": 3})
    # submitted while the rules allowed it
    db_work = GovernedWork(db, rules_from(tmp_path / "then", RULES))
    wid = (await db_work.submit(NewWorkItem("deploy", source="cli").params(
        {"env": "staging"}))).id
    assert (await db.get_work_item(wid)).state == State.QUEUED
    # the rules changed before an engine took it: now it is a friday deploy for everyone
    async with engine_with_rules(db_url, tmp_path, """
        [[rule]]
        name = "freeze"
        work_type = "deploy"
        effect = "deny"
        reason = "release freeze"
    """):
        item = await wait_finished(db, wid)
    assert item.state == State.DEAD
    assert item.reason == "engage failed: RuleRefused: denied before engage: release freeze"
    assert item.attempts == 1, "a rule's refusal is final: no retries"
    assert await events(db, wid) == ["submitted", "claimed", "running", "failed", "dead"]
    (record,) = await db.executions(wid)
    assert record.result == "failed"
    assert "denied before engage: release freeze" in (record.error or "")


async def test_work_that_bypassed_the_rules_is_refused_before_engage(db, db_url, tmp_path,
                                                                     people):
    write_toml_faculty(tmp_path, "deploy", hooks={
        "engage": "echo '{\"deployed\": true}' > engage-out.json"})
    # a submitter calling animus.submit directly can skip the client-side rules...
    async with raw(people.url("sam")) as conn:
        await conn.execute(
            """SELECT count(*) FROM animus.submit('work', jsonb_build_array(jsonb_build_object(
                 'work_type', 'deploy', 'source', 'psql', 'params', '{"env": "prod"}'::jsonb,
                 'state', 'queued')))""")
        # ...or forge a weaker gate
        await conn.execute(
            """SELECT count(*) FROM animus.submit('work', jsonb_build_array(jsonb_build_object(
                 'work_type', 'deploy', 'source', 'psql', 'params', '{"env": "prod", "n": 2}'::jsonb,
                 'state', 'awaiting_approval',
                 'gate', '{"rule": "forged", "role": "approver", "quorum": 1}'::jsonb)))""")
    bypassed, forged = sorted(await db.list_work(work_type="deploy"), key=lambda i: len(i.params))
    ann = await people.db("ann")
    assert (await ann.decide(forged.id, "approve", "one is enough?")).state == State.QUEUED
    # ...but the engine evaluates the rules itself before engage
    async with engine_with_rules(db_url, tmp_path, RULES):
        for wid in (bypassed.id, forged.id):
            item = await wait_finished(db, wid)
            assert item.state == State.DEAD, item
            assert item.attempts == 1
    refusal = ("engage failed: RuleRefused: rule 'prod needs two' requires 2 approval(s) by "
               "approver before engage; this item has {}")
    assert (await db.get_work_item(bypassed.id)).reason == refusal.format(0)
    assert (await db.get_work_item(forged.id)).reason == refusal.format(1)


# -- roles --------------------------------------------------------------------------------------


async def test_roles_setup_and_add_user_from_the_command_line(db_url, server_url, cli_env,
                                                              tmp_path):
    name = f"carol_{database_name(db_url)}"
    code, out, err = await run_cli(cli_env, tmp_path, "roles", "setup")
    assert code == 0, err
    assert out.strip() == ("roles ready: animus_reader, animus_submitter, animus_approver, "
                           "animus_operator, animus_admin")
    try:
        code, out, err = await run_cli(cli_env, tmp_path, "roles", "add-user", name,
                                       "--role", "approver")
        assert code == 0, err
        assert out.strip() == f"{name} is now a member of animus_approver"
        # idempotent, and a second role adds a membership
        code, _, err = await run_cli(cli_env, tmp_path, "roles", "add-user", name,
                                     "--role", "reader")
        assert code == 0, err
        async with raw(db_url) as conn:
            member = {r: await conn.fetchval("SELECT pg_has_role($1, $2, 'MEMBER')", name,
                                             f"animus_{r}")
                      for r in ("reader", "submitter", "approver", "operator", "admin")}
            assert member == {"reader": True, "submitter": False, "approver": True,
                              "operator": False, "admin": False}
            assert await conn.fetchval("SELECT rolcanlogin FROM pg_roles WHERE rolname = $1",
                                       name)
        code, _, err = await run_cli(cli_env, tmp_path, "roles", "add-user", "Bad-Name",
                                     "--role", "reader")
        assert code == 2
        assert "use lowercase letters, digits and _" in err
    finally:
        async with raw(server_url) as conn:
            await conn.execute(f'DROP ROLE IF EXISTS "{name}"')


def refused(match: str | None = None) -> Any:
    return pytest.raises(PermissionDenied, match=match)


async def test_each_role_is_refused_what_it_may_not_do(db, db_url, people):
    # reader: reads, never writes
    rita = await people.db("rita")
    with refused("permission denied for function submit"):
        await rita.submit_work(NewWorkItem("ping", source="rita"))
    sam = await people.db("sam")
    wid = (await sam.submit_work(NewWorkItem("ping", source="sam"))).id
    assert (await rita.get_work_item(wid)).requested_by == people.name("sam")
    assert [e.db_user for e in await rita.history(wid)] == [people.name("sam")]
    async with raw(people.url("rita")) as conn:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("UPDATE animus.work_items SET priority = 9")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("SELECT * FROM pgmq.send('work', '{}'::jsonb)")

    # submitter: submits through animus.submit only
    with refused("permission denied for function decide"):
        await sam.decide(wid, "approve", "mine")
    with refused("permission denied for function cancel"):
        await sam.cancel(wid)
    async with raw(people.url("sam")) as conn:
        for sql in ("UPDATE animus.work_items SET state = 'completed'",
                    "DELETE FROM animus.work_items",
                    "INSERT INTO animus.work_items (work_type, source, state) "
                    "VALUES ('x', 'y', 'queued')",
                    "INSERT INTO animus.audit_log (work_id, event, provenance) "
                    "VALUES (gen_random_uuid(), 'forged', '{}')",
                    "SELECT * FROM animus.claim('work', 1, 30, NULL, true)"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(sql)
    with refused():
        await sam.claim(lease_seconds=30)

    # approver: decides, never submits
    ann = await people.db("ann")
    with refused("permission denied for function submit"):
        await ann.submit_work(NewWorkItem("ping", source="ann"))
    with refused():
        await ann.claim(lease_seconds=30)

    # operator: runs engines on its own connection (claim, start, complete, fail, dead-letter)
    otto = await people.db("otto")
    (claimed,) = await otto.claim(lease_seconds=30, start=True)
    assert claimed.item.id == wid
    await otto.complete(claimed.lease, {"pong": True}, duration_ms=3)
    done = await otto.get_work_item(wid)
    assert (done.state, done.outcome.data) == (State.COMPLETED, {"pong": True})
    second = (await otto.submit_work(NewWorkItem("ping", source="otto"))).id
    (claimed,) = await otto.claim(lease_seconds=30, start=True)
    await otto.fail(claimed.lease, "broken on purpose")
    await otto.dead_letter(second, "given up")
    assert (await otto.get_work_item(second)).state == State.DEAD
    assert {e.db_user for e in await db.history(wid) if e.event != "submitted"} == {
        people.name("otto")}
    assert await otto.seal_audit() >= 1
    wid3 = (await db.submit_gated(NewWorkItem("ping", source="t"), "approver", 1, "r")).id
    with refused("may not decide"):
        await otto.decide(wid3, "approve", "operators are not approvers")

    # nobody, admin included, rewrites history
    for who in ("rita", "sam", "ann", "otto", "ada"):
        async with raw(people.url(who)) as conn:
            for sql in ("UPDATE animus.audit_log SET event = 'forged'",
                        "DELETE FROM animus.audit_log",
                        "TRUNCATE animus.audit_log",
                        "UPDATE animus.audit_seal SET hash = ''::bytea",
                        "DELETE FROM animus.approvals",
                        "UPDATE animus.execution_records SET result = 'completed'",
                        "TRUNCATE animus.execution_records"):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute(sql)
    async with raw(db_url) as conn:  # not even the owner: the triggers refuse
        for sql in ("UPDATE animus.audit_log SET event = 'forged'",
                    "DELETE FROM animus.audit_log",
                    "TRUNCATE animus.audit_log, animus.audit_seal",
                    "TRUNCATE animus.approvals"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                await conn.execute(sql)

    # an admin may delete finished work (retention), not live work
    async with raw(people.url("ada")) as conn:
        with pytest.raises(asyncpg.PostgresError, match="only finished work can be deleted"):
            await conn.execute("DELETE FROM animus.work_items WHERE id = $1", wid3)
        assert await conn.execute("DELETE FROM animus.work_items WHERE id = $1", second) \
            == "DELETE 1"

    # approvers record decisions through animus.decide only, never by writing rows
    async with raw(people.url("ann")) as conn:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(
                "INSERT INTO animus.approvals (work_id, approver, decision, reason) "
                "VALUES ($1, $2, 'approve', 'as bob')", wid3, people.name("bob"))



async def test_an_operator_runs_a_real_engine(db, db_url, cli_env, tmp_path, people):
    write_toml_faculty(tmp_path, "ping", hooks={"engage": "echo '{\"pong\": true}' > engage-out.json"})
    env = {**cli_env, "DATABASE_URL": people.url("otto"), "ANIMUS_HOME": str(tmp_path / "home"),
           "ANIMUS_FACULTIES": str(tmp_path / "faculties"), "ANIMUS_DISABLE_PLUGIN_AUTOLOAD": "1",
           "ANIMUS_RULES": str(tmp_path / "no-rules")}
    proc = EngineProcess(["--poll", "1", "--grace", "5"], env, tmp_path, tmp_path / "engine.log")
    try:
        await wait_listening(db_url, [proc])
        sam = await people.db("sam")
        wid = (await sam.submit_work(NewWorkItem("ping", source="sam"))).id
        item = await wait_finished(db, wid)
        proc.signal(signal.SIGTERM)
        assert await proc.wait(30) == 0, proc.output()
        output = proc.output()
    finally:
        proc.close()
    assert (item.state, item.outcome.data) == (State.COMPLETED, {"pong": True}), output
    assert "error" not in output.lower(), output
    history = await db.history(wid)
    assert [(e.event, e.db_user) for e in history] == [
        ("submitted", people.name("sam")), ("claimed", people.name("otto")),
        ("running", people.name("otto")), ("completed", people.name("otto"))]
    assert all(e.sealed for e in await db.history(wid)), "the operator's engine seals the audit"
    (record,) = await db.executions(wid)
    assert record.result == "completed"


async def test_approvals_by_the_wrong_role_do_not_satisfy_a_rule(db, db_url, tmp_path, people):
    write_toml_faculty(tmp_path, "deploy", hooks={
        "engage": "echo '{\"deployed\": true}' > engage-out.json"})
    await people.add("olga", "operator")
    async with raw(people.url("sam")) as conn:
        await conn.execute(
            """SELECT count(*) FROM animus.submit('work', jsonb_build_array(jsonb_build_object(
                 'work_type', 'deploy', 'source', 'psql', 'params', '{"env": "prod"}'::jsonb,
                 'state', 'awaiting_approval',
                 'gate', '{"rule": "forged", "role": "operator", "quorum": 2}'::jsonb)))""")
    (forged,) = await db.list_work(work_type="deploy")
    for who in ("otto", "olga"):  # operators, not approvers
        await (await people.db(who)).decide(forged.id, "approve", "we run engines")
    async with engine_with_rules(db_url, tmp_path, RULES):
        item = await wait_finished(db, forged.id)
    assert item.state == State.DEAD, "the rule asks for two members of animus_approver"


# -- every submit path --------------------------------------------------------------------------


FROZEN = """
    [[rule]]
    name = "no deploys"
    work_type = "deploy"
    effect = "deny"
    reason = "deploys are frozen"

    [[rule]]
    name = "the rest"
    effect = "allow"
"""


async def test_every_submit_path_applies_the_rules(db, db_url, cli_env, tmp_path):
    """A deny rule refuses work whichever way it is submitted: the CLI, a faculty's child
    work, the submit_work tool of a Claude engage, a schedule tick, a pipeline stage."""
    from animus_core.faculties import llm
    from animus_core.values.schedules import Schedule

    class Submitter(Faculty):
        name = "submitter"
        accepts = ("submitter",)
        schedules = (Schedule(name="deploys", work_type="deploy", every=1.0),)

        async def engage(self, focus: Focus, oriented: Any) -> Any:
            child = await focus.submit(NewWorkItem("deploy", source="submitter"))
            tool = await llm.submit_work(focus, "deploy", {"via": "tool"})
            return {"child": str(child.id), "tool": tool["id"]}

    rules = write_rules(tmp_path / "rules", FROZEN).parent
    env = {**cli_env, "ANIMUS_RULES": str(rules)}
    code, out, err = await run_cli(env, tmp_path, "work", "submit", "deploy", "--json")
    assert code == 0, err
    by_cli = json.loads(out)["item"]["id"]
    pipeline = tmp_path / "ship.toml"
    pipeline.write_text(textwrap.dedent("""
        [pipeline]
        name = "ship"

        [[stage]]
        name = "deploy"
        work_type = "deploy"
    """))
    code, out, err = await run_cli(env, tmp_path, "pipeline", "run", str(pipeline))
    assert code == 0, err
    pipeline_id = out.split(": ")[1].split()[0]
    async with engine_with_rules(db_url, tmp_path, FROZEN, faculties=[Submitter()]):
        parent = await wait_finished(db, (await db.submit_work(NewWorkItem("submitter"))).id)
        assert parent.state == State.COMPLETED, parent.reason

        async def ticked() -> list[Any]:
            return [i for i in await db.list_work(work_type="deploy", limit=1000)
                    if i.provenance.source == "schedule"]

        by_tick = await wait_until(ticked, message="a schedule tick")
        assert (await wait_finished(db, pipeline_id)).state == State.DEAD
    (stage,) = await db.list_work(parent_id=pipeline_id)
    paths = {"cli": by_cli, "child work": parent.outcome.data["child"],
             "submit_work tool": parent.outcome.data["tool"], "schedule tick": by_tick[0].id,
             "pipeline stage": stage.id}
    for path, wid in paths.items():
        item = await db.get_work_item(wid)
        assert (item.work_type, item.state, item.reason) == (
            "deploy", State.DEAD, "denied at submit: deploys are frozen (rule 'no deploys')"), path
        assert item.attempts == 0, path


async def test_the_governed_api_example_in_the_docs_runs_as_shown(db, cli_env, tmp_path):
    heading = "### Submitting with the rules from Python"
    (rule_file,) = code_blocks("governance.md", "## Rules", "toml")[:1]
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "10-deploys.toml").write_text(rule_file)
    (program,) = code_blocks("governance.md", heading, "python")
    (tmp_path / "governed.py").write_text(program)
    (console,) = code_blocks("governance.md", heading, "console")
    command, *shown = console.splitlines()
    assert command == "$ python governed.py"
    code, out, err = await run_process([sys.executable, "governed.py"], cli_env, tmp_path)
    assert code == 0, err
    assert out.splitlines() == shown
