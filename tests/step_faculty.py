"""A plugin for the engine-process tests of durable steps (tests/test_step_processes.py),
loaded by ``animus up`` through an ``animus`` entry point the test writes.

The ``durable`` faculty runs the steps named in ``params["steps"]``; each step's body appends
a line to ``<dir>/<name>.count`` (its side effect). On the first attempt it can stop and
wait to be killed: ``params["hold"] = ["inside", NAME]`` inside step NAME's body,
``["between", NAME]`` after step NAME was recorded; ``<dir>/held`` says it got there.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from animus_core import Faculty, Focus, hookimpl

__all__ = ["Durable", "Waiter", "register_faculties"]


class Durable(Faculty):
    name = "durable"
    accepts = ("durable",)
    max_concurrent = 4

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        root = Path(focus.params["dir"])
        hold = focus.params.get("hold") if focus.attempt == 1 else None
        results = []
        for name in focus.params["steps"]:
            inside = hold == ["inside", name]
            results.append(await focus.step(name, _body, root, name, inside))
            if hold == ["between", name]:
                (root / "held").write_text(f"{os.getpid()}\n")
                await asyncio.sleep(120)  # the engine is killed here
        return {"results": results}


def _body(root: Path, name: str, hold: bool) -> str:
    """A step's side effect (sync: it runs in a worker thread)."""
    with (root / f"{name}.count").open("a") as f:
        f.write(f"{os.getpid()}\n")
    if hold:
        (root / "held").write_text(f"{os.getpid()}\n")
        time.sleep(120)  # the engine is killed here
    return f"{name} done"


class Waiter(Faculty):
    """Runs ``params["script"]``: ``["step", NAME]`` (its body appends to
    ``<dir>/<NAME>.count``), ``["sleep", SECONDS]`` or ``["wait", EVENT]``; returns what
    the steps and waits gave."""

    name = "waiter"
    accepts = ("waiter",)
    max_concurrent = 8

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        root = Path(focus.params["dir"])
        out: list[Any] = []
        for op, arg in focus.params["script"]:
            if op == "step":
                out.append(await focus.step(arg, _body, root, arg, False))
            elif op == "sleep":
                await focus.sleep(arg)
            else:
                out.append(await focus.wait_for(arg))
        return out


@hookimpl
def register_faculties(register: Callable[[Faculty], None]) -> None:
    register(Durable())
    register(Waiter())
