"""A plugin for the engine-process test of child work (tests/test_run_children.py), loaded
by ``animus up`` through an ``animus`` entry point the test writes.

The ``brood`` faculty runs ``params["kids"]`` children of the work type ``external`` (which
no faculty runs: the test finishes them) with ``focus.run_children`` and returns how they
ended. On its first attempt, with ``params["hold"]``, it stops once the children were
submitted (their step committed) and before it suspends, writes ``<params["dir"]>/held``
and waits to be killed.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from animus_core import Faculty, Focus, NewWorkItem, hookimpl
from animus_core.values.waits import Suspended

__all__ = ["Brood", "register_faculties"]


class Brood(Faculty):
    name = "brood"
    accepts = ("brood",)

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        kids = [NewWorkItem("external", source="brood").params({"n": n})
                for n in range(focus.params["kids"])]
        try:
            results = await focus.run_children(kids)
        except Suspended:
            if focus.params.get("hold") and focus.attempt == 1:
                (Path(focus.params["dir"]) / "held").write_text(f"{os.getpid()}\n")
                await asyncio.sleep(120)  # the engine is killed here
            raise
        return [{"id": str(r.id), "state": str(r.state), "outcome": r.outcome}
                for r in results]


@hookimpl
def register_faculties(register: Callable[[Faculty], None]) -> None:
    register(Brood())
