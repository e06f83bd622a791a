"""Durable steps across a killed engine: ``python -m animus_core up`` processes running a
Python faculty (tests/step_faculty.py, loaded through an ``animus`` entry point), SIGKILLed
inside a step and between steps. Every recorded step's side effect happened once; the step
that was running when the engine died runs again (at least once until its result commits);
the item completes once."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from animus_core import Created, NewWorkItem, State
from tests.conftest import ROOT
from tests.engine_helpers import (
    engine_processes,
    events,
    plugin_site,
    run_cli,
    wait_finished,
    wait_listening,
    wait_until,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def proc_env(cli_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """The environment of an engine (or CLI) process that loads tests/step_faculty.py."""
    site = plugin_site(tmp_path, "tests.step_faculty", "teststeps")
    env = {k: v for k, v in cli_env.items() if k != "ANIMUS_DISABLE_PLUGIN_AUTOLOAD"}
    env.update(ANIMUS_FACULTIES="faculties", ANIMUS_HOME=str(tmp_path / "home"),
               ANIMUS_PLUGINS="teststeps", LOG_LEVEL="info",
               PYTHONPATH=f"{site}:{ROOT}")
    return env


@pytest.fixture
def engines(proc_env: dict[str, str], tmp_path: Path) -> Iterator[Any]:
    """``engines("--lease", "2")`` starts an engine process; all are killed at the end."""
    with engine_processes(proc_env, tmp_path) as start:
        yield start


def counts(root: Path, names: list[str]) -> list[int]:
    return [len((root / f"{n}.count").read_text().split()) if (root / f"{n}.count").exists()
            else 0 for n in names]


@pytest.mark.parametrize(("hold", "expected"), [
    (["inside", "b"], [1, 2, 1]),   # b was running: it runs again, a is replayed
    (["between", "b"], [1, 1, 1]),  # a and b were recorded: both are replayed
])
async def test_an_engine_killed_in_a_focus_resumes_at_the_step_it_was_in(
        db, db_url, tmp_path, engines, proc_env, hold, expected):
    root = tmp_path / "effects"
    root.mkdir()
    first = engines("--lease", "2", "--poll", "0.5")
    await wait_listening(db_url, [first])
    created = await db.submit_work(NewWorkItem("durable", source="test").params(
        {"dir": str(root), "steps": ["a", "b", "c"], "hold": hold}))
    assert isinstance(created, Created)
    wid = created.id
    await wait_until(lambda: (root / "held").exists(), 30,
                     message=f"the first attempt to reach {hold}\n{first.output()}")
    first.signal(signal.SIGKILL)
    assert await first.wait(10) == -signal.SIGKILL
    recorded = [s.name for s in await db.steps(wid)]
    assert recorded == (["a"] if hold[0] == "inside" else ["a", "b"])

    second = engines("--lease", "2", "--poll", "0.5")
    await wait_listening(db_url, [second])
    item = await wait_finished(db, wid, 60)
    assert item.state == State.COMPLETED, second.output()
    assert item.outcome.data == {"results": ["a done", "b done", "c done"]}
    assert counts(root, ["a", "b", "c"]) == expected
    steps = await db.steps(wid)
    assert [(s.name, s.attempt) for s in steps] == [
        ("a", 1), ("b", 1 if hold[0] == "between" else 2), ("c", 2)]
    assert (await events(db, wid)).count("completed") == 1
    records = await db.executions(wid)
    assert [r.result for r in records] == ["lost", "completed"]
    assert records[-1].steps is not None
    assert [m["name"] for m in records[-1].steps["replayed"]] == recorded
    code, out, err = await run_cli(proc_env, tmp_path, "work", "explain", str(wid))
    assert code == 0, err
    lost, completed = out.split("\nattempt ")[1:]
    marks = ", ".join(f"{i}:{n}" for i, n in enumerate(recorded, 1))
    assert f"steps ran      {marks}\n" in lost
    assert f"steps replayed {marks}\n" in completed

