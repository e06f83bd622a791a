"""Tools that need a person (docs/agents.md, Tools that need approval): a tool registered with
``requires_approval=True``, or called under a tool rule (docs/governance.md, Rules on tools),
suspends the focus at the model's call until people decide through ``focus.approval``;
approval runs the tool exactly once, rejection returns to the model as a tool error with
the reason, and a deny rule refuses the call. The real engine and the real ``anthropic``
SDK against the local Messages API, real login roles deciding."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from animus_core import Faculty, Focus, NewWorkItem, State, hookimpl
from animus_core.faculties.llm import tool_from_function
from animus_core.testing import OPTIONS, run_faculties
from animus_core.values.errors import InvalidInput
from tests.governance_helpers import People
from tests.governance_helpers import people as team
from tests.messages_server import Reply, ToolUse
from tests.test_focus_waits import until_state
from tests.test_llm_durable import MODEL, server  # noqa: F401 - the fixture

NO_POLL = dataclasses.replace(OPTIONS, poll_interval=60.0)


@pytest.fixture
async def people(db_url: str, server_url: str) -> AsyncIterator[People]:
    async with team(db_url, server_url, (("ann", "approver"), ("bob", "approver"))) as members:
        yield members


class Till:
    """A payment tool that needs approval, and a refund tool that does not."""

    def __init__(self) -> None:
        self.paid: list[int] = []
        self.refunded: list[int] = []

    @hookimpl
    def register_tools(self, register: Callable[..., None]) -> None:
        def pay(amount: int) -> str:
            """Pay an amount."""
            self.paid.append(amount)
            return f"paid {amount}"

        def refund(amount: int) -> str:
            """Refund an amount."""
            self.refunded.append(amount)
            return f"refunded {amount}"

        register(pay, requires_approval=True)
        register(refund)


class Clerk(Faculty):
    name = "clerk"
    accepts = ("clerk",)
    retry_base = 0.0
    retry_max = 0.0

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        result = await focus.agent(model=MODEL, tools=["pay", "refund"], max_turns=5)
        return {"text": result.text, "turns": result.turns}


def paying(tool: str = "pay", amount: int = 40) -> list[Reply]:
    return [Reply(text="Paying.", tool_uses=[ToolUse(tool, {"amount": amount}, "toolu_1")]),
            Reply(text="Done.")]


async def test_an_approved_call_runs_the_tool_once_and_pays_no_turn_twice(
        db_url, tmp_path, server, people):  # noqa: F811 - the fixture
    server.script(*paying())
    till = Till()
    ann = await people.db("ann")
    async with run_faculties([Clerk()], home=tmp_path, database_url=db_url,
                             plugins={"till": till}, options=NO_POLL) as animus:
        sent = await animus.submit(NewWorkItem("clerk", source="test"))
        waiting = await until_state(animus.db, sent.id, State.WAITING)
        assert waiting.wait["kind"] == "approval"
        assert waiting.wait["why"] == 'the model calls tool pay with {"amount": 40}'
        assert till.paid == []
        assert animus.engine.inflight == {}
        await ann.decide(sent.id, "approve", "invoice checked")
        item = await animus.animus.wait_finished(sent.id, 30)
        steps = [s.name for s in await animus.db.steps(item.id)]
    assert item.state == State.COMPLETED, item.reason
    assert item.outcome.data == {"text": "Done.", "turns": 2}
    assert till.paid == [40]
    assert len(server.requests) == 2  # turn 1 replayed after the approval, not asked again
    assert steps == ["llm 1 turn 1", "approval", "llm 1 tool 1.1 pay", "llm 1 turn 2"]
    [result] = server.requests[1].tool_results()
    assert result["content"] == "paid 40"


async def test_a_rejected_call_returns_to_the_model_as_an_error_with_the_reason(
        db_url, tmp_path, server, people):  # noqa: F811 - the fixture
    server.script(*paying())
    till = Till()
    ann = await people.db("ann")
    async with run_faculties([Clerk()], home=tmp_path, database_url=db_url,
                             plugins={"till": till}, options=NO_POLL) as animus:
        sent = await animus.submit(NewWorkItem("clerk", source="test"))
        await until_state(animus.db, sent.id, State.WAITING)
        await ann.decide(sent.id, "reject", "wrong supplier")
        item = await animus.animus.wait_finished(sent.id, 30)
    assert item.state == State.COMPLETED, item.reason
    assert till.paid == []
    [result] = server.requests[1].tool_results()
    assert result["is_error"] is True
    assert result["content"] == (f"a person rejected this call ({people.name('ann')}): "
                                 "wrong supplier")


def write_rules(tmp_path: Path, text: str) -> Path:
    rules = tmp_path / "rules"
    rules.mkdir(exist_ok=True)
    (rules / "tools.toml").write_text(text)
    return rules


async def test_tool_rules_deny_a_call_or_make_it_wait_for_a_quorum(
        db_url, tmp_path, server, people):  # noqa: F811 - the fixture
    rules = write_rules(tmp_path, """
        [[rule]]
        name = "no big refunds"
        tool = "refund"
        params = { amount = 500 }
        effect = "deny"
        reason = "refunds over 100 go through finance"

        [[rule]]
        name = "refunds need two"
        tool = "refund"
        effect = "require_approval"
        quorum = 2
    """)
    till = Till()
    ann, bob = await people.db("ann"), await people.db("bob")
    env = {"ANIMUS_RULES": str(rules)}
    server.script(*paying("refund", 500), *paying("refund", 5))
    async with run_faculties([Clerk()], home=tmp_path, database_url=db_url, env=env,
                             plugins={"till": till}, options=NO_POLL) as animus:
        denied = await animus.run(NewWorkItem("clerk", source="test"))
        assert till.refunded == []
        [refused] = server.requests[1].tool_results()
        assert refused["is_error"] is True
        assert refused["content"] == ("refused by rule 'no big refunds': refunds over 100 go "
                                      "through finance")
        sent = await animus.submit(NewWorkItem("clerk", source="test"))
        waiting = await until_state(animus.db, sent.id, State.WAITING)
        assert (waiting.wait["role"], waiting.wait["quorum"]) == ("approver", 2)
        await ann.decide(sent.id, "approve", "ok")
        await bob.decide(sent.id, "approve", "ok too")
        item = await animus.animus.wait_finished(sent.id, 30)
    assert denied.state == item.state == State.COMPLETED
    assert till.refunded == [5]


def test_a_tool_needing_approval_names_a_role_and_a_quorum():
    def pay(amount: int) -> str:
        """Pay."""
        return str(amount)

    with pytest.raises(InvalidInput, match="an approval's role 'boss' is not an animus role"):
        tool_from_function(pay, requires_approval=True, approval_role="boss")
    with pytest.raises(InvalidInput, match="an approval's quorum"):
        tool_from_function(pay, requires_approval=True, approval_quorum=0)
    assert tool_from_function(pay, approval_role="boss").requires_approval is False
