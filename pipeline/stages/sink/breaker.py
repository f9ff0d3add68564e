"""The breaker that pauses the sink while DPS is failing, and lets one probe through."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from pipeline.io.aio import Backoff

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["Breaker"]


class Breaker:
    """Opens on transient DPS failures; while open, one probe call per backoff period.

    Args:
        initial: first backoff, seconds.
        maximum: backoff cap, seconds.
        on_change: called with True when it opens and False when it closes.
    """

    def __init__(self, initial: float, maximum: float, on_change: Callable[[bool], None]) -> None:
        self._backoff = Backoff(initial, maximum)
        self._on_change = on_change
        self._failures = 0
        self._until = 0.0
        self._probe = asyncio.Lock()

    @property
    def open(self) -> bool:
        """Whether DPS is currently considered failing."""
        return self._failures > 0

    async def acquire(self) -> bool:
        """Wait for permission to call DPS; True when this caller is the probe."""
        while self._failures:
            # Callers queue for the probe's turn: when a probe leaves without closing the
            # breaker (its record gave up), the next caller in line probes.
            await self._probe.acquire()
            # (Waiters reach here one by one after the breaker closed: no backoff then.)
            if self._failures and (delay := max(0.0, self._until - time.monotonic())):
                await asyncio.sleep(delay)
            if self._failures:
                return True
            self._probe.release()
        return False

    def abandon(self, probe: bool) -> None:
        """The call was cancelled: give the probe's turn back without a verdict."""
        if probe:
            self._probe.release()

    def release(self, probe: bool, *, failed: bool, retry_after: float | None = None) -> None:
        """Report how the call went (``failed``: transient failure)."""
        if failed:
            self._failures += 1
            self._until = time.monotonic() + self._backoff.next(retry_after)
            if self._failures == 1:
                self._on_change(True)
        elif self._failures:
            self._failures = 0
            self._backoff.reset()
            self._on_change(False)
        if probe:
            self._probe.release()
