"""Router stage: one Kafka record per child, read-process-write in Kafka transactions.

Each batch of down events, the child records it yields and the consumer offsets are one
transaction: a crash before the commit aborts the outputs and the input is read again;
after it, the offsets have moved with them. Consumers of the outputs read committed, so
each child appears exactly once. A rebalance waits for the transaction in flight
(aiokafka has no KIP-447 fencing), and redelivered events (same gateway and event_id,
as MQTT QoS 1 may produce) are skipped within a window that survives restarts: on
assignment it is rebuilt from the input partition's recent history. The decisions are
pure functions in :mod:`pipeline.core.routing`; this module moves the bytes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from aiokafka.errors import KafkaError, ProducerFenced

from pipeline.core.routing import Dedup, route
from pipeline.errors import DecodeError, StageFailed
from pipeline.io import kafka
from pipeline.io.aio import Backoff, Stopped, unless_stopped
from pipeline.ops.metrics import (
    ROUTER_CHILDREN,
    ROUTER_DUPLICATES,
    ROUTER_RECORDS,
    ROUTER_SKIPPED,
    ROUTER_TRANSACTIONS,
    UNEXPECTED_ERRORS,
)
from pipeline.schemas import utc_now
from pipeline.stages.runtime import Subscription

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

    from pipeline.config import Config
    from pipeline.stages.runtime import Run

__all__ = ["Router"]

log = logging.getLogger(__name__)


class _Batch:
    """What one transaction routes: child and DLQ sends, and what to remember on commit."""

    def __init__(self) -> None:
        self.sends: list[asyncio.Future[object]] = []
        self.seen: dict[tuple[str, str], int] = {}
        """(gateway, event_id) -> record timestamp, for the pairs this transaction routes."""
        self.counts: collections.Counter[str] = collections.Counter()


class Router:
    """The router worker.

    Every input partition has its own transactional producer, with the transactional id
    ``{router.transactional_id}-{topic}-{partition}``, the same in every replica. Whoever
    is assigned a partition starts that producer before reading it, which fences the
    previous owner: if a stalled router (one the group gave up on while it was in a
    transaction: aiokafka has no KIP-447 to check its generation) wakes and commits, its
    transaction fails with ProducerFenced instead of writing the partition's children a
    second time, and it stops.

    Args:
        cfg: the whole configuration (``kafka`` and ``router`` sections are used).
    """

    name = "route"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._topics = cfg.kafka.topics
        self.lock = asyncio.Lock()
        self._dedup = Dedup(cfg.router.dedup_window, cfg.router.dedup_max_entries)
        self._retry = Backoff(0.5, 10.0)
        self._consumer: AIOKafkaConsumer | None = None
        self._producers: dict[TopicPartition, AIOKafkaProducer] = {}
        self._busy = False

    def transactional_id(self, tp: TopicPartition) -> str:
        """The transactional id of the producer that writes what ``tp`` yields."""
        return f"{self.cfg.router.transactional_id}-{tp.topic}-{tp.partition}"

    def topics(self) -> list[str]:
        """What it reads and writes."""
        t = self._topics
        return [t.down_events, t.added, t.failed, t.down_events_dlq]

    def needs_mqtt(self) -> bool:
        """It does not."""
        return False

    def subscription(self) -> Subscription:
        """The down events, as the router group; producers follow the partitions."""
        return Subscription(
            self.cfg.router.group_id,
            [self._topics.down_events],
            revoked=self._revoked,
            assigned=self._assigned,
        )

    def checks(self) -> list[str]:
        """None beyond the runtime's."""
        return []

    def busy(self) -> bool:
        """A transaction is in progress."""
        return self._busy

    async def work(self, run: Run) -> None:
        """Route batches until stopping; the transaction in flight finishes first."""
        kafka.shorten_transaction_backoff()  # back-to-back transactions: 2 ms, not 20
        consumer = run.consumer
        assert consumer is not None  # noqa: S101  (a consuming stage gets its consumer)
        self._consumer = consumer
        run.after_close(self._stop_all)
        try:
            while True:
                batch = await unless_stopped(
                    run.stopping,
                    consumer.getmany(timeout_ms=1000, max_records=self.cfg.router.batch_max),
                )
                run.beat()
                if batch:
                    async with self.lock:
                        self._busy = True
                        await self._transactions(consumer, batch)
                        self._busy = False
                        run.beat()
        except Stopped:
            pass  # the transaction in flight (if any) has committed

    async def _stop_all(self) -> None:
        await self._stop_producers(list(self._producers))

    async def _start_producer(self, tp: TopicPartition) -> None:
        """Start ``tp``'s producer; this fences (and aborts) a previous owner's transaction."""
        # A transaction waits for its sends before it commits: a linger would only delay it.
        producer = kafka.producer(
            self.cfg.kafka, transactional_id=self.transactional_id(tp), linger_ms=0
        )
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        self._producers[tp] = producer

    async def _stop_producers(self, tps: list[TopicPartition]) -> None:
        for tp in tps:
            producer = self._producers.pop(tp, None)
            if producer is not None:
                with contextlib.suppress(Exception):
                    await producer.stop()

    async def _renew_producer(self, tp: TopicPartition) -> None:
        """Replace ``tp``'s producer after Kafka refused one of its sends.

        aiokafka's producer cannot be trusted after that: its sequence numbers are off and
        later records would be lost. A new one with the same transactional id fences the old.
        """
        await self._stop_producers([tp])
        await self._start_producer(tp)

    async def _revoked(self, revoked: list[TopicPartition]) -> None:
        # Let the transaction in flight commit before another consumer gets the partitions.
        async with self.lock:
            log.info("router partitions revoked: %s", sorted(tp.partition for tp in revoked))
            await self._stop_producers(revoked)

    async def _assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("router partitions assigned: %s", sorted(tp.partition for tp in assigned))
        # aiokafka may already be fetching: hold the lock so no batch is routed before the
        # previous owners are fenced and the de-duplication window is re-learned. Fencing
        # first: the committed offsets read afterwards include the previous owner's last
        # transaction, whether it committed or was aborted by the fencing.
        async with self.lock:
            # (aiokafka may re-join without a revocation: drop what is not ours any more.)
            await self._stop_producers([tp for tp in self._producers if tp not in assigned])
            for tp in assigned:
                if tp not in self._producers:
                    await self._start_producer(tp)
            await self.rebuild_dedup(assigned)

    async def _transactions(
        self, consumer: AIOKafkaConsumer, batch: dict[TopicPartition, list[ConsumerRecord]]
    ) -> None:
        """One transaction per partition of ``batch``, side by side."""
        # A partition revoked since getmany() returned is another router's now: skip it.
        mine = {tp: records for tp, records in batch.items() if tp in self._producers}
        results = await asyncio.gather(
            *(self._transaction(consumer, tp, records) for tp, records in mine.items()),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, ProducerFenced):
                msg = (
                    "another router took over a partition while this one was in a "
                    f"transaction for it (fenced: {result}); its outputs were aborted"
                )
                raise StageFailed(msg) from result
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _transaction(
        self, consumer: AIOKafkaConsumer, tp: TopicPartition, records: list[ConsumerRecord]
    ) -> None:
        try:
            await self._commit(tp, records)
        except ProducerFenced:
            raise
        except KafkaError as exc:
            ROUTER_TRANSACTIONS.labels("aborted").inc()
            if exc.retriable:
                delay = self._retry.next()
                log.warning(
                    "transaction aborted (%s); partition %d will be read again in %.1f s",
                    exc, tp.partition, delay, extra={"topic": tp.topic, "partition": tp.partition},
                )  # fmt: skip
                consumer.seek(tp, records[0].offset)
                await asyncio.sleep(delay)
                return
            log.warning(
                "Kafka refused the transaction (%s): routing partition %d one record at a time",
                exc, tp.partition, extra={"topic": tp.topic, "partition": tp.partition},
            )  # fmt: skip
            await self._renew_producer(tp)
            await self._one_by_one(consumer, tp, records)
            return
        self._retry.reset()

    async def _commit(self, tp: TopicPartition, records: list[ConsumerRecord]) -> None:
        """Route ``records`` of ``tp`` and move its offset in one transaction."""
        producer = self._producers[tp]
        batch = _Batch()
        async with producer.transaction():
            for record in records:
                await self._route_one(producer, record, batch)
            # aiokafka commits a transaction even when a send in it failed (the record is
            # then lost): wait for every send, so a failure aborts the transaction instead.
            await asyncio.gather(*batch.sends)
            await producer.send_offsets_to_transaction(
                {tp: records[-1].offset + 1}, self.cfg.router.group_id
            )
        ROUTER_TRANSACTIONS.labels("committed").inc()
        for key, at_ms in batch.seen.items():
            self._dedup.add(key, at_ms)
        for name, n in batch.counts.items():
            ROUTER_CHILDREN.labels(name).inc(n)

    async def _one_by_one(
        self, consumer: AIOKafkaConsumer, tp: TopicPartition, records: list[ConsumerRecord]
    ) -> None:
        """One transaction per record; the one Kafka will not take goes to the DLQ."""
        for record in records:
            try:
                await self._commit(tp, [record])
            except ProducerFenced:
                raise
            except KafkaError as exc:
                if exc.retriable:  # later: read this partition again from here
                    consumer.seek(tp, record.offset)
                    return
                await self._renew_producer(tp)
                await self._refused(tp, record, exc)

    async def _refused(self, tp: TopicPartition, record: ConsumerRecord, exc: KafkaError) -> None:
        """Dead-letter the input whose outputs Kafka refused, in its own transaction."""
        producer = self._producers[tp]
        reason = f"router: Kafka refused the child records of this event: {exc}"
        log.error(reason, extra=_where(record))
        ROUTER_RECORDS.labels("dlq").inc()
        try:
            async with producer.transaction():
                sent = await self._dead_letter(producer, record, reason)
                await sent
                await producer.send_offsets_to_transaction(
                    {tp: record.offset + 1}, self.cfg.router.group_id
                )
        except KafkaError as again:
            where = f"{tp.topic}/{tp.partition}/{record.offset}"
            msg = f"Kafka refused even the DLQ record for {where}: {again}"
            raise StageFailed(msg) from again

    async def _dead_letter(
        self, producer: AIOKafkaProducer, record: ConsumerRecord, reason: str
    ) -> asyncio.Future[object]:
        future: asyncio.Future[object] = await producer.send(
            self._topics.down_events_dlq,
            record.value,
            key=record.key,
            headers=[("error", reason.encode()), ("received-at", utc_now().encode())],
        )
        return future

    async def _route_one(
        self, producer: AIOKafkaProducer, record: ConsumerRecord, batch: _Batch
    ) -> None:
        try:
            routed = route(record.value)
        except DecodeError as exc:
            ROUTER_RECORDS.labels("dlq").inc()
            log.warning("dead-lettering a down-event record: %s", exc, extra=_where(record))
            batch.sends.append(await self._dead_letter(producer, record, f"router: {exc}"))
            return
        except Exception as exc:  # a bug: dead-letter this record, keep the partition moving
            UNEXPECTED_ERRORS.labels("route").inc()
            log.exception("unexpected error routing a record", extra=_where(record))
            reason = f"router: internal error: {type(exc).__name__}: {exc}"
            batch.sends.append(await self._dead_letter(producer, record, reason))
            return
        ROUTER_RECORDS.labels("routed").inc()
        for label in routed.skipped:
            ROUTER_SKIPPED.labels(*label).inc()
        topics = self._topics
        for response in routed.responses:
            key = (routed.gateway_id, response.event_id)
            if key in batch.seen or self._dedup.seen(key, record.timestamp):
                ROUTER_DUPLICATES.inc()
                log.info(
                    "skipping redelivered event %s from %s", response.event_id, routed.gateway_id
                )
                continue
            batch.seen[key] = record.timestamp
            for child_key, value in response.added:
                batch.sends.append(await producer.send(topics.added, value, key=child_key))
            for child_key, value in response.failed:
                batch.sends.append(await producer.send(topics.failed, value, key=child_key))
            batch.counts["added"] += len(response.added)
            batch.counts["failed"] += len(response.failed)

    async def rebuild_dedup(self, assigned: list[TopicPartition]) -> None:
        """Re-learn the (gateway, event_id) pairs of the window before the committed offsets."""
        consumer = self._consumer
        if consumer is None or not assigned:
            return
        since_ms = int((time.time() - self.cfg.router.dedup_window) * 1000)
        starts = await consumer.offsets_for_times(dict.fromkeys(assigned, since_ms))
        ranges: kafka.Ranges = {}
        for tp in assigned:
            committed = await consumer.committed(tp)
            start = starts.get(tp)
            if committed and start is not None and start.offset < committed:
                ranges[tp] = (start.offset, committed)
        if not ranges:
            return
        learned = 0
        async with kafka.reader(self.cfg.kafka) as reader, asyncio.timeout(60):
            async for record in kafka.read_range(reader, ranges):
                learned += self._learn(record)
        log.info("router re-learned %d recent events for de-duplication", learned)

    def _learn(self, record: ConsumerRecord) -> int:
        try:
            routed = route(record.value)
        except DecodeError:
            return 0
        for response in routed.responses:
            self._dedup.add((routed.gateway_id, response.event_id), record.timestamp)
        return len(routed.responses)


def _where(record: ConsumerRecord) -> dict[str, object]:
    """Log context of an input record."""
    return {"topic": record.topic, "partition": record.partition, "offset": record.offset}
