"""Every hook animus defines, in one place (pluggy project name ``animus``).

Implement hooks with :data:`animus_core.hookimpl`. All hooks are called with keyword
arguments; an implementation may accept any subset of them. Lifecycle and focus hooks may
be ``async def``: the engine awaits whatever an implementation returns through one helper
(:func:`animus_core.faculties.plugins.await_me_maybe`). Registration hooks run while the engine or
the command line is being assembled and must be plain functions, except
``register_faculties``, which may also be async.

There are three kinds of hooks:

* **registration** hooks, called once when the engine or CLI starts, which hand the plugin a
  ``register`` callback so that the rules (unique names, one faculty per work type) stay in
  the core: :func:`register_faculties`, :func:`register_commands`;
* **lifecycle** hooks around the engine's life: :func:`startup`, :func:`shutdown`;
* **focus** hooks, the four phases of a faculty's work: :func:`orient`, :func:`engage`,
  :func:`consolidate`, :func:`recover`. These are *not* broadcast to every plugin: the engine
  calls them on the one faculty that accepts the work item's type. A faculty is a plugin
  object (usually a :class:`animus_core.Faculty` subclass) registered through
  :func:`register_faculties`; its phase methods are checked against these specs when it is
  registered, so a misspelt argument is reported then, not at run time.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from animus_core.faculties.embedders import Embedder
    from animus_core.faculties.faculty import Faculty
    from animus_core.faculties.focus import Focus
    from animus_core.infra.config import Settings
    from animus_core.runtime.engine import Engine

__all__ = [
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


@hookspec
def startup(engine: Engine) -> None:
    """The engine is connected and its faculties are registered; it has not claimed work yet.

    A place to open clients or warm caches. An exception here is reported and stops the
    engine from starting.
    """


@hookspec
def shutdown(engine: Engine) -> None:
    """The engine has drained (in-flight foci finished or released) and is about to close
    its database pool. Exceptions are reported and ignored."""


# -- focus phases (called on the routed faculty only) ------------------------------------


@hookspec
def orient(focus: Focus) -> Any:
    """First phase: gather what the work needs (recall memories, read inputs).

    Returns the orientation, any JSON-serializable value, handed to :func:`engage` as
    ``oriented``. Raising fails the focus at this phase.
    """


@hookspec
def engage(focus: Focus, oriented: Any) -> Any:
    """Second phase: do the work (call a model, run a tool).

    ``oriented`` is what :func:`orient` returned. Returns the result handed to
    :func:`consolidate` as ``engaged``.
    """


@hookspec
def consolidate(focus: Focus, engaged: Any) -> Any:
    """Third phase: keep what matters (store memories, submit follow-up work).

    ``engaged`` is what :func:`engage` returned. The return value becomes the work item's
    outcome data (``None`` for no data).
    """


@hookspec
def recover(focus: Focus, error: str, phase: str) -> bool | None:
    """Called after any phase failed (exception, timeout, non-zero exit, unreadable output).

    ``error`` says what went wrong, ``phase`` where. Return ``False`` to dead-letter the item
    now; ``True`` or ``None`` to retry it (with exponential backoff and jitter) while
    attempts remain. If recover itself fails, the item is retried as if it returned ``None``
    and the recover failure is added to the reason.
    """
