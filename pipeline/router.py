"""Router stage: one Kafka record per child, read-process-write in Kafka transactions.

Each batch of down events, the child records it yields and the consumer offsets are one
transaction: a crash before the commit aborts the outputs and the input is read again;
after it, the offsets have moved with them. Consumers of the outputs read committed, so
each child appears exactly once. A rebalance waits for the transaction in flight
(aiokafka has no KIP-447 fencing), and redelivered events (same gateway and event_id,
as MQTT QoS 1 may produce) are skipped within a window that survives restarts: on
assignment it is rebuilt from the input partition's recent history.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from typing import TYPE_CHECKING

import msgspec
from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError, ProducerFenced

from pipeline import kafka
from pipeline.aio import Stopped, unless_stopped
from pipeline.decode import service_label
from pipeline.errors import DecodeError
from pipeline.metrics import (
    ROUTER_CHILDREN,
    ROUTER_DUPLICATES,
    ROUTER_RECORDS,
    ROUTER_SKIPPED,
    ROUTER_TRANSACTIONS,
)
from pipeline.schemas import (
    ADD_RESPONSE,
    SUB_DEVICE_MANAGER,
    AddedChild,
    DeviceInfo,
    DownEvent,
    DownEventRecord,
    FailedChild,
    Reason,
    normalise_event_time,
    utc_now,
)

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord

    from pipeline.config import Config
    from pipeline.ops import Health

__all__ = ["Dedup", "Response", "Routed", "Router", "route"]

log = logging.getLogger(__name__)


class _AddParas(msgspec.Struct):
    # Validated by ingest; kept raw so the children are copied byte for byte.
    successful_devices: list[msgspec.Raw]
    failed_devices: list[msgspec.Raw]


class _Keys(msgspec.Struct):
    node_id: str
    device_id: str | None = None


_RECORD = msgspec.json.Decoder(DownEventRecord)
_EVENT = msgspec.json.Decoder(DownEvent)
_PARAS = msgspec.json.Decoder(_AddParas)
_DEVICE = msgspec.json.Decoder(DeviceInfo)
_REASON = msgspec.json.Decoder(Reason)
_ENCODER = msgspec.json.Encoder()


@dataclasses.dataclass(frozen=True, slots=True)
class Response:
    """The children of one add_sub_device_response, as encoded (key, value) pairs."""

    event_id: str
    added: list[tuple[bytes, bytes]]
    failed: list[tuple[bytes, bytes]]


@dataclasses.dataclass(frozen=True, slots=True)
class Routed:
    """What one down-event record yields."""

    gateway_id: str
    mqtt_topic: str
    responses: list[Response]
    skipped: list[tuple[str, str]]


def route(value: bytes) -> Routed:
    """Split one ``iotda.down-events`` value into child records (pure).

    Raises:
        DecodeError: the record is not a down-event record this pipeline wrote.
    """
    try:
        record = _RECORD.decode(value)
        event = _EVENT.decode(record.event)
        responses: list[Response] = []
        skipped: list[tuple[str, str]] = []
        for service in event.services or ():
            if (service.service_id, service.event_type) != (SUB_DEVICE_MANAGER, ADD_RESPONSE):
                skipped.append(service_label(service))
                continue
            if service.event_id is None:
                msg = "add_sub_device_response without event_id"
                raise DecodeError(msg)
            paras = _PARAS.decode(service.paras)
            gateway, event_id, raw_time = record.gateway_id, service.event_id, service.event_time
            event_time = normalise_event_time(raw_time)
            added = [
                (
                    _DEVICE.decode(raw).device_id.encode(),
                    _ENCODER.encode(
                        AddedChild(
                            gateway_id=gateway,
                            event_id=event_id,
                            event_time=event_time,
                            event_time_raw=raw_time,
                            device=raw,
                        )
                    ),
                )
                for raw in paras.successful_devices
            ]
            failed = [
                (
                    _REASON.decode(raw).node_id.encode(),
                    _ENCODER.encode(
                        FailedChild(
                            gateway_id=gateway,
                            event_id=event_id,
                            event_time=event_time,
                            event_time_raw=raw_time,
                            reason=raw,
                        )
                    ),
                )
                for raw in paras.failed_devices
            ]
            responses.append(Response(service.event_id, added, failed))
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError) as exc:
        msg = f"not a down-event record: {exc}"
        raise DecodeError(msg) from None
    return Routed(record.gateway_id, record.mqtt_topic, responses, skipped)


class Dedup:
    """(gateway, event_id) pairs seen within ``window`` seconds, at most ``max_entries``."""

    def __init__(self, window: float, max_entries: int) -> None:
        self._window_ms = int(window * 1000)
        self._max = max_entries
        self._seen: collections.OrderedDict[tuple[str, str], int] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def seen(self, key: tuple[str, str], at_ms: int) -> bool:
        """Whether ``key`` was added less than the window before ``at_ms``."""
        when = self._seen.get(key)
        return when is not None and at_ms - when < self._window_ms

    def add(self, key: tuple[str, str], at_ms: int) -> None:
        """Remember ``key``; forget entries that left the window or overflow the bound."""
        self._seen[key] = at_ms
        self._seen.move_to_end(key)
        horizon = at_ms - self._window_ms
        while self._seen and (
            len(self._seen) > self._max or next(iter(self._seen.values())) < horizon
        ):
            self._seen.popitem(last=False)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, router: Router) -> None:
        self._router = router

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # Let the transaction in flight commit before another consumer gets the partitions.
        async with self._router.lock:
            log.info("router partitions revoked: %s", sorted(tp.partition for tp in revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("router partitions assigned: %s", sorted(tp.partition for tp in assigned))
        # aiokafka may already be fetching: hold the lock so no batch is routed before
        # the de-duplication window is re-learned.
        async with self._router.lock:
            await self._router.rebuild_dedup(list(assigned))


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
        self._consumer: AIOKafkaConsumer | None = None
        if health is not None:
            health.set("route.kafka", False)

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set; the transaction in flight finishes first."""
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
            consumer.subscribe([topics.down_events], listener=_Rebalance(self))
            if self._health is not None:
                self._health.set("route.kafka", True)
            log.info("router consuming %s as %s", topics.down_events, self._cfg.router.group_id)
            stopped = asyncio.create_task(stop.wait())
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
        log.info("router stopped")

    async def _transaction(
        self,
        producer: AIOKafkaProducer,
        consumer: AIOKafkaConsumer,
        batch: dict[TopicPartition, list[ConsumerRecord]],
    ) -> None:
        pending: list[tuple[tuple[str, str], int]] = []
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
            log.warning("transaction aborted (%s); the batch will be read again", exc)
            for tp, records in batch.items():
                consumer.seek(tp, records[0].offset)
            await asyncio.sleep(1)
            return
        ROUTER_TRANSACTIONS.labels("committed").inc()
        for key, at_ms in pending:
            self._dedup.add(key, at_ms)
        for name, n in counts.items():
            ROUTER_CHILDREN.labels(name).inc(n)

    async def _route_one(
        self,
        producer: AIOKafkaProducer,
        record: ConsumerRecord,
        pending: list[tuple[tuple[str, str], int]],
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
        in_batch = {key for key, _ in pending}
        for response in routed.responses:
            key = (routed.gateway_id, response.event_id)
            if key in in_batch or self._dedup.seen(key, record.timestamp):
                ROUTER_DUPLICATES.inc()
                log.info(
                    "skipping redelivered event %s from %s", response.event_id, routed.gateway_id
                )
                continue
            pending.append((key, record.timestamp))
            in_batch.add(key)
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
        ranges: dict[TopicPartition, tuple[int, int]] = {}
        for tp in assigned:
            committed = await consumer.committed(tp)
            start = starts.get(tp)
            if committed and start is not None and start.offset < committed:
                ranges[tp] = (start.offset, committed)
        if not ranges:
            return
        learned = 0
        reader = kafka.consumer(self._cfg.kafka, group_id=None, enable_auto_commit=False)
        async with reader:
            reader.assign(list(ranges))
            for tp, (start, _) in ranges.items():
                reader.seek(tp, start)
            remaining = set(ranges)
            async with asyncio.timeout(60):
                while remaining:
                    for tp, records in (await reader.getmany(timeout_ms=500)).items():
                        for record in records:
                            if record.offset < ranges[tp][1]:
                                learned += self._learn(record)
                    remaining = {
                        tp for tp in remaining if await reader.position(tp) < ranges[tp][1]
                    }
        log.info("router re-learned %d recent events for de-duplication", learned)

    def _learn(self, record: ConsumerRecord) -> int:
        try:
            routed = route(record.value)
        except DecodeError:
            return 0
        for response in routed.responses:
            self._dedup.add((routed.gateway_id, response.event_id), record.timestamp)
        return len(routed.responses)
