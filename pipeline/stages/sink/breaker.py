"""The breaker: pauses the sink while DPS fails for everyone, one probe per backoff period.

A record's own failures are its own to retry (:mod:`.allocator`, with its own backoff).
The breaker opens only on evidence that DPS fails for everyone:

- ``failures`` calls failed in a row, none succeeding in between, for at least two
  different sns. One record that keeps failing never opens it: among healthy ones their
  successes reset the count, and alone it is one sn. Nor does a 50 % error rate: 20 in
  a row happen about once per million calls;
- or at once, on a failure only the operator can cure (a wrong secret, a ``base_url``
  that refuses connections: the failures that carry a hint).

A call sent before DPS last answered is no evidence that it fails now: a call that hung
for ``dps.timeout`` while later calls were answered (:mod:`.slots`) does not count,
however many such timeouts end together.

While open, one call at a time goes through as a probe, once per backoff period. The
period starts short (``retry_initial``) and only a failed probe lengthens it (doubling,
jittered, up to ``retry_max``, ``Retry-After`` honoured), so calls that were already in
flight when DPS blipped cost nothing more. Any success closes it.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from pipeline.io.aio import Backoff

__all__ = ["Breaker"]


class Breaker:
    """Opens when DPS fails for everyone; while open, one probe call per backoff period.

    Args:
        backoff: the probe schedule (reset when the breaker closes).
        on_change: called with ``(True, reason)`` when it opens or, while open, when the
            reason changes; with ``(False, None)`` when it closes.
        failures: failed calls in a row (of at least two sns) that open it.
        clock: monotonic seconds (tests give their own).
    """

    def __init__(
        self,
        backoff: Backoff,
        on_change: Callable[[bool, str | None], None],
        *,
        failures: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._backoff = backoff
        self._on_change = on_change
        self._failures = failures
        self._run = 0  # failed calls since the last success
        self._answered_at = -float("inf")  # when DPS last answered
        self._run_sn: str | None = None  # the sn of the first of them
        self._mixed = False  # whether another sn failed since
        self._open = False
        self._until = 0.0
        self._probe = asyncio.Lock()
        self.reason: str | None = None
        """Why it is open: the last failure, for an operator."""

    @property
    def open(self) -> bool:
        """Whether DPS is currently considered failing."""
        return self._open

    async def acquire(self) -> bool:
        """Wait for permission to call DPS; True when this caller is the probe.

        A probe must report with :meth:`succeeded`, :meth:`failed` or :meth:`abandon`.
        """
        while self._open:
            # Callers queue for the probe's turn: when a probe leaves without closing the
            # breaker, the next caller in line probes once the period is over.
            await self._probe.acquire()
            try:
                # The period may be over already; a sleep, not an event: nothing ends it early.
                if self._open and (delay := self._until - self._clock()) > 0:
                    await asyncio.sleep(delay)
            except BaseException:
                self._probe.release()
                raise
            if self._open:
                return True
            self._probe.release()  # closed meanwhile: everyone goes
        return False

    def abandon(self, probe: bool) -> None:
        """The call was cancelled: give the probe's turn back without a verdict."""
        if probe:
            self._probe.release()

    def succeeded(self, probe: bool) -> None:
        """DPS answered (success, refusal or throttling): it works; close if open."""
        self._answered_at = self._clock()
        self._reset_run()
        if self._open:
            self._open = False
            self.reason = None
            self._backoff.reset()
            self._on_change(False, None)
        if probe:
            self._probe.release()

    def failed(
        self,
        probe: bool,
        sn: str,
        reason: str,
        *,
        operator: bool = False,
        retry_after: float | None = None,
        sent_at: float | None = None,
    ) -> None:
        """A call for ``sn`` failed transiently.

        Args:
            probe: whether the call was the probe.
            sn: the device the call was for (one sn alone never opens it).
            reason: the failure, for an operator (readiness detail, logs).
            operator: only the operator can cure it (it has a hint): open at once.
            retry_after: the server's ``Retry-After``, the least the next probe waits.
            sent_at: when the call was sent (the breaker's clock); one sent before DPS
                last answered does not count. None: just now.
        """
        try:
            if not (probe or operator) and sent_at is not None and sent_at < self._answered_at:
                return  # DPS answered since it was sent: says nothing about DPS now
            if self._open:
                # Calls that were in flight when it opened say nothing new; a failed probe
                # says DPS still fails: wait longer before the next.
                if probe:
                    self._until = self._clock() + self._backoff.next(retry_after)
                    if reason != self.reason:
                        self.reason = reason
                        self._on_change(True, reason)
                return
            self._run += 1
            if self._run_sn is None:
                self._run_sn = sn
            elif sn != self._run_sn:
                self._mixed = True
            if operator or (self._mixed and self._run >= self._failures):
                self._open = True
                self.reason = reason
                self._reset_run()
                self._until = self._clock() + self._backoff.next(retry_after)
                self._on_change(True, reason)
        finally:
            if probe:
                self._probe.release()

    def _reset_run(self) -> None:
        self._run = 0
        self._run_sn = None
        self._mixed = False
