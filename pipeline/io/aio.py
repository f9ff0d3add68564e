"""Small asyncio helpers: the event loop, stop-aware waits, the backoff, the start-up wait.

One of each: ``run`` (the event loop a process runs on, ``runtime.event_loop``),
``unless_stopped``, ``Backoff``, ``wait_for_service``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import random
import socket
import ssl
import time
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from pipeline.errors import ConfigError, PipelineError, ServiceUnreachable

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine

__all__ = [
    "Backoff",
    "KeyedLocks",
    "Pacer",
    "Stopped",
    "first_set",
    "run",
    "sleep_unless_stopped",
    "unless_stopped",
    "wait_for_service",
    "why_unreachable",
]

T = TypeVar("T")
K = TypeVar("K")

log = logging.getLogger(__name__)


def run(
    main: Coroutine[Any, Any, T],
    event_loop: Literal["auto", "asyncio", "uvloop"],
    *,
    why: str = "",
) -> T:
    """Run ``main`` to its end on a new event loop of the kind ``runtime.event_loop`` names.

    ``why``: set when the process needs asyncio's own loop (a selector loop) whatever the
    configuration says; it then runs on asyncio's (``uvloop`` also says so in a log line).
    ``auto`` without uvloop installed (it has no Windows build) runs on asyncio's.

    Raises:
        ConfigError: ``uvloop`` asked for and not installed.
    """
    if event_loop == "asyncio" or why:
        if event_loop == "uvloop":
            log.info("runtime.event_loop is uvloop; this process runs on asyncio's loop: %s", why)
        return asyncio.run(main)
    try:
        import uvloop  # noqa: PLC0415  (only a process that runs on it loads it)
    except ImportError as exc:
        if event_loop == "uvloop":
            main.close()
            reason = "uvloop is not installed here: install it, or set auto or asyncio"
            msg = f"runtime.event_loop: {reason}"
            raise ConfigError(msg, key="runtime.event_loop", reason=reason) from exc
        return asyncio.run(main)
    return uvloop.run(main)


class Stopped(PipelineError):
    """The stop event came first: what was awaited was cancelled (not a failure)."""


async def unless_stopped(stopped: asyncio.Future[Any], coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro``, unless ``stopped`` finishes first: then cancel it and raise Stopped.

    Cancelled itself (its stage's task group gave up, say), it cancels ``coro`` too: left
    running, its failure would be an asyncio "exception was never retrieved" traceback.
    """
    task = asyncio.ensure_future(coro)
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        await _cancel(task)
        raise
    if not task.done():
        await _cancel(task)
        raise Stopped
    return task.result()


async def _cancel(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and wait for it to end; what it raised on the way out is dropped."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


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


class KeyedLocks(Generic[K]):
    """A lock per key, held by one task at a time, first come first served.

    What a dict of ``asyncio.Lock`` with a count of users does, with less per use (a
    sink takes two for every record): a free key is taken with a dict insertion (no lock
    object, no coroutine suspended), and only a task that finds its key held waits, on a
    future of its own. A key's entry lives only while the key is held.
    """

    __slots__ = ("_held",)

    def __init__(self) -> None:
        # Per held key, the futures of the tasks waiting for it, in arrival order.
        self._held: dict[K, collections.deque[asyncio.Future[None]]] = {}

    def __len__(self) -> int:
        """Keys held now."""
        return len(self._held)

    async def acquire(self, key: K) -> None:
        """Hold ``key``: at once if it is free, else after those who came before."""
        waiting = self._held.get(key)
        if waiting is None:
            self._held[key] = collections.deque()
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiting.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(key)  # handed the key, then cancelled: the next one gets it
            raise  # else its cancelled future stays queued, and a release passes it over

    def release(self, key: K) -> None:
        """Hand ``key`` to the first task still waiting for it, or free it."""
        waiting = self._held[key]
        while waiting:
            future = waiting.popleft()
            if not future.done():
                future.set_result(None)
                return
        del self._held[key]


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


WAIT_LOG_EVERY = 5.0
"""Seconds between two "waiting for ..." warnings about the same service, at least."""
_WARNED: dict[tuple[str, str], float] = {}
"""When this process last warned that it waits for (service, address), loop time."""


async def wait_for_service(
    probe: Callable[[float | None], Awaitable[None]],
    *,
    service: str,
    address: str,
    within: float,
    stop: asyncio.Event | None,
    log: logging.Logger,
) -> None:
    """Call ``probe`` until it succeeds, for up to ``within`` seconds.

    Between attempts: capped, jittered backoff (0.25 s doubling to 2 s). Each failure
    is logged at warning as ``waiting for {service} at {address}: {reason}``, at most
    every :data:`WAIT_LOG_EVERY` seconds; success after a warning is logged at info.

    Args:
        probe: one attempt, given the seconds it may take (``None``: its own limit);
            raises :class:`~pipeline.errors.ServiceUnreachable` with the reason.
        service: ``Kafka``, ``MQTT``.
        address: where, as configured.
        within: seconds to keep trying; 0 tries once.
        stop: when set, stop waiting and raise :class:`Stopped`.
        log: the caller's logger.

    Raises:
        ServiceUnreachable: still failing after ``within`` seconds.
        Stopped: ``stop`` was set first.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    backoff = Backoff(0.25, 2.0)
    warned = False
    # Never set without a stop event: every wait below can then be one of unless_stopped.
    stopped = asyncio.ensure_future(stop.wait()) if stop is not None else loop.create_future()
    try:
        while True:
            if stop is not None and stop.is_set():
                # Asked to stop before this attempt (a SIGTERM while starting): no probe.
                # unless_stopped alone would let a probe that fails at once (a refused
                # connection, on uvloop) finish beside the stop, and be said.
                raise Stopped
            # Whole tenths: the reason a probe gives ("no answer within 3 s") reads the same
            # from every stage waiting for the same service, and is said once.
            left = math.ceil(max(deadline - loop.time(), 1.0) * 10) / 10
            try:
                await unless_stopped(stopped, _awaited(probe(left if within else None)))
            except ServiceUnreachable as exc:
                if stop is not None and stop.is_set():
                    raise Stopped from None  # asked to stop while the attempt failed
                reason = exc.reason
            else:
                if warned:
                    log.info("%s at %s answers", service, address)
                return
            now = loop.time()
            if now >= deadline:
                raise ServiceUnreachable(service, address, reason, waited=within) from None
            # Stages of one process (`pipeline run`) wait for the same Kafka: one line.
            if now - _WARNED.get((service, address), -WAIT_LOG_EVERY) >= WAIT_LOG_EVERY:
                _WARNED[service, address] = now
                log.warning("waiting for %s at %s: %s", service, address, reason)
                warned = True
            await unless_stopped(stopped, asyncio.sleep(min(backoff.next(), deadline - now)))
    finally:
        stopped.cancel()


async def _awaited(awaitable: Awaitable[None]) -> None:
    await awaitable


def why_unreachable(exc: BaseException, timeout: float) -> str:
    """Why a connection attempt failed, in a few words (for ``... not reachable: <why>``)."""
    why = str(exc) or type(exc).__name__
    match exc:
        case ConnectionRefusedError():
            why = "connection refused"
        case TimeoutError():
            why = f"no answer within {timeout:g} s"
        case socket.gaierror():
            why = f"cannot resolve the host name ({exc.strerror})"
        case ssl.SSLCertVerificationError():
            why = f"TLS certificate verification failed ({exc.verify_message})"
        case ssl.SSLError():
            why = f"TLS failed ({exc.reason or exc})"
        case OSError() if exc.strerror:
            why = exc.strerror[:1].lower() + exc.strerror[1:]
    return why
