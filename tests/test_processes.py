"""Child processes awaited on the event loop (animus_core/infra/processes.py), on both loops
animus runs on, with and without a pidfd to wait through."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from animus_core.infra.loop import loop_factory
from animus_core.infra.processes import Child
from tests.engine_helpers import kill_group, process_gone

#: 200,000 bytes on standard output, 3 on standard error, exit status 3
LOUD = ["sh", "-c", "head -c 200000 /dev/zero; printf err >&2; exit 3"]


async def loud_and_daemon(pidfile: Path) -> tuple[int, int, bytes, int]:
    child = Child.start(LOUD)
    out, err = await asyncio.wait_for(child.communicate(), 20)
    # a daemon with its output elsewhere: the command's end is the end
    starter = Child.start(["sh", "-c", f"setsid sleep 60 > /dev/null 2>&1 < /dev/null & "
                                       f"echo $! > {pidfile}"], new_session=True)
    await asyncio.wait_for(starter.communicate(), 20)
    assert child.returncode is not None
    assert starter.returncode is not None
    return len(out), child.returncode, err, starter.returncode


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "thread"])
@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_output_and_exit_status_on_each_loop(tmp_path, monkeypatch, loop, pidfd):
    if not pidfd:
        monkeypatch.delattr(os, "pidfd_open")
    pidfile = tmp_path / "daemon.pid"
    factory = loop_factory({"ANIMUS_EVENT_LOOP": loop})
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            assert runner.run(loud_and_daemon(pidfile)) == (200_000, 3, b"err", 0)
        assert not process_gone(int(pidfile.read_text()))
    finally:
        if pidfile.exists():
            kill_group(int(pidfile.read_text()))


def test_a_command_that_cannot_start_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        Child.start([str(tmp_path / "nowhere")])


async def test_a_killed_group_ends_the_wait_with_the_signal():
    child = Child.start(["sh", "-c", "sleep 60 & sleep 60"], new_session=True)
    reading = asyncio.ensure_future(child.communicate())
    await asyncio.sleep(0.1)
    child.kill_group()
    await asyncio.wait_for(reading, 10)
    assert child.returncode == -9
