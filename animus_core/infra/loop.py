"""The event loop animus runs on: uvloop where it is installed, asyncio's own otherwise.

Every command runs its coroutine through :func:`run`. uvloop (libuv under asyncio's API)
turns the loop over in a fraction of the time asyncio's selector loop takes, which is what
short foci at low concurrency wait on: an engine running four 1 ms foci at a time completed
about 30% more of them a second on it. ``ANIMUS_EVENT_LOOP=asyncio`` chooses asyncio's own
loop; ``uvloop`` insists on uvloop (an error where it is not installed); unset, uvloop is used
when it can be imported.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

from animus_core.values.errors import ConfigError

__all__ = ["VARIABLE", "loop_factory", "loop_name", "run"]

VARIABLE = "ANIMUS_EVENT_LOOP"
_CHOICES = ("uvloop", "asyncio")
T = TypeVar("T")


def loop_factory(environ: Mapping[str, str] | None = None
                 ) -> Callable[[], asyncio.AbstractEventLoop]:
    """What makes the event loop ``ANIMUS_EVENT_LOOP`` asks for (see the module)."""
    env = os.environ if environ is None else environ
    choice = env.get(VARIABLE, "").strip().lower()
    if choice and choice not in _CHOICES:
        raise ConfigError(f"{VARIABLE}={env[VARIABLE]!r} is not an event loop animus knows: "
                          f"use one of {', '.join(_CHOICES)}, or leave it unset (uvloop where "
                          f"it is installed)")
    if choice == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError as e:
        if choice == "uvloop":
            raise ConfigError(f"{VARIABLE}=uvloop, but uvloop cannot be imported ({e}): install "
                              f"it (pip install uvloop), or unset {VARIABLE}") from None
        return asyncio.new_event_loop
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop`` or ``asyncio``: which loop ``loop`` is."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to its end on a new event loop of the kind chosen (:func:`loop_factory`),
    as :func:`asyncio.run` does."""
    try:
        factory = loop_factory()
    except ConfigError:
        main.close()  # never awaited: say nothing about it
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
