"""The stager's resume budget, backoff and rate limiting: pure logic with an injected clock.

The budget is progress-based, not a fixed timeout: a transfer may take hours as long as the
worker keeps acknowledging bytes. It ends when no acknowledged progress happened for the stall
window, or when the optional absolute deadline passes (LocalAI's fixed one-hour budget killed
every transfer longer than an hour; this one does not).
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import DeadlineExceeded, StallTimeout


@dataclass
class ResumeBudget:
    """Stall window plus optional absolute deadline, measured on ``clock`` (monotonic)."""

    stall_window: float
    deadline: float | None = None  # seconds from start, or None for no cap
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self.started = self.clock()
        self.last_progress = self.started

    def progress(self) -> None:
        """The worker acknowledged new bytes."""
        self.last_progress = self.clock()

    def remaining(self) -> float:
        now = self.clock()
        left = self.last_progress + self.stall_window - now
        if self.deadline is not None:
            left = min(left, self.started + self.deadline - now)
        return left

    def check(self, offset: int = 0, why: str = "") -> None:
        """Raise the right BudgetExpired if the budget is used up."""
        now = self.clock()
        suffix = f" (last error: {why})" if why else ""
        if self.deadline is not None and now >= self.started + self.deadline:
            raise DeadlineExceeded(
                f"the deadline of {self.deadline:.0f} s passed at offset {offset}{suffix}; "
                "the upload stays resumable: run the same command again",
                offset=offset,
            )
        if now >= self.last_progress + self.stall_window:
            raise StallTimeout(
                f"no progress acknowledged by the worker for {self.stall_window:.0f} s "
                f"(stall window) at offset {offset}{suffix}; the upload stays resumable: "
                "check the worker and run the same command again",
                offset=offset,
            )


@dataclass
class Backoff:
    """Jittered exponential backoff: ``initial`` doubling up to ``cap``, reset on progress."""

    initial: float = 1.0
    cap: float = 30.0
    rng: random.Random | None = None

    def __post_init__(self) -> None:
        self.attempt = 0
        self._rng: random.Random = self.rng or random.Random()

    def next_delay(self) -> float:
        base = min(self.cap, self.initial * 2.0**self.attempt)
        self.attempt += 1
        # "equal jitter": at least half the base, so retries from many clients spread out
        return base / 2 + self._rng.uniform(0, base / 2)

    def reset(self) -> None:
        self.attempt = 0


class RateMeter:
    """Throughput over a sliding window of acknowledged offsets, and the ETA it implies."""

    def __init__(self, window: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self.clock = clock
        self._points: deque[tuple[float, int]] = deque()

    def add(self, done: int) -> None:
        now = self.clock()
        self._points.append((now, done))
        while len(self._points) > 2 and now - self._points[1][0] > self.window:
            self._points.popleft()

    def rate(self) -> float:
        if len(self._points) < 2:
            return 0.0
        (t0, d0), (t1, d1) = self._points[0], self._points[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0

    def eta(self, total: int) -> float | None:
        rate = self.rate()
        if rate <= 0 or not self._points:
            return None
        return max(0.0, (total - self._points[-1][1]) / rate)


class TokenBucket:
    """Bandwidth limit (``--limit-rate``): how long to wait before sending ``n`` more bytes."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.clock = clock
        self.burst = max(rate / 4, 64 * 1024)
        self._tokens = self.burst
        self._stamp = clock()

    def delay_for(self, n: int) -> float:
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        self._tokens -= n
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate
