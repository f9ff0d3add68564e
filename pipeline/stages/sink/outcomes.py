"""Writing the sink's outcomes: allocations, and DLQ records with the reason.

Every outcome carries two headers: ``source`` (where its input record was, as
``topic/partition/offset``) and ``sink-group``. Recovery (:mod:`.recovery`) reads them
back after a crash, so a record whose outcome is already in Kafka is not allocated again.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Literal

import msgspec

from pipeline.io.aio import Backoff
from pipeline.ops.metrics import SINK_OUTCOMES
from pipeline.schemas import Allocation, AllocationFailure, utc_now

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer, ConsumerRecord

    from pipeline.config import Topics
    from pipeline.core.mapping import Mapped

__all__ = ["GROUP", "SOURCE", "Outcomes", "source_header"]

log = logging.getLogger(__name__)

SOURCE = "source"
"""Header: where the outcome's input record was."""
GROUP = "sink-group"
"""Header: the sink consumer group that recorded the outcome."""

_ENCODER = msgspec.json.Encoder()


def source_header(topic: str, partition: int, offset: int) -> bytes:
    """The ``source`` header of an outcome: where its input record was."""
    return f"{topic}/{partition}/{offset}".encode()


class Outcomes:
    """Records outcomes in ``dps.allocations`` and ``dps.allocations.dlq``.

    Args:
        producer: a started producer (idempotent, ``acks=all``).
        topics: the configured topic names.
        group: the sink's consumer group id (the ``sink-group`` header).
    """

    def __init__(self, producer: AIOKafkaProducer, topics: Topics, group: str) -> None:
        self._producer = producer
        self._topics = topics
        self._group = group.encode()

    async def allocated(
        self,
        mapped: Mapped,
        device: msgspec.Raw,
        *,
        request_id: str | None,
        attempts: int,
        source: bytes,
    ) -> None:
        """DPS allocated ``mapped.sn`` and returned ``device``."""
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
        await self._record(self._topics.allocations, mapped.sn, _ENCODER.encode(allocation), source)
        SINK_OUTCOMES.labels("allocated").inc()

    async def dead_letter(
        self,
        record: ConsumerRecord[bytes, bytes],
        source: bytes,
        mapped: Mapped | None,
        *,
        kind: Literal["rejected", "exhausted", "invalid"],
        code: int | None,
        message: str,
        request_id: str | None,
        attempts: int,
    ) -> None:
        """``record`` failed for good: to ``dps.allocations.dlq`` with the reason."""
        child = mapped.child if mapped else None
        failure = AllocationFailure(
            sn=mapped.sn if mapped else None,
            org_id=mapped.org_id if mapped else None,
            device_id=mapped.device.device_id if mapped else None,
            gateway_id=child.gateway_id if child else None,
            event_id=child.event_id if child else None,
            attempts=attempts,
            error_kind=kind,
            code=code,
            msg=message,
            request_id=request_id,
            failed_at=utc_now(),
            record=_embeddable(record.value),
        )
        key = mapped.sn if mapped else None
        await self._record(self._topics.allocations_dlq, key, _ENCODER.encode(failure), source)
        SINK_OUTCOMES.labels(kind).inc()

    async def _record(self, topic: str, key: str | None, value: bytes, source: bytes) -> None:
        """Write an outcome and wait for Kafka's acknowledgement (retrying until it comes)."""
        backoff = Backoff(0.5, 10.0)
        while True:
            try:
                await self._producer.send_and_wait(
                    topic,
                    value,
                    key=key.encode() if key else None,
                    headers=[(SOURCE, source), (GROUP, self._group)],
                )
            except Exception as exc:
                delay = backoff.next()
                log.warning(
                    "could not record outcome in %s (%s); retrying in %.1f s", topic, exc, delay
                )
                await asyncio.sleep(delay)
            else:
                return


def _embeddable(value: bytes | None) -> msgspec.Raw:
    """The input record as a JSON value: verbatim when it is JSON, else as a JSON string."""
    if value is None:  # a tombstone
        return msgspec.Raw(b"null")
    try:
        msgspec.json.decode(value)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return msgspec.Raw(_ENCODER.encode(value.decode("utf-8", "replace")))
    return msgspec.Raw(value)
