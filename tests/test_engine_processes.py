"""The engine as it runs in production: ``python -m animus_core up`` processes, killed,
signalled and doubled up on one database, and the CLI commands around it.

Each engine runs in the test's ``tmp_path`` with ``ANIMUS_FACULTIES=faculties`` and hook
commands relative to that directory, as an operator would start it.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import re
import signal
import socket
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from animus_core import Created, Faculty, NewWorkItem, State
from animus_core.faculties.plugins import collect_faculties, make_plugin_manager
from animus_core.store import engines as engine_rows
from tests.engine_helpers import (
    engine_processes,
    engine_settings,
    events,
    kill_group,
    process_gone,
    run_cli,
    run_engine,
    run_process,
    wait_finished,
    wait_listening,
    wait_until,
    write_toml_faculty,
)
from tests.test_engines import info

pytestmark = pytest.mark.slow


@pytest.fixture
def proc_env(cli_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """The CLI's environment for an engine started in ``tmp_path``."""
    return {**cli_env, "ANIMUS_FACULTIES": "faculties", "ANIMUS_HOME": str(tmp_path / "home"),
            "ANIMUS_DISABLE_PLUGIN_AUTOLOAD": "1", "LOG_LEVEL": "info"}


@pytest.fixture
def engines(proc_env: dict[str, str], tmp_path: Path) -> Iterator[Any]:
    """``engines("--lease", "2")`` starts an engine process; all are killed at the end."""
    with engine_processes(proc_env, tmp_path) as start:
        yield start


def faculty(tmp_path: Path, name: str, **kwargs: Any) -> Path:
    return write_toml_faculty(tmp_path, name, relative_to=tmp_path, **kwargs)


async def submit(db: Any, new: NewWorkItem) -> Any:
    result = await db.submit_work(new)
    assert isinstance(result, Created)
    return result.id


# -- crash, sharing, shutdown -----------------------------------------------------------------------


async def test_engine_killed_mid_focus_work_is_redelivered_after_the_lease(
        db, db_url, tmp_path, engines):
    runs = tmp_path / "runs.log"
    faculty(tmp_path, "crashy", hooks={"engage": f"""
        echo "$ANIMUS_ATTEMPT $$" >> {runs}
        if [ "$ANIMUS_ATTEMPT" = 1 ]; then exec sleep 60; fi
        echo '{{"finished_on_attempt": '"$ANIMUS_ATTEMPT"'}}' > engage-out.json
    """})
    first = engines("--lease", "2", "--poll", "0.5")
    await wait_listening(db_url, [first])
    wid = await submit(db, NewWorkItem("crashy"))
    await wait_until(lambda: runs.exists() and runs.read_text().count("\n") >= 1,
                     message="the first attempt to start")
    first.signal(signal.SIGKILL)
    assert await first.wait(10) == -signal.SIGKILL
    hook_pid = int(runs.read_text().split()[1])
    kill_group(hook_pid)  # the orphaned hook; it would only sleep
    item = await db.get_work_item(wid)
    assert item.state == State.RUNNING
    assert item.attempts == 1

    second = engines("--lease", "2", "--poll", "0.5")
    item = await wait_finished(db, wid, timeout=30)
    assert item.state == State.COMPLETED, item.reason
    assert item.attempts == 2
    assert item.outcome.data == {"finished_on_attempt": 2}
    assert [line.split()[0] for line in runs.read_text().splitlines()] == ["1", "2"]
    history = await db.history(wid)
    trail = [e.event for e in history]
    assert trail == ["submitted", "claimed", "running", "failed", "queued",
                     "claimed", "running", "completed"]
    lost = history[trail.index("failed")]
    assert lost.payload["error"] == "lease expired while running (engine lost)"
    second.signal(signal.SIGTERM)
    assert await second.wait(30) == 0


def existing(paths: list[str]) -> list[str]:
    return [p for p in paths if Path(p).exists()]


def attempt_one_hook(pids: Path, runs: Path) -> str:
    """Attempt 1 starts a child in its process group and one that leaves it for a session of
    its own, and waits (five minutes), noting the three pids; attempt 2 notes which of those
    processes still run, then succeeds."""
    return f"""
        if [ "$ANIMUS_ATTEMPT" = 1 ]; then
            sleep 300 &
            child=$!
            python3 -c 'import os; os.setsid(); os.execvp("sleep", ["sleep", "300"])' &
            echo "$ANIMUS_FOCUS_DIR" >> {pids.with_suffix(".dirs")}
            echo "$$ $child $!" >> {pids}
            wait
        fi
        alive=""
        for pid in $(cat {pids}); do
            stat=$(cat /proc/$pid/stat 2>/dev/null || true)
            state=${{stat##*) }}
            if [ -n "$stat" ] && [ "${{state%% *}}" != Z ]; then
                what=$(tr '\\0' ' ' < /proc/$pid/cmdline 2>/dev/null || true)
                alive="$alive $pid(${{state%% *}}: $what)"
            fi
        done
        echo "$ANIMUS_WORK_ID $ANIMUS_ATTEMPT alive:$alive" >> {runs}
        echo '{{"attempt": '"$ANIMUS_ATTEMPT"'}}' > engage-out.json
    """


async def test_hooks_die_with_a_killed_engine_before_attempt_2_starts(db, db_url, tmp_path,
                                                                      engines):
    pids, runs = tmp_path / "attempt-1.pids", tmp_path / "runs.log"
    faculty(tmp_path, "stubborn", fields={"max_concurrent": 4},
            hooks={"engage": attempt_one_hook(pids, runs)})
    first = engines("--lease", "2", "--poll", "0.5")
    await wait_listening(db_url, [first])
    wids = [await submit(db, NewWorkItem("stubborn").params({"i": i})) for i in range(4)]
    await wait_until(lambda: pids.exists() and len(pids.read_text().splitlines()) == 4,
                     message="four first attempts to start their children")
    hook_pids = [int(p) for p in pids.read_text().split()]
    focus_dirs = pids.with_suffix(".dirs").read_text().split()
    assert len(focus_dirs) == 4
    try:
        first.signal(signal.SIGKILL)
        assert await first.wait(10) == -signal.SIGKILL
        assert existing(focus_dirs) == focus_dirs
        second = engines("--lease", "2", "--poll", "0.5")
        await wait_listening(db_url, [second])
        # the engine that starts next removes what the killed attempts left
        assert existing(focus_dirs) == []
        for wid in wids:
            item = await wait_finished(db, wid, timeout=30)
            assert item.state == State.COMPLETED, item.reason
            assert item.outcome.data == {"attempt": 2}
            # one execution record per attempt, the killed one's too
            records = [(r.attempt, r.result) for r in await db.executions(wid)]
            assert records == [(1, "lost"), (2, "completed")]
        seen = sorted(runs.read_text().splitlines())
        assert seen == sorted(f"{wid} 2 alive:" for wid in wids), \
            ("attempt 2 ran while processes of attempt 1 still ran:\n" + "\n".join(seen)
             + f"\nthe killed engine's log:\n{first.output()}")
        await wait_until(lambda: all(process_gone(p) for p in hook_pids), 10,
                         message="every process of the killed engine's hooks to be gone")
        second.signal(signal.SIGTERM)
        assert await second.wait(30) == 0
    finally:
        for pid in hook_pids:
            kill_group(pid)


async def test_a_hook_that_starts_a_daemon_ends_when_the_hook_does(db, db_url, tmp_path,
                                                                  engines):
    """A daemon the hook starts, its output sent elsewhere, holds none of the engine's pipes:
    the phase ends when the hook exits, not when the daemon does (nor at the timeout). The
    engine runs on uvloop, whose own subprocesses would leave the daemon their pipes."""
    pidfile = tmp_path / "daemon.pid"
    faculty(tmp_path, "starter", fields={"timeout": 20}, hooks={"engage": f"""
        setsid sleep 60 > /dev/null 2>&1 < /dev/null &
        echo $! > {pidfile}
        echo '{{"started": true}}' > engage-out.json
    """})
    engine = engines("--poll", "0.5")
    try:
        await wait_listening(db_url, [engine])
        wid = await submit(db, NewWorkItem("starter").max_attempts(1))
        item = await wait_finished(db, wid, timeout=15)
        assert "on uvloop" in engine.output()
        assert item.state == State.COMPLETED, item.reason
        assert item.outcome.data == {"started": True}
        assert not process_gone(int(pidfile.read_text()))  # it is the hook's to stop
    finally:
        if pidfile.exists():
            kill_group(int(pidfile.read_text()))


def watcher_of(engine_pid: int) -> int:
    """The pid of the hook watcher an engine process started."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == engine_pid and b"hookguard" in cmdline:
            return int(entry.name)
    raise AssertionError(f"engine process {engine_pid} has no hook watcher")


async def test_the_next_engine_kills_what_an_engine_and_its_watcher_left(db, db_url, tmp_path,
                                                                       engines):
    """Should the watcher die with its engine (the OOM killer may take both), the next engine
    to start with the same ANIMUS_HOME kills what the dead engine's hooks left running, as it
    removes their focus directories, before it claims anything."""
    pids, runs = tmp_path / "attempt-1.pids", tmp_path / "runs.log"
    faculty(tmp_path, "stubborn", fields={"max_concurrent": 4},
            hooks={"engage": attempt_one_hook(pids, runs)})
    first = engines("--lease", "60", "--poll", "0.5")
    await wait_listening(db_url, [first])
    for i in range(4):
        await submit(db, NewWorkItem("stubborn").params({"i": i}))
    await wait_until(lambda: pids.exists() and len(pids.read_text().splitlines()) == 4,
                     message="four first attempts to start their children")
    hook_pids = [int(p) for p in pids.read_text().split()]
    try:
        os.kill(watcher_of(first.pid), signal.SIGKILL)
        first.signal(signal.SIGKILL)
        assert await first.wait(10) == -signal.SIGKILL
        await asyncio.sleep(0.5)
        assert [p for p in hook_pids if process_gone(p)] == [], "nothing was left to kill"
        second = engines("--lease", "60", "--poll", "0.5")
        await wait_listening(db_url, [second])
        await wait_until(lambda: all(process_gone(p) for p in hook_pids), 5,
                         message="the next engine to kill what the dead one's hooks left")
        assert "killed the 8 process groups" in second.output(), second.output()
    finally:
        for pid in hook_pids:
            kill_group(pid)


async def test_two_engines_share_work_without_running_an_item_twice(
        db, db_url, tmp_path, engines):
    log = tmp_path / "foci.log"
    faculty(tmp_path, "shared", fields={"max_concurrent": 2}, hooks={"engage": f"""
        echo "start $ANIMUS_WORK_ID $PPID $(date +%s.%N)" >> {log}
        sleep 0.2
        echo "end $ANIMUS_WORK_ID $PPID $(date +%s.%N)" >> {log}
    """})
    a, b = engines(), engines()
    await wait_listening(db_url, [a, b])
    results = await db.submit_many([NewWorkItem("shared").params({"i": i}) for i in range(40)])
    wids = [r.id for r in results]
    for wid in wids:
        item = await wait_finished(db, wid, timeout=60)
        assert item.state == State.COMPLETED
        assert item.attempts == 1

    starts: dict[str, int] = defaultdict(int)
    timeline: dict[int, list[tuple[float, int]]] = defaultdict(list)
    for line in log.read_text().splitlines():
        kind, wid, pid, at = line.split()
        if kind == "start":
            starts[wid] += 1
        # At equal times an end sorts before a start.
        timeline[int(pid)].append((float(at), 1 if kind == "start" else -1))
    assert sorted(starts) == sorted(str(w) for w in wids)
    assert set(starts.values()) == {1}, "an item ran twice"
    assert set(timeline) == {a.pid, b.pid}, "both engines should have taken work"
    for pid, points in timeline.items():
        running = peak = 0
        for _, step in sorted(points):
            running += step
            peak = max(peak, running)
        assert peak <= 2, f"engine {pid} ran {peak} foci of a max_concurrent=2 faculty at once"
    for p in (a, b):
        p.signal(signal.SIGTERM)
    assert [await a.wait(30), await b.wait(30)] == [0, 0]


async def test_sigterm_drains_an_in_flight_focus(db, db_url, tmp_path, engines):
    marker = tmp_path / "started"
    faculty(tmp_path, "steady", hooks={"engage": f"""
        touch {marker}
        sleep 2
        echo '{{"drained": true}}' > engage-out.json
    """})
    engine = engines()
    await wait_listening(db_url, [engine])
    wid = await submit(db, NewWorkItem("steady"))
    await wait_until(marker.exists, message="the focus to start")
    engine.signal(signal.SIGTERM)
    assert await engine.wait(30) == 0, engine.output()
    # Finished and recorded before the process exited.
    item = await db.get_work_item(wid)
    assert item.state == State.COMPLETED
    assert item.outcome.data == {"drained": True}
    assert "draining" in engine.output()


async def test_sigterm_after_the_grace_period_releases_the_focus(db, db_url, tmp_path, engines):
    pidfile = tmp_path / "hook.pid"
    faculty(tmp_path, "endless", hooks={"engage": f"echo $$ > {pidfile}; exec sleep 30"})
    engine = engines("--grace", "1")
    await wait_listening(db_url, [engine])
    wid = await submit(db, NewWorkItem("endless"))
    await wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(),
                     message="the hook to start")
    hook_pid = int(pidfile.read_text())
    engine.signal(signal.SIGTERM)
    try:
        assert await engine.wait(20) == 0, engine.output()
        item = await db.get_work_item(wid)
        assert item.state == State.QUEUED
        assert item.reason is not None
        assert "shutdown" in item.reason
        assert item.attempts == 0  # a released attempt is given back
        assert (await events(db, wid))[-1] == "queued"
        await wait_until(lambda: process_gone(hook_pid), 5, message="the hook to be killed")
    finally:
        kill_group(hook_pid)


# -- the CLI around a running engine ----------------------------------------------------------------


async def test_status_json_shows_queues_running_foci_unroutable_and_dead_letters(
        db, db_url, tmp_path, engines, proc_env):
    marker = tmp_path / "running"
    faculty(tmp_path, "slow", hooks={"engage": f"touch {marker}; exec sleep 30"})
    faculty(tmp_path, "doomed", hooks={"engage": "echo 'no luck' >&2; exit 4"})
    engine = engines("--grace", "1")
    await wait_listening(db_url, [engine])
    await submit(db, NewWorkItem("slow"))
    doomed = await submit(db, NewWorkItem("doomed").max_attempts(1))
    await submit(db, NewWorkItem("nobody"))
    await submit(db, NewWorkItem("nobody"))
    await wait_until(marker.exists, message="the slow focus to start")
    assert (await wait_finished(db, doomed)).state == State.DEAD
    # a faculty only the CLI's own directory has is no engine's: status does not list it
    faculty(tmp_path, "ghost", hooks={"engage": "true"})

    async def slow_running() -> Any:
        code, out, err = await run_cli(proc_env, tmp_path, "status", "--json")
        assert code == 0, err
        report = json.loads(out)
        [eng] = report["engines"]
        by_name = {f["name"]: f for f in eng["faculties"]}
        return report if by_name["slow"]["running"] == 1 else None  # as of its last beat

    report = await wait_until(slow_running, 20, message="a heartbeat with the slow focus")
    work_queue = next(q for q in report["queues"] if q["queue"] == "work")
    assert work_queue["depth"] == 3  # slow (leased) and the two nobody; doomed's is archived
    [eng] = report["engines"]
    assert (eng["state"], eng["pid"], eng["concurrency"], eng["running"]) == (
        "live", engine.pid, 64, 1)
    by_name = {f["name"]: f for f in eng["faculties"]}
    assert set(by_name) == {"slow", "doomed", "pipeline"}  # the pipeline faculty is built in
    assert (by_name["slow"]["running"], by_name["slow"]["limit"]) == (1, 1)
    assert by_name["doomed"]["running"] == 0
    assert by_name["slow"]["origin"].endswith("slow.toml")
    assert report["work"]["slow"] == {"running": 1}
    assert report["stuck"] == [{"work_type": "nobody", "queued": 2, "reason":
                                "no live engine has a faculty that accepts it (unroutable)"}]
    assert set(report["oldest_queued"]) == {"nobody"}
    assert report["dead_letters"]["total"] == 1
    (latest,) = report["dead_letters"]["latest"]
    assert latest["id"] == str(doomed)
    assert latest["work_type"] == "doomed"
    assert "exited with status 4: no luck" in latest["reason"]
    code, out, err = await run_cli(proc_env, tmp_path, "status")
    assert code == 0, err
    assert "engines: 1 live" in out
    assert "ghost" not in out
    assert re.search(r"\nnobody +2 +no live engine has a faculty that accepts it", out), out

    engine.signal(signal.SIGTERM)
    assert await engine.wait(20) == 0
    # stopped cleanly: deregistered
    code, out, err = await run_cli(proc_env, tmp_path, "status", "--json")
    report = json.loads(out)
    assert report["engines"] == []
    assert report["stuck"][0]["reason"] == "no engine is running"


async def test_status_shows_a_disabled_faculty_and_why_its_work_is_stuck_and_a_lost_engine(
        db, db_url, tmp_path, engines, proc_env):
    faculty(tmp_path, "thinker", hooks={}, extra='[faculty.engage]\nmodel = "claude-x"\n')
    faculty(tmp_path, "plain", hooks={"engage": "true"})
    env_without_key = {k: v for k, v in proc_env.items() if k != "ANTHROPIC_API_KEY"}
    with engine_processes(env_without_key, tmp_path) as start:
        engine = start("--heartbeat", "0.3")
        await wait_listening(db_url, [engine])
        await submit(db, NewWorkItem("thinker"))

        async def registered() -> Any:
            code, out, err = await run_cli(proc_env, tmp_path, "status", "--json")
            assert code == 0, err
            report = json.loads(out)
            return report if report["engines"] and report["stuck"] else None

        report = await wait_until(registered, 20, message="the engine to register")
        [eng] = report["engines"]
        thinker = next(f for f in eng["faculties"] if f["name"] == "thinker")
        assert thinker["disabled"] == "ANTHROPIC_API_KEY not set"
        assert report["stuck"] == [{
            "work_type": "thinker", "queued": 1,
            "reason": f"its faculty is disabled on every live engine (thinker on "
                      f"{eng['host']}:{engine.pid}: ANTHROPIC_API_KEY not set)"}]
        _, out, _ = await run_cli(proc_env, tmp_path, "status")
        assert "disabled: ANTHROPIC_API_KEY not set" in out

        engine.signal(signal.SIGKILL)  # vanished: no deregistration
        await engine.wait(10)

        async def lost() -> Any:
            _, out, _ = await run_cli(proc_env, tmp_path, "status", "--json")
            [eng] = json.loads(out)["engines"]
            return eng if eng["state"] == "lost" else None

        eng = await wait_until(lost, 20, message="the killed engine to show as lost")
        assert eng["pid"] == engine.pid
        _, out, _ = await run_cli(proc_env, tmp_path, "status")
        assert "engines: 0 live, 1 lost" in out
        assert "no engine is running" in out


async def test_stop_asks_engines_to_drain_through_the_database(
        db, db_url, tmp_path, engines, proc_env):
    marker = tmp_path / "started"
    faculty(tmp_path, "nap", hooks={"engage": f"touch {marker}; sleep 1; echo '{{}}' > engage-out.json"})
    first, second = engines("--heartbeat", "0.5"), engines("--heartbeat", "0.5")
    await wait_listening(db_url, [first, second])
    rows = await wait_until(lambda: _registered(db_url, 2), 20, message="two engines")
    first_id = next(r["id"] for r in rows if r["pid"] == first.pid)

    # a notification alone stops nothing: the request must be in the engine's row
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute("SELECT pg_notify('animus_engines', $1)", str(first_id))
        await conn.execute("SELECT pg_notify('animus_engines', '*')")
    finally:
        await conn.close()
    await asyncio.sleep(1.5)
    assert first.alive()
    assert second.alive()

    wid = await submit(db, NewWorkItem("nap"))
    await wait_until(marker.exists, message="the focus to start")
    code, out, err = await run_cli(proc_env, tmp_path, "stop", "--engine", str(first_id)[:8],
                                   "--grace", "20", "--wait", "30")
    running_on_first = (await db.get_work_item(wid)).state
    assert code == 0, out + err
    assert f"asked engine {first_id} to stop within 20s" in out
    assert "stopped" in out
    assert await first.wait(10) == 0
    assert second.alive()
    item = await wait_finished(db, wid)
    assert item.state == State.COMPLETED  # drained (by whichever engine ran it)
    assert running_on_first in (State.RUNNING, State.COMPLETED)
    assert "an operator asked this engine to stop" in (first.output() + second.output())

    code, out, err = await run_cli(proc_env, tmp_path, "stop", "--all", "--wait", "30",
                                   "--json")
    assert code == 0, out + err
    assert json.loads(out)["still_running"] == []
    assert await second.wait(10) == 0
    code, out, err = await run_cli(proc_env, tmp_path, "stop", "--all")
    assert (code, out.strip()) == (0, "no live engine to ask")
    gone = info(heartbeat=0.1)  # an engine whose heartbeats stopped: lost
    await engine_rows.register(db, gone)
    await asyncio.sleep(0.4)
    code, out, err = await run_cli(proc_env, tmp_path, "stop", "--engine", str(gone.id))
    assert (code, out.strip()) == (0, f"engine {gone.id} is not live (it stopped, or its "
                                      "heartbeats did: `animus status` shows it lost): "
                                      "nothing to ask"), err
    code, out, err = await run_cli(proc_env, tmp_path, "stop")
    assert code == 2
    assert "--engine ID" in err


async def _registered(db_url: str, n: int) -> list[Any] | None:
    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetch("SELECT id, pid FROM animus.engines")
    finally:
        await conn.close()
    return list(rows) if len(rows) == n else None


async def test_work_submit_wait_prints_the_outcome(db, db_url, tmp_path, engines, proc_env):
    faculty(tmp_path, "upper", hooks={"engage": r"""
        text=$(sed -n 's/.*"text":"\([^"]*\)".*/\1/p' work.json)
        printf '{"upper":"%s"}' "$(printf '%s' "$text" | tr a-z A-Z)" > engage-out.json
    """})
    engine = engines()
    await wait_listening(db_url, [engine])
    code, out, err = await run_cli(proc_env, tmp_path, "work", "submit", "upper",
                                   "--param", "text=shout", "--wait", "--timeout", "30")
    assert code == 0, err
    lines = dict(line.split(None, 1) for line in out.splitlines() if line.strip())
    assert lines["state:"] == "completed"
    assert json.loads(lines["outcome:"]) == {"upper": "SHOUT"}
    # the id first, then each change as it happens, on standard error
    progress = err.splitlines()
    assert progress[0] == f"submitted {lines['id:']}"
    steps = [line.split(None, 1)[1] for line in progress[1:]]
    assert steps[0].startswith("submitted by ")
    assert steps[1] == f"claimed by engine@{socket.gethostname()}:{engine.pid}"
    assert steps[2] == "attempt 1 running"
    assert steps[3].startswith("completed: in ")
    assert "warning" not in err  # an engine runs it

    code, out, err = await run_cli(proc_env, tmp_path, "work", "submit", "upper",
                                   "--param", "text=again", "--wait", "--json", "--timeout", "30")
    assert code == 0, err
    item = json.loads(out)
    assert item["state"] == "completed"
    assert item["outcome"]["data"] == {"upper": "AGAIN"}
    code, out, err = await run_cli(proc_env, tmp_path, "work", "follow", item["id"])
    assert code == 0, err
    assert "completed" in out
    assert f"claimed by engine@{socket.gethostname()}:{engine.pid}" in err
    engine.signal(signal.SIGTERM)
    assert await engine.wait(20) == 0


async def test_submit_says_when_no_live_engine_would_run_the_work_and_wait_says_why(
        db, db_url, tmp_path, engines, proc_env):
    """Submitting a type no faculty accepts was silent, and --wait then blamed a missing
    engine while one ran."""
    faculty(tmp_path, "upper", hooks={"engage": "true"})
    engine = engines("--heartbeat", "0.5")
    await wait_listening(db_url, [engine])
    await wait_until(lambda: _registered(db_url, 1), 20, message="the engine to register")
    code, out, err = await run_cli(proc_env, tmp_path, "work", "submit", "nobody", "--strict")
    assert code == 2, out + err
    assert ("no live engine would run work type 'nobody': no live engine has a faculty that "
            "accepts it (unroutable); not submitted (--strict)") in err
    assert await db.list_work(work_type="nobody") == []
    code, out, err = await run_cli(proc_env, tmp_path, "work", "submit", "nobody", "--wait",
                                   "--timeout", "1")
    assert code == 1
    assert "animus: warning: no live engine would run work type 'nobody' now" in err
    assert ("still queued after 1s: it is queued and no live engine will run it: no live "
            "engine has a faculty that accepts it (unroutable)") in err
    assert "is an engine running" not in err
    [queued] = await db.list_work(work_type="nobody")  # a warning: it was submitted
    assert queued.state == State.QUEUED
    code, out, err = await run_cli(proc_env, tmp_path, "work", "submit", "upper",
                                   "--queue", "other", "--strict")
    assert code == 2  # a queue that does not exist: the submission's own error, no warning
    assert err.strip().splitlines() == [
        'animus: error: queue "other" does not exist: create it with `animus queue create '
        'other` (in Python Db.create_queue; animus db migrate creates the default queue)']
    await db.create_queue("other")
    code, out, err = await run_cli(proc_env, tmp_path, "work", "submit", "upper",
                                   "--queue", "other", "--strict")
    assert code == 2
    assert "no live engine serves queue 'other'" in err

    # Ctrl-C while following: the item goes on, and the command says how to follow it again
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "animus_core", "work", "submit", "nobody", "-p", "n=2", "--wait",
        env=proc_env, cwd=tmp_path, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    first = await asyncio.wait_for(proc.stderr.readline(), 30)
    while first.startswith(b"animus: warning"):
        first = await asyncio.wait_for(proc.stderr.readline(), 30)
    wid = first.decode().split()[1]
    proc.send_signal(signal.SIGINT)
    _, rest = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 130
    assert (f"stopped following {wid}; it goes on without you. Follow it again with "
            f"`animus work follow {wid}`") in rest.decode()
    assert (await db.get_work_item(wid)).state == State.QUEUED
    engine.signal(signal.SIGTERM)
    assert await engine.wait(20) == 0


async def test_faculty_check_names_file_and_field(tmp_path, proc_env):
    bad = tmp_path / "bad"
    write_toml_faculty(bad, "good", hooks={"engage": "true"}, relative_to=tmp_path)
    noexec = write_toml_faculty(bad, "noexec", hooks={"engage": "true"}, relative_to=tmp_path)
    (bad / "hooks" / "noexec-engage.sh").chmod(0o644)
    (bad / "faculties" / "unknown.toml").write_text(
        '[faculty]\nname = "u"\naccepts = ["u"]\ncolour = "red"\n')
    env = {**proc_env, "ANIMUS_FACULTIES": str(bad / "faculties")}
    code, out, err = await run_cli(env, tmp_path, "faculty", "check")
    assert code == 2, out + err
    assert f"{noexec}: faculty.engage.command" in out
    assert "is not executable" in out
    assert f"{bad / 'faculties' / 'unknown.toml'}" in out
    assert "colour" in out
    assert "ok       good" in out

    good = tmp_path / "good"
    write_toml_faculty(good, "good", hooks={"orient": "true", "engage": "true"},
                       relative_to=tmp_path)
    env = {**proc_env, "ANIMUS_FACULTIES": str(good / "faculties")}
    code, out, err = await run_cli(env, tmp_path, "faculty", "check")
    assert code == 0, out + err
    assert f"ok       good ({good / 'faculties' / 'good.toml'})" in out
    assert "faculties, no problems" in out
    assert "error" not in out


async def test_faculty_new_scaffolds_a_package_that_imports_and_runs(
        db, db_url, tmp_path, proc_env, monkeypatch):
    code, out, err = await run_cli(proc_env, tmp_path, "faculty", "new", "scaffolded",
                                   "--dir", str(tmp_path / "pkgs"))
    assert code == 0, err
    assert "created" in out
    root = tmp_path / "pkgs" / "animus-faculty-scaffolded"
    for rel in ("pyproject.toml", "README.md", "animus_faculty_scaffolded/__init__.py",
                "animus_faculty_scaffolded/py.typed", "tests/test_scaffolded.py"):
        assert (root / rel).is_file(), rel
    assert 'scaffolded = "animus_faculty_scaffolded"' in (root / "pyproject.toml").read_text()
    # A second time refuses to overwrite.
    code, _, err = await run_cli(proc_env, tmp_path, "faculty", "new", "scaffolded",
                                 "--dir", str(tmp_path / "pkgs"))
    assert code == 2
    assert "already exists" in err

    monkeypatch.syspath_prepend(str(root))
    module = importlib.import_module("animus_faculty_scaffolded")
    try:
        settings = engine_settings(db_url, tmp_path / "home")
        pm, _ = make_plugin_manager(settings)
        pm.register(module, name="scaffolded")
        faculties, problems = await collect_faculties(pm, settings)
        assert problems == []
        (fac,) = [f for f in faculties if f.name == "scaffolded"]
        assert isinstance(fac, Faculty)
        assert fac.origin == "scaffolded"
        # Its example runs in a real engine.
        async with run_engine(db_url, tmp_path / "home", plugins={"scaffolded": module}):
            wid = await submit(db, NewWorkItem("scaffolded").params(fac.example or {}))
            item = await wait_finished(db, wid)
        assert item.state == State.COMPLETED, item.reason
        assert item.outcome.data == {"length": 5}
    finally:
        sys.modules.pop("animus_faculty_scaffolded", None)


async def test_faculty_new_generated_tests_pass(tmp_path, proc_env):
    code, _, err = await run_cli(proc_env, tmp_path, "faculty", "new", "gen", "--dir", str(tmp_path))
    assert code == 0, err
    root = tmp_path / "animus-faculty-gen"
    env = {k: v for k, v in proc_env.items() if not k.startswith("PYTEST")}
    env["PYTHONPATH"] = str(root)
    code, out, err = await run_process(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], env, root)
    assert code == 0, out + err
