"""A plugin for the engine-process test of the durable Claude loop
(tests/test_llm_processes.py), loaded by ``animus up`` through an ``animus`` entry point the
test writes.

The ``durable-llm`` faculty runs one agent loop with the ``jot`` tool, whose side effect is a
line appended to ``<dir>/jots``. On the first attempt, with ``params["hold"] == TEXT``, the
tool stops inside the call that jots TEXT and waits to be killed (``<dir>/held`` says it got
there). The engine's model is the test's local Messages API (``ANTHROPIC_BASE_URL``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from animus_core import Faculty, Focus, hookimpl

if TYPE_CHECKING:
    from animus_core.faculties.focus import Focus as ToolFocus

__all__ = ["DurableLLM", "register_faculties", "register_tools"]


class DurableLLM(Faculty):
    name = "durable-llm"
    accepts = ("durable-llm",)
    max_concurrent = 2
    requires_env = ("ANTHROPIC_API_KEY",)

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        result = await focus.agent(model="claude-sonnet-4-5", tools=["jot"], max_turns=10,
                                   message="Jot a, b and c, one per turn.")
        return {"text": result.text, "turns": result.turns,
                "usage": msgspec.structs.asdict(result.usage)}


def jot(focus: ToolFocus, text: str) -> str:
    """Jot something down (sync: it runs in a worker thread)."""
    root = Path(focus.params["dir"])
    with (root / "jots").open("a") as f:
        f.write(f"{text} {os.getpid()}\n")
    if focus.attempt == 1 and focus.params.get("hold") == text:
        (root / "held").write_text(f"{os.getpid()}\n")
        time.sleep(120)  # the engine is killed here
    return f"jotted {text}"


@hookimpl
def register_faculties(register: Callable[[Faculty], None]) -> None:
    register(DurableLLM())


@hookimpl
def register_tools(register: Callable[..., None]) -> None:
    register(jot)
