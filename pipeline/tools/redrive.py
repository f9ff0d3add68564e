"""``pipeline redrive``: move dead-lettered records back to their input, once fixed.

- ``allocations``: each ``dps.allocations.dlq`` record's input (``record``) goes back to
  ``iotda.subdevices.added``, keyed by its device_id, so the sink tries DPS again (after
  the operator created the missing group or registered the sn).
- ``down-events``: each ``iotda.down-events.dlq`` payload is published again, byte for
  byte, to the MQTT topic it arrived on (after a decoder fix).

Progress is kept in a consumer group per DLQ (``{kafka.client_id}-redrive-{dlq}``): each
run handles the records that arrived since the last one, up to the end at the time it
starts; records that do not match the filters stay in the topic (for audit) and are not
offered again unless ``from_beginning``.

Exactly once, for ``allocations``: a run reads the DLQ read-committed in batches of
``batch`` records, and each batch is one Kafka transaction holding the records it puts
back on the added topic and the group's offsets past the batch. The transactional id is
the group's name, one per DLQ: a run starts its producer (which fences every earlier run
of that DLQ and aborts its open transaction) before it reads where the group stands. So
a run killed mid-batch leaves nothing visible of that batch (the sink reads committed)
and the next run starts after its last committed batch; and of two runs started
together, the later one takes over where the earlier one's last commit left off, while
the earlier one's next commit fails, fenced: it stops with a message and exit 1, having
made visible only its committed batches. ``down-events`` publishes to MQTT, which no
Kafka transaction covers: its batches' offsets are committed the same way, so a crash or
a takeover publishes again at most the batch in flight (the router skips a response it
has seen, by gateway and event_id).

A redriven record continues the trace of the DLQ record (its ``traceparent``; for
``down-events`` as MQTT 5 user properties); with tracing on, its ``send`` span links to
the run's ``redrive`` span.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

import msgspec
from aiokafka import TopicPartition
from aiokafka.errors import ProducerFenced
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from pipeline.errors import StageFailed
from pipeline.io import kafka, mqtt
from pipeline.ops import tracing
from pipeline.schemas import AddedChild, AllocationFailure

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    import aiomqtt
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord

    from pipeline.config import Config

__all__ = ["BATCH", "redrive", "redrive_group"]

log = logging.getLogger(__name__)

BATCH = 500
"""Records a transaction covers at most (read, moved or left): a large DLQ is many small
transactions, each one committed before the next is read."""

_FAILURE = msgspec.json.Decoder(AllocationFailure)
_CHILD = msgspec.json.Decoder(AddedChild)


def _matches(failure: AllocationFailure, codes: list[int] | None, kinds: list[str] | None) -> bool:
    return (not codes or failure.code in codes) and (not kinds or failure.error_kind in kinds)


def redrive_group(cfg: Config, dlq: str) -> str:
    """The consumer group, and the transactional id, of the redrive of ``dlq``."""
    return f"{cfg.kafka.client_id}-redrive-{dlq}"


async def redrive(
    cfg: Config,
    dlq: str,
    *,
    codes: list[int] | None = None,
    kinds: list[str] | None = None,
    dry_run: bool = False,
    from_beginning: bool = False,
    batch: int = BATCH,
) -> int:
    """Move matching DLQ records back; returns how many moved (or would move).

    Raises:
        ValueError: ``batch`` is below 1.
        StageFailed: another run of this DLQ's redrive took over (this one was fenced);
            what this run committed before stays, the other run moves the rest.
    """
    if batch < 1:
        msg = f"batch must be 1 or more, got {batch}"
        raise ValueError(msg)
    topics = cfg.kafka.topics
    source = topics.allocations_dlq if dlq == "allocations" else topics.down_events_dlq
    group = redrive_group(cfg, dlq)
    consumer = kafka.consumer(cfg.kafka, group_id=group)
    traces = tracing.start("redrive", cfg.tracing)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(traces.close)
        stack.enter_context(traces.operation(f"redrive {dlq}", **{"pipeline.dlq": source}))
        await stack.enter_async_context(consumer)
        producer = None
        if not dry_run:
            # Fence the earlier runs first: the offsets read next include their last batch.
            kafka.shorten_transaction_backoff()  # back-to-back transactions: 2 ms, not 20
            producer = kafka.producer(cfg.kafka, transactional_id=group, linger_ms=0)
            await stack.enter_async_context(_stopped_quietly(producer))
        client = None
        if dlq == "down-events" and not dry_run:
            client = mqtt.connect(
                cfg.mqtt, client_id=f"{cfg.mqtt.client_id}-redrive", persistent=False
            )
            await stack.enter_async_context(mqtt.connected(cfg.mqtt, client))
        tps = await kafka.partitions(consumer, source)
        ends = await consumer.end_offsets(tps)
        starts = await _starts(consumer, tps, from_beginning=from_beginning)
        ranges: kafka.Ranges = {tp: (starts[tp], ends[tp]) for tp in tps}
        mover = _Mover(cfg, dlq, group, producer, client, codes=codes, kinds=kinds, traces=traces)
        pending: list[ConsumerRecord[bytes, bytes]] = []
        try:
            async for record in kafka.read_range(consumer, ranges):
                pending.append(record)
                if len(pending) >= batch:
                    await mover.move(pending, _past(pending))
                    pending = []
            # The last one moves the offsets to the ends: what lies past the last record
            # read (a transaction marker) is done too.
            await mover.move(
                pending, {tp: end for tp, (start, end) in ranges.items() if start < end}
            )
        except ProducerFenced as exc:
            msg = (
                f"another `pipeline redrive {dlq}` took over {source}, fencing this run: "
                f"it moved {mover.moved} records (committed); the other run moves the rest"
            )
            raise StageFailed(msg) from exc
    log.info("redrive %s: %d records %s", dlq, mover.moved, "would move" if dry_run else "moved")
    return mover.moved


@contextlib.asynccontextmanager
async def _stopped_quietly(producer: AIOKafkaProducer) -> AsyncIterator[AIOKafkaProducer]:
    """The producer, started; stopping it does not hide why the run ended (fenced, say)."""
    try:
        await producer.start()
    except BaseException:
        await producer.stop()
        raise
    try:
        yield producer
    finally:
        with contextlib.suppress(Exception):
            await producer.stop()


def _past(records: Sequence[ConsumerRecord[bytes, bytes]]) -> dict[TopicPartition, int]:
    """Per partition, the offset after the last of ``records``."""
    return {TopicPartition(r.topic, r.partition): r.offset + 1 for r in records}


class _Mover:
    """Moves batches of DLQ records, each batch and its offsets in one transaction."""

    def __init__(
        self,
        cfg: Config,
        dlq: str,
        group: str,
        producer: AIOKafkaProducer | None,
        client: aiomqtt.Client | None,
        *,
        codes: list[int] | None,
        kinds: list[str] | None,
        traces: tracing.Tracing = tracing.OFF,
    ) -> None:
        self._added = cfg.kafka.topics.added
        self._mqtt_v5 = cfg.mqtt.protocol == "5"
        self._traces = traces
        self._run = tracing.current()  # the run's hop: each redriven record links to it
        self._dlq = dlq
        self._group = group
        self._producer = producer
        self._client = client
        self._codes = codes
        self._kinds = kinds
        self.moved = 0
        """Records moved by the committed transactions (counted, in a dry run)."""

    async def move(
        self, records: Sequence[ConsumerRecord[bytes, bytes]], offsets: dict[TopicPartition, int]
    ) -> None:
        """Move what matches in ``records`` and commit ``offsets``, all or nothing."""
        producer = self._producer
        if producer is None:  # a dry run: count only
            self.moved += sum(self._target(record) is not None for record in records)
            return
        if not offsets:
            return
        moved = 0
        async with producer.transaction():
            sends: list[asyncio.Future[object]] = []
            for record in records:
                if self._client is not None:  # down-events: to MQTT, outside the transaction
                    payload = _payload_of(record, self._codes, self._kinds)
                    if payload is not None:
                        topic = payload[0].decode()
                        out = self._traces.resend(record, topic, cause=self._run)
                        await self._client.publish(
                            topic, payload[1], qos=1, properties=self._properties(out)
                        )
                        out.sent()
                        moved += 1
                    continue
                child = _child_of(record, self._codes, self._kinds)
                if child is not None:
                    origin = f"{record.topic}/{record.partition}/{record.offset}"
                    out = self._traces.resend(record, self._added, cause=self._run)
                    headers = [("redriven-from", origin.encode()), *out.headers]
                    sent = await producer.send(self._added, child[1], key=child[0], headers=headers)
                    out.watch(sent)
                    sends.append(sent)
                    moved += 1
            # aiokafka commits a transaction even when a send in it failed: wait for each
            # (and see every failure, so none is logged as never retrieved).
            for result in await asyncio.gather(*sends, return_exceptions=True):
                if isinstance(result, BaseException):
                    raise result
            await producer.send_offsets_to_transaction(offsets, self._group)
        self.moved += moved
        log.info("redrive %s: a batch committed, %d records moved so far", self._dlq, self.moved)

    def _properties(self, out: tracing.Hop) -> Properties | None:
        """MQTT 5 user properties carrying ``out``'s trace context (3.1.1 has none)."""
        if not self._mqtt_v5:
            return None
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.UserProperty = [(name, value.decode()) for name, value in out.headers]
        return properties

    def _target(self, record: ConsumerRecord[bytes, bytes]) -> object | None:
        if self._dlq == "allocations":
            return _child_of(record, self._codes, self._kinds)
        return _payload_of(record, self._codes, self._kinds)


async def _starts(
    consumer: AIOKafkaConsumer, tps: list[TopicPartition], *, from_beginning: bool
) -> dict[TopicPartition, int]:
    """Where to start: the last run's end (the group's committed offsets), or the beginning."""
    beginnings = await consumer.beginning_offsets(tps)
    starts = {}
    for tp in tps:
        committed = None if from_beginning else await consumer.committed(tp)
        starts[tp] = beginnings[tp] if committed is None else max(committed, beginnings[tp])
    return starts


def _child_of(
    record: ConsumerRecord[bytes, bytes], codes: list[int] | None, kinds: list[str] | None
) -> tuple[bytes | None, bytes] | None:
    """(key, value) to put back on the added topic, or None to leave the record."""
    if record.value is None:
        log.warning("skipping a tombstone at offset %d: nothing to redrive", record.offset)
        return None
    try:
        failure = _FAILURE.decode(record.value)
        child = _CHILD.decode(failure.record)
        device_id = msgspec.json.decode(child.device, type=dict[str, object]).get("device_id")
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError) as exc:
        log.warning("cannot redrive the DLQ record at offset %d: %s", record.offset, exc)
        return None
    if not _matches(failure, codes, kinds):
        return None
    return (str(device_id).encode() if device_id is not None else None), bytes(failure.record)


def _payload_of(
    record: ConsumerRecord[bytes, bytes], codes: list[int] | None, kinds: list[str] | None
) -> tuple[bytes, bytes] | None:
    """(MQTT topic, payload) to publish again, or None (filters are DPS codes/kinds)."""
    headers = {name: bytes(value) for name, value in record.headers or ()}
    topic = headers.get("mqtt-topic", b"")
    if codes or kinds or not topic:
        return None
    if record.value is None or "payload-truncated" in headers:
        log.warning(
            "cannot redrive the DLQ record at offset %d: %s",
            record.offset,
            "a tombstone" if record.value is None else "only a prefix of its payload was kept",
        )
        return None
    return topic, record.value
