"""The control plane end to end, in process: a real engine on a real database.

Engines here fall back to polling every second (``DEFAULT_OPTIONS``) so that the tests of
what the engine does stay robust; the tests of how it wakes up (NOTIFY, retry timers) use
``SLOW_POLL`` (every 60 s), so only the engine's own wake-ups can make them pass.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import os
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from animus_core import ConfigError, Created, Faculty, Focus, NewWorkItem, State, hookimpl
from animus_core.faculties.toml import load_dir, load_file
from animus_core.runtime import completions
from animus_core.runtime.engine import CLAIM_CHUNK, EngineOptions
from animus_core.runtime.health import Health
from animus_core.values.errors import DatabaseUnavailable, IllegalTransition, LeaseLost
from animus_core.values.records import ExecutionRecord
from animus_core.values.schedules import Schedule
from tests.engine_helpers import (
    SLOW_POLL,
    ObservedDb,
    events,
    process_gone,
    run_cli,
    run_engine,
    wait_finished,
    wait_until,
    write_script,
    write_toml_faculty,
)
from tests.support import raw

# -- Python faculties used below ------------------------------------------------------------------


class Gauge:
    """Counts foci inside a section at once and remembers the peak."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0
        self.done = 0

    def enter(self) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)

    def leave(self) -> None:
        self.now -= 1
        self.done += 1


class Held(Faculty):
    """Holds each focus open for ``hold`` seconds inside a gauge (or two)."""

    name = "held"
    accepts = ("held",)
    max_concurrent = 3

    def __init__(self, *gauges: Gauge, hold: float = 0.1) -> None:
        self.gauges = gauges
        self.hold = hold

    async def orient(self, focus: Focus) -> Any:
        return focus.params

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        for g in self.gauges:
            g.enter()
        try:
            await asyncio.sleep(self.hold)
        finally:
            for g in self.gauges:
                g.leave()
        return oriented


class HeldA(Held):
    name = "held-a"
    accepts = ("held-a",)
    max_concurrent = 5


class HeldB(Held):
    name = "held-b"
    accepts = ("held-b",)
    max_concurrent = 5


class Echo(Faculty):
    """Returns its params, with the attempt."""

    name = "echo"
    accepts = ("echo",)

    async def orient(self, focus: Focus) -> Any:
        return {**focus.params, "attempt": focus.attempt}


class Kid(Faculty):
    name = "kid"
    accepts = ("kid",)
    max_concurrent = 4

    async def orient(self, focus: Focus) -> Any:
        return {"kid_of": str(focus.work.parent_id), **focus.params}


class Flaky(Faculty):
    """Fails its first ``failures`` attempts, then succeeds."""

    name = "flaky"
    accepts = ("flaky",)
    retry_base = 0.05

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        self.calls += 1
        if focus.attempt <= self.failures:
            raise RuntimeError(f"transient failure on attempt {focus.attempt}")
        return {"attempt": focus.attempt}


class Hopeless(Faculty):
    """Always fails; recover decides whether to retry."""

    name = "hopeless"
    accepts = ("hopeless",)
    retry_base = 0.05

    def __init__(self, verdict: bool | None) -> None:
        self.verdict = verdict
        self.calls = 0
        self.recovered: list[tuple[str, str]] = []

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        self.calls += 1
        raise RuntimeError("always broken")

    def recover(self, focus: Focus, error: str, phase: str) -> bool | None:
        self.recovered.append((phase, error))
        return self.verdict


def ids(results: list[Any]) -> list[UUID]:
    out = []
    for r in results:
        assert isinstance(r, Created), r
        out.append(r.id)
    return out


# -- the command hook contract (docs/hook-contract.md) ---------------------------------------------------

CONTRACT_ORIENT = r"""
test -f work.json
fmt='{"phase":"%s","type":"%s","id":"%s","attempt":"%s","focus_dir":"%s","pwd":"%s",'
fmt+='"planted":"%s","declared":"%s","path":"%s","database_url":"%s","work":%s}'
printf "$fmt" "$ANIMUS_PHASE" "$ANIMUS_WORK_TYPE" "$ANIMUS_WORK_ID" "$ANIMUS_ATTEMPT" \
  "$ANIMUS_FOCUS_DIR" "$PWD" "${ANIMUS_TEST_PLANTED-unset}" "${ANIMUS_TEST_DECLARED-unset}" \
  "$PATH" "${DATABASE_URL-unset}" "$(cat work.json)" \
  > orient-out.json
"""
CONTRACT_ENGAGE = r"""
test -f orient-out.json
printf '{"phase":"%s","orient":%s}' "$ANIMUS_PHASE" "$(cat orient-out.json)" > engage-out.json
"""
CONTRACT_CONSOLIDATE = r"""
test -f engage-out.json
printf '{"phase":"%s","engage":%s}' "$ANIMUS_PHASE" "$(cat engage-out.json)" > consolidate-out.json
cp consolidate-out.json "{copies}/$ANIMUS_WORK_ID.json"
"""


async def test_toml_faculty_follows_the_hook_contract(db, db_url, tmp_path, monkeypatch):
    monkeypatch.setenv("ANIMUS_TEST_PLANTED", "must-not-leak")
    monkeypatch.setenv("ANIMUS_TEST_DECLARED", "passed-through")
    copies = tmp_path / "copies"
    copies.mkdir()
    toml = write_toml_faculty(tmp_path, "contract", fields={"env": ["ANIMUS_TEST_DECLARED"]}, hooks={
        "orient": CONTRACT_ORIENT,
        "engage": CONTRACT_ENGAGE,
        "consolidate": CONTRACT_CONSOLIDATE.replace("{copies}", str(copies)),
    })
    params = {"text": "hello world", "n": 3}
    async with run_engine(db_url, tmp_path / "home", faculties_dir=toml.parent) as run:
        assert run.problems == []
        wid = (await db.submit_work(NewWorkItem("contract", source="test").params(params))).id
        item = await wait_finished(db, wid)

    assert item.state == State.COMPLETED, item.reason
    assert item.attempts == 1
    # The outcome is exactly what consolidate wrote to consolidate-out.json.
    assert item.outcome.data == json.loads((copies / f"{wid}.json").read_text())
    consolidated = item.outcome.data
    engaged = consolidated["engage"]
    oriented = engaged["orient"]
    assert (consolidated["phase"], engaged["phase"], oriented["phase"]) == (
        "consolidate", "engage", "orient")
    # work.json is the whole work item.
    assert oriented["work"]["id"] == str(wid)
    assert oriented["work"]["work_type"] == "contract"
    assert oriented["work"]["params"] == params
    assert oriented["work"]["provenance"]["source"] == "test"
    # The environment of the contract, and nothing undeclared from the engine's.
    assert oriented["type"] == "contract"
    assert oriented["id"] == str(wid)
    assert oriented["attempt"] == "1"
    assert oriented["focus_dir"] == oriented["pwd"]
    assert Path(oriented["focus_dir"]).parent.parent == run.foci_root  # in the engine's own
    assert oriented["planted"] == "unset"
    assert oriented["declared"] == "passed-through"
    assert str(Path(sys.executable).parent) in oriented["path"].split(os.pathsep)
    assert oriented["database_url"] == db_url  # so `animus` works inside a hook
    # The focus directory is removed once the focus succeeded.
    focus_dir = Path(oriented["focus_dir"])
    await wait_until(lambda: not focus_dir.exists(), 5, message="the focus directory to go")


async def test_python_and_toml_faculties_share_one_engine(db, db_url, tmp_path):
    toml = write_toml_faculty(tmp_path, "shout", hooks={"engage": r"""
        text=$(sed -n 's/.*"text":"\([^"]*\)".*/\1/p' work.json)
        printf '{"shouted":"%s"}' "$(printf '%s' "$text" | tr a-z A-Z)" > engage-out.json
    """})
    async with run_engine(db_url, tmp_path / "home", faculties_dir=toml.parent,
                          faculties=[Echo()]) as run:
        assert run.origins() == {"echo": "test-faculties", "shout": str(toml)}
        shout, echo = ids(await db.submit_many([
            NewWorkItem("shout").params({"text": "quiet words"}),
            NewWorkItem("echo").params({"x": 1}),
        ]))
        shouted = await wait_finished(db, shout)
        echoed = await wait_finished(db, echo)
    assert shouted.state == echoed.state == State.COMPLETED
    # Without a consolidate hook, engage's output is the outcome.
    assert shouted.outcome.data == {"shouted": "QUIET WORDS"}
    assert echoed.outcome.data == {"x": 1, "attempt": 1}


# -- scheduling -----------------------------------------------------------------------------------


async def test_faculty_concurrency_limit_holds_under_load(db, db_url, tmp_path):
    gauge = Gauge()
    # Submitted before the engine starts, so the first claim already sees all 30.
    wids = ids(await db.submit_many([NewWorkItem("held").params({"i": i}) for i in range(30)]))
    async with run_engine(db_url, tmp_path / "home", faculties=[Held(gauge)], settle=False):
        for wid in wids:
            assert (await wait_finished(db, wid)).state == State.COMPLETED
    assert gauge.done == 30
    assert gauge.peak == 3


class Paced(Faculty):
    name = "paced"
    accepts = ("paced",)
    max_concurrent = 8
    rate_limit = 4.0  # foci started per second

    def __init__(self) -> None:
        self.started: list[float] = []

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        self.started.append(asyncio.get_running_loop().time())
        return None


async def test_a_rate_limited_faculty_starts_its_backlog_at_its_rate_without_a_poll(
        db, db_url, tmp_path):
    """The engine woke only at its fallback poll once the token bucket ran dry: with 0.5/s,
    items started every 10 s, and behind a schedule 4 of 6 stayed queued for over 80 s."""
    paced = Paced()
    async with run_engine(db_url, tmp_path / "home", faculties=[paced],
                          options=SLOW_POLL) as engine:
        wids = ids(await db.submit_many([NewWorkItem("paced").params({"i": i})
                                         for i in range(10)]))
        for wid in wids:  # ten items at 4/s: about 2.5 s, not a minute's poll
            assert (await wait_finished(db, wid, timeout=15)).state == State.COMPLETED
        assert engine.engine.options.poll_interval >= 60
    gaps = [b - a for a, b in itertools.pairwise(paced.started)]
    span = paced.started[-1] - paced.started[0]
    assert len(paced.started) == 10
    assert span >= (10 - 4) / 4 * 0.9  # the bucket holds four at the start, then 4/s
    assert max(gaps) < 1.0, gaps


async def test_global_concurrency_limit_holds_across_faculties(db, db_url, tmp_path):
    total, a, b = Gauge(), Gauge(), Gauge()
    wids = ids(await db.submit_many(
        [NewWorkItem("held-a").params({"i": i}) for i in range(15)]
        + [NewWorkItem("held-b").params({"i": i}) for i in range(15)]))
    options = EngineOptions(concurrency=4, poll_interval=60.0, seal_interval=0.2)
    async with run_engine(db_url, tmp_path / "home", faculties=[HeldA(total, a), HeldB(total, b)],
                          options=options, settle=False):
        for wid in wids:
            assert (await wait_finished(db, wid)).state == State.COMPLETED
    assert total.done == 30
    assert total.peak == 4
    assert a.peak <= 4
    assert b.peak <= 4


async def test_higher_priority_runs_first(db, db_url, tmp_path):
    seen: list[str] = []

    class Ordered(Faculty):
        name = "ordered"
        accepts = ("ordered",)
        max_concurrent = 1

        async def engage(self, focus: Focus, oriented: Any) -> Any:
            seen.append(focus.params["label"])

    plan = [("low-1", 0), ("high", 10), ("mid", 5), ("low-2", 0), ("top", 20), ("neg", -3)]
    wids = ids(await db.submit_many(
        [NewWorkItem("ordered").params({"label": label}).priority(p) for label, p in plan]))
    async with run_engine(db_url, tmp_path / "home", faculties=[Ordered()], settle=False):
        for wid in wids:
            await wait_finished(db, wid)
    assert seen == ["top", "high", "mid", "low-1", "low-2", "neg"]


# -- failure handling --------------------------------------------------------------------------------

async def test_retry_then_success(db, db_url, tmp_path):
    """The retry timer alone wakes the engine (it would poll only after 60 s)."""
    flaky = Flaky(failures=1)
    async with run_engine(db_url, tmp_path / "home", faculties=[flaky], options=SLOW_POLL):
        wid = (await db.submit_work(NewWorkItem("flaky"))).id
        item = await wait_finished(db, wid)
    assert item.state == State.COMPLETED, item.reason
    assert item.attempts == 2
    assert flaky.calls == 2
    assert item.outcome.data == {"attempt": 2}
    history = await db.history(wid)
    trail = [e.event for e in history]
    assert trail == ["submitted", "claimed", "running", "failed", "queued",
                     "claimed", "running", "completed"]
    failed = history[trail.index("failed")]
    assert "transient failure on attempt 1" in failed.payload["error"]
    requeued = history[trail.index("queued")]
    assert requeued.payload["reason"].startswith("retry 2/3 in ")


async def test_retry_then_dead_when_attempts_are_exhausted(db, db_url, tmp_path):
    hopeless = Hopeless(verdict=None)
    async with run_engine(db_url, tmp_path / "home", faculties=[hopeless], options=SLOW_POLL):
        wid = (await db.submit_work(NewWorkItem("hopeless").max_attempts(2))).id
        item = await wait_finished(db, wid)
    assert item.state == State.DEAD
    assert item.attempts == 2
    assert hopeless.calls == 2
    assert item.reason is not None
    assert "attempts exhausted (2/2)" in item.reason
    assert "engage failed: RuntimeError: always broken" in item.reason
    assert [p for p, _ in hopeless.recovered] == ["engage", "engage"]
    assert (await events(db, wid)).count("failed") == 2


class Stubborn(Hopeless):
    name = "stubborn"
    accepts = ("stubborn",)
    max_attempts = 4  # the faculty's limit overrides the item's own 3


async def test_a_faculty_attempt_limit_is_the_one_the_item_shows_and_the_database_applies(
        db, db_url, tmp_path, cli_env):
    """``work show`` printed 5/3 for an item dead after "attempts exhausted (5/5)", and 1/3
    while it ran, when its faculty set max_attempts = 5."""
    stubborn = Stubborn(verdict=None)
    async with run_engine(db_url, tmp_path / "home", faculties=[stubborn], options=SLOW_POLL):
        created = await db.submit_work(NewWorkItem("stubborn"))
        assert isinstance(created, Created)
        # as submitted (read back later, an engine may have claimed it already)
        assert created.item.max_attempts == 3
        wid = created.id
        item = await wait_finished(db, wid)
    assert (item.state, item.attempts, item.max_attempts) == (State.DEAD, 4, 4)
    assert "attempts exhausted (4/4)" in (item.reason or "")
    changed = [e.payload for e in await db.history(wid) if e.event == "changed"]
    assert changed == [{"columns": {"max_attempts": {"old": 3, "new": 4}}}]  # once, audited
    code, out, err = await run_cli(cli_env, tmp_path, "work", "show", str(wid))
    assert code == 0, err
    assert re.search(r"^attempts: +4/4$", out, re.MULTILINE), out


async def test_a_lost_lease_is_judged_against_the_faculty_limit(db):
    await db.submit_work(NewWorkItem("once"))
    [c] = await db.claim(work_types=["once"], lease_seconds=1, start=True,
                         max_attempts={"once": 1})
    assert c.item.max_attempts == 1
    await asyncio.sleep(1.2)  # the lease runs out; the next claim takes the attempt back
    assert await db.claim(work_types=["once"], lease_seconds=1, start=True) == []
    item = await db.get_work_item(c.item.id)
    assert item.state == State.DEAD  # with the item's own 3 it would have run again
    assert item.reason == ("attempts exhausted (1/1): lease expired while running "
                           "(engine lost)")


async def test_recover_false_dead_letters_at_once(db, db_url, tmp_path):
    hopeless = Hopeless(verdict=False)
    log = tmp_path / "recover.log"
    toml = write_toml_faculty(tmp_path, "refuse", hooks={
        "engage": "echo 'bad input: no widget' >&2; exit 3",
        "recover": f'echo "$ANIMUS_PHASE $ANIMUS_FAILED_PHASE $ANIMUS_ERROR" > {log}; exit 1',
    })
    async with run_engine(db_url, tmp_path / "home", faculties=[hopeless],
                          faculties_dir=toml.parent) as run:
        assert run.problems == []
        py, sh = ids(await db.submit_many([NewWorkItem("hopeless"), NewWorkItem("refuse")]))
        py_item = await wait_finished(db, py)
        sh_item = await wait_finished(db, sh)
    for item in (py_item, sh_item):
        assert item.state == State.DEAD
        assert item.attempts == 1
        assert item.reason is not None
        assert item.reason.startswith("recover chose to dead-letter: engage failed: ")
    assert hopeless.calls == 1
    assert "RuntimeError: always broken" in (py_item.reason or "")
    assert "exited with status 3: bad input: no widget" in (sh_item.reason or "")
    recover_saw = log.read_text()
    assert recover_saw.startswith("recover engage ")
    assert "exited with status 3" in recover_saw


class Slowpoke(Faculty):
    """Orient runs past the phase timeout on the first attempt only; later, orient and
    engage each take 0.2 s: under the 0.3 s limit each, over it together."""

    name = "slowpoke"
    accepts = ("slowpoke",)
    timeout = 0.3
    retry_base = 0.05

    def __init__(self) -> None:
        self.cancelled = 0

    async def orient(self, focus: Focus) -> Any:
        if focus.attempt == 1:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        await asyncio.sleep(0.2)
        return None

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        await asyncio.sleep(0.2)  # under the limit: one phase's time does not carry over
        return {"attempt": focus.attempt}


async def test_a_python_phase_past_its_timeout_is_cancelled_and_retried(db, db_url, tmp_path):
    slow = Slowpoke()
    async with run_engine(db_url, tmp_path / "home", faculties=[slow]) as run:
        wid = (await db.submit_work(NewWorkItem("slowpoke"))).id
        item = await wait_finished(db, wid, timeout=15)
        loop = asyncio.get_running_loop()
        assert run.engine.deadlines.check(loop.time()) == math.inf  # nothing left to watch
    assert item.state == State.COMPLETED, item.reason
    assert item.attempts == 2
    assert item.outcome.data == {"attempt": 2}
    assert slow.cancelled == 1
    history = await db.history(wid)
    failed = [e for e in history if e.to_state == "failed"]
    assert "orient failed: timed out after 0.3s" in failed[0].payload["error"]


async def test_hook_timeout_fails_the_focus_and_kills_the_hook(db, db_url, tmp_path):
    pidfile = tmp_path / "hook.pid"
    toml = write_toml_faculty(
        tmp_path, "sleepy", hooks={"engage": f"echo $$ > {pidfile}; exec sleep 30"},
        phase_fields={"engage": {"timeout": 0.5}})
    async with run_engine(db_url, tmp_path / "home", faculties_dir=toml.parent):
        wid = (await db.submit_work(NewWorkItem("sleepy").max_attempts(1))).id
        item = await wait_finished(db, wid)
    assert item.state == State.DEAD
    assert item.reason is not None
    assert "engage failed" in item.reason
    assert "timed out after 0.5s" in item.reason
    assert process_gone(int(pidfile.read_text()))


async def test_unreadable_output_fails_the_focus(db, db_url, tmp_path):
    class Unserializable(Faculty):
        name = "unserializable"
        accepts = ("unserializable",)

        async def consolidate(self, focus: Focus, engaged: Any) -> Any:
            return {"not": {"json", "a set"}}

    toml = write_toml_faculty(tmp_path, "garbage", hooks={
        "engage": "echo 'this is {not json' > engage-out.json",
    })
    async with run_engine(db_url, tmp_path / "home", faculties_dir=toml.parent,
                          faculties=[Unserializable()]):
        sh, py = ids(await db.submit_many([NewWorkItem("garbage").max_attempts(1),
                                           NewWorkItem("unserializable").max_attempts(1)]))
        sh_item = await wait_finished(db, sh)
        py_item = await wait_finished(db, py)
    assert sh_item.state == py_item.state == State.DEAD
    assert "engage failed" in (sh_item.reason or "")
    assert "engage-out.json is not valid JSON" in (sh_item.reason or "")
    assert "consolidate failed: outcome.not: a set is not JSON" in (py_item.reason or "")


class NulOutcome(Faculty):
    name = "nul-outcome"
    accepts = ("nul-outcome",)

    async def consolidate(self, focus: Focus, engaged: Any) -> Any:
        return {"text": "bad\x00byte"}


async def test_an_outcome_postgres_cannot_store_fails_the_focus(db, db_url, tmp_path):
    """JSON allows \\u0000, jsonb does not: the focus fails with that reason and the item
    is retried or dead-lettered, instead of its completion being refused afterwards (which
    left it running until its lease expired)."""
    async with run_engine(db_url, tmp_path / "home", faculties=[NulOutcome()]):
        wid = (await db.submit_work(NewWorkItem("nul-outcome").max_attempts(1))).id
        item = await wait_finished(db, wid, timeout=10)
    assert item.state == State.DEAD
    assert "consolidate failed: outcome.text: contains a NUL character" in (item.reason or "")


async def test_a_stop_with_a_grace_of_its_own_releases_foci_when_that_grace_ends(
        db, db_url, tmp_path):
    """``animus stop --grace`` (``Engine.stop(grace)``): the foci still running when that
    grace period ends are released, whatever the engine's own ``--grace``."""
    started = asyncio.Event()

    class Stuck(Faculty):
        name = "stuck"
        accepts = ("stuck",)

        async def engage(self, focus: Focus, oriented: Any) -> Any:
            started.set()
            await asyncio.Event().wait()  # until cancelled

    options = EngineOptions(poll_interval=1.0, lease_seconds=30, grace=120.0)
    async with run_engine(db_url, tmp_path / "home", faculties=[Stuck()], options=options,
                          stop_timeout=5) as run:
        wid = (await db.submit_work(NewWorkItem("stuck"))).id
        await asyncio.wait_for(started.wait(), 15)
        run.engine.stop(grace=0.2)
        item = await wait_until(
            lambda: _released(db, wid), 15,
            message="released once the stop's grace of 0.2 s ended, not the engine's 120 s")
    assert item.reason == "released at shutdown (grace period over)"
    assert item.attempts == 0  # given back


async def _released(db: Any, wid: UUID) -> Any:
    item = await db.get_work_item(wid)
    return item if item.state == State.QUEUED else None


async def test_an_engine_stops_when_the_database_refuses_its_last_completions(
        db, db_url, tmp_path):
    """Completions that cannot be recorded while the engine stops are given up (their
    leases expire and the items run again): the engine must not wait for them forever."""
    async with run_engine(db_url, tmp_path / "home", faculties=[Echo()],
                          stop_timeout=10) as run:
        refused: list[int] = []

        def refuse() -> None:
            refused.append(1)
            raise DatabaseUnavailable("lost the database connection: test")

        run.db.seams.faults["complete_many"] = refuse
        wid = (await db.submit_work(NewWorkItem("echo"))).id
        await wait_until(lambda: refused, 10, message="a completion refused")
    assert (await db.get_work_item(wid)).state == State.RUNNING  # until its lease expires


class NulRaiser(Faculty):
    name = "nul-raiser"
    accepts = ("nul-raiser",)

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        raise RuntimeError("bad\x00byte")


async def test_a_hook_writing_nul_bytes_to_stderr_fails_cleanly(db, db_url, tmp_path):
    """Postgres text cannot hold NUL: the reason keeps the stderr tail (or the exception's
    text) with NUL shown as U+FFFD, and the failure is recorded like any other."""
    toml = write_toml_faculty(tmp_path, "nully", hooks={
        "engage": "printf 'bad\\0byte\\n' >&2; exit 4",
    })
    async with run_engine(db_url, tmp_path / "home", faculties_dir=toml.parent,
                          faculties=[NulRaiser()]):
        wid = (await db.submit_work(NewWorkItem("nully").max_attempts(1))).id
        py = (await db.submit_work(NewWorkItem("nul-raiser").max_attempts(1))).id
        item = await wait_finished(db, wid)
        py_item = await wait_finished(db, py)
    assert py_item.state == State.DEAD
    assert "RuntimeError: bad\ufffdbyte" in (py_item.reason or "")
    assert item.state == State.DEAD
    assert "exited with status 4" in (item.reason or "")
    assert "bad\ufffdbyte" in (item.reason or "")
    [record] = await db.executions(wid)
    assert record.result == "failed"
    assert "bad\ufffdbyte" in (record.error or "")


# -- loading TOML faculties -------------------------------------------------------------------------


def test_non_executable_and_missing_commands_are_rejected_at_load(tmp_path):
    toml = write_toml_faculty(tmp_path, "broken", hooks={"orient": "true", "engage": "true"})
    (tmp_path / "hooks" / "broken-engage.sh").chmod(0o644)
    with pytest.raises(ConfigError) as not_exec:
        load_file(toml)
    assert str(toml) in str(not_exec.value)
    assert "faculty.engage.command" in str(not_exec.value)
    assert "not executable" in str(not_exec.value)

    (tmp_path / "hooks" / "broken-orient.sh").unlink()
    with pytest.raises(ConfigError) as missing:
        load_file(toml)
    assert str(toml) in str(missing.value)
    assert "faculty.orient.command" in str(missing.value)
    assert "does not exist" in str(missing.value)

    toml.write_text(toml.read_text().replace(
        str(tmp_path / "hooks" / "broken-orient.sh"), "no-such-program-anywhere --flag"))
    with pytest.raises(ConfigError) as not_on_path:
        load_file(toml)
    assert "faculty.orient.command" in str(not_on_path.value)
    assert "'no-such-program-anywhere' is not on PATH" in str(not_on_path.value)


def test_relative_commands_resolve_against_the_start_directory(tmp_path):
    start = tmp_path / "start"
    start.mkdir()
    toml = write_toml_faculty(tmp_path, "rel", hooks={"engage": "true"}, relative_to=start)
    assert 'command = "../hooks/rel-engage.sh"' in toml.read_text()
    faculty = load_file(toml, cwd=start)
    assert faculty.commands["engage"] == [str(start / ".." / "hooks" / "rel-engage.sh")]
    with pytest.raises(ConfigError, match=r"faculty\.engage\.command"):
        load_file(toml, cwd=tmp_path)


def test_malformed_toml_and_unknown_fields_are_rejected_naming_the_file(tmp_path):
    fac_dir = tmp_path / "faculties"
    fac_dir.mkdir()
    engage = write_script(tmp_path / "engage.sh", "true")
    malformed = fac_dir / "malformed.toml"
    malformed.write_text('[faculty\nname = "x"\n')
    unknown = fac_dir / "unknown.toml"
    unknown.write_text(f'[faculty]\nname = "u"\naccepts = ["u"]\ncolour = "red"\n'
                       f'[faculty.engage]\ncommand = "{engage}"\n')
    unknown_phase = fac_dir / "unknown_phase.toml"
    unknown_phase.write_text(f'[faculty]\nname = "p"\naccepts = ["p"]\n'
                             f'[faculty.engage]\ncommand = "{engage}"\nretries = 2\n')
    wrong_type = fac_dir / "wrong_type.toml"
    wrong_type.write_text(f'[faculty]\nname = "w"\naccepts = ["w"]\nmax_concurrent = "many"\n'
                          f'[faculty.engage]\ncommand = "{engage}"\n')
    good = fac_dir / "good.toml"
    good.write_text(f'[faculty]\nname = "good"\naccepts = ["good"]\n'
                    f'[faculty.engage]\ncommand = "{engage}"\n')

    with pytest.raises(ConfigError) as e:
        load_file(malformed)
    assert str(malformed) in str(e.value)
    assert "malformed TOML" in str(e.value)

    loaded, errors = load_dir(fac_dir)
    assert [f.name for f in loaded] == ["good"]
    assert len(errors) == 4
    by_file = {Path(err.split(": ", 1)[0]).name: err for err in errors}
    assert set(by_file) == {"malformed.toml", "unknown.toml", "unknown_phase.toml",
                            "wrong_type.toml"}
    assert "unknown field `colour` in faculty (it takes: name, accepts," in by_file["unknown.toml"]
    assert "did you mean" not in by_file["unknown.toml"]  # nothing like it
    assert "unknown field `retries` in faculty.engage" in by_file["unknown_phase.toml"]
    assert "max_concurrent" in by_file["wrong_type.toml"]


@pytest.mark.parametrize(("body", "expected"), [
    ('[faculty.engag]\ncommand = "true"\n',
     "unknown field `engag` in faculty: did you mean `engage`? (it takes: name, accepts,"),
    ('[faculty.engage]\ncommand = "true"\n[[faculty.schedule]]\nwork_type = "x"\nevry = "1m"\n',
     "unknown field `evry` in faculty.schedule[0]: did you mean `every`? (it takes: work_type, "
     "every, cron, params, name, priority)"),
    ('[faculty.engage]\ncommand = "true"\n[extra]\n',
     "unknown field `extra` at the top level (it takes: faculty)"),
])
def test_an_unknown_field_is_named_with_the_fields_its_table_takes(tmp_path, body, expected):
    toml = tmp_path / "x.toml"
    toml.write_text('[faculty]\nname = "x"\naccepts = ["x"]\n' + body)
    with pytest.raises(ConfigError) as e:
        load_file(toml)
    assert expected in str(e.value)


def test_a_relative_path_that_cannot_be_read_says_where_it_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_file(Path("nope.toml"))
    assert str(e.value) == (f"nope.toml: cannot read: No such file or directory (a path "
                            f"relative to {tmp_path})")


async def test_bad_files_are_reported_and_good_ones_still_run(db, db_url, tmp_path):
    toml = write_toml_faculty(tmp_path, "fine", hooks={
        "engage": "echo '{\"ok\": true}' > engage-out.json"})
    (toml.parent / "bad.toml").write_text('[faculty]\nname = "bad"\naccepts = ["bad"]\n')
    async with run_engine(db_url, tmp_path / "home", faculties_dir=toml.parent) as run:
        assert list(run.origins()) == ["fine"]
        assert len(run.problems) == 1
        assert run.problems[0].plugin == "animus (built-in)"
        assert str(toml.parent / "bad.toml") in run.problems[0].error
        assert "faculty.engage is missing" in run.problems[0].error
        item = await wait_finished(db, (await db.submit_work(NewWorkItem("fine"))).id)
    assert item.outcome.data == {"ok": True}


async def test_work_type_claimed_by_two_faculties_is_reported(db, db_url, tmp_path):
    first = write_toml_faculty(tmp_path, "first", accepts=["shared", "first-only"], hooks={
        "engage": "echo '\"first\"' > engage-out.json"})
    second = write_toml_faculty(tmp_path, "second", accepts=["shared"], hooks={
        "engage": "echo '\"second\"' > engage-out.json"})
    third = write_toml_faculty(tmp_path, "third", accepts=["py-shared"], hooks={"engage": "true"})

    class AlsoShared(Faculty):
        name = "also-shared"
        accepts = ("py-shared",)

    async with run_engine(db_url, tmp_path / "home", faculties_dir=first.parent,
                          faculties=[AlsoShared()]) as run:
        names = set(run.origins())
        # Files load in name order, so first.toml wins "shared"; between plugins, whichever
        # registered first wins, and the other is refused as a whole.
        assert "first" in names
        assert "second" not in names
        assert len(names & {"also-shared", "third"}) == 1
        assert run.engine.faculties.by_type["first-only"].name == "first"
        errors = [p.error for p in run.problems]
        assert len(errors) == 2, errors
        toml_error = next(e for e in errors if "'shared'" in e)
        assert "claimed by two faculties: 'first'" in toml_error
        assert str(first) in toml_error
        assert str(second) in toml_error
        mixed = next(e for e in errors if "'py-shared'" in e)
        assert "'also-shared' (test-faculties)" in mixed
        assert f"'third' ({third})" in mixed
        item = await wait_finished(db, (await db.submit_work(NewWorkItem("shared"))).id)
    assert item.outcome.data == "first"


# -- routing ------------------------------------------------------------------------------------------


async def test_unroutable_work_waits_for_a_faculty(db, db_url, tmp_path):
    class Orphan(Faculty):
        name = "orphan"
        accepts = ("orphan", "stray")

    before = (await db.submit_work(NewWorkItem("orphan").params({"when": "before"}))).id
    async with run_engine(db_url, tmp_path / "home", faculties=[Echo()]) as run:
        engine = run.engine
        assert "orphan" in engine.unroutable  # the backlog is reported at start
        after = (await db.submit_work(NewWorkItem("stray").params({"when": "after"}))).id
        await wait_until(lambda: "stray" in engine.unroutable, message="stray to be unroutable")
        # Work the engine can route still flows; the unroutable items stay queued.
        echo = await wait_finished(db, (await db.submit_work(NewWorkItem("echo"))).id)
        assert echo.state == State.COMPLETED
        for wid in (before, after):
            item = await db.get_work_item(wid)
            assert item.state == State.QUEUED
            assert item.attempts == 0
        # A second engine with a faculty for them picks them up.
        async with run_engine(db_url, tmp_path / "home2", faculties=[Orphan()],
                              settle=False) as second:
            assert second.engine.unroutable == {}
            for wid in (before, after):
                item = await wait_finished(db, wid)
                assert item.state == State.COMPLETED
                assert item.attempts == 1
    assert (await db.get_work_item(before)).outcome.data == {"when": "before"}


async def test_child_work_from_python_and_from_a_bash_hook(db, db_url, tmp_path):
    class Parent(Faculty):
        name = "parent"
        accepts = ("parent",)

        async def consolidate(self, focus: Focus, engaged: Any) -> Any:
            result = await focus.submit(NewWorkItem("kid", source="parent").params({"from": "python"}))
            return {"child": str(result.id)}

    toml = write_toml_faculty(tmp_path, "bash-parent", hooks={"engage": """
        animus work submit kid --parent "$ANIMUS_WORK_ID" --param from=bash --source hook > submitted.txt
        read -r created child < submitted.txt
        test "$created" = created
        printf '{"child":"%s"}' "$child" > engage-out.json
    """})
    async with run_engine(db_url, tmp_path / "home", faculties=[Parent(), Kid()],
                          faculties_dir=toml.parent):
        py, sh = ids(await db.submit_many([NewWorkItem("parent"), NewWorkItem("bash-parent")]))
        py_item = await wait_finished(db, py)
        sh_item = await wait_finished(db, sh, timeout=30)
        assert py_item.state == State.COMPLETED, py_item.reason
        assert sh_item.state == State.COMPLETED, sh_item.reason
        for parent, origin in ((py_item, "python"), (sh_item, "bash")):
            child_id = parent.outcome.data["child"]
            child = await wait_finished(db, child_id)
            assert child.state == State.COMPLETED
            assert child.parent_id == parent.id
            assert child.params == {"from": origin}
            assert child.outcome.data == {"kid_of": str(parent.id), "from": origin}
            assert [k.id for k in await db.list_work(parent_id=parent.id)] == [child.id]
    assert (await db.get_work_item(sh_item.outcome.data["child"])).provenance.source == "hook"


async def test_focus_directories_removed_on_success_kept_on_failure_when_asked(db, db_url, tmp_path):
    hooks = {"engage": 'echo marker > marker.txt; test "$(sed -n \'s/.*"fail":\\(true\\).*/\\1/p\' '
                       'work.json)" != true; echo 1 > engage-out.json'}
    keep = write_toml_faculty(tmp_path, "keeper", hooks=hooks, fields={"keep_failed": True})
    write_toml_faculty(tmp_path, "tidy", hooks=hooks)
    async with run_engine(db_url, tmp_path / "home", faculties_dir=keep.parent) as run:
        wids = ids(await db.submit_many([
            NewWorkItem("keeper").params({"fail": False}),
            NewWorkItem("keeper").params({"fail": True}).max_attempts(1),
            NewWorkItem("tidy").params({"fail": False}),
            NewWorkItem("tidy").params({"fail": True}).max_attempts(1),
        ]))
        items = [await wait_finished(db, wid) for wid in wids]
        root = run.foci_root
    assert [i.state for i in items] == [State.COMPLETED, State.DEAD, State.COMPLETED, State.DEAD]
    left = sorted(p.name for p in root.iterdir())
    assert len(left) == 1, left
    kept = root / left[0]
    assert left[0].startswith(f"keeper-{wids[1]}-1-")
    assert (kept / "marker.txt").read_text() == "marker\n"
    assert json.loads((kept / "work.json").read_text())["id"] == str(wids[1])


async def test_lease_is_extended_while_a_long_focus_runs(db, db_url, tmp_path):
    runs: list[int] = []

    class Long(Faculty):
        name = "long"
        accepts = ("long",)
        max_concurrent = 2  # a free slot: the engine would claim the item again if it could

        async def engage(self, focus: Focus, oriented: Any) -> Any:
            runs.append(focus.attempt)
            await asyncio.sleep(5)
            return {"slept": 5}

    options = EngineOptions(lease_seconds=2, poll_interval=0.5, seal_interval=0.2)
    async with run_engine(db_url, tmp_path / "home", faculties=[Long()], options=options):
        wid = (await db.submit_work(NewWorkItem("long"))).id
        item = await wait_finished(db, wid, timeout=30)
    assert item.state == State.COMPLETED
    assert item.attempts == 1
    assert runs == [1]
    trail = await events(db, wid)
    assert trail == ["submitted", "claimed", "running", "completed"]


def _record_of(c: Any) -> ExecutionRecord:
    return ExecutionRecord(
        work_id=c.item.id, attempt=c.item.attempts, result="completed",
        work_type=c.item.work_type, params_hash="p", faculty={"name": "f"}, faculty_hash="fh",
        engine_version="1", environment_hash="env", models=[], outcome_hash=None, error=None,
        started_at=datetime.now(UTC))


async def test_a_completion_and_its_execution_records_are_written_all_or_none(db):
    """A batch completed with its attempts' execution records (one statement): with one lease
    lost, no item completes and no record is written; with every lease held, each item has
    its one record."""
    await db.record_environment("env", {"python": "3"})
    await db.submit_many([NewWorkItem("rec").params({"i": i}) for i in range(3)])
    claimed = await db.claim(limit=3, lease_seconds=60, start=True)
    await db.release(claimed[-1].lease, "given back")  # the last one's lease is lost

    async def records() -> int:
        async with db.connection() as conn:
            n: int = await conn.fetchval(
                "SELECT count(*) FROM animus.execution_records WHERE work_id = ANY ($1)",
                [c.item.id for c in claimed])
            return n

    with pytest.raises((LeaseLost, IllegalTransition)):
        await db.complete_many([(c.lease, None, 1) for c in claimed],
                               executions=[_record_of(c) for c in claimed])
    assert await records() == 0
    assert [(await db.get_work_item(c.item.id)).state for c in claimed[:2]] == ["running"] * 2
    await db.complete_many([(c.lease, {"i": i}, 1) for i, c in enumerate(claimed[:2])],
                           executions=[_record_of(c) for c in claimed[:2]])
    assert await records() == 2
    assert [(await db.get_work_item(c.item.id)).state for c in claimed[:2]] == ["completed"] * 2


async def test_the_completer_records_a_backlog_in_transactions_of_at_most_a_batch(db, db_url):
    """Finished foci pile up while a completion is written (thousands of foci in flight):
    the completer writes them BATCH at a time, so that no transaction holds the locks of
    thousands of items (a lease extension of the same items waits for it)."""
    n = completions.BATCH * 2 + 7
    await db.submit_many([NewWorkItem("pile").params({"i": i}) for i in range(n)])
    claimed: list[Any] = []
    while len(claimed) < n:
        claimed += await db.claim(limit=500, lease_seconds=60, start=True)
    sizes: list[int] = []

    class Counted(ObservedDb):
        async def complete_many(self, done: Any, *args: Any, **kwargs: Any) -> None:
            sizes.append(len(done))
            await super().complete_many(done, *args, **kwargs)

    await db.record_environment("env", {"python": "3"})
    store = await Counted.connect(db_url, max_size=2, actor="test-completer")
    try:
        done = completions.Completions(store, Health(), stop_deadline=lambda: None,
                                       on_recorded=lambda: None)
        for c in claimed:
            done.add(c.lease, None, 1, _record_of(c))
        await done.flush()
    finally:
        await store.close()
    assert sizes == [completions.BATCH, completions.BATCH, 7]
    async with db.connection() as conn:
        assert await conn.fetchval(
            "SELECT count(*) FROM animus.work_items WHERE state = 'completed'") == n


async def test_completions_that_arrive_while_a_batch_is_written_wait_for_the_next(db, db_url):
    """Group commit under a steady stream: what finishes while a batch is being written joins
    the next batch (written LINGER after this one began), not a write of its own straight
    after this one."""
    await db.submit_many([NewWorkItem("stream").params({"i": i}) for i in range(3)])
    first, *later = await db.claim(limit=3, lease_seconds=60, start=True)
    sizes: list[int] = []

    class Counted(ObservedDb):
        async def complete_many(self, done: Any, *args: Any, **kwargs: Any) -> None:
            if not sizes:  # two more foci finish while the first batch is written
                for c in later:
                    completer.add(c.lease, None, 1, _record_of(c))
            await super().complete_many(done, *args, **kwargs)
            sizes.append(len(done))

    await db.record_environment("env", {"python": "3"})
    store = await Counted.connect(db_url, max_size=2, actor="test-completer")
    try:
        completer = completions.Completions(store, Health(), stop_deadline=lambda: None,
                                            on_recorded=lambda: None)
        completer.add(first.lease, None, 1, _record_of(first))
        await completer.flush()
        assert sizes == [1]
        assert len(completer) == 2  # pending: the next batch
        await completer.flush()
        assert sizes == [1, 2]
    finally:
        await store.close()


async def test_a_completion_the_database_drops_while_its_batch_is_split_is_written_anyway(
        db, db_url):
    """A batch refused for one item (its lease lost) is written an item at a time; one of
    those the database drops meanwhile is written again in the same flush, not left pending
    with nothing to write it (the engine may be idle, or stopping)."""
    await db.submit_many([NewWorkItem("split").params({"i": i}) for i in range(2)])
    kept, lost = await db.claim(limit=2, lease_seconds=60, start=True)
    await db.complete(lost.lease)  # the batch's other item: no longer held
    dropped: list[int] = []

    class Dropping(ObservedDb):
        async def complete_many(self, done: Any, *args: Any, **kwargs: Any) -> None:
            if len(done) == 1 and done[0][0] is kept.lease and not dropped:
                dropped.append(1)
                raise DatabaseUnavailable("lost the database connection: (test) dropped")
            await super().complete_many(done, *args, **kwargs)

    await db.record_environment("env", {"python": "3"})
    store = await Dropping.connect(db_url, max_size=2, actor="test-completer")
    try:
        completer = completions.Completions(store, Health(), stop_deadline=lambda: None,
                                            on_recorded=lambda: None)
        for c in (kept, lost):
            completer.add(c.lease, None, 1, _record_of(c))
        await completer.flush()  # as the engine's last flush at a stop
    finally:
        await store.close()
    assert dropped == [1]
    assert len(completer) == 0
    assert (await db.get_work_item(kept.item.id)).state == State.COMPLETED


async def test_a_busy_completer_gathers_completions_and_an_idle_one_writes_at_once(
        db, db_url, monkeypatch):
    """Group commit: the first completion after a quiet spell is written at once; those that
    follow within LINGER of that write go together in the next transaction."""
    monkeypatch.setattr(completions, "LINGER", 2.0)  # long, so that timing cannot decide
    await db.submit_many([NewWorkItem("burst").params({"i": i}) for i in range(6)])
    claimed = await db.claim(limit=6, lease_seconds=60, start=True)
    sizes: list[int] = []
    written = asyncio.Event()

    class Counted(ObservedDb):
        async def complete_many(self, done: Any, *args: Any, **kwargs: Any) -> None:
            await super().complete_many(done, *args, **kwargs)
            sizes.append(len(done))
            written.set()

    await db.record_environment("env", {"python": "3"})
    store = await Counted.connect(db_url, max_size=2, actor="test-completer")
    done = completions.Completions(store, Health(), stop_deadline=lambda: None,
                                   on_recorded=lambda: None)
    run = asyncio.create_task(done.run())
    try:
        first, *rest = claimed
        done.add(first.lease, None, 1, _record_of(first))
        await asyncio.wait_for(written.wait(), 1.5)  # not held back for LINGER
        assert sizes == [1]
        for c in rest:  # a steady stream, well within LINGER of that write
            done.add(c.lease, None, 1, _record_of(c))
            await asyncio.sleep(0.01)
        done.close()
        await asyncio.wait_for(run, 10)
    finally:
        run.cancel()
        await store.close()
    assert sizes == [1, 5]


async def test_many_free_slots_are_filled_by_claims_of_at_most_a_chunk(db, db_url, tmp_path):
    """An engine with more free slots than a claim takes (CLAIM_CHUNK) claims again at once
    until they are filled: the foci of the first claim start while the next is read."""
    release = asyncio.Event()
    started: list[int] = []

    class Wide(Faculty):
        name = "wide"
        accepts = ("wide",)
        max_concurrent = 1000

        async def engage(self, focus: Focus, oriented: Any) -> Any:
            started.append(focus.params["i"])
            await release.wait()
            return None

    n = CLAIM_CHUNK * 2 + 10
    limits: list[int] = []
    options = EngineOptions(concurrency=1000, poll_interval=60.0, lease_seconds=30, grace=5.0,
                            seal_interval=0.2)
    async with run_engine(db_url, tmp_path / "home", faculties=[Wide()],
                          options=options) as run:
        async def note(kwargs: dict[str, Any], claimed: list[Any]) -> None:
            limits.append(kwargs["limit"])

        run.db.seams.after_claim = note
        await db.submit_many([NewWorkItem("wide").params({"i": i}) for i in range(n)])
        try:
            await wait_until(lambda: len(started) == n, 30, message="every item to start")
        finally:
            release.set()
    assert len(limits) >= 3
    assert max(limits) <= CLAIM_CHUNK
    assert sorted(started) == list(range(n))


async def test_stop_drains_an_in_flight_focus(db, db_url, tmp_path):
    started = asyncio.Event()

    class Steady(Faculty):
        name = "steady"
        accepts = ("steady",)

        async def engage(self, focus: Focus, oriented: Any) -> Any:
            started.set()
            await asyncio.sleep(1)
            return {"drained": True}

    async with run_engine(db_url, tmp_path / "home", faculties=[Steady()]) as run:
        wid = (await db.submit_work(NewWorkItem("steady"))).id
        await asyncio.wait_for(started.wait(), 10)
        assert wid in run.engine.inflight
    # run() has returned: the focus finished within the grace period and was recorded.
    item = await db.get_work_item(wid)
    assert item.state == State.COMPLETED
    assert item.outcome.data == {"drained": True}


async def test_listener_reconnects_after_its_connection_is_killed(db, db_url, tmp_path):
    async def listener_pid() -> int | None:
        async with raw(db_url) as conn:
            pid: int | None = await conn.fetchval(
                """SELECT pid FROM pg_stat_activity WHERE application_name = 'animus-listener'
                    AND datname = current_database()""")
            return pid

    async with run_engine(db_url, tmp_path / "home", faculties=[Echo()], options=SLOW_POLL) as run:
        engine = run.engine
        old = await wait_until(listener_pid, message="the listener connection")
        async with raw(db_url) as conn:
            assert await conn.fetchval("SELECT pg_terminate_backend($1)", old)

        async def reconnected() -> bool:
            pid = await listener_pid()
            return pid is not None and pid != old and engine.listener_connected.is_set()

        await wait_until(reconnected, message="the listener to reconnect")
        for i in range(3):
            # Idle first (the reconnect catches up with one round of claims): then only the
            # notification of this submit can wake the engine before its 60 s poll.
            await run.wait_quiet()
            wid = (await db.submit_work(NewWorkItem("echo").params({"i": i}))).id
            item = await wait_finished(db, wid, timeout=15)
            assert item.state == State.COMPLETED


async def test_notification_during_a_claim_is_not_lost(db, db_url, tmp_path, monkeypatch):
    class Pair(Echo):
        name = "pair"
        accepts = ("pair",)
        max_concurrent = 2

    async with run_engine(db_url, tmp_path / "home", faculties=[Pair()], options=SLOW_POLL) as run:
        slot = run.engine.slots["pair"]
        late: list[UUID] = []

        async def submit_during_claim(kwargs: dict[str, Any], claimed: list[Any]) -> None:
            if late or not claimed:
                return
            # The claim has read the queue; new work arrives and its notification is handled
            # before the engine looks at what the claim returned. (The flag is lowered first
            # only so that seeing it raised proves the notification was handled.)
            slot.dirty = False
            late.append((await db.submit_work(NewWorkItem("pair").params({"n": 2}))).id)
            await wait_until(lambda: slot.dirty, message="the notification of the late item")

        run.db.seams.after_claim = submit_during_claim
        first = (await db.submit_work(NewWorkItem("pair").params({"n": 1}))).id
        assert (await wait_finished(db, first, timeout=10)).state == State.COMPLETED
        assert late, "the late item was not submitted"
        item = await wait_finished(db, late[0], timeout=5)  # the fallback poll is 60 s away
        assert item.state == State.COMPLETED


async def test_a_slot_freed_during_a_claim_is_filled_at_once(db, db_url, tmp_path):
    """A focus that finishes while a claim is in flight frees a slot the claim did not count:
    the engine claims again for it at once, not at the next wake-up (which, with a backlog and
    no new work, is the next focus to finish, or the fallback poll)."""
    gates = {k: asyncio.Event() for k in "abc"}
    gates["c"].set()
    started: list[str] = []

    class Gated(Faculty):
        name = "gated"
        accepts = ("gated",)
        max_concurrent = 2

        async def engage(self, focus: Focus, oriented: Any) -> Any:
            started.append(focus.params["k"])
            await gates[focus.params["k"]].wait()
            return None

    async with run_engine(db_url, tmp_path / "home", faculties=[Gated()],
                          options=SLOW_POLL) as run:
        slot = run.engine.slots["gated"]
        await db.submit_work(NewWorkItem("gated").params({"k": "a"}))
        await wait_until(lambda: started == ["a"], message="a to start")

        async def free_a_slot_during_the_claim(kwargs: dict[str, Any], claimed: list[Any]) -> None:
            if [c.item.params["k"] for c in claimed] == ["b"]:
                gates["a"].set()  # a finishes while the claim of b is in flight
                await wait_until(lambda: slot.running == 0, message="a to finish")

        run.db.seams.after_claim = free_a_slot_during_the_claim
        # b and c in one transaction (one notification): the claim for the one free slot takes b
        await db.submit_many([NewWorkItem("gated").params({"k": k}) for k in "bc"])
        await wait_until(lambda: "c" in started, 5, message="c to start in the slot a freed")
        gates["b"].set()


async def test_foci_that_hold_every_pooled_connection_do_not_hold_up_the_engine(
        db, db_url, tmp_path):
    """The engine claims, starts and completes work on connections of its own: foci that
    hold every connection of the shared pool (long queries, say) do not make a new item's
    claim, or its completion, wait until one of them lets go."""
    release = asyncio.Event()
    holding: list[int] = []

    class Hog(Faculty):
        name = "hog"
        accepts = ("hog",)
        max_concurrent = 20

        async def engage(self, focus: Focus, oriented: Any) -> Any:
            if focus.params.get("hold"):
                async with focus.db.connection():
                    holding.append(focus.params["i"])
                    await release.wait()
            return focus.params["i"]

    async with run_engine(db_url, tmp_path / "home", faculties=[Hog()],
                          options=SLOW_POLL) as run:
        pool_size = run.db.pool.get_max_size()
        await db.submit_many([NewWorkItem("hog").params({"hold": True, "i": i})
                              for i in range(pool_size)])
        await wait_until(lambda: len(holding) == pool_size, 10,
                         message="the foci to hold every pooled connection")
        try:
            quick = (await db.submit_work(NewWorkItem("hog").params({"i": -1}))).id
            item = await wait_finished(db, quick, timeout=5)
            assert item.state == State.COMPLETED
            assert len(holding) == pool_size  # nobody let go meanwhile
        finally:
            release.set()


async def test_failing_plugin_is_reported_and_other_faculties_run(db, db_url, tmp_path):
    class Broken:
        @hookimpl
        def register_faculties(self, register: Any, settings: Any) -> None:
            raise RuntimeError("kaboom while registering")

    class HalfBroken:
        @hookimpl
        def register_faculties(self, register: Any) -> None:
            register(Kid())
            raise ValueError("failed after registering one")

    async with run_engine(db_url, tmp_path / "home", faculties=[Echo()],
                          plugins={"broken-plugin": Broken(), "half-broken": HalfBroken()}) as run:
        problems = {p.plugin: p.error for p in run.problems}
        assert problems == {"broken-plugin": "RuntimeError: kaboom while registering",
                            "half-broken": "ValueError: failed after registering one"}
        assert sorted(run.origins()) == ["echo", "kid"]
        for work_type in ("echo", "kid"):
            item = await wait_finished(db, (await db.submit_work(NewWorkItem(work_type))).id)
            assert item.state == State.COMPLETED


# -- schedules ------------------------------------------------------------------------------------------


class Beat(Faculty):
    name = "beat"
    accepts = ("beat",)
    max_concurrent = 4
    schedules = (Schedule(name="beat", work_type="beat", every=1, params={"k": "v"}),)


async def test_schedule_fires_each_tick_once_across_two_engines(db, db_url, tmp_path):
    async def ticks() -> list[Any]:
        async with raw(db_url) as conn:
            return list(await conn.fetch(
                "SELECT name, tick, work_id FROM animus.schedule_ticks ORDER BY tick"))

    async with (
        run_engine(db_url, tmp_path / "home1", faculties=[Beat()], settle=False),
        run_engine(db_url, tmp_path / "home2", faculties=[Beat()], settle=False),
    ):
        await wait_until(lambda: _at_least(ticks, 3), timeout=10, message="three ticks")

    rows = await ticks()
    assert len(rows) >= 3
    assert {r["name"] for r in rows} == {"beat"}
    assert len({r["tick"] for r in rows}) == len(rows)
    stamps = [r["tick"] for r in rows]
    assert all(t.microsecond == 0 for t in stamps)
    assert all(b - a >= timedelta(seconds=1) for a, b in itertools.pairwise(stamps))
    beats = await db.list_work(work_type="beat")
    assert len(beats) == len(rows)
    assert {b.id for b in beats} == {r["work_id"] for r in rows}
    for b in beats:
        assert b.provenance.source == "schedule"
        assert b.provenance.trigger == "beat"
        assert b.params == {"k": "v"}


async def _at_least(fetch: Any, n: int) -> bool:
    return len(await fetch()) >= n


async def test_a_work_type_with_slashes_cannot_place_its_focus_directory(db, tmp_path):
    """Work types may contain "/" and "..": the focus directory stays directly under the
    foci root whatever the type says."""
    from animus_core.faculties.focus import Focus

    await db.submit_work(NewWorkItem("a/../../../escape", source="test"))
    [claimed] = await db.claim(start=True)
    root = tmp_path / "foci"
    focus = Focus(claimed.item, db, attempt=1, log=logging.getLogger("test"), root=root)
    assert focus.directory.parent == root
    assert focus.directory.name.startswith("a_.._.._.._escape-")
    focus.cleanup(keep=False)
    assert list(root.iterdir()) == []
