"""How a failed focus is put in words and classified, and the failures the engine raises
itself."""

from __future__ import annotations

from typing import Any

from animus_core.faculties.faculty import Faculty
from animus_core.values import json_values
from animus_core.values.canonical import canonical_hash
from animus_core.values.errors import InvalidInput, PhaseFailed

__all__ = ["NO_PARAMS_HASH", "Unrunnable", "describe", "failure_kind",
           "params_hash"]

NO_PARAMS_HASH = "none: the params cannot be read"  # an attempt refused before it ran


class Unrunnable(PhaseFailed):
    """The item cannot run at all (its stored params cannot be read): dead-lettered now."""

    final = True


def params_hash(params: Any) -> str:
    """The canonical hash of an item's params; :class:`Unrunnable` for params written around
    animus that it cannot read or hash (they are outside its JSON value model)."""
    if isinstance(params, json_values.Unreadable):
        raise Unrunnable(f"params cannot be read ({params.reason}): the item was written "
                         "around animus; it is dead-lettered without running")
    try:
        return canonical_hash(params, nfc=True)
    except (ValueError, TypeError, RecursionError):
        try:
            json_values.check(params, "params")
            problem = "they have no canonical form"
        except InvalidInput as e:
            problem = str(e)
        raise Unrunnable(f"params cannot be read ({problem}): the item was written around "
                         "animus; it is dead-lettered without running") from None


def failure_kind(e: BaseException, phase: str) -> str:
    """For the hook-failure metric: ``timeout``, ``bad_output``, ``exit_status`` or
    ``exception``."""
    if isinstance(e, TimeoutError):
        return "timeout"
    if isinstance(e, PhaseFailed):
        return e.kind
    if isinstance(e, InvalidInput) and phase == "consolidate":
        return "bad_output"  # the outcome cannot be stored
    return "exception"


def describe(e: BaseException, phase: str, fac: Faculty) -> str:
    """The failure reason for ``e`` (NUL, which Postgres text cannot hold, shown as U+FFFD)."""
    return _reason(e, phase, fac).replace("\x00", "\ufffd")


def _reason(e: BaseException, phase: str, fac: Faculty) -> str:
    if isinstance(e, TimeoutError):
        return f"timed out after {fac.timeout:g}s"
    if isinstance(e, PhaseFailed) or (isinstance(e, InvalidInput) and phase == "consolidate"):
        return str(e).strip()  # says it all (for consolidate: why the outcome cannot be stored)
    text = str(e).strip()
    name = type(e).__name__
    return f"{name}: {text}" if text else name
