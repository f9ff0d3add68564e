"""The allocator's call slots, and calls that give theirs back when DPS is late to answer.

Each attempt of a record (its Get DPS Device check, its allocate, the recording of its
outcome) holds one of ``sink.concurrency`` slots. A DPS call still unanswered at the
*soft deadline* gives its slot back and goes on without one ("detached"), if fewer than
``sink.detached_limit`` are: it stays on the wire up to ``sink.dps.timeout`` (the hard
deadline, unchanged: nothing is cut short) and its record's outcome is recorded when it
ends, as before; only its slot went to the next record meanwhile. So a DPS that hangs
on some calls holds up those records alone, not every slot for ``dps.timeout``. When
the limit is reached, late calls keep their slots (as if there were no soft deadline)
and the oldest of them detaches as soon as a detached call ends.

What holds:

- DPS calls of the allocator in flight <= ``concurrency`` + ``detached_limit``: a slot
  or a detached place is held from the start of an attempt to its end, one call at a time.
- The soft deadline is learnt from the latencies of calls DPS answered (whatever it
  answered; a timeout or a broken connection is no latency): :data:`_FACTOR` times the
  :data:`_QUANTILE` of the last :data:`_WINDOW`, at least :data:`_FLOOR`, at most
  ``dps.timeout``; it is ``dps.timeout`` (nothing detaches) until :data:`_WINDOW_MIN`
  answers are seen. A quantile below 1 keeps calls that hang and then answer late out of
  it as long as they are fewer than 1 - quantile of all; a DPS that is slow for everyone
  raises it within a window of answers.
- ``detached_limit`` 0 turns it off: a slot is held for the whole call, as it was.

The allocator awaits each DPS call through :meth:`CallSlots.call`
(``await slots.call(dps.allocate(...))``); which slot a call belongs to is the task's (a
context variable: each record is processed in a task of its own).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import time
from typing import TYPE_CHECKING, Self, TypeVar

from pipeline.errors import DpsError
from pipeline.ops.metrics import SINK_DETACHED, SINK_DETACHES, SINK_SOFT_DEADLINE

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from types import TracebackType

__all__ = ["CallSlots"]

T = TypeVar("T")

_QUANTILE = 0.9
_FACTOR = 4.0
_FLOOR = 0.1
"""Seconds, at least: the soft deadline never fires on this process's own hiccups (a
garbage collection, a burst of records) when DPS answers in a few milliseconds."""
_WINDOW = 512
"""Latest answers the quantile is taken over."""
_WINDOW_MIN = 32
"""Answers seen before the soft deadline applies."""
_EVERY = 32
"""Answers between two computations of the soft deadline."""

_HELD, _DETACHED, _FREE = range(3)
_LATE_PRUNE = 1024
"""Entries of the late queue (calls that ended leave theirs behind) beyond which it is pruned."""


class _Slot:
    """One attempt's place: a slot, or (once detached) a detached place."""

    __slots__ = ("late", "state")

    def __init__(self) -> None:
        self.state = _HELD
        self.late = False
        """Its call passed the soft deadline while no detached place was free."""


_CURRENT: contextvars.ContextVar[_Slot | None] = contextvars.ContextVar("sink_slot", default=None)
"""The slot of the attempt this task is in."""


class CallSlots:
    """``concurrency`` call slots whose late calls may give theirs back (module docstring).

    Use ``async with slots:`` around an attempt (in the record's own task), and await each
    DPS call through :meth:`call`.

    Args:
        concurrency: slots (``sink.concurrency``).
        detached_limit: calls detached at once, at most (``sink.detached_limit``; 0: off).
        timeout: the hard deadline of a call (``sink.dps.timeout``).
        clock: monotonic seconds (tests give their own).
    """

    def __init__(
        self,
        concurrency: int,
        *,
        detached_limit: int,
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._free = asyncio.Semaphore(concurrency)
        self._limit = detached_limit
        self._timeout = timeout
        self._clock = clock
        self._late: collections.deque[_Slot] = collections.deque()
        # Calls in a slot that may detach, with their start (loop time), in start order.
        self._calls: dict[_Slot, float] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._latencies: collections.deque[float] = collections.deque(maxlen=_WINDOW)
        self._since = 0
        self.detached = 0
        """Calls detached now (or their attempts, until their outcome is recorded)."""
        self.soft_deadline = timeout
        """Seconds after which a call gives its slot back."""
        SINK_DETACHED.set_function(lambda: self.detached)
        SINK_SOFT_DEADLINE.set(timeout)

    async def __aenter__(self) -> Self:
        await self._free.acquire()
        _CURRENT.set(_Slot())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        slot = _CURRENT.get()
        _CURRENT.set(None)
        if slot is None:
            return
        state, slot.state, slot.late = slot.state, _FREE, False
        if state == _HELD:
            self._free.release()
        elif state == _DETACHED:
            self.detached -= 1
            self._detach_waiting()

    async def call(self, pending: Awaitable[T]) -> T:
        """Await a DPS call; past the soft deadline, give the task's slot back if allowed."""
        slot = _CURRENT.get()
        watched = None
        if slot is not None and slot.state == _HELD and self.soft_deadline < self._timeout:
            watched = slot
            self._watch(slot)
        started = self._clock()
        try:
            result = await pending
        except DpsError as exc:
            if exc.http_status is not None:  # DPS answered (with a refusal or an error)
                self._observe(self._clock() - started)
            raise
        finally:
            if watched is not None:
                self._calls.pop(watched, None)
            if slot is not None:
                slot.late = False
        self._observe(self._clock() - started)
        return result

    def _watch(self, slot: _Slot) -> None:
        """Note ``slot``'s call as started now; make sure a sweep is due for the oldest.

        One timer for all the calls, not one a call: a call answered in milliseconds only
        adds and removes its entry (a timer a call was about 3 % of the sink's CPU).
        """
        loop = asyncio.get_running_loop()
        self._calls[slot] = loop.time()
        if self._sweeper is None:
            self._sweeper = loop.call_later(self.soft_deadline, self._sweep)

    def _sweep(self) -> None:
        """The calls whose soft deadline passed are overdue; the timer is set for the next."""
        self._sweeper = None
        loop = asyncio.get_running_loop()
        now, deadline = loop.time(), self.soft_deadline
        calls = self._calls
        while calls:  # oldest first: in the order they started
            slot, started = next(iter(calls.items()))
            wait = started + deadline - now
            if wait > 0:
                self._sweeper = loop.call_later(wait, self._sweep)
                return
            del calls[slot]
            self._overdue(slot)

    def _resweep(self) -> None:
        """The soft deadline changed: sweep by the new one now."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweep()

    def _overdue(self, slot: _Slot) -> None:
        """The soft deadline of ``slot``'s call passed: detach it, or queue it."""
        if slot.state != _HELD:
            return
        if self.detached < self._limit:
            self._detach(slot)
        else:
            slot.late = True
            self._late.append(slot)
            if len(self._late) > _LATE_PRUNE:
                self._late = collections.deque(s for s in self._late if s.late)

    def _detach(self, slot: _Slot) -> None:
        slot.state, slot.late = _DETACHED, False
        self.detached += 1
        SINK_DETACHES.inc()
        self._free.release()

    def _detach_waiting(self) -> None:
        """A detached place is free: the oldest call still late and in a slot takes it."""
        while self._late and self.detached < self._limit:
            slot = self._late.popleft()
            if slot.late and slot.state == _HELD:
                self._detach(slot)

    def _observe(self, seconds: float) -> None:
        if not self._limit:
            return
        self._latencies.append(seconds)
        self._since += 1
        if self._since < _EVERY or len(self._latencies) < _WINDOW_MIN:
            return
        self._since = 0
        ordered = sorted(self._latencies)
        quantile = ordered[min(len(ordered) - 1, int(_QUANTILE * len(ordered)))]
        soft_deadline = min(self._timeout, max(_FLOOR, _FACTOR * quantile))
        if soft_deadline != self.soft_deadline:
            self.soft_deadline = soft_deadline
            SINK_SOFT_DEADLINE.set(soft_deadline)
            self._resweep()
