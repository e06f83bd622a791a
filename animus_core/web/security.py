"""The console's secret, its CSRF tokens and its limit on sign-in attempts."""

from __future__ import annotations

import hmac
import os
import secrets
import time
from collections import deque
from pathlib import Path

from animus_core.infra.config import Settings
from animus_core.values.errors import ConfigError

__all__ = ["LoginLimiter", "console_secret", "csrf_ok", "new_csrf"]

SECRET_ENV = "ANIMUS_WEB_SECRET"


def console_secret(settings: Settings, env: dict[str, str] | None = None, *,
                   create: bool = True) -> bytes:
    """``ANIMUS_WEB_SECRET``, or the secret in ``$ANIMUS_HOME/web-secret`` (made, readable
    by its owner only, on first use, unless not ``create``). It signs the session cookies and
    derives the people's database passwords: the console, ``animus mcp --bind`` and ``animus
    web user add`` must share it."""
    env = dict(os.environ) if env is None else env
    given = env.get(SECRET_ENV)
    if given:
        if len(given) < 32:
            raise ConfigError(f"{SECRET_ENV} must be at least 32 characters (`openssl rand "
                              "-hex 32` makes one)")
        return given.encode()
    path = Path(settings.home) / "web-secret"
    if not path.exists() and not create:
        raise ConfigError(f"no console secret: set {SECRET_ENV}, or run where {path} is (the "
                          "one `animus web user add` used: people's database passwords are "
                          "derived from it)")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    text = path.read_text().strip()
    if len(text) < 32:
        raise ConfigError(f"{path}: the console's secret is too short; delete the file to make "
                          "a new one (then add the console's people again)")
    return text.encode()


def new_csrf() -> str:
    return secrets.token_urlsafe(32)


def csrf_ok(expected: object, given: object) -> bool:
    return (isinstance(expected, str) and isinstance(given, str) and bool(expected)
            and hmac.compare_digest(expected.encode(), given.encode()))


class LoginLimiter:
    """At most ``attempts`` sign-ins per name that have not succeeded, and ``per_client`` per
    client address (people behind one proxy share one), within ``window`` seconds. An attempt
    counts from the moment it is made, so guesses sent at once are limited as guesses sent one
    after the other; a success forgets the name's attempts."""

    def __init__(self, attempts: int = 5, window: float = 300.0, per_client: int = 20) -> None:
        self.attempts = attempts
        self.per_client = per_client
        self.window = window
        self._tries: dict[str, deque[float]] = {}

    def attempt(self, name: str, client: str) -> float:
        """Seconds until another attempt is allowed (0: this one is, and it counts)."""
        now = time.monotonic()
        waits = [0.0]
        for key, limit in ((f"name:{name}", self.attempts),
                           (f"client:{client}", self.per_client)):
            times = self._tries.get(key)
            if times is None:
                continue
            while times and now - times[0] > self.window:
                times.popleft()
            if len(times) >= limit:
                waits.append(self.window - (now - times[0]))
        wait = max(waits)
        if wait == 0:
            for key in (f"name:{name}", f"client:{client}"):
                self._tries.setdefault(key, deque()).append(now)
            if len(self._tries) > 100_000:  # forget the oldest rather than grow forever
                for key in list(self._tries)[:50_000]:
                    del self._tries[key]
        return wait

    def succeeded(self, name: str, client: str) -> None:
        self._tries.pop(f"name:{name}", None)
        times = self._tries.get(f"client:{client}")
        if times:
            times.pop()  # the attempt that succeeded
