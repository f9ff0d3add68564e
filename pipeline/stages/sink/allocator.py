"""Allocating one added child in DPS: the sn lock, the call slots and the record's retries.

- Never two calls at once for the same sn (a per-sn lock, kept only while in use).
- At most ``sink.concurrency`` calls in flight; a slot is held until the call's outcome
  is recorded, so a crash loses at most that many outcomes of calls DPS answered (plus
  those of the detached calls below). A record waiting to retry holds no slot: records
  failing on their own do not slow the others down. A call DPS is late to answer gives
  its slot back and goes on without one, up to ``sink.detached_limit`` such calls
  (:mod:`.slots`): calls that hang hold up their own records only.
- Each call takes its turn at the :class:`~.limiter.RateLimiter` and passes the
  :class:`~.breaker.Breaker`; how it went is reported to both (throttling to the
  limiter only: it is not a failure).
- A transient failure is retried after the record's own backoff (``retry_initial``
  doubling up to ``retry_max``, jittered, at least ``Retry-After``); a throttled call
  after ``Retry-After``. After ``sink.give_up_after`` seconds the record is
  dead-lettered as ``exhausted``; business refusals are dead-lettered as ``rejected``
  at once.
- An allocate that was sent and never answered (timed out, connection cut) may have
  taken effect: before allocating again, DPS is asked (Get DPS Device). If it shows the
  sn allocated, the allocation is recorded from that answer and allocate is not called
  again; if not, allocate is called; if the check itself fails, it is tried again later.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import msgspec

from pipeline.dps.protocol import is_allocated
from pipeline.errors import DpsError, DpsUnanswered, MappingError
from pipeline.io.aio import Backoff, KeyedLocks
from pipeline.ops import tracing
from pipeline.ops.metrics import SINK_CALL_SECONDS, SINK_CALLS, SINK_RETRIES
from pipeline.stages.sink.outcomes import log_context
from pipeline.stages.sink.slots import CallSlots

if TYPE_CHECKING:
    from collections.abc import Callable

    from aiokafka import ConsumerRecord

    from pipeline.config import SinkConfig
    from pipeline.core.mapping import Mapped, Mapper
    from pipeline.dps.client import DpsClient
    from pipeline.stages.sink.breaker import Breaker
    from pipeline.stages.sink.limiter import RateLimiter
    from pipeline.stages.sink.outcomes import Outcomes

__all__ = ["Allocator"]

log = logging.getLogger(__name__)

_CALLED_OK = SINK_CALLS.labels("ok")  # once, not per call
_encode = msgspec.json.Encoder().encode


class Allocator:
    """Turns one ``iotda.subdevices.added`` record into exactly one recorded outcome.

    Args:
        cfg: the ``[sink]`` section.
        mapper: sn, orgId and deviceData for a child.
        dps: an open DPS client.
        breaker: shared by every call of this sink.
        limiter: shared by every call of this sink.
        outcomes: where allocations and DLQ records go.
        on_answer: called when a DPS call has ended (progress, for liveness).
    """

    def __init__(
        self,
        cfg: SinkConfig,
        *,
        mapper: Mapper,
        dps: DpsClient,
        breaker: Breaker,
        limiter: RateLimiter,
        outcomes: Outcomes,
        on_answer: Callable[[], None],
    ) -> None:
        self._cfg = cfg
        self._mapper = mapper
        self._slots = CallSlots(
            cfg.concurrency, detached_limit=cfg.detached_limit, timeout=cfg.dps.timeout
        )
        self._dps = dps  # called through the slots: late calls give theirs back (.slots)
        self._breaker = breaker
        self._limiter = limiter
        self._outcomes = outcomes
        self._on_answer = on_answer
        self._sn_locks: KeyedLocks[str] = KeyedLocks()
        self.busy: set[bytes] = set()
        """Sources of the records whose call is on the wire or whose outcome is being
        written: cancelling one of those could drop an allocation DPS already made."""

    async def process(
        self,
        record: ConsumerRecord[bytes, bytes],
        source: bytes,
        *,
        superseded: Callable[[], bool] = lambda: False,
    ) -> None:
        """Map, allocate and record the outcome of ``record``.

        ``superseded`` is asked before each retry: a later delete or add of the child
        (:mod:`.lifecycle`) ends the retries, and the record is dead-lettered as such.
        """
        # One coroutine for what follows, not two: this runs for every record.
        held: str | None = None  # the sn this record holds
        try:
            try:
                mapped = self._map(record.value)
            except MappingError as exc:
                log.warning("record is invalid: %s", exc, extra=log_context(record, None))
                self.busy.add(source)
                await self._outcomes.dead_letter(
                    record, source, None, kind="invalid", code=None, message=str(exc),
                    request_id=None, attempts=0,
                )  # fmt: skip
                return
            sn = mapped.sn
            child = mapped.child
            tracing.current().describe(sn=sn, gateway_id=child.gateway_id, event_id=child.event_id)
            await self._sn_locks.acquire(sn)
            held = sn
            await self._allocate(record, source, mapped, superseded)
        finally:
            self.busy.discard(source)
            if held is not None:
                self._sn_locks.release(held)

    def _map(self, value: bytes | None) -> Mapped:
        if value is None:  # a tombstone: there is nothing to read
            msg = "not an added-child record: the record has no value (a tombstone)"
            raise MappingError(msg)
        return self._mapper.map(value)

    async def _allocate(
        self,
        record: ConsumerRecord[bytes, bytes],
        source: bytes,
        mapped: Mapped,
        superseded: Callable[[], bool],
    ) -> None:
        backoff = Backoff(self._cfg.retry_initial, self._cfg.retry_max)
        first = time.monotonic()
        attempts = 0
        unsure = False  # an allocate went unanswered: it may have taken effect
        while True:
            attempts += 1
            # A slot covers a call and the recording of its outcome: a crash can then lose
            # the outcome of `concurrency` + `detached_limit` allocations at most (allocated
            # again after it).
            async with self._slots:
                delay, unsure = await self._attempt(
                    record, source, mapped, attempts=attempts, first=first, backoff=backoff,
                    unsure=unsure,
                )  # fmt: skip
            if delay is None:
                return
            self.busy.discard(source)  # nothing on the wire while it waits, and no slot held
            SINK_RETRIES.inc()
            await asyncio.sleep(delay)
            if superseded():
                # A later delete (or add) waits for this record's turn: give it up. Should
                # an unanswered allocate have taken effect, the delete that follows finds
                # the sn allocated and releases it.
                self.busy.add(source)
                await self._outcomes.dead_letter(
                    record, source, mapped, kind="superseded", code=None,
                    message="the child was deleted or added again while this add waited "
                    "to retry: not allocated", request_id=None, attempts=attempts,
                )  # fmt: skip
                return

    async def _attempt(
        self,
        record: ConsumerRecord[bytes, bytes],
        source: bytes,
        mapped: Mapped,
        *,
        attempts: int,
        first: float,
        backoff: Backoff,
        unsure: bool,
    ) -> tuple[float | None, bool]:
        """One call, and the outcome if it settles the record; else the delay before a retry.

        Whether a failed call is tried again is the error's ``retriable`` alone (the DPS
        client sets it from the answer, :func:`pipeline.dps.protocol.classify`). When
        ``unsure`` (an earlier allocate went unanswered), DPS is asked first whether it
        took effect. Returns the delay (None: settled) and whether it is still unsure.
        """
        try:
            if unsure:
                found = await self._check(record, source, mapped)
                unsure = False
                if found is not None:
                    device, request_id = found, None
                else:
                    device, request_id = await self._call(record, source, mapped)
            else:
                device, request_id = await self._call(record, source, mapped)
        except DpsError as exc:
            unsure = unsure or isinstance(exc, DpsUnanswered)
            if not exc.retriable:
                context = log_context(record, mapped) | {"code": exc.code}
                log.warning("DPS rejected sn %s: %s", mapped.sn, exc, extra=context)
                await self._outcomes.dead_letter(
                    record, source, mapped, kind="rejected", code=exc.code, message=exc.msg,
                    request_id=exc.request_id, attempts=attempts, http_status=exc.http_status,
                )  # fmt: skip
                return None, False
            if time.monotonic() - first >= self._cfg.give_up_after:
                context = log_context(record, mapped) | {"code": exc.code}
                log.warning(
                    "giving up on sn %s after %d attempts: %s", mapped.sn, attempts, exc,
                    extra=context,
                )  # fmt: skip
                await self._outcomes.dead_letter(
                    record, source, mapped, kind="exhausted", code=exc.code,
                    message=exc.msg, request_id=exc.request_id, attempts=attempts,
                    http_status=exc.http_status,
                )  # fmt: skip
                return None, False
            if exc.throttled and exc.retry_after is not None:
                delay = exc.retry_after  # DPS is fine, it said when: no backoff
            else:
                delay = backoff.next(exc.retry_after)
            log.debug("sn %s: %s; retrying in %.2f s", mapped.sn, exc, delay)
            return delay, unsure
        await self._outcomes.allocated(
            record, mapped, device, request_id=request_id, attempts=attempts, source=source
        )
        return None, False

    async def _check(
        self, record: ConsumerRecord[bytes, bytes], source: bytes, mapped: Mapped
    ) -> msgspec.Raw | None:
        """Get DPS Device: the device if DPS shows ``mapped.sn`` allocated, else None.

        Paced and guarded like an allocate. A refusal (35400, ...) is not an answer to the
        question: the allocate that follows is judged on its own.
        """
        taken_at = await self._limiter.wait()
        probe = await self._breaker.acquire()
        self.busy.add(source)
        try:
            device = await self._slots.call(self._dps.get_device(mapped.org_id, mapped.sn))
        except DpsError as exc:
            self._failed(exc, probe, record, mapped, taken_at)
            if exc.retriable:
                raise
            return None
        except BaseException:
            self._breaker.abandon(probe)
            raise
        finally:
            self._on_answer()
        self._breaker.succeeded(probe)
        self._limiter.succeeded()
        if device is None or not is_allocated(device):
            return None
        log.info(
            "sn %s: an unanswered allocate took effect; recording it from Get DPS Device",
            mapped.sn, extra=log_context(record, mapped),
        )  # fmt: skip
        return msgspec.Raw(_encode(device))

    async def _call(
        self, record: ConsumerRecord[bytes, bytes], source: bytes, mapped: Mapped
    ) -> tuple[msgspec.Raw, str | None]:
        """One allocate call (in a call slot), paced by the limiter, let through by the breaker."""
        # The limiter's and the breaker's waits only when they make one wait (coroutines
        # for every call otherwise).
        taken_at, delay = self._limiter.take()
        if delay > 0:
            await asyncio.sleep(delay)
        breaker = self._breaker
        probe = await breaker.acquire() if breaker.open else False
        self.busy.add(source)
        started = time.monotonic()
        try:
            answer = await self._slots.call(self._dps.allocate(mapped.org_id, mapped.request))
        except DpsError as exc:
            self._failed(exc, probe, record, mapped, taken_at)
            raise
        except BaseException:
            # Cancelled (hand-back, shutdown) or a bug: give the probe's turn back.
            self._breaker.abandon(probe)
            raise
        finally:
            # The exemplar links a slow call to its trace (OpenMetrics; sampled traces only).
            SINK_CALL_SECONDS.observe(time.monotonic() - started, exemplar=tracing.exemplar())
            self._on_answer()
        _CALLED_OK.inc(exemplar=tracing.exemplar())
        self._breaker.succeeded(probe)
        self._limiter.succeeded()
        return answer

    def _failed(
        self,
        exc: DpsError,
        probe: bool,
        record: ConsumerRecord[bytes, bytes],
        mapped: Mapped,
        taken_at: float,
    ) -> None:
        """Tell the breaker and the limiter how a failed call went."""
        if not exc.retriable:
            SINK_CALLS.labels("rejected").inc()
            self._breaker.succeeded(probe)  # DPS works: it judged the record
            return
        if exc.throttled:
            SINK_CALLS.labels("throttled").inc()
            self._limiter.throttled(taken_at)
            self._breaker.succeeded(probe)  # DPS answers; it only wants fewer calls
            return
        SINK_CALLS.labels("transient").inc()
        if exc.hint is not None:
            # Only the operator can cure this: say what to check, at warning level (the
            # breaker opens on it, so this repeats once per probe period at most).
            context = log_context(record, mapped) | {"code": exc.code, "hint": exc.hint}
            log.warning("%s", exc.diagnosis(), extra=context)
        self._breaker.failed(
            probe, mapped.sn, exc.diagnosis(), operator=exc.hint is not None,
            retry_after=exc.retry_after, sent_at=taken_at,
        )  # fmt: skip
