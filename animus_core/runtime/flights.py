"""What the engine keeps per faculty (a slot: capacity and rate) and per running focus
(a flight: its claim, task and lease)."""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass, field

from animus_core.faculties.faculty import Faculty
from animus_core.values.waits import Resume
from animus_core.values.work import Claimed

__all__ = ["Flight", "Slot"]


@dataclass
class Slot:
    """One faculty's capacity in this engine: foci running, whether its queue may hold
    claimable work (*dirty*), and a token bucket for its rate limit."""

    faculty: Faculty
    running: int = 0
    dirty: bool = True
    #: a claim for it is in flight: a focus that finishes meanwhile frees a slot the claim
    #: did not count, so the engine must look again once it returns
    claiming: bool = False
    tokens: float = 0.0
    refilled: float = field(default_factory=time.monotonic)
    #: wakes the engine when the next token is due (see Engine._wake_for_token)
    token_timer: asyncio.TimerHandle | None = None
    #: how long its foci have been running, in seconds (a moving average; None until one
    #: ends): it sizes the faculty's reserve (:mod:`.reserve`)
    turnover: float | None = None

    def observe(self, seconds: float) -> None:
        """A focus of this faculty ran ``seconds``."""
        self.turnover = (seconds if self.turnover is None
                         else self.turnover + (seconds - self.turnover) / 8)

    @functools.cached_property
    def max_attempts(self) -> dict[str, int] | None:
        """The faculty's attempt limit by work type, when it sets one (it overrides the
        item's own; the claim writes it into the item)."""
        limit = self.faculty.max_attempts
        return None if limit is None else dict.fromkeys(self.faculty.accepts, limit)

    def take_tokens(self, want: int) -> int:
        rate = self.faculty.rate_limit
        if not rate:
            return want
        now = time.monotonic()
        self.tokens = min(max(1.0, rate), self.tokens + (now - self.refilled) * rate)
        self.refilled = now
        allowed = min(want, int(self.tokens))
        self.tokens -= allowed
        return allowed

    def seconds_to_token(self) -> float:
        rate = self.faculty.rate_limit or 1.0
        return max(0.01, (1 - self.tokens) / rate)


@dataclass
class Flight:
    """A running focus."""

    claimed: Claimed
    task: asyncio.Task[None]
    slot: Slot
    #: until when the lease surely holds (monotonic): when the claim or the last extension
    #: that succeeded was asked for, plus the lease time; see LeaseKeeper.fence
    held_until: float
    #: the item's record (steps, the signal that woke it), read with the claim: None for
    #: its first attempt
    resume: Resume | None = None
    #: stopped because its lease is lost (or about to be): it records nothing
    lost: bool = False
    #: stopped because a cancellation was requested
    cancelling: bool = False
    finished: bool = False
    #: when the running coroutine phase times out (loop time); see Deadlines
    deadline: float | None = None
    timed_out: bool = False
    #: when it started (monotonic)
    started: float = field(default_factory=time.monotonic)
