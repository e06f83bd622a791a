"""Durable command hooks (docs/hook-contract.md): ``resume = "phase"``, a hook suspending
its focus with ``suspend.json`` (and resuming with ``resume.json`` and ``ANIMUS_RESUMED``),
and ``animus step`` inside a hook. Real engines, real Postgres, real hook processes; the
hooks count their runs in files."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from animus_core import NewWorkItem, State
from animus_core.faculties import durable_hooks
from animus_core.faculties.durable_hooks import DurableFocus, StepServer, parse_suspend
from animus_core.faculties.toml import DURABLE_ENV, load_file
from animus_core.values.errors import ConfigError, InvalidInput
from tests.engine_helpers import (
    SLOW_POLL,
    engine_processes,
    run_cli,
    run_engine,
    wait_finished,
    wait_listening,
    wait_until,
    write_toml_faculty,
)
from tests.governance_helpers import people as team
from tests.support import code_blocks, console_examples, doc_section
from tests.test_focus_waits import until_state

#: retried at once
QUICK = {"retry_base": 0.0, "retry_max": 0.0}


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def run_one(db: Any, db_url: str, tmp_path: Path, toml: Path,
                  params: dict[str, Any] | None = None) -> Any:
    async with run_engine(db_url, tmp_path / "home", faculties_dir=toml.parent,
                          options=SLOW_POLL) as run:
        assert run.problems == []
        wid = (await db.submit_work(NewWorkItem(toml.stem, source="test")
                                    .params(params or {}))).id
        return await wait_finished(db, wid)


def three_phases(t: Path, consolidate_fails: str) -> dict[str, str]:
    """Hooks counting their runs in ``t``; consolidate fails while ``consolidate_fails``
    (a bash condition) holds."""
    return {
        "orient": f"""
            echo run >> {t}/orient.runs
            echo '{{"o": 1}}' > orient-out.json
        """,
        "engage": f"""
            echo run >> {t}/engage.runs
            printf '{{"orient": %s, "e": 2}}' "$(cat orient-out.json)" > engage-out.json
        """,
        "consolidate": f"""
            echo "$ANIMUS_ATTEMPT" >> {t}/consolidate.runs
            if {consolidate_fails}; then echo "not yet" >&2; exit 3; fi
            printf '{{"engage": %s, "orient": %s}}' "$(cat engage-out.json)" \\
                "$(cat orient-out.json)" > consolidate-out.json
        """,
    }


# -- resume = "phase" ---------------------------------------------------------------------------


async def test_resume_phase_retries_only_the_phase_that_failed(db, db_url, tmp_path):
    toml = write_toml_faculty(tmp_path, "phased", fields={"resume": "phase", **QUICK},
                              hooks=three_phases(tmp_path, '[ "$ANIMUS_ATTEMPT" = 1 ]'))
    item = await run_one(db, db_url, tmp_path, toml)
    steps = await db.steps(item.id)
    records = await db.executions(item.id)
    assert item.state == State.COMPLETED, item.reason
    assert item.attempts == 2
    assert (lines(tmp_path / "orient.runs"), lines(tmp_path / "engage.runs")) == (["run"], ["run"])
    assert lines(tmp_path / "consolidate.runs") == ["1", "2"]
    # the files of orient and engage were restored for the retry of consolidate
    assert item.outcome.data == {"engage": {"orient": {"o": 1}, "e": 2}, "orient": {"o": 1}}
    assert [(s.position, s.name, s.attempt) for s in steps] == [
        (1, "phase orient", 1), (2, "phase engage", 1), (3, "phase consolidate", 2)]
    assert steps[1].result == {"phase": "engage", "out": {"orient": {"o": 1}, "e": 2}}
    assert records[1].steps == {"ran": [{"position": 3, "name": "phase consolidate"}],
                                "replayed": [{"position": 1, "name": "phase orient"},
                                             {"position": 2, "name": "phase engage"}]}


async def test_without_resume_every_attempt_runs_every_phase_and_records_no_step(
        db, db_url, tmp_path):
    toml = write_toml_faculty(tmp_path, "plain", fields=QUICK,
                              hooks=three_phases(tmp_path, '[ "$ANIMUS_ATTEMPT" = 1 ]'))
    item = await run_one(db, db_url, tmp_path, toml)
    assert item.state == State.COMPLETED, item.reason
    assert lines(tmp_path / "orient.runs") == ["run", "run"]
    assert lines(tmp_path / "engage.runs") == ["run", "run"]
    assert await db.steps(item.id) == []


async def test_resume_phase_restores_no_file_for_a_phase_that_wrote_none(db, db_url, tmp_path):
    toml = write_toml_faculty(tmp_path, "nofile", fields={"resume": "phase", **QUICK}, hooks={
        "orient": f"echo run >> {tmp_path}/orient.runs",
        "engage": """
            if [ -e orient-out.json ]; then echo "orient-out.json appeared" >&2; exit 9; fi
            echo '{"attempt": '"$ANIMUS_ATTEMPT"'}' > engage-out.json
            [ "$ANIMUS_ATTEMPT" != 1 ]
        """})
    item = await run_one(db, db_url, tmp_path, toml)
    assert item.state == State.COMPLETED, item.reason
    assert item.outcome.data == {"attempt": 2}
    assert lines(tmp_path / "orient.runs") == ["run"]
    assert [s.result for s in await db.steps(item.id)] == [
        {"phase": "orient"}, {"phase": "engage", "out": {"attempt": 2}}]


@pytest.mark.parametrize(("value", "expected"), [
    ('"always"', 'faculty.resume must be "phase"'),
    ("1", "faculty.resume"),
])
def test_resume_takes_phase_or_nothing(tmp_path, value, expected):
    toml = write_toml_faculty(tmp_path, "badresume", hooks={"engage": "true"},
                              extra="")
    text = toml.read_text().replace("[faculty]\n", f"[faculty]\nresume = {value}\n", 1)
    toml.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_file(toml)
    assert str(toml) in str(e.value)
    assert expected in str(e.value)


# -- suspend.json ---------------------------------------------------------------------------------


def suspending(t: Path, request: str, *, before: str = "") -> dict[str, str]:
    """orient counts its runs; engage runs ``before``, then asks for ``request`` unless it
    resumes, when it keeps resume.json and its environment."""
    return {
        "orient": f"""
            echo run >> {t}/orient.runs
            echo '{{"o": 1}}' > orient-out.json
        """,
        "engage": f"""
            echo "$ANIMUS_ATTEMPT ${{ANIMUS_RESUMED:-unset}}" >> {t}/engage.runs
            {before}
            if [ "${{ANIMUS_RESUMED:-}}" = 1 ]; then
                cp resume.json {t}/resume.json
                printf '{{"orient": %s, "resumed": %s}}' "$(cat orient-out.json)" \\
                    "$(cat resume.json)" > engage-out.json
                exit 0
            fi
            if [ -e resume.json ]; then echo "resume.json on a fresh run" >&2; exit 9; fi
            echo '{request}' > suspend.json
        """,
    }


async def test_a_hook_sleeps_and_runs_again_with_resume_json(db, db_url, tmp_path):
    toml = write_toml_faculty(tmp_path, "sleeper",
                              hooks=suspending(tmp_path, '{"sleep": 0.3}'))
    item = await run_one(db, db_url, tmp_path, toml)
    steps = await db.steps(item.id)
    assert item.state == State.COMPLETED, item.reason
    assert (item.attempts, item.suspensions) == (2, 1)
    assert lines(tmp_path / "orient.runs") == ["run"]  # not again after the wake
    assert lines(tmp_path / "engage.runs") == ["1 unset", "2 1"]
    resumed = json.loads((tmp_path / "resume.json").read_text())
    assert resumed["slept"] is True
    assert item.outcome.data == {"orient": {"o": 1}, "resumed": resumed}
    assert [(s.position, s.name) for s in steps] == [(1, "suspend engage"), (2, "sleep")]
    assert steps[0].result["outputs"] == {"orient": {"out": {"o": 1}}}


async def test_a_hook_waits_for_a_signal_sent_with_the_cli(db, db_url, tmp_path, cli_env):
    toml = write_toml_faculty(tmp_path, "waiter",
                              hooks=suspending(tmp_path, '{"wait_for": "go"}'))
    async with run_engine(db_url, tmp_path / "home", faculties_dir=toml.parent,
                          options=SLOW_POLL):
        wid = (await db.submit_work(NewWorkItem("waiter", source="test"))).id

        async def waiting() -> bool:
            return bool((await db.get_work_item(wid)).state == State.WAITING)
        await wait_until(waiting, 20)
        code, _, err = await run_cli(cli_env, tmp_path, "work", "signal", str(wid), "go",
                                       "--data", '{"n": 1}')
        assert code == 0, err
        item = await wait_finished(db, wid)
    assert item.state == State.COMPLETED, item.reason
    assert json.loads((tmp_path / "resume.json").read_text()) == {
        "event": "go", "payload": {"n": 1}}
    assert lines(tmp_path / "engage.runs") == ["1 unset", "2 1"]
    assert lines(tmp_path / "orient.runs") == ["run"]


async def test_a_wait_that_times_out_resumes_the_hook_saying_so(db, db_url, tmp_path):
    toml = write_toml_faculty(tmp_path, "timer",
                              hooks=suspending(tmp_path, '{"wait_for": "go", "timeout": 0.3}'))
    item = await run_one(db, db_url, tmp_path, toml)
    assert item.state == State.COMPLETED, item.reason
    resumed = json.loads((tmp_path / "resume.json").read_text())
    assert resumed["event"] == "go"
    assert resumed["timed_out"] is True
    assert "until" in resumed


async def test_a_signal_sent_before_the_hook_asks_resumes_it_without_suspending(
        db, db_url, tmp_path):
    toml = write_toml_faculty(tmp_path, "early", hooks=suspending(
        tmp_path, '{"wait_for": "go"}',
        before='animus work signal "$ANIMUS_WORK_ID" go --data \'"early"\' > /dev/null'))
    item = await run_one(db, db_url, tmp_path, toml)
    assert item.state == State.COMPLETED, item.reason
    assert item.suspensions == 0
    assert json.loads((tmp_path / "resume.json").read_text()) == {
        "event": "go", "payload": "early"}
    # the hook's second run is in the same attempt
    assert lines(tmp_path / "engage.runs")[1] == "1 1"


@pytest.mark.parametrize(("content", "reason"), [
    ('{"sleep": "soon"}', "suspend.json.sleep must be a number of seconds"),
    ("{sleep: 1}", "suspend.json is not valid JSON"),
    ('{"sleep": 1, "wait_for": "go"}', "exactly one of sleep, wait_for, approval"),
    ('{"wait_for": "go", "timeout": -1}', "suspend.json.timeout must be a number"),
    ('{"approval": {"role": "ops"}}', "suspend.json.approval.why must be"),
])
async def test_a_bad_suspend_json_fails_the_phase_saying_what_is_wrong(
        db, db_url, tmp_path, content, reason):
    toml = write_toml_faculty(tmp_path, "badsuspend", fields={"max_attempts": 1}, hooks={
        "engage": f"echo '{content}' > suspend.json"})
    item = await run_one(db, db_url, tmp_path, toml)
    assert item.state == State.DEAD
    assert "engage failed: engage hook wrote an unusable suspend.json: " in (item.reason or "")
    assert reason in (item.reason or "")


async def test_a_hook_asks_for_an_approval_and_runs_again_with_the_decision(
        db, db_url, server_url, tmp_path):
    t = tmp_path / "effects"
    t.mkdir()
    toml = write_toml_faculty(tmp_path, "approver", fields={"max_attempts": 1}, hooks={
        "orient": f"echo run >> {t}/orient.runs",
        "engage": f"""
            echo "${{ANIMUS_RESUMED:-0}}" >> {t}/engage.runs
            if [ -f resume.json ]; then cp resume.json engage-out.json; exit 0; fi
            echo '{{"approval": {{"why": "deploy 1.4", "quorum": 2}}}}' > suspend.json
        """})
    async with team(db_url, server_url, (("ann", "approver"), ("bob", "approver"))) as people:
        ann, bob = await people.db("ann"), await people.db("bob")
        async with run_engine(db_url, tmp_path / "home", faculties_dir=toml.parent,
                              options=SLOW_POLL) as run:
            assert run.problems == []
            wid = (await db.submit_work(NewWorkItem("approver", source="test"))).id
            await until_state(db, wid, State.WAITING)
            assert (await db.get_work_item(wid)).wait["kind"] == "approval"
            await ann.decide(wid, "approve", "looks right")
            assert (await db.get_work_item(wid)).state == State.WAITING  # 1 of 2
            await bob.decide(wid, "approve", "ok")
            item = await wait_finished(db, wid)
    assert item.state == State.COMPLETED
    decided = item.outcome.data["approval"]
    assert decided["approved"] is True
    assert decided["by"] == [people.name("ann"), people.name("bob")]
    assert decided["reason"] == "looks right; ok"
    assert lines(t / "orient.runs") == ["run"]  # replayed, not run again
    assert lines(t / "engage.runs") == ["0", "1"]


def test_suspend_json_requests_are_read_exactly():
    assert parse_suspend(b'{"sleep": 2}').seconds == 2.0
    wait = parse_suspend(b'{"wait_for": "go", "timeout": 5}')
    assert (wait.kind, wait.event, wait.timeout) == ("wait_for", "go", 5.0)
    approval = parse_suspend(b'{"approval": {"why": "deploy", "role": "ops", "quorum": 2}}')
    assert (approval.why, approval.role, approval.quorum) == ("deploy", "ops", 2)
    for bad in (b"[]", b'{"sleep": true}', b'{"wait_for": ""}', b'{"sleep": 1, "x": 2}',
                b'{"approval": {"why": "x", "quorum": 0}}'):
        with pytest.raises(InvalidInput, match=r"suspend\.json"):
            parse_suspend(bad)


# -- animus step ------------------------------------------------------------------------------------


async def test_animus_step_runs_once_and_replays_its_output_and_status(db, db_url, tmp_path):
    toml = write_toml_faculty(tmp_path, "stepper", fields=QUICK, hooks={"engage": f"""
        out=$(animus step fetch -- sh -c 'echo run >> {tmp_path}/fetch.runs; echo out')
        status=0
        checked=$(animus step check -- sh -c \\
            'echo run >> {tmp_path}/check.runs; echo no; echo "to stderr" >&2; exit 4') \\
            || status=$?
        printf '{{"out": "%s", "checked": "%s", "status": %s}}' "$out" "$checked" "$status" \\
            > engage-out.json
        if [ "$ANIMUS_ATTEMPT" = 1 ]; then echo "fails once" >&2; exit 1; fi
    """})
    item = await run_one(db, db_url, tmp_path, toml)
    steps = await db.steps(item.id)
    assert item.state == State.COMPLETED, item.reason
    assert item.attempts == 2
    assert item.outcome.data == {"out": "out", "checked": "no", "status": 4}
    assert lines(tmp_path / "fetch.runs") == ["run"]
    assert lines(tmp_path / "check.runs") == ["run"]
    assert [(s.position, s.name, s.attempt, s.result) for s in steps] == [
        (1, "fetch", 1, {"stdout": "out\n", "status": 0}),
        (2, "check", 1, {"stdout": "no\n", "status": 4})]


async def test_animus_step_is_answered_only_with_its_own_runs_token(db, db_url, tmp_path):
    """One port serves every hook run: a token of a run that has ended, or one that is no
    run's, gets no answer, and its command does not run."""
    t = tmp_path
    toml = write_toml_faculty(t, "tokens", fields={"max_attempts": 1}, hooks={
        "orient": f"""
            echo "$ANIMUS_STEP_TOKEN" > {t}/orient.token
            animus step first -- echo one > /dev/null
            echo '{{}}' > orient-out.json
        """,
        "engage": f"""
            stale=0; ANIMUS_STEP_TOKEN=$(cat {t}/orient.token) \
                animus step stale -- sh -c 'echo ran >> {t}/stale.runs' 2> {t}/stale.err \
                || stale=$?
            wrong=0; ANIMUS_STEP_TOKEN=0123456789abcdef0123456789abcdef \
                animus step wrong -- sh -c 'echo ran >> {t}/wrong.runs' 2> {t}/wrong.err \
                || wrong=$?
            own=$(animus step own -- echo mine)
            printf '{{"stale": %s, "wrong": %s, "own": "%s"}}' "$stale" "$wrong" "$own" \
                > engage-out.json
        """})
    item = await run_one(db, db_url, t, toml)
    assert item.state == State.COMPLETED, item.reason
    assert item.outcome.data["own"] == "mine"
    assert item.outcome.data["stale"] != 0
    assert item.outcome.data["wrong"] != 0
    for name in ("stale", "wrong"):
        assert not (t / f"{name}.runs").exists()
        assert "closed the connection before it answered" in (t / f"{name}.err").read_text()
    assert [s.name for s in await db.steps(item.id)] == ["first", "own"]


async def test_animus_step_in_another_order_dead_letters_the_item(db, db_url, tmp_path):
    toml = write_toml_faculty(tmp_path, "reorder", fields=QUICK, hooks={"engage": """
        if [ "$ANIMUS_ATTEMPT" = 1 ]; then animus step first -- true; exit 1; fi
        animus step second -- true || true
    """})
    item = await run_one(db, db_url, tmp_path, toml)
    assert item.state == State.DEAD
    assert item.attempts == 2
    assert "StepOrderChanged: step 1 is 'first'" in (item.reason or "")


async def test_animus_step_refuses_the_engines_step_names_and_runs_only_in_hooks(
        db, db_url, tmp_path, cli_env):
    toml = write_toml_faculty(tmp_path, "reserved", fields={"max_attempts": 1}, hooks={"engage": """
        animus step "phase engage" -- true
    """})
    item = await run_one(db, db_url, tmp_path, toml)
    assert item.state == State.DEAD
    assert "starts with 'phase ' or 'suspend '" in (item.reason or "")
    code, _, err = await run_cli(cli_env, tmp_path, "step", "fetch", "--", "true")
    assert code == 2
    assert "animus step runs inside an orient, engage or consolidate hook" in err


async def test_steps_before_a_suspension_replay_when_the_hook_resumes_and_after_a_retry(
        db, db_url, tmp_path):
    # engage fetches, suspends, is resumed and finishes; consolidate then fails once: the
    # retry runs engage again (it resumed a suspension) with the same resume.json, replaying
    # its fetch and the wait, and orient not at all
    hooks = suspending(tmp_path, '{"sleep": 0.2}', before=(
        f"animus step fetch -- sh -c 'echo run >> {tmp_path}/fetch.runs; echo fetched' "
        f"> /dev/null"))
    hooks["consolidate"] = f"""
        echo "$ANIMUS_ATTEMPT" >> {tmp_path}/consolidate.runs
        animus step after -- sh -c 'echo run >> {tmp_path}/after.runs'
        if [ "$ANIMUS_ATTEMPT" = 2 ]; then exit 5; fi
        cp engage-out.json consolidate-out.json
    """
    toml = write_toml_faculty(tmp_path, "resumer", fields=QUICK, hooks=hooks)
    item = await run_one(db, db_url, tmp_path, toml)
    steps = await db.steps(item.id)
    assert item.state == State.COMPLETED, item.reason
    assert (item.attempts, item.suspensions) == (3, 1)
    assert lines(tmp_path / "orient.runs") == ["run"]
    assert lines(tmp_path / "fetch.runs") == ["run"]
    assert lines(tmp_path / "after.runs") == ["run"]
    assert lines(tmp_path / "engage.runs") == ["1 unset", "2 1", "3 1"]
    assert lines(tmp_path / "consolidate.runs") == ["2", "3"]
    assert [(s.position, s.name) for s in steps] == [
        (1, "fetch"), (2, "suspend engage"), (3, "sleep"), (4, "after")]
    assert item.outcome.data["resumed"]["slept"] is True


def test_the_hook_contract_page_names_the_durable_variables():
    text = (Path(__file__).resolve().parent.parent / "docs" / "hook-contract.md").read_text()
    assert all(name in text for name in DURABLE_ENV)


# -- a killed engine --------------------------------------------------------------------------------


@pytest.fixture
def engines(cli_env: dict[str, str], tmp_path: Path) -> Iterator[Any]:
    env = {**cli_env, "ANIMUS_FACULTIES": "faculties", "ANIMUS_HOME": str(tmp_path / "home"),
           "ANIMUS_DISABLE_PLUGIN_AUTOLOAD": "1", "LOG_LEVEL": "info"}
    with engine_processes(env, tmp_path) as start:
        yield start


@pytest.mark.slow
async def test_a_step_killed_with_its_engine_runs_again_and_once_recorded_is_replayed(
        db, db_url, tmp_path, engines):
    t = tmp_path
    write_toml_faculty(t, "killed", relative_to=t, fields=QUICK, hooks={"engage": f"""
        out=$(animus step fetch -- sh -c \\
            'echo "$ANIMUS_ATTEMPT" >> {t}/fetch.runs; [ -e {t}/release ] || exec sleep 60; echo fetched')
        echo "$ANIMUS_ATTEMPT" >> {t}/engage.runs
        if [ "$ANIMUS_ATTEMPT" = 2 ]; then exit 1; fi
        printf '{{"out": "%s"}}' "$out" > engage-out.json
    """})
    first = engines("--lease", "2", "--poll", "0.5")
    await wait_listening(db_url, [first])
    wid = (await db.submit_work(NewWorkItem("killed", source="test"))).id
    await wait_until(lambda: lines(t / "fetch.runs") == ["1"], 20,
                     message="the step's command to start")
    first.signal(signal.SIGKILL)
    await first.wait(10)
    (t / "release").touch()
    second = engines("--lease", "2", "--poll", "0.5")
    item = await wait_finished(db, wid, 60)
    steps = await db.steps(wid)
    assert second.alive()
    assert item.state == State.COMPLETED, item.reason
    assert item.outcome.data == {"out": "fetched"}
    # killed before it was recorded: run again by attempt 2, which recorded it; attempt 2
    # failed after, and attempt 3 replayed it
    assert lines(t / "fetch.runs") == ["1", "2"]
    assert lines(t / "engage.runs") == ["2", "3"]
    assert [(s.name, s.attempt, s.result) for s in steps] == [
        ("fetch", 2, {"stdout": "fetched\n", "status": 0})]


# -- the documented example -------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = "### A durable example"


def test_the_documented_example_is_the_faculty_in_the_repository():
    (toml,) = code_blocks("hook-contract.md", EXAMPLE, "toml")
    (engage,) = code_blocks("hook-contract.md", EXAMPLE, "bash")
    assert toml == (ROOT / "faculties" / "durable.toml").read_text()
    assert engage == (ROOT / "faculties" / "durable" / "engage.sh").read_text()


async def test_the_documented_example_runs(db, db_url, tmp_path, cli_env, monkeypatch):
    monkeypatch.chdir(ROOT)  # its commands are relative to the repository
    (submit, shown), (signal_args, _) = console_examples("hook-contract.md", EXAMPLE)
    outcome = {"words": 3, "approved": True, "note": "ship it"}
    assert json.dumps(outcome).replace("True", "true") in doc_section("hook-contract.md",
                                                                      EXAMPLE)
    async with run_engine(db_url, tmp_path / "home", faculties_dir=ROOT / "faculties",
                          options=SLOW_POLL) as run:
        assert run.problems == []
        code, out, err = await run_cli(cli_env, tmp_path, *submit)
        assert code == 0, err
        assert out.split()[0] == shown[0].split()[0] == "created"
        wid = out.split()[1]

        async def waiting() -> bool:
            return bool((await db.get_work_item(wid)).state == State.WAITING)
        await wait_until(waiting, 20)
        documented_id = shown[0].split()[1]
        code, _, err = await run_cli(cli_env, tmp_path,
                                     *[a.replace(documented_id, wid) for a in signal_args])
        assert code == 0, err
        item = await wait_finished(db, wid)
        steps = await db.steps(wid)
    assert item.state == State.COMPLETED, item.reason
    assert item.outcome.data == outcome
    assert [s.name for s in steps] == ["phase orient", "count", "suspend engage", "wait for go",
                                       "phase engage"]


async def test_an_engine_that_stops_closes_the_step_server_its_hooks_used(db, db_url, tmp_path):
    """The step server's idle wait ends with the engine: a loop that closes within it (an
    engine run with ``asyncio.run``) must not leave the socket listening with nobody to
    serve it."""
    toml = write_toml_faculty(tmp_path, "where", hooks={
        "engage": 'printf \'{"address": "%s"}\' "$ANIMUS_STEP_ADDRESS" > engage-out.json'})
    item = await run_one(db, db_url, tmp_path, toml)
    assert item.state == State.COMPLETED, item.reason
    host, port = item.outcome.data["address"].rsplit(":", 1)
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(host, int(port))


async def test_a_run_cancelled_while_the_step_server_opens_does_not_keep_it_open(monkeypatch):
    """A hook run cancelled while the listening socket is being opened leaves no trace: the
    server then closes once idle, as after any other run."""
    monkeypatch.setattr(durable_hooks, "IDLE_CLOSE", 0.1)
    monkeypatch.setattr(durable_hooks, "_listener", None)  # a listener of its own
    opened = asyncio.Event()
    real = asyncio.start_server

    async def slow_start(*args: Any, **kwargs: Any) -> Any:
        server = await real(*args, **kwargs)
        opened.set()
        await asyncio.sleep(10)  # cancelled here
        return server

    monkeypatch.setattr(asyncio, "start_server", slow_start)
    cancelled = StepServer(cast(DurableFocus, None))
    task = asyncio.create_task(cancelled.__aenter__())
    await asyncio.wait_for(opened.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    monkeypatch.setattr(asyncio, "start_server", real)
    run = StepServer(cast(DurableFocus, None))
    async with run:
        host, port = run.env["ANIMUS_STEP_ADDRESS"].rsplit(":", 1)
    await asyncio.sleep(0.4)
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(host, int(port))


async def test_the_step_server_stays_open_between_hook_runs_then_closes(monkeypatch):
    """One port for hook runs that follow each other (opening one per run cost about as
    much as the rest of the engine's work on short foci); closed once idle for a while."""
    monkeypatch.setattr(durable_hooks, "IDLE_CLOSE", 0.2)
    first = StepServer(cast(DurableFocus, None))
    async with first:
        address = first.env["ANIMUS_STEP_ADDRESS"]
    second = StepServer(cast(DurableFocus, None))
    async with second:  # straight after: the same server
        assert second.env["ANIMUS_STEP_ADDRESS"] == address
    host, port = address.rsplit(":", 1)
    _reader, writer = await asyncio.open_connection(host, int(port))  # still open
    writer.close()
    await writer.wait_closed()
    await asyncio.sleep(0.5)
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(host, int(port))


async def test_a_connection_that_sends_nothing_is_closed(monkeypatch):
    """A local process that connects to the step server and sends nothing does not hold a
    task and a socket for ever."""
    monkeypatch.setattr(durable_hooks, "ASK_WITHIN", 0.2)
    run = StepServer(cast(DurableFocus, None))
    async with run:
        host, port = run.env["ANIMUS_STEP_ADDRESS"].rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
        finally:
            writer.close()


async def test_a_rerun_from_the_end_of_a_phase_replays_its_hooks_wait(db, db_url, tmp_path,
                                                                       monkeypatch):
    """``animus work rerun --from-step "phase engage"`` of the documented example copies the
    steps before it, the wait for ``go`` among them: the hook suspends again on its fresh
    run, and that suspension is the recorded one, replayed with the signal it took (it did
    not wait again for a second ``go``)."""
    monkeypatch.chdir(ROOT)
    async with run_engine(db_url, tmp_path / "home", faculties_dir=ROOT / "faculties",
                          options=SLOW_POLL):
        first = (await db.submit_work(NewWorkItem("durable").params(
            {"text": "three little words"}))).id
        await until_state(db, first, State.WAITING)
        await db.signal(first, "go", "ship it")
        assert (await wait_finished(db, first)).state == State.COMPLETED
        rerun = await db.submit_from_step(
            NewWorkItem("durable").params({"text": "three little words"}).replay_of(first),
            from_id=first, step="phase engage")
        item = await wait_finished(db, rerun.canonical_id, timeout=20)
        steps = await db.steps(rerun.canonical_id)
    assert item.state == State.COMPLETED, item.reason
    assert item.outcome.data == {"words": 3, "approved": True, "note": "ship it"}
    assert [(s.name, s.copied_from == first) for s in steps] == [
        ("phase orient", True), ("count", True), ("suspend engage", True),
        ("wait for go", True), ("phase engage", False)]
