"""Every hook animus defines, in one place (pluggy project name ``animus``).

Implement hooks with :data:`animus_core.hookimpl`. pluggy calls every hook with keyword
arguments and hands each implementation the ones it names, so a registration or lifecycle
hook may accept any subset of them. Lifecycle and focus hooks may be ``async def``.
Registration hooks run while the engine or the command line is being assembled and must be
plain functions, except ``register_faculties``, which may also be async.

There are three kinds of hooks:

* **registration** hooks, called once when the engine or CLI starts, which hand the plugin a
  ``register`` callback so that the rules (unique names, one faculty per work type) stay in
  the core: :func:`register_faculties`, :func:`register_commands`, ...;
* **lifecycle** hooks around the engine's life: :func:`startup`, :func:`shutdown`. Each
  implementation is called on its own, through pluggy (``startup(engine=...)``, its wrappers
  included), and what it returns is awaited before the next one is called;
* **focus** hooks, the four phases of a faculty's work: :func:`orient`, :func:`engage`,
  :func:`consolidate`, :func:`recover` (``firstresult`` specs). They are *not* broadcast: the
  engine calls them through pluggy on the one faculty that accepts the work item's type,
  with keyword arguments (``engage(focus=..., oriented=...)``), leaving out every other
  faculty's implementations but not the wrappers. A faculty is a plugin object (a
  :class:`animus_core.Faculty` subclass) registered through :func:`register_faculties`; its
  phase methods are hook implementations without the marker, and each must take the whole
  signature of its spec: a faculty whose ``engage(self, focus)`` lacks ``oriented`` is
  refused when it is registered, not at its first item.

Any other plugin may **wrap** the phases of every faculty, TOML and Python alike, with
``@hookimpl(wrapper=True)`` (or pluggy's old-style ``hookwrapper=True``); a plain
implementation of a phase hook in a plugin that is not a faculty is refused when it is
registered (it would answer for every faculty). A wrapper runs where the phase runs: in a
worker thread for a faculty's sync method, on the event loop for an ``async def`` one.
Around an async phase, ``yield`` gives the wrapper the awaitable the faculty returned, not
its value: :func:`after` applies a function to the phase's result either way::

    @hookimpl(wrapper=True)
    def engage(focus, oriented):
        result = yield
        return after(result, lambda engaged: redact(engaged))

See docs/hooks.md ("Wrapping the phases").
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import pluggy

if TYPE_CHECKING:
    from animus_core.faculties.faculty import Faculty
    from animus_core.faculties.focus import Focus
    from animus_core.infra.config import Settings
    from animus_core.store.db import Db
    from animus_core.store.memory import Embedder, Memory

__all__ = [
    "EngineView",
    "FacultyRegistry",
    "after",
    "consolidate",
    "engage",
    "hookimpl",
    "hookspec",
    "orient",
    "recover",
    "register_commands",
    "register_embedders",
    "register_faculties",
    "register_tools",
    "shutdown",
    "startup",
]

hookspec = pluggy.HookspecMarker("animus")
#: mark a plugin's hook implementations with this (``@hookimpl``, ``@hookimpl(wrapper=True)``)
hookimpl = pluggy.HookimplMarker("animus")


# -- registration ------------------------------------------------------------------------


@hookspec
def register_faculties(register: Callable[[Faculty], None], settings: Settings) -> None:
    """Register the faculties this plugin provides.

    Called once when the engine (or a CLI command that needs faculties) starts. Call
    ``register(faculty)`` for each :class:`~animus_core.Faculty` instance. ``register``
    raises :class:`~animus_core.values.errors.ConfigError` when the faculty's name or one of its
    work types is already taken; the engine reports that with the plugin's name and skips
    the faculty. ``settings`` is the engine's configuration (for example
    ``settings.faculties_dir``, where the built-in TOML plugin looks).
    """


@hookspec
def register_embedders(register: Callable[[str, Callable[[Settings], Embedder]], None]) -> None:
    """Register embedders by name: ``register("name", factory)``.

    ``factory(settings)`` returns an :class:`~animus_core.faculties.embedders.Embedder`; it is called
    only when ``ANIMUS_EMBEDDER`` selects that name. A name already taken is refused with
    :class:`~animus_core.values.errors.ConfigError`. The built-ins (``hashing``, ``openai``,
    ``voyage``, ``sentence-transformers``) are registered through this same hook.
    """


@hookspec
def register_tools(register: Callable[..., None]) -> None:
    """Register tools the Claude engage loop may offer the model.

    ``register(function)`` derives the tool's name, description (the docstring) and JSON
    schema (the typed signature); ``register(function, name=..., description=...,
    input_schema=...)`` gives them explicitly; ``register(Tool(...))`` is also accepted. A
    parameter named ``focus`` receives the current :class:`~animus_core.faculties.focus.Focus` and is
    not shown to the model. A tool that raises returns an error result to the model.
    Faculties choose tools by name (``tools = [...]``).
    """


@hookspec
def register_commands(cli: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add sub-commands to the ``animus`` command line.

    ``cli`` is the top-level ``add_subparsers()`` object: call ``cli.add_parser(...)`` and
    give the parser a ``handler`` default, an ``async def handler(args) -> int`` returning
    the exit code.
    """


# -- lifecycle -----------------------------------------------------------------------------


class FacultyRegistry(Protocol):
    """The registered faculties, as :class:`EngineView` shows them: iterable, and by name
    and by the work types they accept."""

    by_name: dict[str, Faculty]
    by_type: dict[str, Faculty]

    def __iter__(self) -> Iterator[Faculty]: ...

    def __len__(self) -> int: ...


class EngineView(Protocol):
    """What a lifecycle hook may use of the engine it is given (``engine``)."""

    @property
    def db(self) -> Db: ...

    @property
    def faculties(self) -> FacultyRegistry: ...

    @property
    def settings(self) -> Settings: ...

    @property
    def pm(self) -> pluggy.PluginManager: ...

    @property
    def memory(self) -> Memory | None: ...

    def stop(self) -> None:
        """Ask the engine to drain and stop."""


@hookspec
def startup(engine: EngineView) -> None:
    """The engine is connected and its faculties are registered; it has not claimed work yet.

    A place to open clients or warm caches. Each implementation is called on its own, with
    ``engine=``, and awaited if it is async. An exception here is reported and stops the
    engine from starting (the implementations after it are not called).
    """


@hookspec
def shutdown(engine: EngineView) -> None:
    """The engine has drained (in-flight foci finished or released) and is about to close
    its database pool. Each implementation is called on its own, with ``engine=``, and
    awaited if it is async; an exception is reported and ignored, and the next
    implementation is called."""


# -- focus phases (called on the routed faculty only) ------------------------------------
#
# firstresult: the one faculty's implementation answers; wrappers see (and may replace) it.


@hookspec(firstresult=True)
def orient(focus: Focus) -> Any:
    """First phase: gather what the work needs (recall memories, read inputs).

    Returns the orientation, any JSON-serializable value, handed to :func:`engage` as
    ``oriented``. Raising fails the focus at this phase.
    """


@hookspec(firstresult=True)
def engage(focus: Focus, oriented: Any) -> Any:
    """Second phase: do the work (call a model, run a tool).

    ``oriented`` is what :func:`orient` returned. Returns the result handed to
    :func:`consolidate` as ``engaged``.
    """


@hookspec(firstresult=True)
def consolidate(focus: Focus, engaged: Any) -> Any:
    """Third phase: keep what matters (store memories, submit follow-up work).

    ``engaged`` is what :func:`engage` returned. The return value becomes the work item's
    outcome data (``None`` for no data).
    """


@hookspec(firstresult=True)
def recover(focus: Focus, error: str, phase: str) -> bool | None:
    """Called after any phase failed (exception, timeout, non-zero exit, unreadable output).

    ``error`` says what went wrong, ``phase`` where. Return ``False`` to dead-letter the item
    now; ``True`` or ``None`` to retry it (with exponential backoff and jitter) while
    attempts remain. If recover itself fails, the item is retried as if it returned ``None``
    and the recover failure is added to the reason.
    """


# -- wrapping the phases ---------------------------------------------------------------------


def after(result: Any, fn: Callable[[Any], Any]) -> Any:
    """``fn`` applied to a phase's result, whatever kind of faculty produced it.

    In a phase wrapper, ``result = yield`` is the value itself around a sync phase method,
    but the awaitable the method returned around an ``async def`` one. ``after`` returns
    ``fn(result)`` at once in the first case; in the second, a coroutine that awaits
    ``result`` and returns ``fn`` of its value (the engine awaits it in place of the
    phase's own). ``fn`` is a plain function: what it returns becomes the phase's result,
    what it raises fails the phase. It is not called when the phase raises.
    """
    if inspect.isawaitable(result):
        awaitable = result

        async def then() -> Any:
            return fn(await awaitable)

        return then()
    return fn(result)
