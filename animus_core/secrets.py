"""Keeping secret values out of everything animus writes.

A hook sees only the variables its faculty declares (``env = [...]`` and
``secrets = [...]``), but a hook may still print a secret it was given: in its stderr (which
becomes the failure reason), in its output files (which become the outcome). The redactor
knows the values of every variable a faculty lists under ``secrets`` plus any variable whose
name says it is a secret (``*KEY*``, ``*TOKEN*``, ``*SECRET*``, ``*PASSWORD*``,
``*CREDENTIAL*``, and ``DATABASE_URL``'s password), and replaces them with
``[redacted NAME]`` in failure reasons, outcomes, log records and span text before any of
these leave the process. Plain ``env`` values (a region, a base URL) are not redacted.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

__all__ = ["Redactor", "redactor"]

_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
_MIN_LENGTH = 6  # shorter values would redact ordinary words


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
                self._values[value] = name
        url = env.get("DATABASE_URL")
        if url:
            password = urlsplit(url).password
            if password and len(password) >= _MIN_LENGTH:
                self._values[password] = "DATABASE_URL password"
        if self._values:
            alternatives = sorted(self._values, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(v) for v in alternatives))

    def text(self, value: str) -> str:
        if self._pattern is None or not value:
            return value
        return self._pattern.sub(lambda m: f"[redacted {self._values[m.group(0)]}]", value)

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
