"""``animus approvals list``, ``animus work approve|reject`` and what ``animus work show``
says of a gated item: everyday approval work without SQL."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from datetime import datetime

import pytest

from animus_core import NewWorkItem, State
from animus_core.values.waits import Wait
from tests.engine_helpers import run_cli
from tests.governance_helpers import People
from tests.governance_helpers import people as team


@pytest.fixture
async def people(db_url: str, server_url: str) -> AsyncIterator[People]:
    async with team(db_url, server_url, (("rita", "reader"), ("sam", "submitter"),
                                         ("ann", "approver"), ("bob", "approver"))) as members:
        yield members


async def test_pending_decisions_are_listed_with_gate_requester_and_votes(
        db, people, cli_env, tmp_path):
    sam = await people.db("sam")
    gated = (await sam.submit_gated(NewWorkItem("deploy").params({"env": "prod"}),
                                    "approver", 2, "prod deploys")).id
    await (await people.db("ann")).decide(gated, "approve", "looks right")
    await db.submit_work(NewWorkItem("review"))
    [c] = await db.claim(work_types=["review"], lease_seconds=60, start=True)
    await db.suspend(c.lease, Wait.approval(3, "publish the summary?", "approver", 1, None),
                     wake_at=None)
    as_rita = {**cli_env, "DATABASE_URL": people.url("rita")}  # reading needs no more

    code, out, err = await run_cli(as_rita, tmp_path, "approvals", "list", "--json")
    assert code == 0, err
    by_id = {p["id"]: p for p in json.loads(out)}
    assert set(by_id) == {str(gated), str(c.item.id)}
    g = by_id[str(gated)]
    assert (g["kind"], g["role"], g["quorum"], g["why"], g["requested_by"], g["approvers"]) == (
        "submit", "approver", 2, "prod deploys", people.name("sam"), [people.name("ann")])
    f = by_id[str(c.item.id)]
    assert (f["kind"], f["position"], f["quorum"], f["why"], f["approvers"]) == (
        "focus", 3, 1, "publish the summary?", [])
    # since when each waits: a decision moves the item's updated_at, not this
    held = await db.get_work_item(gated)
    assert held.updated_at > held.created_at
    assert datetime.fromisoformat(g["since"]) == held.created_at
    suspended = [e.at for e in await db.history(c.item.id) if e.event == "suspended"]
    assert datetime.fromisoformat(f["since"]) == suspended[-1]
    code, out, err = await run_cli(as_rita, tmp_path, "approvals", "list")
    assert code == 0, err
    assert re.search(rf"{gated} +deploy +submit \(prod deploys\) +approver +1/2 "
                     rf"\({people.name('ann')}\) +{people.name('sam')}", out), out
    assert re.search(rf"{c.item.id} +review +step 3 +approver +0/1 ", out), out

    code, out, err = await run_cli(as_rita, tmp_path, "work", "show", str(gated))
    assert code == 0, err
    assert re.search(rf"^requester: +{people.name('sam')}$", out, re.MULTILINE), out
    assert re.search(r"^gate: +2 x approver \(rule prod deploys\)", out, re.MULTILINE), out

    as_bob = {**cli_env, "DATABASE_URL": people.url("bob")}
    code, out, err = await run_cli(as_bob, tmp_path, "work", "approve", str(gated),
                                   "--reason", "second pair of eyes", "--json")
    assert code == 0, err
    assert json.loads(out)["state"] == "queued"
    code, out, err = await run_cli(as_bob, tmp_path, "work", "reject", str(c.item.id),
                                   "--reason", "not yet")
    assert code == 0, err
    assert (await db.get_work_item(c.item.id)).state == State.QUEUED  # woken with the answer
    code, out, err = await run_cli(as_rita, tmp_path, "approvals", "list")
    assert (code, out.strip()) == (0, "no decision is pending")
    code, out, err = await run_cli(as_rita, tmp_path, "work", "approve", str(gated),
                                   "--reason", "me too")
    assert code != 0
    assert "permission" in err.lower() or "not" in err.lower()
