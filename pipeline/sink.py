"""Sink stage: DPS allocate for every added child, concurrently, committing safely.

- Calls run concurrently up to ``sink.concurrency``, optionally rate limited, and never
  two at once for the same sn.
- An offset is committed only once the outcome of its record (and of every record before
  it in the partition) is in Kafka: ``dps.allocations`` or ``dps.allocations.dlq``.
- Business errors go to the DLQ as ``rejected`` at once; transient ones are retried with
  capped, jittered exponential backoff that honours ``Retry-After``. While DPS keeps
  failing a breaker pauses consumption and lets a single probe call through per backoff
  period, so an outage neither hammers DPS nor floods the DLQ. A record that has been
  failing for ``sink.give_up_after`` seconds goes to the DLQ as ``exhausted``.
- Every outcome carries ``source`` (input topic/partition/offset) and ``sink-group``
  headers. After a crash, the group's outcomes recorded past its committed offsets are
  read back on assignment, and those records are not allocated again: duplicate calls
  are bounded by the calls that were in flight.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from typing import TYPE_CHECKING

import msgspec
from aiokafka import ConsumerRebalanceListener, TopicPartition

from pipeline import kafka
from pipeline.aio import Stopped, unless_stopped
from pipeline.config import DpsConfig
from pipeline.dps import DpsClient
from pipeline.errors import DpsRejected, DpsTransient, MappingError
from pipeline.mapping import Mapped, Mapper
from pipeline.metrics import (
    SINK_CALL_SECONDS,
    SINK_CALLS,
    SINK_INFLIGHT,
    SINK_OUTCOMES,
    SINK_PAUSED,
    SINK_RETRIES,
)
from pipeline.schemas import Allocation, AllocationFailure, utc_now

if TYPE_CHECKING:
    from collections.abc import Callable

    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord

    from pipeline.config import Config
    from pipeline.ops import Health

__all__ = ["Breaker", "OffsetTracker", "Sink", "source_header"]

log = logging.getLogger(__name__)

_ENCODER = msgspec.json.Encoder()
SOURCE = "source"
GROUP = "sink-group"


def source_header(topic: str, partition: int, offset: int) -> bytes:
    """The ``source`` header of an outcome: where its input record was."""
    return f"{topic}/{partition}/{offset}".encode()


class OffsetTracker:
    """Per partition, the offset up to which every record's outcome is recorded."""

    def __init__(self) -> None:
        self._open: dict[TopicPartition, collections.OrderedDict[int, bool]] = {}
        self._safe: dict[TopicPartition, int] = {}

    def start(self, tp: TopicPartition, offset: int) -> None:
        """A record was handed out (offsets arrive in increasing order per partition)."""
        self._open.setdefault(tp, collections.OrderedDict())[offset] = False

    def done(self, tp: TopicPartition, offset: int) -> None:
        """The record's outcome is recorded; advance the safe point past finished records."""
        pending = self._open.get(tp)
        if pending is None or offset not in pending:
            return  # the partition was revoked meanwhile
        pending[offset] = True
        while pending and pending[next(iter(pending))]:
            first, _ = pending.popitem(last=False)
            self._safe[tp] = first + 1

    def in_flight(self, tps: set[TopicPartition] | None = None) -> int:
        """Records handed out and not finished, in ``tps`` (or everywhere)."""
        return sum(
            sum(1 for finished in pending.values() if not finished)
            for tp, pending in self._open.items()
            if tps is None or tp in tps
        )

    def take_commits(self) -> dict[TopicPartition, int]:
        """The safe offsets that moved since the last call."""
        out, self._safe = self._safe, {}
        return out

    def forget(self, tps: list[TopicPartition]) -> None:
        """Drop revoked partitions."""
        for tp in tps:
            self._open.pop(tp, None)
            self._safe.pop(tp, None)


class Breaker:
    """Opens on transient DPS failures; while open, one probe call per backoff period.

    Args:
        initial: first backoff, seconds.
        maximum: backoff cap, seconds.
        on_change: called with True when it opens and False when it closes.
    """

    def __init__(self, initial: float, maximum: float, on_change: Callable[[bool], None]) -> None:
        self._initial = initial
        self._maximum = maximum
        self._on_change = on_change
        self._failures = 0
        self._until = 0.0
        self._probe = asyncio.Lock()

    @property
    def open(self) -> bool:
        """Whether DPS is currently considered failing."""
        return self._failures > 0

    def delay(self, failures: int, retry_after: float | None) -> float:
        """Capped exponential backoff with jitter, at least ``retry_after``."""
        base: float = min(self._maximum, self._initial * 2.0 ** min(failures - 1, 30))
        return max(base * random.uniform(0.5, 1.0), retry_after or 0.0)

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
            self._until = time.monotonic() + self.delay(self._failures, retry_after)
            if self._failures == 1:
                self._on_change(True)
        elif self._failures:
            self._failures = 0
            self._on_change(False)
        if probe:
            self._probe.release()


class _RateLimiter:
    def __init__(self, rate: float | None) -> None:
        self._interval = 1.0 / rate if rate else 0.0
        self._next = 0.0

    async def wait(self) -> None:
        if not self._interval:
            return
        now = time.monotonic()
        slot = max(now, self._next)
        self._next = slot + self._interval
        if slot > now:
            await asyncio.sleep(slot - now)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self._sink.hand_back(list(revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self._sink.recover(list(assigned))


class Sink:
    """The sink worker.

    Args:
        cfg: the whole configuration (``kafka`` and ``sink`` sections are used).
        health: readiness checks to keep up to date (``kafka``, ``dps``).
    """

    def __init__(self, cfg: Config, health: Health | None = None) -> None:
        s = cfg.sink
        self._cfg = cfg
        self._topics = cfg.kafka.topics
        self._health = health
        self._mapper = Mapper(
            sn_from=s.sn_from, org_id=s.org_id, org_overrides=s.org_overrides,
            device_data=s.device_data,
        )  # fmt: skip
        self._slots = asyncio.Semaphore(s.concurrency)
        self._tracker = OffsetTracker()
        self._breaker = Breaker(s.retry_initial, s.retry_max, self._paused)
        self._limiter = _RateLimiter(s.rate_limit)
        self._sn_locks: dict[str, asyncio.Lock] = {}
        self._sn_users: collections.Counter[str] = collections.Counter()
        self._recorded: set[bytes] = set()
        self._recovered = asyncio.Event()
        self._recovered.set()
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._group = s.group_id.encode()
        if health is not None:
            health.set("sink.kafka", False)
            health.set("sink.dps", False)

    def _paused(self, failing: bool) -> None:
        SINK_PAUSED.set(1 if failing else 0)
        if self._health is not None:
            self._health.set("sink.dps", not failing)
        consumer = self._consumer
        if consumer is None:
            return
        if failing:
            log.warning("DPS is failing: pausing consumption, probing with backoff")
            consumer.pause(*consumer.assignment())
        else:
            log.info("DPS answers again: resuming consumption")
            consumer.resume(*consumer.assignment())

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then hand back in-flight work and commit."""
        topics = self._topics
        await kafka.ensure_topics(
            self._cfg.kafka, [topics.added, topics.allocations, topics.allocations_dlq]
        )
        consumer = kafka.consumer(self._cfg.kafka, group_id=self._cfg.sink.group_id)
        producer = kafka.producer(self._cfg.kafka)
        self._consumer, self._producer = consumer, producer
        async with producer, consumer, DpsClient(self._cfg.sink.dps) as dps:
            consumer.subscribe([topics.added], listener=_Rebalance(self))
            if self._health is not None:
                self._health.set("sink.kafka", True)
                self._health.set("sink.dps", True)
            log.info("sink consuming %s as %s", topics.added, self._cfg.sink.group_id)
            dps_cfg = self._cfg.sink.dps
            if dps_cfg.app_key == DpsConfig().app_key and "127.0.0.1" not in dps_cfg.base_url:
                log.warning(
                    "sink.dps.app_key is the demo default while %s is not local: "
                    "set sink.dps.app_key and sink.dps.app_secret",
                    dps_cfg.base_url,
                )
            committer = asyncio.create_task(self._commit_loop(stop), name="sink.commit")
            try:
                await self._consume(consumer, dps, stop)
            finally:
                await self._shutdown(committer)
        log.info("sink stopped")

    async def _consume(
        self, consumer: AIOKafkaConsumer, dps: DpsClient, stop: asyncio.Event
    ) -> None:
        stopped = asyncio.create_task(stop.wait())
        try:
            while True:
                batch = await unless_stopped(
                    stopped,
                    consumer.getmany(timeout_ms=500, max_records=self._cfg.sink.concurrency),
                )
                for tp, records in batch.items():
                    for record in records:
                        # Capacity first: this is where back-pressure stops intake. A record
                        # not started is not committed: it is consumed again next time.
                        await unless_stopped(stopped, self._slots.acquire())
                        self._tracker.start(tp, record.offset)
                        task = asyncio.create_task(self._handle(dps, tp, record))
                        self._tasks.add(task)
                        task.add_done_callback(self._tasks.discard)
        except Stopped:
            pass
        finally:
            stopped.cancel()

    async def _shutdown(self, committer: asyncio.Task[None]) -> None:
        if self._tasks:
            log.info("waiting for %d in-flight records", len(self._tasks))
            _, pending = await asyncio.wait(self._tasks, timeout=self._cfg.sink.dps.timeout * 2)
            for task in pending:  # handed back: not committed, allocated again next time
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        committer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await committer
        await self._commit()

    async def _commit_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(self._cfg.sink.commit_interval)
            await self._commit()

    async def _commit(self) -> None:
        commits = self._tracker.take_commits()
        if not commits or self._consumer is None:
            return
        assigned = self._consumer.assignment()
        commits = {tp: offset for tp, offset in commits.items() if tp in assigned}
        try:
            await self._consumer.commit(commits)
        except Exception as exc:  # a rebalance in progress: the records will be redone
            log.warning("offset commit failed (%s); those records may be allocated again", exc)

    async def hand_back(self, revoked: list[TopicPartition]) -> None:
        """Before partitions go elsewhere: let their in-flight records finish, then commit."""
        tps = set(revoked)
        deadline = time.monotonic() + self._cfg.sink.dps.timeout * 2
        while self._tracker.in_flight(tps) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await self._commit()
        self._tracker.forget(revoked)

    async def recover(self, assigned: list[TopicPartition]) -> None:
        """Learn which records past the committed offsets already have a recorded outcome."""
        consumer = self._consumer
        if consumer is None or not assigned:
            return
        # aiokafka fetches for the new partitions while this callback runs: no record may
        # be handled before we know which already have an outcome.
        self._recovered.clear()
        try:
            await self._recover(consumer, assigned)
        finally:
            self._recovered.set()

    async def _recover(self, consumer: AIOKafkaConsumer, assigned: list[TopicPartition]) -> None:
        if self._breaker.open:
            consumer.pause(*assigned)
        since: int | None = None
        beginnings = await consumer.beginning_offsets(assigned)
        ends = await consumer.end_offsets(assigned)
        for tp in assigned:
            committed = await consumer.committed(tp)
            first = beginnings[tp] if committed is None else committed
            if ends[tp] > first and (stamp := await self._timestamp_at(tp, first)) is not None:
                since = stamp if since is None else min(since, stamp)
        if since is None:
            return
        # Outcomes are written after their input record, so none of those past the
        # committed offsets is older than the first uncommitted input (less clock skew).
        found = await self._read_sources(since - 60_000)
        log.info("sink found %d outcomes recorded since the committed offsets", found)

    async def _read_sources(self, since_ms: int) -> int:
        topics = [self._topics.allocations, self._topics.allocations_dlq]
        reader = kafka.consumer(self._cfg.kafka, group_id=None)
        found = 0
        async with reader:
            tps = await kafka.partitions(reader, *topics)
            reader.assign(tps)
            starts = await reader.offsets_for_times(dict.fromkeys(tps, max(0, since_ms)))
            ends = await reader.end_offsets(tps)
            live = [tp for tp in tps if starts.get(tp) is not None and starts[tp].offset < ends[tp]]
            for tp in live:
                reader.seek(tp, starts[tp].offset)
            async with asyncio.timeout(60):
                while live:
                    for records in (await reader.getmany(timeout_ms=500)).values():
                        for record in records:
                            headers = {name: bytes(value) for name, value in record.headers or ()}
                            # Only this group's outcomes: another group is another pipeline.
                            if SOURCE in headers and headers.get(GROUP) == self._group:
                                self._recorded.add(headers[SOURCE])
                                found += 1
                    live = [tp for tp in live if await reader.position(tp) < ends[tp]]
        return found

    async def _timestamp_at(self, tp: TopicPartition, offset: int) -> int | None:
        reader = kafka.consumer(self._cfg.kafka, group_id=None)
        async with reader:
            reader.assign([tp])
            reader.seek(tp, offset)
            batch = await reader.getmany(tp, timeout_ms=2000, max_records=1)
        records = batch.get(tp)
        return records[0].timestamp if records else None

    async def _handle(self, dps: DpsClient, tp: TopicPartition, record: ConsumerRecord) -> None:
        SINK_INFLIGHT.inc()
        try:
            await self._recovered.wait()
            source = source_header(tp.topic, tp.partition, record.offset)
            if source in self._recorded:
                self._recorded.discard(source)
                SINK_OUTCOMES.labels("already_recorded").inc()
            else:
                try:
                    await self._process(dps, record, source)
                except Exception as exc:
                    # A bug must not stop this partition's commits for good: dead-letter
                    # the record with the reason, so it can be redriven once fixed.
                    log.exception("unexpected error handling %s", source.decode())
                    await self._dead_letter(
                        record, source, None, kind="invalid", code=None,
                        message=f"internal error: {exc!r}", request_id=None, attempts=0,
                    )  # fmt: skip
            self._tracker.done(tp, record.offset)
            if self._breaker.open and not self._tracker.in_flight() and self._consumer:
                # DPS is failing and no record is left to probe with (they gave up): fetch
                # the next ones, or consumption would stay paused for good.
                log.info("no record in flight while DPS is failing: fetching one to probe")
                self._consumer.resume(*self._consumer.assignment())
        finally:
            SINK_INFLIGHT.dec()
            self._slots.release()

    async def _process(self, dps: DpsClient, record: ConsumerRecord, source: bytes) -> None:
        try:
            mapped = self._map(record.value)
        except MappingError as exc:
            log.warning("record at %s is invalid: %s", source.decode(), exc)
            await self._dead_letter(
                record, source, None, kind="invalid", code=None, message=str(exc),
                request_id=None, attempts=0,
            )  # fmt: skip
            return
        sn = mapped.sn
        lock = self._sn_locks.setdefault(sn, asyncio.Lock())
        self._sn_users[sn] += 1
        try:
            async with lock:
                await self._allocate(dps, record, source, mapped)
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
        self, dps: DpsClient, record: ConsumerRecord, source: bytes, mapped: Mapped
    ) -> None:
        s = self._cfg.sink
        first = time.monotonic()
        attempts = 0
        while True:
            probe = await self._breaker.acquire()
            await self._limiter.wait()
            attempts += 1
            started = time.monotonic()
            try:
                device, request_id = await dps.allocate(mapped.org_id, mapped.request)
            except DpsTransient as exc:
                SINK_CALLS.labels("transient").inc()
                self._breaker.release(probe, failed=True, retry_after=exc.retry_after)
                if time.monotonic() - first >= s.give_up_after:
                    log.warning(
                        "giving up on sn %s after %d attempts: %s", mapped.sn, attempts, exc
                    )
                    await self._dead_letter(
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
                await self._dead_letter(
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
            child = mapped.child
            allocation = Allocation(
                sn=mapped.sn,
                org_id=mapped.org_id,
                device_id=mapped.device.device_id,
                gateway_id=child.gateway_id,
                event_id=child.event_id,
                attempts=attempts,
                request_id=request_id,
                allocated_at=utc_now(),
                device=device,
            )
            await self._record(
                self._topics.allocations, mapped.sn, _ENCODER.encode(allocation), source
            )
            SINK_OUTCOMES.labels("allocated").inc()
            return

    async def _dead_letter(
        self,
        record: ConsumerRecord,
        source: bytes,
        mapped: Mapped | None,
        *,
        kind: str,
        code: int | None,
        message: str,
        request_id: str | None,
        attempts: int,
    ) -> None:
        if record.value is None:  # a tombstone
            raw = msgspec.Raw(b"null")
        else:
            try:
                msgspec.json.decode(record.value)  # is it JSON? then embed it verbatim
                raw = msgspec.Raw(record.value)
            except (msgspec.DecodeError, UnicodeDecodeError):
                # Not JSON at all: keep it readable, as a JSON string.
                raw = msgspec.Raw(_ENCODER.encode(record.value.decode("utf-8", "replace")))
        child = mapped.child if mapped else None
        failure = AllocationFailure(
            sn=mapped.sn if mapped else None,
            org_id=mapped.org_id if mapped else None,
            device_id=mapped.device.device_id if mapped else None,
            gateway_id=child.gateway_id if child else None,
            event_id=child.event_id if child else None,
            attempts=attempts,
            error_kind=kind,  # type: ignore[arg-type]
            code=code,
            msg=message,
            request_id=request_id,
            failed_at=utc_now(),
            record=raw,
        )
        key = mapped.sn if mapped else None
        await self._record(self._topics.allocations_dlq, key, _ENCODER.encode(failure), source)
        SINK_OUTCOMES.labels(kind).inc()

    async def _record(self, topic: str, key: str | None, value: bytes, source: bytes) -> None:
        """Write an outcome and wait for Kafka's acknowledgement (retrying until it comes)."""
        producer = self._producer
        if producer is None:  # pragma: no cover - run() sets it first
            msg = "sink is not running"
            raise RuntimeError(msg)
        delay = 0.5
        while True:
            try:
                await producer.send_and_wait(
                    topic,
                    value,
                    key=key.encode() if key else None,
                    headers=[(SOURCE, source), (GROUP, self._group)],
                )
            except Exception as exc:
                log.warning(
                    "could not record outcome in %s (%s); retrying in %.1f s", topic, exc, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
            else:
                return
