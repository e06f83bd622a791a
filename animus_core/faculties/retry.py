"""What happens after a failed attempt: retry after a backoff, or dead-letter. Each faculty
owns its policy (:attr:`Faculty.retry_policy`); the engine asks it once per failure."""

from __future__ import annotations

import random
from dataclasses import dataclass

from animus_core.store.moves import DeadLetter, Retry
from animus_core.values.limits import clip

__all__ = ["RetryPolicy"]


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: ``base * 2 ** (attempt - 1)``, at most ``cap``
    seconds, times a random factor in [0.5, 1.5); ``max_attempts`` (when set) overrides the
    item's own."""

    base: float = 1.0
    cap: float = 300.0
    max_attempts: int | None = None

    def decide(self, reason: str, *, attempts: int, item_max_attempts: int,
               recover: bool | None, final: bool = False) -> Retry | DeadLetter:
        """After attempt number ``attempts`` failed with ``reason``. ``recover`` is what the
        faculty's recover phase answered (``False``: dead-letter now); ``final`` says that
        retrying cannot help (a rule refused the item), so recover was not asked."""
        limit = self.max_attempts or item_max_attempts
        if final:
            return DeadLetter(reason)
        if recover is False:
            return DeadLetter(clip(f"recover chose to dead-letter: {reason}"))
        if attempts >= limit:
            return DeadLetter(clip(f"attempts exhausted ({attempts}/{limit}): {reason}"))
        delay = min(self.cap, self.base * 2 ** (attempts - 1)) * random.uniform(0.5, 1.5)
        return Retry(delay, clip(f"retry {attempts + 1}/{limit} in {delay:.1f}s after {reason}"))
