"""How fast the sink calls DPS: at most ``sink.rate_limit``, slower while DPS throttles.

HTTP 429 is DPS saying "slower", not DPS failing, so it never counts against the
breaker. Instead it sets the call rate to the success rate actually observed over the
last seconds (what DPS let through), and the throttled record waits its own
``Retry-After`` (:mod:`.allocator`). Then, each second without a 429, the rate rises by
5 % (at least 1 call/s) to find out whether DPS allows more again; a 429 for a call sent
at the higher rate sets it back. The rate never exceeds ``sink.rate_limit``; without
one, it is lifted once it is twice the observed success rate (it no longer limits).
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from typing import TYPE_CHECKING

from pipeline.ops.metrics import SINK_RATE

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["RateLimiter"]

_WINDOW = 2.0
"""Seconds of successes the observed rate is measured over."""
_MIN_SPAN = 0.5
"""Shortest span the observed rate is measured over (just after start-up)."""
_STEP = 1.0
"""Seconds without a 429 between two rises."""
_GROWTH = 0.05
_FLOOR = 1.0
"""Calls per second, at least: a throttled sink still finds out when DPS allows more."""


class RateLimiter:
    """Spaces calls evenly at the current rate, and learns the rate from throttling.

    Args:
        ceiling: calls per second, at most (``sink.rate_limit``); None: no ceiling.
        clock: monotonic seconds (tests give their own).
    """

    def __init__(
        self, ceiling: float | None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ceiling = ceiling
        self._clock = clock
        self._rate = ceiling
        self._next = 0.0
        self._started: float | None = None
        self._cut_at = -math.inf
        self._raised_at = -math.inf
        self._successes: collections.deque[float] = collections.deque()
        SINK_RATE.set(ceiling or 0)

    @property
    def rate(self) -> float | None:
        """The current rate in calls per second; None when unlimited."""
        return self._rate

    async def wait(self) -> float:
        """Until this caller's turn comes; returns when the turn was taken.

        Pass the returned time to :meth:`throttled` if the call is throttled.
        """
        now, delay = self.take()
        if delay > 0:
            await asyncio.sleep(delay)
        return now

    def take(self) -> tuple[float, float]:
        """This caller's turn: when it was taken, and the seconds to wait for it.

        :meth:`wait` without the coroutine, for a caller that calls on every record and
        mostly need not wait (no limit, or the turn is now).
        """
        now = self._clock()
        if self._started is None:
            self._started = now
        if self._rate is None:
            return now, 0.0
        turn = max(now, self._next)
        self._next = turn + 1.0 / self._rate
        return now, turn - now

    def succeeded(self) -> None:
        """A call went through: count it, and raise the rate if it is time to."""
        now = self._clock()
        self._successes.append(now)
        self._trim(now)
        if self._rate is None or now - max(self._cut_at, self._raised_at) < _STEP:
            return
        rate = self._rate + max(1.0, self._rate * _GROWTH)
        if self._ceiling is not None:
            rate = min(rate, self._ceiling)
        elif rate >= 2 * self._observed(now):
            self._set(None)
            return
        self._raised_at = now
        self._set(rate)

    def throttled(self, taken_at: float) -> None:
        """A call whose turn was taken at ``taken_at`` was throttled (HTTP 429)."""
        if taken_at < self._cut_at:
            return  # its turn came under a rate that is already cut
        now = self._clock()
        self._trim(now)
        rate = max(_FLOOR, self._observed(now))
        if self._rate is not None:
            rate = min(rate, self._rate)
        self._cut_at = now
        self._set(rate)

    def _observed(self, now: float) -> float:
        started = self._started if self._started is not None else now
        span = min(_WINDOW, max(_MIN_SPAN, now - started))
        return len(self._successes) / span

    def _trim(self, now: float) -> None:
        while self._successes and self._successes[0] < now - _WINDOW:
            self._successes.popleft()

    def _set(self, rate: float | None) -> None:
        self._rate = rate
        SINK_RATE.set(rate or 0)
