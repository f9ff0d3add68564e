"""Small asyncio helpers shared by the stages: stop-aware waits and the one backoff."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from collections.abc import Coroutine

__all__ = ["Backoff", "Pacer", "Stopped", "first_set", "sleep_unless_stopped", "unless_stopped"]

T = TypeVar("T")


class Stopped(Exception):
    """The stop event came first."""


async def unless_stopped(stopped: asyncio.Future[Any], coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro``, unless ``stopped`` finishes first: then cancel it and raise Stopped."""
    task = asyncio.ensure_future(coro)
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise Stopped
    return task.result()


def first_set(*events: asyncio.Event) -> asyncio.Task[None]:
    """A task that finishes when any of ``events`` is set (cancel it when done with it)."""

    async def wait() -> None:
        waits = [asyncio.ensure_future(event.wait()) for event in events]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()

    return asyncio.create_task(wait())


async def sleep_unless_stopped(stop: asyncio.Event, delay: float) -> bool:
    """Sleep ``delay`` seconds, or less if ``stop`` is set meanwhile; True when stopped."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(delay):
            await stop.wait()
    return stop.is_set()


class Backoff:
    """Capped exponential backoff with jitter, the one used for every retry in the package.

    The n-th delay (n counted from 0 since the last :meth:`reset`) is
    ``min(maximum, initial * 2**n)`` scaled by a random factor in ``[1 - jitter, 1]``,
    so replicas that failed together do not retry together; a ``floor`` (a server's
    ``Retry-After``) is honoured even above the cap.

    Args:
        initial: the first delay, seconds.
        maximum: the cap, seconds.
        jitter: the share of each delay that is random (0 gives exact delays).
    """

    def __init__(self, initial: float, maximum: float, *, jitter: float = 0.5) -> None:
        self.initial = initial
        self.maximum = maximum
        self._jitter = jitter
        self.attempts = 0
        """Delays handed out since the last reset."""

    def next(self, floor: float | None = None) -> float:
        """The delay before the next attempt, at least ``floor``; counts one attempt."""
        base = min(self.maximum, self.initial * 2.0 ** min(self.attempts, 60))
        self.attempts += 1
        delay = base * random.uniform(1.0 - self._jitter, 1.0)
        return max(delay, floor or 0.0)

    def reset(self) -> None:
        """Start again from ``initial`` (after a success)."""
        self.attempts = 0


class Pacer:
    """At most ``rate`` starts per second, spaced evenly, shared by everyone who waits.

    Args:
        rate: starts per second; unlimited when None.
    """

    def __init__(self, rate: float | None) -> None:
        self._interval = 1.0 / rate if rate else 0.0
        self._next = 0.0

    async def wait(self) -> None:
        """Until this caller's slot comes."""
        if not self._interval:
            return
        now = time.monotonic()
        slot = max(now, self._next)
        self._next = slot + self._interval
        if slot > now:
            await asyncio.sleep(slot - now)
