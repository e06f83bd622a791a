"""Approvals inside a focus (docs/governance.md, Approval gates; docs/concepts.md, Waiting):
``await focus.approval(why, role=..., quorum=...)`` suspends the focus (running -> waiting,
no slot, no lease) until people decide it with ``animus approve|reject`` by the rules of a
submit gate, and the attempt that resumes records the decision as a step at the wait's
position and returns it. Real engine, real Postgres, people as real login roles (see
tests/governance_helpers.py); the fallback poll is set to a minute so that only decisions,
timers and notifications can wake anything in time."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from animus_core import Faculty, Focus, NewWorkItem, State
from animus_core.testing import OPTIONS, run_faculties
from animus_core.values.errors import (
    ApprovalTimedOut,
    IllegalTransition,
    InvalidInput,
    PermissionDenied,
)
from animus_core.values.roles import ROLES
from animus_core.values.waits import Approval, Decision, Wait
from tests.engine_helpers import run_cli
from tests.governance_helpers import People
from tests.governance_helpers import people as team
from tests.support import code_blocks, raw
from tests.test_focus_waits import until_state
from tests.test_steps import Tally

NO_POLL = dataclasses.replace(OPTIONS, poll_interval=60.0)
TEAM = (("sam", "submitter"), ("ann", "approver"), ("bob", "approver"), ("otto", "operator"),
        ("ada", "admin"))


@pytest.fixture
async def people(db_url: str, server_url: str) -> AsyncIterator[People]:
    async with team(db_url, server_url, TEAM) as members:
        yield members


class Gated(Faculty):
    """Runs ``params["script"]``: a list of ``["step", NAME]``, ``["approval", WHY, ROLE,
    QUORUM]`` (optionally with a timeout), ``["approval?", WHY, ROLE, QUORUM, TIMEOUT]`` (the
    timeout caught) or ``["wait", EVENT]``; returns what each gave."""

    name = "gated"
    accepts = ("gated",)
    retry_base = 0.0
    retry_max = 0.0

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.attempts: list[int] = []

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        self.attempts.append(focus.attempt)
        out: list[Any] = []
        for op, *args in focus.params["script"]:
            if op == "step":
                out.append(await focus.step(args[0], self.tally.hit, args[0]))
            elif op == "approval":
                why, role, quorum, *timeout = args
                decision = await focus.approval(why, role=role, quorum=quorum,
                                                timeout=timeout[0] if timeout else None)
                assert isinstance(decision, Decision)
                out.append({"approved": decision.approved, "reason": decision.reason,
                            "by": decision.by})
            elif op == "approval?":
                why, role, quorum, timeout = args
                try:
                    await focus.approval(why, role=role, quorum=quorum, timeout=timeout)
                    out.append("decided")
                except ApprovalTimedOut as e:
                    out.append({"timed_out": e.approvals})
            elif op == "wait":
                out.append(await focus.wait_for(args[0]))
            elif op == "sleep":
                await focus.sleep(args[0])
        return out


def script(*ops: list[Any]) -> NewWorkItem:
    return NewWorkItem("gated", source="test").params({"script": list(ops)})


def names(people: People, *who: str) -> list[str]:
    return [people.name(w) for w in who]


async def test_two_approvers_make_the_quorum_and_the_focus_resumes_after_the_gate(
        db_url, tmp_path, people):
    tally = Tally(tmp_path)
    fac = Gated(tally)
    ann, bob = await people.db("ann"), await people.db("bob")
    async with run_faculties([fac], home=tmp_path, database_url=db_url,
                             options=NO_POLL) as animus:
        sent = await animus.submit(script(["step", "build"], ["approval", "ship 1.4?",
                                                              "approver", 2],
                                          ["step", "ship"]))
        waiting = await until_state(animus.db, sent.id, State.WAITING)
        assert animus.engine.inflight == {}  # no slot, no lease while people decide
        assert waiting.wait == msgspec.to_builtins(Wait.approval(2, "ship 1.4?", "approver", 2))
        assert waiting.reason == "awaiting approval (2 x approver): ship 1.4?"

        half = await ann.decide(sent.id, "approve", "changelog read")
        assert (half.state, half.reason) == (State.WAITING, "approved by 1 of 2 needed")
        with pytest.raises(PermissionDenied, match="already decided the approval at step 2"):
            await ann.decide(sent.id, "approve", "once more")
        woke = await bob.decide(sent.id, "approve", "staging is green")
        assert woke.state in (State.QUEUED, State.CLAIMED, State.RUNNING)
        item = await animus.animus.wait_finished(sent.id, 20)
        steps = await animus.db.steps(item.id)
        history = await animus.db.history(item.id)
        approvals = await animus.db.approvals(item.id)
    assert item.state == State.COMPLETED
    assert item.outcome.data == [1, {"approved": True, "by": names(people, "ann", "bob"),
                                     "reason": "changelog read; staging is green"}, 1]
    assert (tally.runs("build"), tally.runs("ship")) == (1, 1)  # steps before the gate: once
    assert fac.attempts == [1, 2]
    assert [(s.position, s.name, s.attempt) for s in steps] == [
        (1, "build", 1), (2, "approval", 2), (3, "ship", 2)]
    assert steps[1].result["approved"] is True
    assert steps[1].result["by"] == names(people, "ann", "bob")
    assert [(a["approver"], a["decision"], a["position"]) for a in approvals] == [
        (people.name("ann"), "approve", 2), (people.name("bob"), "approve", 2)]
    # the audit shows each decision with the database role that made it, then the wake-up
    decided = [(e.event, e.db_user, e.payload["reason"], e.payload["position"])
               for e in history if e.event == "approval"]
    assert decided == [("approval", people.name("ann"), "changelog read", 2),
                       ("approval", people.name("bob"), "staging is green", 2)]
    approval_rows = [e for e in history if e.event == "approval"]
    assert all(e.from_state == e.to_state == State.WAITING for e in approval_rows)
    assert approval_rows[0].payload["gate"]["why"] == "ship 1.4?"
    [woken] = [e for e in history if e.event == "woken"]
    assert (woken.db_user, woken.payload["reason"]) == (
        people.name("bob"), f"woken: approved by {people.name('ann')}, {people.name('bob')}")
    events = [e.event for e in history]
    assert "changed" not in events  # "approved by 1 of 2 needed" is the approval's own row
    # ... as docs/governance.md shows it
    who = {people.name("ann"): "ann", people.name("bob"): "bob"}
    shown = [(e.event, e.from_state, e.to_state, who.get(e.db_user or "", "postgres"))
             for e in history[events.index("suspended"):events.index("woken") + 1]]
    assert shown == documented_audit()


def documented_audit() -> list[tuple[str, str, str, str]]:
    """Event, from, to and db user of the audit example under "Approvals inside a focus"."""
    (block,) = code_blocks("governance.md", "### Approvals inside a focus", "console")
    rows = [line.split() for line in block.splitlines()[2:]]
    return [(r[3], r[4], r[5], r[7]) for r in rows]


async def test_a_rejection_wakes_the_focus_which_sees_the_reason(db_url, tmp_path, people):
    tally = Tally(tmp_path)
    ann = await people.db("ann")
    async with run_faculties([Gated(tally)], home=tmp_path, database_url=db_url,
                             options=NO_POLL) as animus:
        sent = await animus.submit(script(["approval", "drop the table?", "approver", 2],
                                          ["step", "after"]))
        await until_state(animus.db, sent.id, State.WAITING)
        with pytest.raises(PermissionDenied, match="a decision needs a reason"):
            await ann.decide(sent.id, "reject", "   ")  # as for any gate
        await ann.decide(sent.id, "reject", "not on a Friday")
        item = await animus.animus.wait_finished(sent.id, 20)
        history = await animus.db.history(item.id)
    assert item.state == State.COMPLETED  # the faculty decides what a rejection means
    assert item.outcome.data == [{"approved": False, "reason": "not on a Friday",
                                  "by": [people.name("ann")]}, 1]
    [rejection] = [e for e in history if e.event == "rejection"]
    assert (rejection.db_user, rejection.payload["reason"]) == (
        people.name("ann"), "not on a Friday")
    [woken] = [e for e in history if e.event == "woken"]
    assert woken.payload["reason"] == f"woken: rejected by {people.name('ann')}: not on a Friday"


async def test_the_submitter_cannot_approve_and_a_member_of_another_role_does_not_count(
        db_url, tmp_path, people):
    ada, sam, ann, otto = [await people.db(w) for w in ("ada", "sam", "ann", "otto")]
    async with run_faculties([Gated(Tally(tmp_path))], home=tmp_path, database_url=db_url,
                             options=NO_POLL) as animus:
        # ada (an admin, so an approver too) submits it: she may not approve it herself
        mine = (await ada.submit_work(script(["approval", "mine", "approver", 1]))).id
        # an approval the focus asks of operators: approvers do not count
        ops = (await sam.submit_work(script(["approval", "restart db", "operator", 1]))).id
        await until_state(animus.db, mine, State.WAITING)
        await until_state(animus.db, ops, State.WAITING)

        with pytest.raises(PermissionDenied, match=r"requested work item .* cannot approve it"):
            await ada.decide(mine, "approve", "looks fine to me")
        with pytest.raises(PermissionDenied, match="permission denied for function decide"):
            await sam.decide(mine, "approve", "I am no approver")  # submitters never decide
        with pytest.raises(PermissionDenied,
                           match="the approval at step 1 of its focus requires role "
                                 "animus_operator"):
            await ann.decide(ops, "approve", "I approve everything")
        assert await animus.db.approvals(mine) == await animus.db.approvals(ops) == []
        assert (await animus.db.get_work_item(mine)).state == State.WAITING

        await ann.decide(mine, "approve", "another person looked")
        await otto.decide(ops, "approve", "on call")
        done = [await animus.animus.wait_finished(i, 20) for i in (mine, ops)]
    assert [d.outcome.data[0]["by"] for d in done] == [[people.name("ann")],
                                                       [people.name("otto")]]


async def test_an_approval_by_someone_who_lost_the_role_does_not_count(
        db_url, tmp_path, people):
    """As before engage for a submit gate: only approvers who hold the role count."""
    ann, bob = await people.db("ann"), await people.db("bob")
    await people.add("cy", "approver")
    cy = await people.db("cy")
    async with run_faculties([Gated(Tally(tmp_path))], home=tmp_path, database_url=db_url,
                             options=NO_POLL) as animus:
        sent = await animus.submit(script(["approval", "two of us", "approver", 2]))
        await until_state(animus.db, sent.id, State.WAITING)
        await ann.decide(sent.id, "approve", "fine")
        async with raw(db_url) as conn:
            await conn.execute(f'REVOKE animus_approver FROM "{people.name("ann")}"')
        await bob.decide(sent.id, "approve", "fine too")  # the second approval wakes it ...
        again = await until_state(animus.db, sent.id, State.WAITING)  # ... but ann no longer counts
        assert again.suspensions == 2
        await cy.decide(sent.id, "approve", "third")
        item = await animus.animus.wait_finished(sent.id, 20)
    assert item.state == State.COMPLETED
    assert item.outcome.data == [{"approved": True, "by": names(people, "bob", "cy"),
                                  "reason": "fine too; third"}]


async def test_two_gates_in_one_focus_and_a_submit_gate_are_decided_separately(
        db_url, tmp_path, people):
    tally = Tally(tmp_path)
    sam, ann = await people.db("sam"), await people.db("ann")
    async with run_faculties([Gated(tally)], home=tmp_path, database_url=db_url,
                             options=NO_POLL) as animus:
        item = script(["approval", "first", "approver", 1], ["step", "between"],
                      ["approval", "second", "approver", 1], ["step", "after"])
        sent = (await sam.submit_gated(item, "approver", 1, "gated at submit")).id
        await ann.decide(sent, "approve", "may run")  # the submit gate
        first = await until_state(animus.db, sent, State.WAITING)
        assert first.wait is not None
        assert first.wait["position"] == 1
        await ann.decide(sent, "approve", "first is fine")  # the same person, another gate
        second = await until_state(animus.db, sent, State.WAITING)  # decide woke it first
        assert second.wait is not None
        assert second.wait["position"] == 3
        assert second.reason == "awaiting approval (1 x approver): second"
        await ann.decide(sent, "reject", "second is not")
        done = await animus.animus.wait_finished(sent, 20)
        approvals = await animus.db.approvals(sent)
        steps = await animus.db.steps(sent)
    assert done.state == State.COMPLETED
    assert [(a["position"], a["decision"], a["reason"]) for a in approvals] == [
        (None, "approve", "may run"), (1, "approve", "first is fine"),
        (3, "reject", "second is not")]
    assert [o if isinstance(o, int) else o["approved"] for o in done.outcome.data] == [
        True, 1, False, 1]
    assert [(s.position, s.name) for s in steps] == [
        (1, "approval"), (2, "between"), (3, "approval"), (4, "after")]
    assert (tally.runs("between"), tally.runs("after")) == (1, 1)


async def test_deciding_an_item_that_waits_for_a_sleep_or_a_signal_is_a_clear_error(
        db_url, tmp_path, people):
    ann = await people.db("ann")
    async with run_faculties([Gated(Tally(tmp_path))], home=tmp_path, database_url=db_url,
                             options=NO_POLL) as animus:
        signal = (await animus.submit(script(["wait", "go"]))).id
        sleep = (await animus.submit(script(["sleep", 3600]))).id
        await until_state(animus.db, signal, State.WAITING)
        await until_state(animus.db, sleep, State.WAITING)
        with pytest.raises(IllegalTransition,
                           match="is waiting for the signal 'go', not for an approval"):
            await ann.decide(signal, "approve", "go ahead")
        with pytest.raises(IllegalTransition,
                           match=r"is waiting for a sleep until .*, not for an approval"):
            await ann.decide(sleep, "reject", "wake up")
        assert await animus.db.approvals(signal) == await animus.db.approvals(sleep) == []
        for wid in (signal, sleep):
            assert (await animus.db.get_work_item(wid)).state == State.WAITING
            await animus.db.cancel(wid, "done with the test")


async def test_an_approval_that_times_out_raises_approval_timed_out(db_url, tmp_path, people):
    ann = await people.db("ann")
    tally = Tally(tmp_path)
    async with run_faculties([Gated(tally)], home=tmp_path, database_url=db_url,
                             options=NO_POLL) as animus:
        caught = await animus.submit(script(["approval?", "quick", "approver", 2, 0.5],
                                            ["step", "after"]))
        await until_state(animus.db, caught.id, State.WAITING)
        await ann.decide(caught.id, "approve", "one is not enough")
        caught_item = await animus.animus.wait_finished(caught.id, 20)
        uncaught = await animus.run(script(["approval", "quick", "approver", 1, 0.3],
                                           ["step", "never"]))
        history = await animus.db.history(uncaught.id)
    assert caught_item.state == State.COMPLETED
    assert caught_item.outcome.data == [{"timed_out": 1}, 1]
    assert uncaught.state == State.DEAD  # a retry would replay the same timeout
    assert "approval (1 x approver) 'quick' timed out at" in (uncaught.reason or "")
    assert tally.runs("never") == 0
    [woken] = [e for e in history if e.event == "woken"]
    assert woken.payload["reason"] == "woken: approval (1 x approver) timed out undecided"


async def test_bad_roles_quorums_and_whys_are_clear_errors(db_url, tmp_path):
    for kwargs, message in (({"role": "boss"}, "role 'boss' is not an animus role"),
                            ({"quorum": 0}, "a whole number of 1 or more, got 0"),
                            ({"quorum": True}, "a whole number of 1 or more, got True"),
                            ({"why": " "}, "an approval needs a why")):
        args: dict[str, Any] = {"why": "x", "role": "approver", "quorum": 1} | kwargs
        with pytest.raises(InvalidInput, match=message):
            Wait.approval(1, args["why"], args["role"], args["quorum"])
    with pytest.raises(InvalidInput, match="only an approval has a why"):
        Wait(kind="sleep", position=1, until=datetime.now(UTC).isoformat(), role="approver")
    with pytest.raises(InvalidInput, match="waits for no event"):
        Wait(kind="approval", position=1, event="go", why="x", role="approver", quorum=1)

    async with run_faculties([Gated(Tally(tmp_path))], home=tmp_path,
                             database_url=db_url) as animus:
        item = await animus.run(script(["approval", "x", "boss", 1]).max_attempts(1))
    assert item.state == State.DEAD
    assert "an approval's role 'boss' is not an animus role: use one of" in (item.reason or "")
    assert item.suspensions == 0


@given(st.lists(st.tuples(st.sampled_from(["ann", "bob", "cy", "dee"]),
                          st.sampled_from(["approve", "reject"]), st.booleans()),
                max_size=6, unique_by=lambda d: d[0]),
       st.integers(min_value=1, max_value=4))
def test_a_decision_is_one_rejection_or_the_quorum_of_approvals_that_count(decisions, quorum):
    at = datetime(2026, 1, 1, tzinfo=UTC)
    approvals = [Approval(approver=who, decision=what, reason=f"r{i}",
                          at=at + timedelta(seconds=i), position=1, counts=counts)
                 for i, (who, what, counts) in enumerate(decisions)]
    decision = Decision.of(approvals, quorum)
    rejections = [a for a in approvals if a.decision == "reject"]
    counted = [a for a in approvals if a.decision == "approve" and a.counts]
    if rejections:
        assert decision is not None
        assert not decision.approved
        assert (decision.by, decision.reason) == ([rejections[0].approver], rejections[0].reason)
    elif len(counted) >= quorum:
        assert decision is not None
        assert decision.approved
        assert decision.by == [a.approver for a in counted[:quorum]]
        assert decision.decided_at == counted[quorum - 1].at
    else:
        assert decision is None


def test_wait_roles_are_the_governance_roles():
    from animus_core.store.roles import ROLES as STORE_ROLES
    assert ROLES == STORE_ROLES
    for role in ROLES:
        wait = Wait.approval(2, "why", role, 1)
        assert Wait.from_json(msgspec.to_builtins(wait)) == wait


async def test_work_show_and_list_say_what_an_approval_waits_for_and_approve_works_on_it(
        db, cli_env, tmp_path, people):
    """The CLI, as a person runs it: ann approves with `animus approve` as herself."""
    wid = (await db.submit_work(NewWorkItem("gated", source="s"))).id
    [c] = await db.claim(start=True)
    until = datetime.now(UTC) + timedelta(hours=2)
    await db.suspend(c.lease, Wait.approval(4, "ship it", "approver", 2, until), wake_at=until)

    async def cli(*args: str, who: str | None = None) -> str:
        env = dict(cli_env)
        if who is not None:
            env["DATABASE_URL"] = people.url(who)
        code, out, err = await run_cli(env, tmp_path, *args)
        assert code == 0, err
        return out

    waits = f"approval by approver (0 of 2) until {until.isoformat()}"
    assert waits in await cli("work", "list", "--state", "waiting")
    out = await cli("approve", str(wid), "--reason", "read it", who="ann")
    assert out.strip() == f"{wid}: waiting (approved by 1 of 2 needed)"
    shown = await cli("work", "show", str(wid))
    assert f"waits for:   approval by approver (1 of 2) until {until.isoformat()}" in shown
    assert "decisions:" in shown
    assert f"step 4       approve  {people.name('ann')}" in shown
    out = await cli("reject", str(wid), "--reason", "not today", who="bob")
    assert out.strip() == f"{wid}: queued (woken: rejected by {people.name('bob')}: not today)"


async def test_the_documented_approval_example_runs(db_url, tmp_path, monkeypatch, people):
    monkeypatch.setenv("DATABASE_URL", db_url)
    (example,) = code_blocks("writing-faculties.md", "### Approvals inside a focus", "python")
    namespace: dict[str, Any] = {}
    exec(compile(example, "writing-faculties.md", "exec"), namespace)
    await namespace["test_release"](tmp_path, await people.db("ann"))

