"""Allocating one added child in DPS: the sn lock, the rate limit and the retry loop.

- Never two calls at once for the same sn (a per-sn lock, kept only while in use).
- Transient failures are retried behind the shared :class:`~.breaker.Breaker`, which
  paces them; after ``sink.give_up_after`` seconds the record is dead-lettered as
  ``exhausted``. Business refusals are dead-lettered as ``rejected`` at once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import TYPE_CHECKING

from pipeline.errors import DpsRejected, DpsTransient, MappingError
from pipeline.ops.metrics import SINK_CALL_SECONDS, SINK_CALLS, SINK_RETRIES

if TYPE_CHECKING:
    from aiokafka import ConsumerRecord

    from pipeline.config import SinkConfig
    from pipeline.core.mapping import Mapped, Mapper
    from pipeline.dps.client import DpsClient
    from pipeline.stages.sink.breaker import Breaker
    from pipeline.stages.sink.outcomes import Outcomes

__all__ = ["Allocator", "RateLimiter"]

log = logging.getLogger(__name__)


class RateLimiter:
    """At most ``rate`` calls per second, spaced evenly; unlimited when ``rate`` is None."""

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


class Allocator:
    """Turns one ``iotda.subdevices.added`` record into exactly one recorded outcome.

    Args:
        cfg: the ``[sink]`` section.
        mapper: sn, orgId and deviceData for a child.
        dps: an open DPS client.
        breaker: shared by every call of this sink.
        outcomes: where allocations and DLQ records go.
    """

    def __init__(
        self,
        cfg: SinkConfig,
        *,
        mapper: Mapper,
        dps: DpsClient,
        breaker: Breaker,
        outcomes: Outcomes,
    ) -> None:
        self._cfg = cfg
        self._mapper = mapper
        self._dps = dps
        self._breaker = breaker
        self._outcomes = outcomes
        self._limiter = RateLimiter(cfg.rate_limit)
        self._sn_locks: dict[str, asyncio.Lock] = {}
        self._sn_users: collections.Counter[str] = collections.Counter()

    async def process(self, record: ConsumerRecord[bytes, bytes], source: bytes) -> None:
        """Map, allocate and record the outcome of ``record``."""
        try:
            mapped = self._map(record.value)
        except MappingError as exc:
            log.warning("record at %s is invalid: %s", source.decode(), exc)
            await self._outcomes.dead_letter(
                record, source, None, kind="invalid", code=None, message=str(exc),
                request_id=None, attempts=0,
            )  # fmt: skip
            return
        sn = mapped.sn
        lock = self._sn_locks.setdefault(sn, asyncio.Lock())
        self._sn_users[sn] += 1
        try:
            async with lock:
                await self._allocate(record, source, mapped)
        finally:
            # Not `lock.locked()`: right after a release it is False while the woken waiter
            # has yet to take the lock; a new lock then would let two calls for sn overlap.
            self._sn_users[sn] -= 1
            if not self._sn_users[sn]:
                del self._sn_users[sn], self._sn_locks[sn]

    def _map(self, value: bytes | None) -> Mapped:
        if value is None:  # a tombstone: there is nothing to read
            msg = "not an added-child record: the record has no value (a tombstone)"
            raise MappingError(msg)
        return self._mapper.map(value)

    async def _allocate(
        self, record: ConsumerRecord[bytes, bytes], source: bytes, mapped: Mapped
    ) -> None:
        first = time.monotonic()
        attempts = 0
        while True:
            probe = await self._breaker.acquire()
            await self._limiter.wait()
            attempts += 1
            started = time.monotonic()
            try:
                device, request_id = await self._dps.allocate(mapped.org_id, mapped.request)
            except DpsTransient as exc:
                SINK_CALLS.labels("transient").inc()
                self._breaker.release(probe, failed=True, retry_after=exc.retry_after)
                if time.monotonic() - first >= self._cfg.give_up_after:
                    log.warning(
                        "giving up on sn %s after %d attempts: %s", mapped.sn, attempts, exc
                    )
                    await self._outcomes.dead_letter(
                        record, source, mapped, kind="exhausted", code=exc.code, message=exc.msg,
                        request_id=exc.request_id, attempts=attempts,
                    )  # fmt: skip
                    return
                SINK_RETRIES.inc()
                log.info("sn %s: %s; will retry", mapped.sn, exc)
                continue
            except DpsRejected as exc:
                SINK_CALLS.labels("rejected").inc()
                self._breaker.release(probe, failed=False)
                log.warning("DPS rejected sn %s: %s", mapped.sn, exc)
                await self._outcomes.dead_letter(
                    record, source, mapped, kind="rejected", code=exc.code, message=exc.msg,
                    request_id=exc.request_id, attempts=attempts,
                )  # fmt: skip
                return
            except BaseException:
                # Cancelled at shutdown, or a bug: give the probe's turn back, no verdict.
                self._breaker.abandon(probe)
                raise
            finally:
                SINK_CALL_SECONDS.observe(time.monotonic() - started)
            SINK_CALLS.labels("ok").inc()
            self._breaker.release(probe, failed=False)
            await self._outcomes.allocated(
                mapped, device, request_id=request_id, attempts=attempts, source=source
            )
            return
