"""Keeping secret values out of everything animus writes.

A hook sees only the variables its faculty declares (``env = [...]`` and
``secrets = [...]``), but a hook may still print a secret it was given: in its stderr (which
becomes the failure reason), in its output files (which become the outcome). The redactor
knows the values of every variable a faculty lists under ``secrets`` plus any variable whose
name says it is a secret (``*KEY*``, ``*TOKEN*``, ``*SECRET*``, ``*PASSWORD*``,
``*CREDENTIAL*``, and ``DATABASE_URL``'s password), and replaces them with
``[redacted NAME]`` in failure reasons, outcomes, log records and span text before any of
these leave the process. Plain ``env`` values (a region, a base URL) are not redacted.

A value is also found where it is written in an escaped form: inside JSON text (as JSON, msgspec
and Postgres write a string, with or without ASCII escapes, also JSON kept in a JSON string)
and inside Python's ``repr``. Text is always redacted before it is cut to a length, so that a
cut cannot leave a part of a value that no longer matches.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = ["Redactor", "redactor"]

_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
_MIN_LENGTH = 6  # shorter values would redact ordinary words
#: JSON text inside a JSON string inside another: how deep escaped forms are looked for
_JSON_DEPTH = 3


def _py_escape(char: str) -> str:
    if char == "\\":
        return "\\\\"
    return char if char.isprintable() else repr(char)[1:-1]


def _forms(value: str) -> set[str]:
    """``value`` and the escaped forms in which animus may write it: in a JSON string, with
    and without ASCII escapes (json, msgspec and Postgres's jsonb output), nested up to
    ``_JSON_DEPTH`` strings deep (JSON text kept in a JSON string); in a Python ``repr``
    (either quote); and the text that JSON-escapes *to* ``value``, which Postgres would write
    as ``value`` itself."""
    forms = {value}
    layer = {value}
    for _ in range(_JSON_DEPTH):
        layer = {json.dumps(f, ensure_ascii=ascii_only)[1:-1]
                 for f in layer for ascii_only in (True, False)} - forms
        forms |= layer
    for form in list(forms):
        plain = "".join(map(_py_escape, form))
        forms |= {plain, plain.replace("'", "\\'")}
    try:
        unescaped = json.loads(f'"{value}"')
    except ValueError:
        pass
    else:
        if isinstance(unescaped, str):
            forms.add(unescaped)
    return {f for f in forms if len(f) >= _MIN_LENGTH}


class Redactor:
    def __init__(self) -> None:
        self._values: dict[str, str] = {}
        self._pattern: re.Pattern[str] | None = None

    def learn(self, env: Mapping[str, str], names: Iterable[str] = ()) -> None:
        """Remember the values of ``names`` and of every secret-looking variable in ``env``."""
        wanted = set(names) | {n for n in env if _SECRET_NAME.search(n)}
        for name in wanted:
            value = env.get(name)
            if value and len(value) >= _MIN_LENGTH:
                self._add(value, name)
        url = env.get("DATABASE_URL")
        if url:
            password = urlsplit(url).password
            if password:  # as written in the URL, and as the server knows it
                for form in {password, unquote(password)}:
                    if len(form) >= _MIN_LENGTH:
                        self._add(form, "DATABASE_URL password")
        if self._values:
            alternatives = sorted(self._values, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(v) for v in alternatives))

    def _add(self, value: str, name: str) -> None:
        for form in _forms(value):
            self._values[form] = name

    def text(self, value: str) -> str:
        if self._pattern is None or not value:
            return value
        return self._pattern.sub(lambda m: f"[redacted {self._values[m.group(0)]}]", value)

    def tail(self, output: bytes, limit: int) -> str:
        """The last ``limit`` characters of a command's output as text, redacted before the
        cut (a value the cut went through would otherwise leave its end behind). Bytes that
        are not UTF-8 match the same bytes in a value taken from the environment, and become
        U+FFFD afterwards."""
        text = self.text(output.decode("utf-8", "surrogateescape"))[-limit:]
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")

    def json(self, value: Any) -> Any:
        if self._pattern is None:
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.text(k): self.json(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.json(v) for v in value]
        return value


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if redactor._pattern is not None:
            message = redactor.text(record.getMessage())
            record.msg, record.args = message, None
        return True


#: The process-wide redactor: the engine teaches it at start.
redactor = Redactor()
redactor.learn(os.environ)
