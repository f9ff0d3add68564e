"""``pipeline redrive``: move dead-lettered records back to their input, once fixed.

- ``allocations``: each ``dps.allocations.dlq`` record's input (``record``) goes back to
  ``iotda.subdevices.added``, keyed by its device_id, so the sink tries DPS again (after
  the operator created the missing group or registered the sn).
- ``down-events``: each ``iotda.down-events.dlq`` payload is published again, byte for
  byte, to the MQTT topic it arrived on (after a decoder fix).

Progress is kept in a consumer group per DLQ: each run handles the records that arrived
since the last one, up to the end at the time it starts; records that do not match the
filters stay in the topic (for audit) and are not offered again unless ``from_beginning``.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

import msgspec

from pipeline.io import kafka, mqtt
from pipeline.schemas import AddedChild, AllocationFailure

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

    from pipeline.config import Config

__all__ = ["redrive"]

log = logging.getLogger(__name__)

_FAILURE = msgspec.json.Decoder(AllocationFailure)
_CHILD = msgspec.json.Decoder(AddedChild)


def _matches(failure: AllocationFailure, codes: list[int] | None, kinds: list[str] | None) -> bool:
    return (not codes or failure.code in codes) and (not kinds or failure.error_kind in kinds)


async def redrive(
    cfg: Config,
    dlq: str,
    *,
    codes: list[int] | None = None,
    kinds: list[str] | None = None,
    dry_run: bool = False,
    from_beginning: bool = False,
) -> int:
    """Move matching DLQ records back; returns how many moved (or would move)."""
    topics = cfg.kafka.topics
    source = topics.allocations_dlq if dlq == "allocations" else topics.down_events_dlq
    group = f"{cfg.kafka.client_id}-redrive-{dlq}"
    consumer = kafka.consumer(cfg.kafka, group_id=group)
    moved = 0
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(consumer)
        producer = await stack.enter_async_context(kafka.producer(cfg.kafka))
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
        async for record in kafka.read_range(consumer, ranges):
            if dlq == "allocations":
                target = _child_of(record, codes, kinds)
                if target is not None and not dry_run:
                    key, value = target
                    origin = f"{record.topic}/{record.partition}/{record.offset}"
                    await producer.send(
                        topics.added, value, key=key, headers=[("redriven-from", origin.encode())]
                    )
            else:
                target = _payload_of(record, codes, kinds)
                if target is not None and client is not None:
                    await client.publish(target[0].decode(), target[1], qos=1)
            moved += target is not None
        await producer.flush()
        read = {tp: end for tp, (start, end) in ranges.items() if start < end}
        if read and not dry_run:
            await consumer.commit(read)  # (read_range assigned exactly these)
    log.info("redrive %s: %d records %s", dlq, moved, "would move" if dry_run else "moved")
    return moved


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
