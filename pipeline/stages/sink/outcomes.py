"""Writing the sink's outcomes: allocations, and DLQ records with the reason.

Every outcome continues the trace of its input record (``traceparent``: a ``send`` of
the sink's hop; a DLQ record also marks the hop failed, with the reason and the DPS
code). Every outcome carries two headers: ``source`` (where its input record was, as
``topic/partition/offset``) and ``sink-group``. Recovery (:mod:`.recovery`) reads them
back after a crash, so a record whose outcome is already in Kafka is not allocated again.

Kafka errors that a retry can cure (``retriable``, and timeouts) are retried with
backoff until Kafka acknowledges. Of the others, an outcome too large for Kafka is
dead-lettered with the reason (a DLQ record too large is written without the input
record, which stays readable at its ``source``); anything else ends the stage with
:class:`~pipeline.errors.StageFailed`: retrying forever would hide it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Literal

import msgspec
from aiokafka.errors import KafkaError, KafkaTimeoutError, MessageSizeTooLargeError

from pipeline.errors import PipelineError, StageFailed
from pipeline.io.aio import Backoff
from pipeline.ops import tracing
from pipeline.ops.metrics import SINK_OUTCOMES
from pipeline.schemas import Allocation, AllocationFailure, Release, utc_now

if TYPE_CHECKING:
    from collections.abc import Callable

    from aiokafka import AIOKafkaProducer, ConsumerRecord

    from pipeline.config import Topics
    from pipeline.core.mapping import Mapped

__all__ = [
    "GROUP",
    "SOURCE",
    "Outcomes",
    "embeddable",
    "log_context",
    "parse_source",
    "source_header",
]

log = logging.getLogger(__name__)

SOURCE = "source"
"""Header: where the outcome's input record was."""
GROUP = "sink-group"
"""Header: the sink consumer group that recorded the outcome."""

_ENCODER = msgspec.json.Encoder()
_ALLOCATED = SINK_OUTCOMES.labels("allocated")  # once, not per outcome


def source_header(topic: str, partition: int, offset: int) -> bytes:
    """The ``source`` header of an outcome: where its input record was."""
    return f"{topic}/{partition}/{offset}".encode()


def parse_source(header: bytes) -> tuple[str, int, int] | None:
    """``(topic, partition, offset)`` from a ``source`` header, or None if unreadable.

    Kafka topic names have no ``/``, so the last two fields are the numbers.
    """
    try:
        topic, partition, offset = header.decode().rsplit("/", 2)
        return topic, int(partition), int(offset)
    except ValueError:  # also UnicodeDecodeError
        return None


def log_context(record: ConsumerRecord[bytes, bytes], mapped: Mapped | None) -> dict[str, Any]:
    """The JSON fields a log line about ``record`` carries (``extra=``)."""
    context: dict[str, Any] = {
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
    }
    if mapped is not None:
        context |= {
            "sn": mapped.sn,
            "gateway": mapped.child.gateway_id,
            "event_id": mapped.child.event_id,
        }
    return context


class _TooLarge(PipelineError):
    """Kafka does not accept a record this large (no retry helps: the record is dead-lettered)."""


def _retriable(exc: Exception) -> bool:
    # aiokafka's KafkaTimeoutError says retriable = False, but a batch that expired while
    # a broker was away is worth sending again.
    return isinstance(exc, KafkaTimeoutError) or (isinstance(exc, KafkaError) and exc.retriable)


class Outcomes:
    """Records outcomes in ``dps.allocations`` and ``dps.allocations.dlq``.

    Args:
        producer: a started producer (idempotent, ``acks=all``).
        topics: the configured topic names.
        group: the sink's consumer group id (the ``sink-group`` header).
        on_recorded: called when Kafka acknowledged an outcome (progress, for liveness).
    """

    def __init__(
        self,
        producer: AIOKafkaProducer,
        topics: Topics,
        group: str,
        *,
        on_recorded: Callable[[], None] = lambda: None,
    ) -> None:
        self._producer = producer
        self._topics = topics
        self._group = group.encode()
        self._on_recorded = on_recorded

    async def allocated(
        self,
        record: ConsumerRecord[bytes, bytes],
        mapped: Mapped,
        device: msgspec.Raw,
        *,
        request_id: str | None,
        attempts: int,
        source: bytes,
    ) -> None:
        """DPS allocated ``mapped.sn`` and returned ``device``.

        Raises:
            StageFailed: Kafka refused the outcome for a reason no retry cures.
        """
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
        value = _ENCODER.encode(allocation)
        try:
            await self._record(self._topics.allocations, mapped.sn, value, source)
        except _TooLarge as exc:
            log.warning(
                "the allocation of sn %s is too large for Kafka; dead-lettering it: %s",
                mapped.sn, exc, extra=log_context(record, mapped),
            )  # fmt: skip
            message = (
                f"DPS allocated the device (requestId {request_id}), but its allocation record "
                f"({len(value)} bytes) is too large for Kafka: {exc}"
            )
            await self.dead_letter(
                record, source, mapped, kind="invalid", code=None, message=message,
                request_id=request_id, attempts=attempts,
            )  # fmt: skip
            return
        _ALLOCATED.inc(exemplar=tracing.exemplar())

    async def dead_letter(
        self,
        record: ConsumerRecord[bytes, bytes],
        source: bytes,
        mapped: Mapped | None,
        *,
        kind: Literal["rejected", "exhausted", "invalid", "superseded"],
        code: int | None,
        message: str,
        request_id: str | None,
        attempts: int,
        http_status: int | None = None,
    ) -> None:
        """``record`` failed for good: to ``dps.allocations.dlq`` with the reason.

        ``code`` is DPS's code and ``http_status`` the HTTP status of its last answer,
        each None when there was none (an HTML error page has a status and no code).

        Raises:
            StageFailed: Kafka refused the DLQ record for a reason no retry cures.
        """
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
            http_status=http_status,
            msg=message,
            request_id=request_id,
            failed_at=utc_now(),
            record=embeddable(record.value),
        )
        key = mapped.sn if mapped else None
        topic = self._topics.allocations_dlq
        tracing.current().fail(f"{kind}: {message}", code=code)
        try:
            await self._record(topic, key, _ENCODER.encode(failure), source)
        except _TooLarge:
            # The input record made it too large; it stays readable where `source` says.
            size = len(record.value or b"")
            omitted = f"omitted: {size} bytes, too large for Kafka; read it at {source.decode()}"
            slim = msgspec.structs.replace(failure, record=msgspec.Raw(_ENCODER.encode(omitted)))
            try:
                await self._record(topic, key, _ENCODER.encode(slim), source)
            except _TooLarge as exc:
                msg = f"cannot record a DLQ record in {topic}: {exc}"
                raise StageFailed(msg) from exc
        SINK_OUTCOMES.labels(kind).inc(exemplar=tracing.exemplar())

    async def released(self, release: Release, source: bytes) -> None:
        """What the sink did for a deleted child: to ``dps.releases``, keyed by sn.

        Raises:
            StageFailed: Kafka refused it for a reason no retry cures (too large included:
                a release is small; its input record is as large as an added child's).
        """
        key = release.sn or release.device_id
        try:
            await self._record(self._topics.releases, key, _ENCODER.encode(release), source)
        except _TooLarge as exc:
            msg = f"cannot record a release in {self._topics.releases}: {exc}"
            raise StageFailed(msg) from exc
        SINK_OUTCOMES.labels(f"release_{release.action}").inc(exemplar=tracing.exemplar())

    async def release_failed(self, failure: AllocationFailure, source: bytes) -> None:
        """A deleted child could not be released (``operation`` reset or delete): to the DLQ.

        Raises:
            StageFailed: Kafka refused it for a reason no retry cures.
        """
        topic = self._topics.allocations_dlq
        tracing.current().fail(f"{failure.error_kind}: {failure.msg}", code=failure.code)
        try:
            await self._record(topic, failure.sn, _ENCODER.encode(failure), source)
        except _TooLarge as exc:
            msg = f"cannot record a DLQ record in {topic}: {exc}"
            raise StageFailed(msg) from exc
        SINK_OUTCOMES.labels(failure.error_kind).inc(exemplar=tracing.exemplar())

    async def _record(self, topic: str, key: str | None, value: bytes, source: bytes) -> None:
        """Write an outcome and wait for Kafka's acknowledgement, retrying what may pass.

        Raises:
            _TooLarge: Kafka does not accept a record this large.
            StageFailed: another error no retry cures (e.g. a compacted topic refusing a
                record without a key, a missing authorisation).
        """
        backoff: Backoff | None = None
        out = tracing.current().send(topic, key)  # in the trace of the record handled
        headers = [(SOURCE, source), (GROUP, self._group), *out.headers]
        while True:
            try:
                metadata = await self._producer.send_and_wait(
                    topic, value, key=key.encode() if key else None, headers=headers
                )
            except MessageSizeTooLargeError as exc:
                out.sent(error=exc)
                raise _TooLarge(str(exc)) from exc
            except Exception as exc:
                if not _retriable(exc):
                    out.sent(error=exc)
                    msg = (
                        f"cannot record an outcome in {topic}: {type(exc).__name__}: {exc} "
                        "(not retriable)"
                    )
                    raise StageFailed(msg) from exc
                backoff = backoff or Backoff(0.5, 10.0)
                delay = backoff.next()
                where = parse_source(source) or ("?", -1, -1)
                log.warning(
                    "could not record outcome in %s (%s); retrying in %.1f s", topic, exc, delay,
                    extra={"sn": key, "topic": where[0], "partition": where[1],
                           "offset": where[2], "outcome_topic": topic},
                )  # fmt: skip
                await asyncio.sleep(delay)
            else:
                out.sent(metadata)
                self._on_recorded()
                return


def embeddable(value: bytes | None) -> msgspec.Raw:
    """The input record as a JSON value: verbatim when it is JSON, else as a JSON string."""
    if value is None:  # a tombstone
        return msgspec.Raw(b"null")
    try:
        msgspec.json.decode(value)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return msgspec.Raw(_ENCODER.encode(value.decode("utf-8", "replace")))
    return msgspec.Raw(value)
