"""The work item state machine: Python and the database agree, and both refuse the rest.

The stateful test drives the real database through the whole lifecycle against a model and
checks after every step that each item's stored state, attempts, last audit row and queue
message agree with the model, and that every refused operation changed nothing at all.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from uuid import UUID

import asyncpg
import msgspec
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from animus_core import (
    Created,
    Db,
    IllegalTransition,
    Lease,
    LeaseLost,
    Merged,
    NewWorkItem,
    State,
)
from animus_core.values.states import TERMINAL, TRANSITIONS, require_transition
from animus_core.values.waits import Wait
from tests.support import raw

_exact_ints = st.integers(min_value=-(2**53 - 1), max_value=2**53 - 1)

T = TypeVar("T")


# -- the table itself --------------------------------------------------------------------------


async def test_python_transitions_equal_database_table(db_url):
    async with raw(db_url) as conn:
        rows = await conn.fetch(
            "SELECT from_state::text AS f, to_state::text AS t FROM animus.transitions"
        )
        labels = await conn.fetchval(
            "SELECT array_agg(x::text ORDER BY x) FROM unnest(enum_range(NULL::animus.work_state)) x"
        )
        dedup_index = await conn.fetchval(
            "SELECT pg_get_indexdef('animus.work_items_dedup'::regclass)"
        )
    in_db = {(State(r["f"]), State(r["t"])) for r in rows}
    in_python = {(f, t) for f, targets in TRANSITIONS.items() for t in targets}
    assert in_db == in_python
    assert len(rows) == len(in_db)
    # Same states, in the same order, on both sides; terminal = no way out.
    assert labels == [s.value for s in State]
    assert set(TRANSITIONS) == set(State)
    assert {s for s, targets in TRANSITIONS.items() if not targets} == TERMINAL
    # The dedup index treats exactly the terminal states as finished.
    finished = {s for s in State if f"'{s.value}'" in dedup_index}
    assert finished == TERMINAL


def test_require_transition_message_names_both_states():
    require_transition("x", State.QUEUED, State.CLAIMED)
    with pytest.raises(IllegalTransition, match=r"queued -> completed"):
        require_transition("x", State.QUEUED, State.COMPLETED)
    with pytest.raises(IllegalTransition, match="finished"):
        require_transition("x", State.COMPLETED, State.QUEUED)


async def _item_in(db: Db, state: State) -> UUID:
    """A fresh item brought to ``state`` through the API."""
    kind = f"by-hand-{state.value}"
    result = await db.submit_work(NewWorkItem(kind, source="test"))
    assert isinstance(result, Created)
    wid = result.id
    if state == State.QUEUED:
        return wid
    if state == State.MERGED:
        first = NewWorkItem(kind, source="test").dedup_key(f"k-{wid}")
        canonical = await db.submit_work(first)
        merged = await db.submit_work(first)
        assert isinstance(merged, Merged)
        assert merged.canonical_id == canonical.id
        await db.cancel(canonical.id)  # frees the key: only the transition is then wrong
        return merged.id
    if state == State.CANCELLED:
        await db.cancel(wid)
        return wid
    if state == State.DEAD:
        await db.dead_letter(wid, "by hand")
        return wid
    [claimed] = await db.claim(lease_seconds=300, work_types=[kind])
    assert claimed.item.id == wid
    if state == State.CLAIMED:
        return wid
    await db.start(claimed.lease)
    if state == State.RUNNING:
        return wid
    if state == State.COMPLETED:
        await db.complete(claimed.lease, {"done": True})
        return wid
    if state == State.WAITING:
        await db.suspend(claimed.lease, Wait.for_event(1, "go"), wake_at=None)
        return wid
    assert state == State.FAILED
    await db.fail(claimed.lease, "boom")
    return wid


_REACHABLE = [s for s in State if s not in (State.CREATED, State.AWAITING_APPROVAL)]


async def test_illegal_transition_by_hand_in_sql_is_refused(db, db_url):
    """Every illegal (from, to) pair issued as a plain UPDATE is refused by the database,
    naming both states, and leaves the row and the audit trail as they were."""
    refused = 0
    async with raw(db_url) as conn:
        for current in _REACHABLE:
            wid = await _item_in(db, current)
            assert (await db.get_work_item(wid)).state == current
            for target in State:
                if target == current or target in TRANSITIONS[current]:
                    continue
                before = await conn.fetchrow("SELECT * FROM animus.work_items WHERE id = $1", wid)
                audit_before = await conn.fetchval("SELECT count(*) FROM animus.audit_log")
                with pytest.raises(asyncpg.PostgresError) as err:
                    # merged_into is kept consistent so that only the transition is wrong.
                    await conn.execute(
                        """UPDATE animus.work_items
                              SET state = $2::animus.work_state,
                                  merged_into = CASE WHEN $2 = 'merged'
                                                     THEN coalesce(merged_into, id) END
                            WHERE id = $1""",
                        wid, target.value,
                    )
                assert err.value.sqlstate == "ANI01", err.value
                message = str(err.value)
                assert f"{current.value} -> {target.value}" in message
                assert str(wid) in message
                after = await conn.fetchrow("SELECT * FROM animus.work_items WHERE id = $1", wid)
                assert dict(after) == dict(before)
                assert await conn.fetchval("SELECT count(*) FROM animus.audit_log") == audit_before
                refused += 1
    # 9 reachable states x the states each may not go to.
    assert refused == sum(len(State) - 1 - len(TRANSITIONS[s]) for s in _REACHABLE)


async def test_legal_transition_by_hand_is_allowed_and_audited(db, db_url):
    created = await db.submit_work(NewWorkItem("by-hand", source="test"))
    async with raw(db_url) as conn:
        await conn.execute(
            "UPDATE animus.work_items SET state = 'cancelled', reason = 'psql' WHERE id = $1",
            created.id,
        )
    history = await db.history(created.id)
    assert [(e.from_state, e.to_state) for e in history] == [
        (None, "queued"), ("queued", "cancelled"),
    ]
    # Issued by hand: the database user is recorded; there is no animus actor.
    assert "actor" not in history[-1].provenance
    assert history[-1].db_user == history[0].db_user


async def test_a_claim_that_starts_is_audited_as_both_steps(db, db_url):
    """claim(start=True) moves queued -> running in one UPDATE; the audit trail still holds
    queued -> claimed and claimed -> running, with the attempt counted on the second."""
    created = await db.submit_work(NewWorkItem("claim-start", source="test"))
    [claimed] = await db.claim(lease_seconds=300, work_types=["claim-start"], start=True)
    assert claimed.item.state == State.RUNNING
    assert claimed.item.attempts == 1
    history = await db.history(created.id)
    assert [(e.from_state, e.to_state) for e in history] == [
        (None, "queued"), ("queued", "claimed"), ("claimed", "running"),
    ]
    assert [e.payload.get("attempts") for e in history[1:]] == [0, 1]
    assert history[1].id < history[2].id
    # By hand, queued -> running is refused unless the row takes a new lease, as a claim does.
    other = await db.submit_work(NewWorkItem("claim-start", source="test"))
    async with raw(db_url) as conn:
        with pytest.raises(asyncpg.PostgresError, match="queued -> running"):
            await conn.execute("UPDATE animus.work_items SET state = 'running' WHERE id = $1",
                               other.id)
        await conn.execute(
            "UPDATE animus.work_items SET state = 'running', msg_id = -1, lease = 1 "
            "WHERE id = $1", other.id)
    assert [(e.from_state, e.to_state) for e in await db.history(other.id)] == [
        (None, "queued"), ("queued", "claimed"), ("claimed", "running"),
    ]


async def test_illegal_insert_state_is_refused(db_url):
    async with raw(db_url) as conn:
        with pytest.raises(asyncpg.PostgresError, match="cannot start in state running"):
            await conn.execute(
                "INSERT INTO animus.work_items (work_type, source, state) "
                "VALUES ('x', 'psql', 'running')"
            )
        assert await conn.fetchval("SELECT count(*) FROM animus.work_items") == 0


# -- the lifecycle, as a state machine against a model --------------------------------------------

_machines = itertools.count()


@dataclass
class Model:
    state: State
    key: str | None
    max_attempts: int
    seq: int | None  # when its queue message became visible, in order (None: it has none)
    attempts: int = 0
    token: int | None = None  # lease token of the latest claim (None: it holds none)
    msg_id: int | None = None  # the message the latest claim read
    timer: bool = False  # waiting on a timer that ran out (a sleep into the past)
    signalled: bool = False  # sent a signal `go` (kept: the model never takes one)

    @property
    def live(self) -> bool:
        return self.state not in TERMINAL


async def test_lifecycle_state_machine(db: Db) -> None:
    loop = asyncio.get_running_loop()

    def run(coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=60)

    class Lifecycle(RuleBasedStateMachine):
        items = Bundle("items")
        leases = Bundle("leases")

        def __init__(self) -> None:
            super().__init__()
            n = next(_machines)
            # A queue and a work type of its own: earlier examples cannot interfere.
            self.queue = f"sm{n}"
            self.work_type = f"sm{n}"
            run(db.create_queue(self.queue))
            self.model: dict[UUID, Model] = {}
            self.seq = itertools.count()

        # -- helpers --

        def new(self, key: str | None = None) -> NewWorkItem:
            item = NewWorkItem(self.work_type, source="model")
            return item.dedup_key(key) if key else item

        def live_with(self, key: str | None) -> UUID | None:
            if key is None:
                return None
            for wid, m in self.model.items():
                if m.key == key and m.live:
                    return wid
            return None

        def record(self, result: Created | Merged, key: str | None, max_attempts: int) -> UUID:
            canonical = self.live_with(key)
            if canonical is None:
                assert isinstance(result, Created), result
                assert result.item.state == State.QUEUED
                self.model[result.id] = Model(State.QUEUED, key, max_attempts, next(self.seq))
            else:
                assert isinstance(result, Merged), result
                assert result.canonical_id == canonical
                self.model[result.id] = Model(State.MERGED, key, max_attempts, None)
            return result.id

        async def snapshot(self) -> Any:
            async with db.connection() as conn:
                items = await conn.fetch(
                    """SELECT id, state, attempts, msg_id, lease, reason, updated_at, resolved_at
                         FROM animus.work_items WHERE work_type = $1 ORDER BY id""",
                    self.work_type,
                )
                messages = await conn.fetch(
                    f'SELECT msg_id, read_ct, vt FROM pgmq."q_{self.queue}" ORDER BY msg_id'
                )
                archived = await conn.fetchval(f'SELECT count(*) FROM pgmq."a_{self.queue}"')
                audit = await conn.fetchval("SELECT count(*) FROM animus.audit_log")
            return [tuple(r) for r in items], [tuple(r) for r in messages], archived, audit

        def refused(
            self, coro: Coroutine[Any, Any, Any], errors: type[Exception] | tuple[type[Exception], ...]
        ) -> None:
            """The operation raises ``errors`` and changes nothing anywhere."""
            before = run(self.snapshot())
            with pytest.raises(errors):
                run(coro)
            assert run(self.snapshot()) == before

        def holder(self, lease: Lease) -> tuple[Model, bool]:
            """The item a lease is on, and whether the lease is still the current one."""
            m = self.model[lease.work_id]
            # a lease is its message and its read of it: an item woken from a wait without a
            # timer is claimed through a new message, whose reads count from 1 again
            return m, (lease.msg_id, lease.token) == (m.msg_id, m.token)

        # -- rules --

        @rule(
            target=items,
            key=st.sampled_from([None, "a", "b"]),
            max_attempts=st.integers(min_value=1, max_value=3),
        )
        def submit(self, key: str | None, max_attempts: int) -> UUID:
            result = run(db.submit_work(self.new(key).max_attempts(max_attempts), queue=self.queue))
            return self.record(result, key, max_attempts)

        @rule(target=leases, limit=st.integers(min_value=1, max_value=2), start=st.booleans())
        def claim(self, limit: int, start: bool) -> Any:
            visible = sorted(
                (wid for wid, m in self.model.items()
                 if m.state == State.QUEUED or (m.state == State.WAITING and m.timer)),
                # a sleep that ran out a day ago first, then in the order they became visible
                key=lambda wid: (self.model[wid].state != State.WAITING,
                                 self.model[wid].seq or 0),
            )
            claimed = run(db.claim(self.queue, limit=limit, lease_seconds=300, start=start))
            # which items (one claim returns its items by priority, then by msg_id)
            assert sorted(c.item.id for c in claimed) == sorted(visible[:limit])
            for c in claimed:
                m = self.model[c.item.id]
                assert (m.token is None or c.lease.msg_id != m.msg_id
                        or c.lease.token > m.token)
                m.token, m.msg_id = c.lease.token, c.lease.msg_id
                if start:
                    m.state, m.attempts = State.RUNNING, m.attempts + 1
                else:
                    m.state = State.CLAIMED
                assert c.item.state == m.state
                assert c.item.attempts == m.attempts
            return multiple(*(c.lease for c in claimed))

        @rule(lease=leases)
        def start(self, lease: Lease) -> None:
            m, current = self.holder(lease)
            if not current:
                self.refused(db.start(lease), LeaseLost)
            elif m.state != State.CLAIMED:
                self.refused(db.start(lease), IllegalTransition)
            else:
                item = run(db.start(lease))
                m.state, m.attempts = State.RUNNING, m.attempts + 1
                assert item.state == State.RUNNING
                assert item.attempts == m.attempts

        @rule(
            lease=leases,
            data=st.one_of(  # outcomes inside the JSON value model (exact integers)
                st.none(),
                st.lists(_exact_ints, max_size=3),
                st.dictionaries(st.text("xyz", max_size=2), _exact_ints),
            ),
        )
        def complete(self, lease: Lease, data: Any) -> None:
            m, current = self.holder(lease)
            if not current:  # whatever state the item reached since
                self.refused(db.complete(lease, data), LeaseLost)
            elif m.state == State.RUNNING:
                run(db.complete(lease, data, duration_ms=5))
                m.state = State.COMPLETED
                assert run(db.get_work_item(lease.work_id)).outcome.data == data
            else:
                self.refused(db.complete(lease, data), IllegalTransition)

        @rule(lease=leases)
        def fail(self, lease: Lease) -> None:
            m, current = self.holder(lease)
            if not current:
                self.refused(db.fail(lease, "boom"), LeaseLost)
            elif m.state != State.RUNNING:
                self.refused(db.fail(lease, "boom"), IllegalTransition)
            else:
                item = run(db.fail(lease, "boom"))
                m.state = State.FAILED
                assert item.outcome.error == "boom"

        @rule(lease=leases)
        def release(self, lease: Lease) -> None:
            m, current = self.holder(lease)
            if not current:
                self.refused(db.release(lease, "shutdown"), LeaseLost)
            elif m.state not in (State.CLAIMED, State.RUNNING):
                self.refused(db.release(lease, "shutdown"), IllegalTransition)
            else:
                run(db.release(lease, "shutdown"))
                if m.state == State.RUNNING:
                    m.attempts -= 1  # the attempt never really happened
                m.state, m.seq = State.QUEUED, next(self.seq)

        @rule(lease=leases, sleep=st.booleans())
        def suspend(self, lease: Lease, sleep: bool) -> None:
            """A sleep whose time is past (its timer has run out: the next claim wakes it),
            or a wait for the signal ``go`` without a timer."""
            m, current = self.holder(lease)
            past = datetime.now(UTC) - timedelta(days=1)
            wait = Wait.sleep(1, past) if sleep else Wait.for_event(1, "go")
            suspend = db.suspend(lease, wait, wake_at=past if sleep else None)
            if not current:
                self.refused(suspend, LeaseLost)
            elif m.state != State.RUNNING:
                self.refused(suspend, IllegalTransition)
            else:
                item = run(suspend)
                # a wait for a signal that has come already is woken at once
                woken = m.signalled and not sleep
                m.state, m.token, m.timer = State.QUEUED if woken else State.WAITING, None, sleep
                m.seq = next(self.seq)
                assert (item.state, item.wait) == (m.state, msgspec.to_builtins(wait))

        @rule(item=items)
        def signal(self, item: UUID) -> None:
            m = self.model[item]
            if not m.live:
                self.refused(db.signal(item, "go"), IllegalTransition)
                return
            woke = m.state == State.WAITING and not m.timer
            assert run(db.signal(item, "go")).woke == woke
            m.signalled = True
            if woke:
                m.state, m.seq = State.QUEUED, next(self.seq)

        @rule(item=items)
        def retry(self, item: UUID) -> None:
            m = self.model[item]
            if m.state != State.FAILED:
                self.refused(db.retry(item), IllegalTransition)
            else:
                run(db.retry(item))
                m.state, m.seq = State.QUEUED, next(self.seq)

        @rule(item=items)
        def dead_letter(self, item: UUID) -> None:
            m = self.model[item]
            if m.state not in (State.QUEUED, State.FAILED, State.RUNNING, State.WAITING):
                self.refused(db.dead_letter(item, "given up"), IllegalTransition)
            else:
                dead = run(db.dead_letter(item, "given up"))
                m.state = State.DEAD
                assert dead.reason == "given up"
                assert dead.resolved_at is not None

        @rule(item=items)
        def cancel(self, item: UUID) -> None:
            m = self.model[item]
            if m.state in (State.CLAIMED, State.RUNNING):
                # a request for the engine holding it: recorded, the state is unchanged
                requested = run(db.cancel(item, "asked to stop"))
                assert requested.state == m.state
                assert requested.cancel_requested == "asked to stop"
            elif m.state not in (State.QUEUED, State.WAITING):
                self.refused(db.cancel(item), IllegalTransition)
            else:
                run(db.cancel(item))
                m.state = State.CANCELLED

        @rule(target=items, item=items)
        def replay(self, item: UUID) -> Any:
            m = self.model[item]
            if m.state != State.DEAD:
                self.refused(db.replay(item), IllegalTransition)
                return multiple()
            result = run(db.replay(item))
            new_id = self.record(result, m.key, m.max_attempts)
            if isinstance(result, Created):
                assert result.item.replay_of == item
            return new_id

        # -- what must hold after every step --

        @invariant()
        def database_matches_model(self) -> None:
            if not self.model:
                return

            async def read() -> Any:
                async with db.connection() as conn:
                    rows = await conn.fetch(
                        """SELECT w.id, w.state::text AS state, w.attempts,
                                  (SELECT a.to_state::text FROM animus.audit_log a
                                    WHERE a.work_id = w.id ORDER BY a.id DESC LIMIT 1) AS audited,
                                  (SELECT count(*) FROM pgmq."""
                        + f'"q_{self.queue}"'
                        + """ q WHERE q.message->>'id' = w.id::text) AS messages
                             FROM animus.work_items w WHERE w.work_type = $1""",
                        self.work_type,
                    )
                return {r["id"]: r for r in rows}

            rows = run(read())
            assert set(rows) == set(self.model)
            for wid, m in self.model.items():
                r = rows[wid]
                assert (r["state"], r["attempts"]) == (m.state.value, m.attempts), wid
                # The last audit row says where the item is now.
                assert r["audited"] == m.state.value, wid
                # Live work has exactly one queue message, except an item waiting without a
                # timer (it has given its message up); finished work has none left.
                unqueued = m.state == State.WAITING and not m.timer
                assert r["messages"] == (1 if m.live and not unqueued else 0), (wid, m.state)
            live_keys = [m.key for m in self.model.values() if m.key and m.live]
            assert len(live_keys) == len(set(live_keys))

    await asyncio.to_thread(
        run_state_machine_as_test,
        Lifecycle,
        settings=settings(
            max_examples=40,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
