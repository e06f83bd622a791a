"""Attempts that lose their lease: one execution record each, and no hook left running.

An engine loses the lease of a running item when it stops extending it long enough for
another claim to take the item back (it was killed, stalled, or cut off from the database).
Here the test plays the other engine: it makes the item's message visible (as a lease that
ran out leaves it) and claims it, exactly as any engine's claim would.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from animus_core import Claimed, Created, Db, Faculty, Lease, NewWorkItem, State
from animus_core.faculties.focus import Focus
from animus_core.runtime.engine import EngineOptions
from animus_core.runtime.workspace import EngineFoci, sweep_foci
from tests.engine_helpers import (
    kill_group,
    process_gone,
    run_cli,
    run_engine,
    wait_finished,
    wait_until,
    write_toml_faculty,
)
from tests.support import raw

LOST = "lease expired while running (engine lost)"


async def submit(db: Db, new: NewWorkItem) -> UUID:
    result = await db.submit_work(new)
    assert isinstance(result, Created)
    return result.id


async def run_out(db_url: str, work_id: UUID) -> None:
    """The lease of ``work_id`` runs out: its message becomes visible now."""
    async with raw(db_url) as conn:
        await conn.execute(
            """UPDATE pgmq.q_work SET vt = clock_timestamp()
                WHERE msg_id = (SELECT msg_id FROM animus.work_items WHERE id = $1)""",
            work_id)


async def take_back(db: Db, db_url: str, work_id: UUID, work_type: str) -> Claimed:
    """Claim ``work_id`` as another engine would once its lease ran out (again and again:
    the engine holding it may extend its lease meanwhile)."""

    async def claimed() -> Claimed | None:
        await run_out(db_url, work_id)
        got = await db.claim(lease_seconds=60, work_types=[work_type], start=True)
        assert all(c.item.id == work_id for c in got), got
        return got[0] if got else None

    taken: Claimed = await wait_until(claimed, 15, message=f"a claim of {work_id}")
    return taken


async def running_at(db: Db, work_id: UUID, attempt: int) -> datetime:
    """When the item went running for the ``attempt``-th time (its audit row)."""
    return [e.at for e in await db.history(work_id) if e.event == "running"][attempt - 1]


# -- the record of a lost attempt --------------------------------------------------------------


async def test_a_running_attempt_whose_lease_ran_out_gets_a_lost_record(db, db_url):
    wid = await submit(db, NewWorkItem("orphan").params({"n": 1}).max_attempts(2))
    [first] = await db.claim(lease_seconds=60, start=True)
    assert first.item.attempts == 1

    second = await take_back(db, db_url, wid, "orphan")
    assert second.item.attempts == 2
    [lost] = await db.executions(wid)
    assert (lost.work_id, lost.attempt, lost.result, lost.work_type) == (wid, 1, "lost", "orphan")
    assert lost.error == LOST
    assert lost.started_at == await running_at(db, wid, 1)
    assert lost.finished_at is not None
    assert lost.finished_at >= lost.started_at
    # what only the engine that ran it knew is unknown, not made up
    assert (lost.params_hash, lost.faculty, lost.faculty_hash, lost.engine_version,
            lost.environment_hash, lost.environment, lost.outcome_hash) == (None,) * 7
    assert lost.models == []

    # the last attempt is lost too: the item is dead, and each attempt has its one record
    assert await db.claim(lease_seconds=60, start=True) == []
    await run_out(db_url, wid)
    assert await db.claim(lease_seconds=60, start=True) == []
    item = await db.get_work_item(wid)
    assert item.state == State.DEAD
    assert item.reason == f"attempts exhausted (2/2): {LOST}"
    records = await db.executions(wid)
    assert [(r.attempt, r.result) for r in records] == [(1, "lost"), (2, "lost")]


async def test_a_lost_record_is_written_once_even_when_the_engine_recorded_the_attempt(
        db, db_url):
    """An engine that recorded its attempt before the item was taken back (an older engine
    recorded failures before failing the item) keeps its record; none is added."""
    wid = await submit(db, NewWorkItem("orphan").max_attempts(2))
    await db.claim(lease_seconds=60, start=True)
    async with raw(db_url) as conn:
        await conn.execute(
            """INSERT INTO animus.environments (hash, environment) VALUES ('sha256:e', '{}')
               ON CONFLICT DO NOTHING""")
        await conn.execute(
            """INSERT INTO animus.execution_records (work_id, attempt, result, work_type,
                   params_hash, faculty, faculty_hash, engine_version, environment_hash,
                   error, started_at)
               VALUES ($1, 1, 'failed', 'orphan', 'sha256:p', '{}', 'sha256:f', '0', 'sha256:e',
                       'it broke', now())""", wid)
    await take_back(db, db_url, wid, "orphan")
    assert [(r.attempt, r.result) for r in await db.executions(wid)] == [(1, "failed")]


async def test_only_a_lost_record_may_leave_its_inputs_unknown(db, db_url):
    async with raw(db_url) as conn:
        with pytest.raises(Exception, match="execution_records_known_inputs"):
            await conn.execute(
                """INSERT INTO animus.execution_records (work_id, attempt, result, work_type,
                       started_at)
                   VALUES (gen_random_uuid(), 1, 'failed', 'x', now())""")
        with pytest.raises(Exception, match="execution_records_result_check"):
            await conn.execute(
                """INSERT INTO animus.execution_records (work_id, attempt, result, work_type,
                       params_hash, faculty, faculty_hash, engine_version, environment_hash,
                       started_at)
                   VALUES (gen_random_uuid(), 1, 'vanished', 'x', 'sha256:p', '{}',
                           'sha256:f', '0', 'sha256:e', now())""")


async def test_explain_show_and_diff_handle_lost_attempts(db, db_url, cli_env, tmp_path):
    lost = await submit(db, NewWorkItem("orphan").max_attempts(1))
    await db.claim(lease_seconds=60, start=True)
    await run_out(db_url, lost)
    assert await db.claim(lease_seconds=60, start=True) == []
    assert (await db.get_work_item(lost)).state == State.DEAD

    code, out, err = await run_cli(cli_env, tmp_path, "work", "explain", str(lost))
    assert code == 0, err
    assert f"{lost}  orphan  dead  (1 attempts recorded)" in out
    assert "attempt 1: lost" in out
    assert f"error         {LOST}" in out
    assert "not known" in out
    code, out, err = await run_cli(cli_env, tmp_path, "work", "explain", str(lost), "--json")
    assert code == 0, err
    [record] = json.loads(out)["records"]
    assert (record["result"], record["faculty"], record["params_hash"]) == ("lost", None, None)
    code, out, err = await run_cli(cli_env, tmp_path, "work", "show", str(lost))
    assert code == 0, err
    assert LOST in out
    # nothing is known of what a lost attempt was bound to: there is nothing to compare
    code, out, err = await run_cli(cli_env, tmp_path, "work", "diff", str(lost), str(lost))
    assert code == 2, out + err
    assert "every attempt was lost" in err, err
    assert "nothing to compare" in err, err


# -- an engine that loses a lease ---------------------------------------------------------------


async def test_a_focus_whose_lease_was_lost_is_stopped_and_its_hooks_killed(
        db, db_url, tmp_path, caplog):
    pids = tmp_path / "pids"
    write_toml_faculty(tmp_path, "slow", hooks={"engage": f"""
        sleep 300 &
        echo "$$ $!" > {pids}
        wait
        echo '{{"finished": true}}' > engage-out.json
    """})
    caplog.set_level(logging.INFO)
    # the lease keeper runs every second
    options = EngineOptions(lease_seconds=3, poll_interval=0.5, grace=5.0, seal_interval=0.2)
    hook_pids: list[int] = []
    try:
        async with run_engine(db_url, tmp_path / "home", faculties_dir=tmp_path / "faculties",
                              options=options) as run:
            wid = await submit(db, NewWorkItem("slow").max_attempts(3))
            await wait_until(lambda: pids.exists() and len(pids.read_text().split()) == 2,
                             message="the hook to start its child")
            hook_pids = [int(p) for p in pids.read_text().split()]
            theirs = await take_back(db, db_url, wid, "slow")
            assert theirs.item.attempts == 2
            await wait_until(lambda: all(process_gone(p) for p in hook_pids), 10,
                             message="the lost focus's hook and its child to be killed")
            await wait_until(lambda: wid not in run.engine.inflight, 10,
                             message="the lost focus to end")
            # the engine neither failed nor completed the item it no longer holds
            item = await db.get_work_item(wid)
            assert (item.state, item.attempts) == (State.RUNNING, 2)
            await db.complete(theirs.lease, {"by": "the other engine"})
    finally:
        for pid in hook_pids:
            kill_group(pid)

    item = await db.get_work_item(wid)
    assert item.state == State.COMPLETED
    assert item.outcome.data == {"by": "the other engine"}
    trail = [e.event for e in await db.history(wid)]
    assert trail == ["submitted", "claimed", "running", "failed", "queued", "claimed",
                     "running", "completed"]
    assert [(r.attempt, r.result) for r in await db.executions(wid)] == [(1, "lost")]
    assert any(f"lease lost on work item {wid}" in r.getMessage() for r in caplog.records)


class Waits(Faculty):
    """Engage waits until the test lets it go, then fails (or succeeds)."""

    name = "waits"
    accepts = ("waits",)
    max_concurrent = 1

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.go = asyncio.Event()

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        self.started.set()
        await self.go.wait()
        if focus.params.get("fail"):
            raise RuntimeError("it broke after all")
        return {"done": True}


@pytest.mark.parametrize("fail", [True, False], ids=["fails", "completes"])
async def test_an_attempt_that_ends_after_its_lease_was_lost_adds_no_record(
        db, db_url, tmp_path, fail):
    """Without the lease keeper noticing (a long lease), the focus ends on its own after
    the item was taken back: its failure or completion is refused, and it writes no second
    record for the attempt."""
    faculty = Waits()
    options = EngineOptions(lease_seconds=600, poll_interval=0.5, grace=5.0, seal_interval=0.2)
    async with run_engine(db_url, tmp_path / "home", faculties=[faculty], options=options) as run:
        wid = await submit(db, NewWorkItem("waits").params({"fail": fail}).max_attempts(3))
        await asyncio.wait_for(faculty.started.wait(), 10)
        theirs = await take_back(db, db_url, wid, "waits")
        faculty.go.set()
        await wait_until(lambda: wid not in run.engine.inflight, 10,
                         message="the focus to end")
    # the engine has stopped: whatever it had to record, it tried
    item = await db.get_work_item(wid)
    assert (item.state, item.attempts, item.outcome.data) == (State.RUNNING, 2, None)
    await db.complete(theirs.lease, {"by": "the other engine"})
    assert [(r.attempt, r.result) for r in await db.executions(wid)] == [(1, "lost")]


async def test_a_cancelled_running_attempt_has_its_record(db, db_url, tmp_path):
    faculty = Waits()
    async with run_engine(db_url, tmp_path / "home", faculties=[faculty]):
        wid = await submit(db, NewWorkItem("waits"))
        await asyncio.wait_for(faculty.started.wait(), 10)
        await db.cancel(wid, "not needed any more")
        item = await wait_finished(db, wid)
    assert item.state == State.DEAD
    [record] = await db.executions(wid)
    assert (record.attempt, record.result) == (1, "failed")
    assert record.error == item.reason
    assert record.faculty is not None
    assert record.faculty["kind"] == "python"


# -- focus directories of engines that died ------------------------------------------------------


def test_an_engine_removes_the_focus_directories_no_live_engine_holds(tmp_path):
    root = tmp_path / "foci"
    live = EngineFoci.open(root)
    (live.path / "greet-1-1-abc").mkdir()
    (live.path / "greet-1-1-abc" / "work.json").write_text("{}")
    dead = root / "engine-4242-zzzzzzzz"  # an engine killed with a focus running: no lock
    (dead / "greet-2-1-def").mkdir(parents=True)
    (dead / "greet-2-1-def" / "work.json").write_text("{}")
    kept = root / "greet-3-1-ghi"  # kept for debugging: not an engine's directory
    kept.mkdir()

    assert sweep_foci(root) == [dead / "greet-2-1-def"]
    assert not dead.exists()
    assert (live.path / "greet-1-1-abc" / "work.json").is_file()
    assert kept.is_dir()

    # an engine that stops with foci left in its directory leaves them to the next start
    live.close()
    assert live.path.is_dir()
    assert sweep_foci(root) == [live.path / "greet-1-1-abc"]
    assert sorted(p.name for p in root.iterdir()) == ["greet-3-1-ghi"]

    # one that stops with nothing left removes its directory
    empty = EngineFoci.open(root)
    empty.close()
    assert not empty.path.exists()


def is_dir(path: str) -> bool:
    return Path(path).is_dir()


async def test_a_starting_engine_leaves_a_running_engine_s_foci_alone(db, db_url, tmp_path):
    started, release = tmp_path / "started", tmp_path / "release"
    write_toml_faculty(tmp_path, "patient", hooks={"engage": f"""
        echo "$ANIMUS_FOCUS_DIR" > {started}
        while [ ! -e {release} ]; do sleep 0.05; done
        echo '{{"done": true}}' > engage-out.json
    """})
    home = tmp_path / "home"
    async with run_engine(db_url, home, faculties_dir=tmp_path / "faculties"):
        wid = await submit(db, NewWorkItem("patient"))
        await wait_until(lambda: started.exists() and started.read_text().strip(),
                         message="the focus to start")
        focus_dir = started.read_text().strip()
        async with run_engine(db_url, home, faculties_dir=tmp_path / "no-faculties"):
            assert is_dir(focus_dir), "a starting engine removed a running focus's directory"
        release.touch()
        item = await wait_finished(db, wid)
    assert item.state == State.COMPLETED
    assert item.outcome.data == {"done": True}


async def take_back_cancelled(db_url: str, work_id: UUID) -> Lease:
    """Take the item back and ask for it to be cancelled, in one transaction: the lease
    keeper's next round finds both (a request made without a notification)."""
    async with raw(db_url) as conn:
        while True:
            tx = conn.transaction()
            await tx.start()
            await conn.execute("UPDATE animus.work_items SET cancel_requested = 'stop' "
                               "WHERE id = $1", work_id)
            await conn.execute(
                """UPDATE pgmq.q_work SET vt = clock_timestamp()
                    WHERE msg_id = (SELECT msg_id FROM animus.work_items WHERE id = $1)""",
                work_id)
            row = await conn.fetchrow(
                "SELECT * FROM animus.claim('work', 1, 60, ARRAY['again'], true)")
            if row is not None:
                await tx.commit()
                assert row["id"] == work_id
                return Lease(work_id=work_id, queue="work", msg_id=row["msg_id"],
                             token=row["lease"])
            await tx.rollback()  # the keeper was extending the lease: again
            await asyncio.sleep(0.05)


class Lingers(Faculty):
    """Engage runs until cancelled; the first time, it takes until ``done_when()`` to stop
    (a faculty cleaning up), so that the engine still runs it when it acts on a cancel
    request after finding its lease lost."""

    name = "again"
    accepts = ("again",)

    def __init__(self, done_when: Any) -> None:
        self.done_when = done_when
        self.runs = 0

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        self.runs += 1
        try:
            await asyncio.sleep(300)
        except asyncio.CancelledError:
            if self.runs == 1:
                await wait_until(self.done_when, 10, message="the cancel request to be seen")
            raise


async def test_a_cancel_request_for_a_lost_focus_does_not_outlive_it(db, db_url, tmp_path,
                                                                     caplog):
    """The lease keeper finds the lease lost and, in the same round, a cancel request for the
    item (meant for whoever runs it now). The lost focus ends as lost; when this engine runs
    the item again later, that focus is not taken for a cancelled one."""
    caplog.set_level(logging.INFO)
    wid: UUID | None = None

    def cancel_seen() -> bool:
        return any(f"cancelling the running focus of {wid}" in r.getMessage()
                   for r in caplog.records)

    faculty = Lingers(cancel_seen)
    options = EngineOptions(lease_seconds=3, poll_interval=0.5, grace=0.5, seal_interval=0.2)
    async with run_engine(db_url, tmp_path / "home", faculties=[faculty],
                          options=options) as run:
        wid = await submit(db, NewWorkItem("again").max_attempts(5))
        await wait_until(lambda: faculty.runs == 1, message="the first focus to start")
        theirs = await take_back_cancelled(db_url, wid)
        await wait_until(lambda: wid not in run.engine.inflight, 10,
                         message="the lost focus to end")
        async with raw(db_url) as conn:
            await conn.execute("UPDATE animus.work_items SET cancel_requested = NULL "
                               "WHERE id = $1", wid)
        await db.release(theirs, "the other engine gives it back")
        await wait_until(lambda: faculty.runs == 2, message="this engine to run it again")
    # stopped with the focus running: released, as any focus at shutdown
    item = await db.get_work_item(wid)
    assert item.state == State.QUEUED, item.reason
    assert item.reason == "released at shutdown (grace period over)"
