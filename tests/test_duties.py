"""Separation of duties, kept by the database itself.

* no role, admin included, writes work items or audit rows directly: submitting, deciding
  and every state move go through functions that run as the schema's owner and check the
  transition (and the lease) first;
* every change of any column of a work item writes an audit row in the same transaction;
  ``requested_by`` is who submitted and never changes; an audit row's ``db_user`` is the
  session's own role, whatever the INSERT says;
* nobody, admin and superusers included, approves an item they requested;
* the role table in docs/governance.md is what the database does: every role tries every
  action, and the answers must be the table's.

People are real login roles connected as themselves (see tests/governance_helpers.py); the
``db`` fixture and ``raw(db_url)`` connect as the superuser that owns the schema.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import msgspec
import pytest

from animus_core import NewWorkItem, State
from animus_core.faculties.embedders import HashingEmbedder
from animus_core.store import engines, read
from animus_core.store.db import Db, DeadLetter, Retry
from animus_core.store.memory import Memory
from animus_core.store.migrations import apply, load
from animus_core.store.roles import ROLES, setup_roles
from animus_core.values.engines import EngineInfo
from animus_core.values.errors import ConfigError, IllegalTransition, PermissionDenied
from animus_core.values.waits import Signal, Wait
from tests.conftest import scratch_database
from tests.governance_helpers import People, as_user, database_name
from tests.governance_helpers import people as team
from tests.support import raw

DOC = Path(__file__).resolve().parent.parent / "docs" / "governance.md"

TEAM = (("rita", "reader"), ("sam", "submitter"), ("sue", "submitter"), ("ann", "approver"),
        ("bob", "approver"), ("otto", "operator"), ("ada", "admin"))
#: who stands for each role in the role table
MEMBER = {"reader": "rita", "submitter": "sam", "approver": "ann", "operator": "otto",
          "admin": "ada"}


@pytest.fixture
async def people(db_url: str, server_url: str) -> AsyncIterator[People]:
    async with team(db_url, server_url, TEAM) as members:
        yield members


def deploy(env: str = "prod") -> NewWorkItem:
    return NewWorkItem("deploy", source="cli").params({"env": env})


# -- the holes, one by one -----------------------------------------------------------------------


async def test_roles_that_only_read_verify_the_audit_trail_and_search_memory(db, people):
    """``animus audit verify`` and ``animus memory search`` failed for the reader and the
    approver: verify sealed first (INSERT on audit_seal), and opening memory configured it
    (animus.memory_configure), although the docs promise both to whoever reads."""
    mine = await Memory.open(db, HashingEmbedder(64))
    await mine.store("the deploy window is on tuesdays")
    await db.submit_work(deploy())
    await db.verify_audit()  # sealed up to here
    await db.submit_work(deploy("dev"))  # and this one is not
    for who in ("rita", "ann"):
        p = await people.db(who)
        result = await p.verify_audit()
        assert result.ok, result
        assert result.checked > 0
        assert result.unsealed > 0  # rows it may not seal: counted, not verified
        memory = await Memory.open(p, HashingEmbedder(64))
        [hit] = await memory.search("deploy window", k=1)
        assert "tuesdays" in hit.content
        with pytest.raises(ConfigError, match="embedded with hashing-v1-64"):
            await Memory.open(p, HashingEmbedder(32))
        with pytest.raises(PermissionDenied):
            await memory.store("a reader writes no memory")
    otto = await people.db("otto")
    assert (await otto.verify_audit()).unsealed == 0  # an operator seals first



async def test_nobody_rewrites_an_item_to_approve_it_themselves(db, people):
    """Operators and admins could rewrite an item's requester and params without an audit
    row, then approve their own item."""
    ada = await people.db("ada")
    wid = (await ada.submit_gated(deploy(), "approver", 1, "prod deploys")).id
    before = await db.history(wid)
    for who in ("otto", "ada"):
        async with raw(people.url(who)) as conn:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(
                    """UPDATE animus.work_items SET requested_by = $2,
                              params = '{"env": "dev"}' WHERE id = $1""",
                    wid, people.name("bob"))
    with pytest.raises(PermissionDenied, match="requested work item"):
        await ada.decide(wid, "approve", "somebody else asked for it")
    item = await db.get_work_item(wid)
    assert (item.state, item.requested_by, item.params) == (
        State.AWAITING_APPROVAL, people.name("ada"), {"env": "prod"})
    assert await db.history(wid) == before
    assert await db.approvals(wid) == []


async def test_a_gated_item_leaves_its_wait_only_by_a_decision(db, people):
    """Operators and admins could set a gated item's state to queued directly (where it sat
    without a queue message), or end it without being approvers."""
    sam = await people.db("sam")
    wid = (await sam.submit_gated(deploy(), "approver", 1, "prod deploys")).id
    before = await db.history(wid)
    for who in ("otto", "ada"):
        async with raw(people.url(who)) as conn:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(
                    "UPDATE animus.work_items SET state = 'queued' WHERE id = $1", wid)
        with pytest.raises(IllegalTransition, match="awaiting_approval: only a decision"):
            await (await people.db(who)).dead_letter(wid, "not worth the wait")
    otto = await people.db("otto")
    async with raw(people.url("otto")) as conn:  # a queue message slipped in runs nothing
        await conn.execute(
            "SELECT count(*) FROM pgmq.send('work', jsonb_build_object('id', $1::text, "
            "'t', 'deploy', 'p', 0))", str(wid))
    assert await otto.claim(lease_seconds=30, start=True) == []
    assert (await db.get_work_item(wid)).state == State.AWAITING_APPROVAL
    assert await db.history(wid) == before


async def test_audit_rows_name_the_session_user_whatever_the_insert_says(db, db_url, people):
    """An operator could insert audit rows naming another database user, and the sealer
    chained them like any other."""
    sam = await people.db("sam")
    wid = (await sam.submit_work(NewWorkItem("ping", source="sam"))).id
    for who in ("otto", "ada"):
        async with raw(people.url(who)) as conn:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(
                    """INSERT INTO animus.audit_log (work_id, event, provenance, db_user)
                       VALUES ($1, 'approval', '{}', $2)""", wid, people.name("ann"))
    async with raw(db_url) as conn:  # the owner may append, but only in its own name
        owner = await conn.fetchval("SELECT session_user")
        await conn.execute(
            """INSERT INTO animus.audit_log (work_id, event, provenance, db_user)
               VALUES ($1, 'note', '{}', $2)""", wid, people.name("ann"))
    assert [(e.event, e.db_user) for e in await db.history(wid)] == [
        ("submitted", people.name("sam")), ("note", owner)]
    assert await db.seal_audit() == 2
    assert (await db.verify_audit()).ok


async def test_every_change_of_a_work_item_is_audited(db, db_url):
    """Only state changes were audited: the owner's UPDATE of params left no trace."""
    wid = (await db.submit_work(deploy())).id
    async with raw(db_url) as conn:
        owner = await conn.fetchval("SELECT session_user")
        await conn.execute(
            """UPDATE animus.work_items SET params = '{"env": "dev"}', priority = 5
                WHERE id = $1""", wid)
        await conn.execute(  # no value changes: nothing to record
            "UPDATE animus.work_items SET params = params, updated_at = now() WHERE id = $1",
            wid)
        await conn.execute(  # beside a state change, the other columns get their own row
            """UPDATE animus.work_items SET state = 'cancelled', reason = 'by hand',
                      resolved_at = now(), gate = '{"rule": "late"}' WHERE id = $1""", wid)
    history = await db.history(wid)
    assert [(e.event, e.from_state, e.to_state, e.db_user) for e in history] == [
        ("submitted", None, "queued", owner),
        ("changed", "queued", "queued", owner),
        ("cancelled", "queued", "cancelled", owner),
        ("changed", "cancelled", "cancelled", owner)]
    assert history[1].payload == {"columns": {
        "params": {"old": {"env": "prod"}, "new": {"env": "dev"}},
        "priority": {"old": 0, "new": 5}}}
    assert history[1].provenance == {"source": "cli"}  # by hand: no animus actor
    assert history[2].payload["reason"] == "by hand"
    assert history[3].payload == {"columns": {"gate": {"old": None, "new": {"rule": "late"}}}}
    assert await db.seal_audit() == 4
    assert (await db.verify_audit()).ok


async def test_model_usage_totals_are_audited(db):
    wid = (await db.submit_work(NewWorkItem("think", source="t"))).id
    first = {"models": {"m1": {"input_tokens": 10, "output_tokens": 2}}, "cost_usd": 0.25}
    await db.record_usage(wid, first)
    await db.record_usage(wid, {"models": {"m1": {"input_tokens": 5}, "m2": {"input_tokens": 1}},
                                "cost_usd": 0.125})
    total = {"models": {"m1": {"input_tokens": 15, "output_tokens": 2},
                        "m2": {"input_tokens": 1}}, "cost_usd": 0.375}
    assert (await db.get_work_item(wid)).usage == total
    changes = [e.payload["columns"] for e in await db.history(wid) if e.event == "changed"]
    assert changes == [{"usage": {"old": None, "new": first}},
                       {"usage": {"old": first, "new": total}}]


async def test_a_change_recorded_by_its_own_event_is_not_recorded_twice(db, db_url, people):
    """A cancel request and an approval short of the quorum change the item without moving
    it; their own audit rows say so. The same change made by hand is a `changed` row."""
    running = (await db.submit_work(NewWorkItem("slow", source="t"))).id
    [c] = await db.claim(lease_seconds=300, start=True)
    await db.cancel(running, "not needed")
    await db.cancel(running, "really not needed")
    async with raw(db_url) as conn:
        await conn.execute("UPDATE animus.work_items SET cancel_requested = 'by hand' "
                           "WHERE id = $1", running)
    assert [e.event for e in await db.history(running)] == [
        "submitted", "claimed", "running", "cancel_requested", "cancel_requested", "changed"]
    assert (await db.history(running))[-1].payload == {"columns": {"cancel_requested": {
        "old": "really not needed", "new": "by hand"}}}
    await db.complete(c.lease, None)

    sam = await people.db("sam")
    gated = (await sam.submit_gated(deploy(), "approver", 2, "two people")).id
    await (await people.db("ann")).decide(gated, "approve", "fine")
    assert [e.event for e in await db.history(gated)] == ["submitted", "approval"]
    assert (await db.get_work_item(gated)).reason == "approved by 1 of 2 needed"


async def test_requested_by_is_who_submitted_and_never_changes(db, db_url, people):
    async with raw(people.url("sam")) as conn:  # a requester named in the input is ignored
        await conn.execute(
            """SELECT count(*) FROM animus.submit('work', jsonb_build_array(jsonb_build_object(
                 'work_type', 'ping', 'source', 'psql', 'requested_by', $1::text)))""",
            people.name("ann"))
    async with raw(db_url) as conn:
        owner = await conn.fetchval("SELECT session_user")
        await conn.execute(
            """INSERT INTO animus.work_items (work_type, source, state, requested_by)
               VALUES ('pong', 'psql', 'queued', $1)""", people.name("ann"))
        requesters = dict(await conn.fetch(
            "SELECT work_type, requested_by FROM animus.work_items ORDER BY work_type"))
        assert requesters == {"ping": people.name("sam"), "pong": owner}
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="requested_by"):
            await conn.execute("UPDATE animus.work_items SET requested_by = $1",
                               people.name("ann"))


async def test_a_superuser_that_is_not_the_owner_is_held_to_the_same_rules(db, db_url,
                                                                          server_url):
    name = f"root_{database_name(db_url)}"
    async with raw(server_url) as conn:
        await conn.execute(f'CREATE ROLE "{name}" LOGIN SUPERUSER')
    root = await Db.connect(as_user(db_url, name), max_size=2, actor="test:root")
    try:
        wid = (await root.submit_gated(deploy(), "approver", 1, "prod deploys")).id
        with pytest.raises(PermissionDenied, match=f"{name} requested work item"):
            await root.decide(wid, "approve", "mine, but I am root")
        async with raw(as_user(db_url, name)) as conn:
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="requested_by"):
                await conn.execute("UPDATE animus.work_items SET requested_by = 'someone'")
            # a superuser may write anything, but not without its row in the audit trail
            await conn.execute("UPDATE animus.work_items SET params = '{}' WHERE id = $1", wid)
            await conn.execute(
                """INSERT INTO animus.audit_log (work_id, event, provenance, db_user)
                   VALUES ($1, 'note', '{}', 'someone')""", wid)
        assert [(e.event, e.db_user) for e in await db.history(wid)] == [
            ("submitted", name), ("changed", name), ("note", name)]
        assert (await db.get_work_item(wid)).state == State.AWAITING_APPROVAL
    finally:
        await root.close()
        async with raw(server_url) as conn:
            await conn.execute(f'DROP ROLE IF EXISTS "{name}"')


#: The columns a state move sets: its audit rows account for them (see the trigger in
#: 0012_separation_of_duties.sql).
MOVED = {"state", "reason", "attempts", "outcome_data", "outcome_error", "duration_ms",
         "msg_id", "lease", "resolved_at", "updated_at", "wait", "wake_at", "suspensions"}
#: The columns the trigger compares before it looks for other changes beside a state move.
COMPARED = {"work_type", "dedup_key", "params", "source", "trigger", "priority", "queue",
            "parent_id", "merged_into", "replay_of", "traceparent", "gate", "max_attempts",
            "created_at", "usage", "cancel_requested"}
#: The columns nobody may change.
FIXED = {"id", "requested_by"}


async def test_the_audit_trigger_knows_every_column_of_a_work_item(db_url):
    async with raw(db_url) as conn:
        columns = {r[0] for r in await conn.fetch(
            """SELECT attname FROM pg_attribute
                WHERE attrelid = 'animus.work_items'::regclass AND attnum > 0
                  AND NOT attisdropped""")}
    assert columns == MOVED | COMPARED | FIXED, (
        "a column was added to animus.work_items: add it to the columns that "
        "animus.work_items_updated() compares (or to those a state move sets), and here")


async def test_upgrading_to_0012_takes_the_direct_writes_away_at_once(server_url):
    """On a database whose roles were set up by an earlier version (operators could update
    work items and insert audit rows), the migration applies the new rules without waiting
    for the next `animus roles setup`; that one, run twice, keeps them."""
    writes = """SELECT has_table_privilege('animus_operator', 'animus.work_items', 'UPDATE'),
                       has_table_privilege('animus_operator', 'animus.work_items', 'INSERT'),
                       has_table_privilege('animus_operator', 'animus.audit_log', 'INSERT')"""
    grants = writes + """,
                       has_function_privilege('animus_operator',
                                              'animus.fail(uuid, bigint, int, text, bigint)',
                                              'EXECUTE'),
                       has_function_privilege('animus_reader',
                                              'animus.fail(uuid, bigint, int, text, bigint)',
                                              'EXECUTE'),
                       has_schema_privilege('animus_admin', 'animus', 'CREATE'),
                       (SELECT bool_and(prosecdef) FROM pg_proc
                         WHERE oid IN ('animus.claim(text, int, int, text[], bool)'::regprocedure,
                                       'animus.complete(uuid[], bigint[], int[], jsonb[],
                                                        bigint[])'::regprocedure))"""
    files = load()
    async with scratch_database(server_url) as url, raw(url) as conn:
        await apply(conn, [m for m in files if m.version < 12])
        await conn.execute("SELECT animus.create_queue('work')")
        await setup_roles(conn)
        await conn.execute("""GRANT INSERT, UPDATE ON animus.work_items TO animus_operator;
                              GRANT INSERT ON animus.audit_log TO animus_operator;
                              GRANT ALL ON SCHEMA animus TO animus_admin""")
        assert tuple(await conn.fetchrow(writes)) == (True, True, True)
        assert [m.version for m in await apply(conn, files)] == [
            m.version for m in files if m.version >= 12]
        # the admin's right to create in the schema goes with the next roles setup
        assert tuple(await conn.fetchrow(grants)) == (False, False, False, True, False, True,
                                                      True)
        for _ in range(2):
            await setup_roles(conn)
            assert tuple(await conn.fetchrow(grants)) == (False, False, False, True, False,
                                                          False, True)


# -- the role table ------------------------------------------------------------------------------


_REFUSED = (PermissionDenied, asyncpg.InsufficientPrivilegeError)


async def allowed(step: Awaitable[Any]) -> bool:
    """Whether the database let it happen (a refusal of privilege is the only "no")."""
    try:
        await step
    except _REFUSED:
        return False
    return True


async def same_answer(*steps: Callable[[], Awaitable[Any]]) -> bool:
    """The answer to every step, which must be the same for all of them."""
    answers = [await allowed(step()) for step in steps]
    assert len(set(answers)) == 1, f"some steps were allowed and others refused: {answers}"
    return answers[0]


class Bench:
    """What the actions share: the owner's Db, the team, and fresh work types so that no
    action sees another's items."""

    def __init__(self, db: Db, db_url: str, people: People) -> None:
        self.db, self.db_url, self.people = db, db_url, people
        self._n = itertools.count()
        self._dbs: dict[str, Db] = {}

    def fresh(self) -> str:
        return f"matrix-{next(self._n)}"

    async def person(self, who: str) -> Db:
        if who not in self._dbs:
            self._dbs[who] = await self.people.db(who)
        return self._dbs[who]

    async def queued(self, work_type: str | None = None) -> UUID:
        return (await self.db.submit_work(NewWorkItem(work_type or self.fresh(),
                                                      source="matrix"))).id

    async def gated(self, requester: str = "sue") -> UUID:
        """An item ``requester`` submitted that waits for one approver."""
        db = await self.person(requester)
        return (await db.submit_gated(NewWorkItem(self.fresh(), source="matrix"),
                                      "approver", 1, "the matrix gate")).id

    async def finished(self) -> UUID:
        wid = await self.queued()
        await self.db.cancel(wid, "done with it")
        return wid

    async def sql(self, who: str, statement: str, *args: Any) -> str:
        async with raw(self.people.url(who)) as conn:
            status: str = await conn.execute(statement, *args)
        return status


Action = Callable[[Bench, str], Awaitable[bool]]
ACTIONS: dict[str, Action] = {}


def action(label: str) -> Callable[[Action], Action]:
    def register(fn: Action) -> Action:
        ACTIONS[label] = fn
        return fn
    return register


@action("read work items, approvals, execution records and signals")
async def _read_work(b: Bench, who: str) -> bool:
    wid = await b.queued()
    p = await b.person(who)
    return await same_answer(lambda: p.get_work_item(wid), lambda: p.approvals(wid),
                             lambda: p.executions(wid), lambda: p.signals(wid))


@action("read the audit trail")
async def _read_audit(b: Bench, who: str) -> bool:
    wid = await b.queued()
    p = await b.person(who)
    return await allowed(p.history(wid))


@action("read the fleet's status: engines, queues, stuck work (animus status)")
async def _read_status(b: Bench, who: str) -> bool:
    p = await b.person(who)
    return await allowed(read.status(p))


@action("submit work")
async def _submit(b: Bench, who: str) -> bool:
    p = await b.person(who)
    return await allowed(p.submit_work(NewWorkItem(b.fresh(), source="matrix")))


@action("approve or reject work someone else requested, gated for approvers")
async def _approve_other(b: Bench, who: str) -> bool:
    first, second = await b.gated(), await b.gated()
    p = await b.person(who)
    return await same_answer(lambda: p.decide(first, "approve", "looks right"),
                             lambda: p.decide(second, "reject", "not now"))


@action("approve work they requested themselves")
async def _approve_own(b: Bench, who: str) -> bool:
    name, role = b.people.name(who), next(r for r, m in MEMBER.items() if m == who)
    p = await b.person(who)
    async with raw(b.db_url) as conn:
        # Roles that may not submit could have submitted under an earlier role: lend them
        # the submitter role for it. The gate names their own role, so that being the
        # requester is the only thing that can stand in their way.
        lend = not await conn.fetchval("SELECT pg_has_role($1, 'animus_submitter', 'MEMBER')",
                                       name)
        if lend:
            await conn.execute(f'GRANT animus_submitter TO "{name}"')
        try:
            wid = (await p.submit_gated(NewWorkItem(b.fresh(), source="matrix"), role, 1,
                                        "their own")).id
        finally:
            if lend:
                await conn.execute(f'REVOKE animus_submitter FROM "{name}"')
    assert (await b.db.get_work_item(wid)).requested_by == name
    return await allowed(p.decide(wid, "approve", "mine"))


@action("run an engine: claim, start, complete, fail, release, extend leases, record usage "
        "and steps, suspend, take signals")
async def _engine(b: Bench, who: str) -> bool:
    t = b.fresh()
    for _ in range(11):
        await b.queued(t)
    p = await b.person(who)
    # Leases the owner took, so that each step can be tried whatever the others answered.
    [to_start] = await b.db.claim(work_types=[t], lease_seconds=300)
    [to_complete] = await b.db.claim(work_types=[t], lease_seconds=300, start=True)
    [to_fail] = await b.db.claim(work_types=[t], lease_seconds=300, start=True)
    [to_retry] = await b.db.claim(work_types=[t], lease_seconds=300, start=True)
    [to_end] = await b.db.claim(work_types=[t], lease_seconds=300, start=True)
    [to_cancel] = await b.db.claim(work_types=[t], lease_seconds=300, start=True)
    [to_release] = await b.db.claim(work_types=[t], lease_seconds=300)
    [to_step] = await b.db.claim(work_types=[t], lease_seconds=300, start=True)
    [to_suspend] = await b.db.claim(work_types=[t], lease_seconds=300, start=True)
    [to_take] = await b.db.claim(work_types=[t], lease_seconds=300, start=True)
    await b.db.signal(to_take.item.id, "go", {"n": 1})
    until = datetime.now(UTC) + timedelta(hours=1)
    usage = {"models": {"m": {"input_tokens": 1}}, "cost_usd": 0.5}
    return await same_answer(
        lambda: p.claim(work_types=[t], lease_seconds=300),
        lambda: p.start(to_start.lease),
        lambda: p.complete(to_complete.lease, {"ok": True}, duration_ms=1),
        lambda: p.fail(to_fail.lease, "on purpose"),
        lambda: p.fail_attempt(to_retry.lease, "on purpose", then=Retry(0, "again"),
                               usage=usage),
        lambda: p.fail_attempt(to_end.lease, "on purpose", then=DeadLetter("enough")),
        lambda: p.cancel_attempt(to_cancel.lease),
        lambda: p.release(to_release.lease, "later"),
        lambda: p.extend_lease([to_start.lease], 300),
        lambda: p.record_usage(to_start.item.id, usage),
        lambda: p.record_step(to_step.lease, 1, "fetch", msgspec.Raw(b"1"), result_hash="h",
                              started_at=datetime.now(UTC), duration_ms=1),
        lambda: p.suspend(to_suspend.lease, Wait.sleep(1, until), wake_at=until),
        lambda: _took(p.take_signal(to_take.lease, "go", 1)),
        lambda: p.create_queue("matrix_" + t.replace("-", "_")))


async def _took(taking: Awaitable[Signal | None]) -> None:
    assert await taking is not None


@action("retry, dead-letter and cancel work")
async def _manage(b: Bench, who: str) -> bool:
    t = b.fresh()
    failed, running, queued, cancelled = [await b.queued(t) for _ in range(4)]
    [c] = await b.db.claim(work_types=[t], lease_seconds=300, start=True)
    await b.db.fail(c.lease, "flaky")
    assert c.item.id == failed
    [r] = await b.db.claim(work_types=[t], lease_seconds=300, start=True)
    assert r.item.id == running
    p = await b.person(who)
    return await same_answer(lambda: p.retry(failed), lambda: p.dead_letter(queued, "no"),
                             lambda: p.cancel(cancelled), lambda: p.cancel(running))


async def _registered_engine(b: Bench) -> EngineInfo:
    me = EngineInfo(id=uuid4(), host="h", pid=1, version="1", heartbeat_seconds=5.0,
                    concurrency=1, queues=["work"], faculties=[])
    await engines.register(b.db, me)
    return me


@action("run an engine's registration: register, heartbeat, deregister")
async def _engine_presence(b: Bench, who: str) -> bool:
    me = await _registered_engine(b)
    p = await b.person(who)
    return await same_answer(lambda: engines.register(p, me),
                             lambda: engines.heartbeat(p, me.id, {}),
                             lambda: engines.deregister(p, me.id))


@action("ask engines to stop (animus stop)")
async def _stop_engines(b: Bench, who: str) -> bool:
    me = await _registered_engine(b)
    p = await b.person(who)
    return await allowed(engines.stop_engines(p, me.id, grace=1))


@action("signal work")
async def _signal(b: Bench, who: str) -> bool:
    t = b.fresh()
    await b.queued(t)
    [c] = await b.db.claim(work_types=[t], lease_seconds=300, start=True)
    await b.db.suspend(c.lease, Wait.for_event(1, "go"), wake_at=None)
    await b.queued(t)
    [d] = await b.db.claim(work_types=[t], lease_seconds=300, start=True)
    await b.db.suspend(d.lease, Wait.for_event(1, "go"), wake_at=None)
    p = await b.person(who)
    done = await same_answer(lambda: p.signal(c.item.id, "go", {"from": who}),
                             lambda: p.signal_many([(d.item.id, "go", {"from": who})]))
    if done:
        for wid in (c.item.id, d.item.id):
            [signal] = await b.db.signals(wid)
            assert signal.sent_by == b.people.name(who)
            assert (await b.db.get_work_item(wid)).state == State.QUEUED
    return done


@action("rerun or replay work from a recorded step (--from-step)")
async def _from_step(b: Bench, who: str) -> bool:
    t = b.fresh()
    await b.queued(t)
    [c] = await b.db.claim(work_types=[t], lease_seconds=300, start=True)
    await b.db.record_step(c.lease, 1, "fetch", msgspec.Raw(b"1"), result_hash="h",
                           started_at=datetime.now(UTC), duration_ms=1)
    await b.db.record_step(c.lease, 2, "think", msgspec.Raw(b"2"), result_hash="h",
                           started_at=datetime.now(UTC), duration_ms=1)
    await b.db.complete(c.lease, None)
    p = await b.person(who)
    old = await b.db.get_work_item(c.item.id)
    done = await allowed(p.submit_from_step(old.again(source="matrix", trigger="rerun"),
                                            from_id=old.id, step="think"))
    if done:
        [rerun] = await b.db.list_work(work_type=t, state=["queued"])
        assert [s.name for s in await b.db.steps(rerun.id)] == ["fetch"]
    return done


@action("write or change steps directly")
async def _steps(b: Bench, who: str) -> bool:
    wid = await b.queued()
    return await same_answer(
        lambda: b.sql(who, """INSERT INTO animus.steps (work_id, position, name, attempt,
                                  result, result_hash, started_at, duration_ms)
                              VALUES ($1, 1, 'forged', 1, '1', 'h', now(), 1)""", wid),
        lambda: b.sql(who, "UPDATE animus.steps SET name = 'forged'"),
        lambda: b.sql(who, "DELETE FROM animus.steps"))


@action("change a work item directly (UPDATE)")
async def _update(b: Bench, who: str) -> bool:
    wid = await b.queued()
    done = await allowed(b.sql(who, """UPDATE animus.work_items SET params = '{"x": 1}'
                                        WHERE id = $1""", wid))
    return done and (await b.db.get_work_item(wid)).params == {"x": 1}


@action("move a gated item to queued directly")
async def _set_state(b: Bench, who: str) -> bool:
    wid = await b.gated()
    await allowed(b.sql(who, "UPDATE animus.work_items SET state = 'queued' WHERE id = $1",
                        wid))
    return (await b.db.get_work_item(wid)).state == State.QUEUED


@action("change who requested a work item")
async def _requester(b: Bench, who: str) -> bool:
    wid = await b.gated()
    await allowed(b.sql(who, "UPDATE animus.work_items SET requested_by = $2 WHERE id = $1",
                        wid, b.people.name(who)))
    return (await b.db.get_work_item(wid)).requested_by == b.people.name(who)


@action("insert a work item directly, not through animus.submit")
async def _insert(b: Bench, who: str) -> bool:
    return await allowed(b.sql(
        who, """INSERT INTO animus.work_items (work_type, source, state)
                VALUES ($1, 'psql', 'queued')""", b.fresh()))


@action("write an audit row directly")
async def _audit_row(b: Bench, who: str) -> bool:
    wid = await b.queued()
    return await allowed(b.sql(
        who, """INSERT INTO animus.audit_log (work_id, event, provenance)
                VALUES ($1, 'note', '{}')""", wid))


@action("write an audit row in another user's name")
async def _forge(b: Bench, who: str) -> bool:
    wid, other = await b.queued(), b.people.name("sue")
    await allowed(b.sql(
        who, """INSERT INTO animus.audit_log (work_id, event, provenance, db_user)
                VALUES ($1, 'forged', '{}', $2)""", wid, other))
    return any(e.event == "forged" and e.db_user == other for e in await b.db.history(wid))


@action("change, delete or truncate audit rows, seals or approvals")
async def _rewrite(b: Bench, who: str) -> bool:
    wid = await b.queued()
    await b.db.seal_audit()
    return await same_answer(*(
        (lambda sql=sql: b.sql(who, sql, wid)) for sql in (
            "UPDATE animus.audit_log SET event = 'forged' WHERE work_id = $1",
            "DELETE FROM animus.audit_log WHERE work_id = $1",
            "UPDATE animus.audit_seal SET hash = ''::bytea "
            "WHERE audit_id IN (SELECT id FROM animus.audit_log WHERE work_id = $1)",
            "DELETE FROM animus.approvals WHERE work_id = $1")),
        lambda: b.sql(who, "TRUNCATE animus.audit_log, animus.audit_seal, animus.approvals"))


@action("seal the audit trail")
async def _seal(b: Bench, who: str) -> bool:
    await b.queued()  # something to seal
    p = await b.person(who)
    return await allowed(p.seal_audit())


@action("write decisions directly into approvals")
async def _approvals(b: Bench, who: str) -> bool:
    wid = await b.gated()
    return await allowed(b.sql(
        who, """INSERT INTO animus.approvals (work_id, decision, reason)
                VALUES ($1, 'approve', 'direct')""", wid))


@action("write memories")
async def _memories(b: Bench, who: str) -> bool:
    return await allowed(b.sql(who, "INSERT INTO animus.memories (content) VALUES ('noted')"))


@action("delete finished work (animus purge)")
async def _purge(b: Bench, who: str) -> bool:
    wid = await b.finished()
    return await allowed(b.sql(who, "DELETE FROM animus.work_items WHERE id = $1", wid)) \
        and await _gone(b, wid)


@action("delete live work")
async def _delete_live(b: Bench, who: str) -> bool:
    wid = await b.queued()
    try:
        await b.sql(who, "DELETE FROM animus.work_items WHERE id = $1", wid)
    except _REFUSED:
        return False
    except asyncpg.PostgresError as e:
        if e.sqlstate != "ANI01":  # the trigger that keeps live work
            raise
        return False
    return await _gone(b, wid)


async def _gone(b: Bench, wid: UUID) -> bool:
    async with raw(b.db_url) as conn:
        return not await conn.fetchval("SELECT count(*) FROM animus.work_items WHERE id = $1",
                                       wid)


@action("change the schema: create or alter tables (animus db migrate)")
async def _schema(b: Bench, who: str) -> bool:
    column, table = b.fresh().replace("-", "_"), b.fresh().replace("-", "_")
    return await same_answer(
        lambda: b.sql(who, f"ALTER TABLE animus.work_items ADD COLUMN {column} int"),
        lambda: b.sql(who, f"CREATE TABLE animus.{table} (x int)"))


def documented_roles() -> dict[str, dict[str, bool]]:
    """The table under "What each role may do" in docs/governance.md: {action: {role: yes}}."""
    text = DOC.read_text("utf-8")
    heading = re.search(r"^#+ What each role may do$", text, re.MULTILINE)
    assert heading, "docs/governance.md has no section 'What each role may do'"
    lines = text[heading.end():].strip().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))

    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    assert cells(rows[0]) == ["action", *ROLES]
    table: dict[str, dict[str, bool]] = {}
    for row in rows[2:]:
        label, *answers = cells(row)
        assert set(answers) <= {"yes", "no"}, row
        table[label] = dict(zip(ROLES, [a == "yes" for a in answers], strict=True))
    return table


async def test_each_role_may_do_what_the_role_table_says_and_no_more(db, db_url, people):
    table = documented_roles()
    assert list(table) == list(ACTIONS), "the table and the test must list the same actions"
    bench = Bench(db, db_url, people)
    found = {label: {role: await act(bench, MEMBER[role]) for role in ROLES}
             for label, act in ACTIONS.items()}
    wrong = {label: {role: ("yes" if found[label][role] else "no") for role in ROLES}
             for label in ACTIONS if found[label] != table[label]}
    assert not wrong, f"the database answers differently from the table: {wrong}"
