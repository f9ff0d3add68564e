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
import logging
import time
from typing import TYPE_CHECKING

from aiokafka.errors import KafkaError, ProducerFenced

from pipeline.core.routing import Dedup, route
from pipeline.errors import DecodeError
from pipeline.io import kafka
from pipeline.io.aio import Backoff, Stopped, first_set, unless_stopped
from pipeline.ops.metrics import (
    ROUTER_CHILDREN,
    ROUTER_DUPLICATES,
    ROUTER_RECORDS,
    ROUTER_SKIPPED,
    ROUTER_TRANSACTIONS,
)
from pipeline.schemas import utc_now

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

    from pipeline.config import Config
    from pipeline.ops.server import Health

__all__ = ["Router"]

log = logging.getLogger(__name__)


class Router:
    """The router worker.

    Args:
        cfg: the whole configuration (``kafka`` and ``router`` sections are used).
        health: readiness checks to keep up to date (``kafka``).
    """

    def __init__(self, cfg: Config, health: Health | None = None) -> None:
        self._cfg = cfg
        self._topics = cfg.kafka.topics
        self._health = health
        self.lock = asyncio.Lock()
        self._dedup = Dedup(cfg.router.dedup_window, cfg.router.dedup_max_entries)
        self._retry = Backoff(0.5, 10.0)
        self._consumer: AIOKafkaConsumer | None = None
        if health is not None:
            health.set("route.kafka", False)

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set; the transaction in flight finishes first."""
        await kafka.wait_until_reachable(self._cfg.kafka, stop)
        topics = self._topics
        await kafka.ensure_topics(
            self._cfg.kafka,
            [topics.down_events, topics.added, topics.failed, topics.down_events_dlq],
        )
        producer = kafka.producer(
            self._cfg.kafka, transactional_id=self._cfg.router.transactional_id
        )
        consumer = kafka.consumer(self._cfg.kafka, group_id=self._cfg.router.group_id)
        self._consumer = consumer
        async with producer, consumer:
            listener = kafka.Rebalance("router", revoked=self._revoked, assigned=self._assigned)
            consumer.subscribe([topics.down_events], listener=listener)
            if self._health is not None:
                self._health.set("route.kafka", True)
            log.info("router consuming %s as %s", topics.down_events, self._cfg.router.group_id)
            stopped = first_set(stop, listener.failed)
            try:
                while True:
                    batch = await unless_stopped(
                        stopped,
                        consumer.getmany(timeout_ms=1000, max_records=self._cfg.router.batch_max),
                    )
                    if batch:
                        async with self.lock:
                            await self._transaction(producer, consumer, batch)
            except Stopped:
                pass  # the transaction in flight (if any) has committed
            finally:
                stopped.cancel()
        listener.raise_if_failed()
        log.info("router stopped")

    async def _revoked(self, revoked: list[TopicPartition]) -> None:
        # Let the transaction in flight commit before another consumer gets the partitions.
        async with self.lock:
            log.info("router partitions revoked: %s", sorted(tp.partition for tp in revoked))

    async def _assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("router partitions assigned: %s", sorted(tp.partition for tp in assigned))
        # aiokafka may already be fetching: hold the lock so no batch is routed before
        # the de-duplication window is re-learned.
        async with self.lock:
            await self.rebuild_dedup(assigned)

    async def _transaction(
        self,
        producer: AIOKafkaProducer,
        consumer: AIOKafkaConsumer,
        batch: dict[TopicPartition, list[ConsumerRecord]],
    ) -> None:
        # (gateway, event_id) -> record timestamp, for the pairs this batch routes.
        pending: dict[tuple[str, str], int] = {}
        counts: collections.Counter[str] = collections.Counter()
        try:
            async with producer.transaction():
                for records in batch.values():
                    for record in records:
                        await self._route_one(producer, record, pending, counts)
                await producer.send_offsets_to_transaction(
                    {tp: records[-1].offset + 1 for tp, records in batch.items()},
                    self._cfg.router.group_id,
                )
        except ProducerFenced:
            log.exception(
                "another router took over transactional id %s; stopping",
                self._cfg.router.transactional_id,
            )
            raise
        except KafkaError as exc:
            ROUTER_TRANSACTIONS.labels("aborted").inc()
            delay = self._retry.next()
            log.warning(
                "transaction aborted (%s); the batch will be read again in %.1f s", exc, delay
            )
            for tp, records in batch.items():
                consumer.seek(tp, records[0].offset)
            await asyncio.sleep(delay)
            return
        self._retry.reset()
        ROUTER_TRANSACTIONS.labels("committed").inc()
        for key, at_ms in pending.items():
            self._dedup.add(key, at_ms)
        for name, n in counts.items():
            ROUTER_CHILDREN.labels(name).inc(n)

    async def _route_one(
        self,
        producer: AIOKafkaProducer,
        record: ConsumerRecord,
        pending: dict[tuple[str, str], int],
        counts: collections.Counter[str],
    ) -> None:
        topics = self._topics
        try:
            routed = route(record.value)
        except DecodeError as exc:
            ROUTER_RECORDS.labels("dlq").inc()
            log.warning("dead-lettering down-event record at offset %d: %s", record.offset, exc)
            await producer.send(
                topics.down_events_dlq,
                record.value,
                key=record.key,
                headers=[("error", f"router: {exc}".encode()), ("received-at", utc_now().encode())],
            )
            return
        ROUTER_RECORDS.labels("routed").inc()
        for label in routed.skipped:
            ROUTER_SKIPPED.labels(*label).inc()
        for response in routed.responses:
            key = (routed.gateway_id, response.event_id)
            if key in pending or self._dedup.seen(key, record.timestamp):
                ROUTER_DUPLICATES.inc()
                log.info(
                    "skipping redelivered event %s from %s", response.event_id, routed.gateway_id
                )
                continue
            pending[key] = record.timestamp
            for child_key, value in response.added:
                await producer.send(topics.added, value, key=child_key)
            for child_key, value in response.failed:
                await producer.send(topics.failed, value, key=child_key)
            counts["added"] += len(response.added)
            counts["failed"] += len(response.failed)

    async def rebuild_dedup(self, assigned: list[TopicPartition]) -> None:
        """Re-learn the (gateway, event_id) pairs of the window before the committed offsets."""
        consumer = self._consumer
        if consumer is None or not assigned:
            return
        since_ms = int((time.time() - self._cfg.router.dedup_window) * 1000)
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
        async with kafka.reader(self._cfg.kafka) as reader, asyncio.timeout(60):
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
