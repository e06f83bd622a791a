"""Size limits on what animus stores, so that one submission or one hook cannot fill the
database (an outcome is stored twice: on the item and in its audit row).

Each limit has a default and an environment variable; a value over a limit is refused with
an error that names the limit, and nothing is stored. Reasons that animus writes itself
(a hook's failure, a retry note) are cut to the limit instead, after secrets are redacted.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Final

import msgspec

from animus_core.values.errors import ConfigError, InvalidInput
from animus_core.values.json_values import check

__all__ = ["Limits", "check_text", "clip", "limits"]

#: variable -> (field, default, smallest allowed)
SETTINGS: Final = {
    "ANIMUS_MAX_PARAMS_BYTES": ("params_bytes", 1 << 20, 1024),
    "ANIMUS_MAX_OUTCOME_BYTES": ("outcome_bytes", 1 << 20, 1024),
    "ANIMUS_MAX_REASON_CHARS": ("reason_chars", 8000, 200),
    "ANIMUS_MAX_SOURCE_CHARS": ("source_chars", 256, 16),
}


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    params_bytes: int = 1 << 20     # JSON text of a work item's params
    outcome_bytes: int = 1 << 20    # JSON text of an outcome (a hook's consolidate-out.json)
    reason_chars: int = 8000        # a reason: failure, cancellation, decision, dead letter
    source_chars: int = 256         # provenance: source and trigger

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Limits:
        env = os.environ if env is None else env
        values = {}
        for name, (field, default, least) in SETTINGS.items():
            text = env.get(name, "").strip()
            if not text:
                values[field] = default
                continue
            try:
                n = int(text)
            except ValueError:
                n = -1
            if n < least:
                raise ConfigError(f"{name}={text!r} must be an integer of at least {least} "
                                  f"(default {default})")
            values[field] = n
        return cls(**values)


@functools.cache
def limits() -> Limits:
    """The limits of this process, read from its environment once."""
    return Limits.from_env()


def check_text(text: object, what: str, limit: int, setting: str) -> str:
    """``text`` if it is a string Postgres can store within ``limit`` characters."""
    if not isinstance(text, str):
        raise InvalidInput(f"{what} must be a string, got {type(text).__name__}")
    if len(text) > limit:
        raise InvalidInput(f"{what} is {len(text)} characters long, over the limit of {limit} "
                           f"({setting})")
    check(text, what)
    return text


def clip(text: str, limit: int | None = None) -> str:
    """``text`` cut to ``limit`` characters (the reason limit by default), saying so."""
    limit = limit or limits().reason_chars
    if len(text) <= limit:
        return text
    keep = limit - 40  # room for the marker
    return f"{text[:keep]} [... {len(text) - keep} more characters cut]"
