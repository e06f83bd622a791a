"""The hook watcher on its own: a process that uses a :class:`HookGuard` is SIGKILLed, and
the watcher kills what it was told to and what carries its mark, and nothing else.

The engine's side runs in a child Python process (the "engine"), so that the test can kill it
the way an engine gets killed. No database is needed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import textwrap
from pathlib import Path

import pytest

from tests.engine_helpers import kill_group, process_gone, wait_until

ENGINE = textwrap.dedent('''
    import json, os, signal, subprocess, sys, time
    from animus_core.infra.hookguard import MARK_VARIABLE, HookGuard

    out = sys.argv[1]
    guard = HookGuard()
    guard.start()
    plain = {"PATH": os.environ["PATH"]}
    marked = {**plain, MARK_VARIABLE: guard.mark}

    def group(env, name):
        """A group leader that starts a child and notes its pid."""
        return subprocess.Popen(
            ["sh", "-c", f"sleep 300 & echo $! > {out}.{name}; wait"], env=env,
            start_new_session=True)

    watched = group(plain, "watched")        # named to the watcher, not marked
    escaped = subprocess.Popen(["sleep", "300"], env=marked, start_new_session=True)
    bystander = subprocess.Popen(["sleep", "300"], env=plain, start_new_session=True)
    finished = group(plain, "finished")      # named, then its end is announced
    guard.watch(watched.pid)
    guard.watch(finished.pid)
    guard.unwatch(finished.pid)
    # someone kills the watcher: the next start() brings one up that knows the groups
    first = guard._watcher
    first.kill()
    first.wait()
    late = group(plain, "late")
    guard.start()
    guard.watch(late.pid)
    # the shell creates each file before it writes the pid: wait for the pid itself
    while not all(os.path.exists(f"{out}.{n}") and os.path.getsize(f"{out}.{n}")
                  for n in ("watched", "finished", "late")):
        time.sleep(0.01)
    pids = {n: p.pid for n, p in [("watched", watched), ("escaped", escaped),
                                   ("bystander", bystander), ("finished", finished),
                                   ("late", late)]}
    for n in ("watched", "finished", "late"):
        pids[n + "_child"] = int(open(f"{out}.{n}").read())
    pids["watcher"] = guard._watcher.pid
    with open(out + ".tmp", "w") as f:
        json.dump(pids, f)
    os.rename(out + ".tmp", out)
    time.sleep(300)
''')


@pytest.mark.parametrize("kill", ["process", "process group"])
async def test_the_watcher_kills_what_a_killed_engine_s_hooks_left_and_nothing_else(
        tmp_path: Path, kill: str) -> None:
    """SIGKILL of the engine's process alone, or of its whole process group (a shell's
    ``kill -9 -PGID``): the watcher is not in that group."""
    out = tmp_path / "pids.json"
    script = tmp_path / "engine.py"
    script.write_text(ENGINE)
    log = tmp_path / "engine.log"
    with log.open("wb") as stderr:
        engine = await asyncio.create_subprocess_exec(
            sys.executable, str(script), str(out), stderr=stderr, start_new_session=True)
    pids: dict[str, int] = {}
    try:
        await wait_until(out.exists, 20, message="the engine to start its processes")
        pids = json.loads(out.read_text())
        if kill == "process":
            engine.send_signal(signal.SIGKILL)
        else:
            os.killpg(engine.pid, signal.SIGKILL)
        await engine.wait()
        doomed = ["watched", "watched_child", "escaped", "late", "late_child", "watcher"]
        await wait_until(lambda: all(process_gone(pids[n]) for n in doomed), 10,
                         message="the watcher to kill the hooks and exit")
        # not named (or no longer), not marked: not the watcher's to kill
        for name in ("bystander", "finished", "finished_child"):
            assert not process_gone(pids[name]), f"{name} was killed"
        assert "killed the 3 process groups" in log.read_text(), log.read_text()
    finally:
        if engine.returncode is None:
            engine.kill()
            await engine.wait()
        for pid in pids.values():
            kill_group(pid)
