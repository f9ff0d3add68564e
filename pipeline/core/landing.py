"""What ingest writes to Kafka for one MQTT message: the event, or a DLQ record (pure).

Every message ends as exactly one of these, whatever its bytes:

- a ``iotda.down-events`` record (:class:`~pipeline.schemas.DownEventRecord`), keyed by
  the gateway, when the topic names a gateway and the payload decodes;
- a ``iotda.down-events.dlq`` record whose value is the payload as received and whose
  ``error`` header says why. When the payload is too big to be a Kafka record itself,
  the DLQ record keeps a bounded prefix, with the full size and SHA-256 in headers, so
  the DLQ never refuses what it is given.
"""

from __future__ import annotations

import dataclasses
import hashlib

import msgspec

from pipeline.core.decode import decode_down, gateway_from_topic
from pipeline.errors import DecodeError
from pipeline.schemas import DownEvent, DownEventRecord

__all__ = ["DLQ_PREFIX", "Lander", "Landing"]

DLQ_PREFIX = 64 * 1024
"""Bytes of an oversized payload that its DLQ record keeps."""
_FRAMING = 1024
"""Room left in a record for Kafka's own framing (batch and record headers)."""

_ENCODER = msgspec.json.Encoder()


class Landing(msgspec.Struct, frozen=True, kw_only=True):
    """One Kafka record to write for one MQTT message.

    A Struct, not a dataclass: one is made per message, and msgspec's ``__init__`` (in C)
    costs a quarter of a frozen dataclass's.
    """

    dead: bool
    """True for a DLQ record."""
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    gateway: str | None
    """The gateway the topic names, if it names one."""
    event: DownEvent | None = None
    """The decoded event, when it landed."""
    reason: str | None = None
    """Why it was dead-lettered."""


_TOPICS_KEPT = 8192
"""Topics whose :class:`_Topic` a :class:`Lander` keeps (one per gateway; then it starts over)."""
_BETWEEN = b',"event":'
"""What comes between the ``received_at`` string and the event in a down-event record."""


@dataclasses.dataclass(frozen=True, slots=True)
class _Topic:
    """The gateway of an MQTT topic, and the start of its down-event records.

    A record is ``{"gateway_id":...,"mqtt_topic":...,"received_at":"...","event":<payload>}``
    (:class:`~pipeline.schemas.DownEventRecord`, encoded by msgspec): everything before
    the time is the same for every message of a topic, so it is encoded once, and a
    record is that, the time (encoded by msgspec) and the payload, joined.
    """

    gateway: str | None
    key: bytes | None
    head: bytes
    """The record up to the value of ``received_at`` (empty: encode each record whole)."""
    topic: str

    @classmethod
    def of(cls, topic: str) -> _Topic:
        gateway = gateway_from_topic(topic)
        if gateway is None:
            return cls(None, None, b"", topic)
        whole = _encode(gateway, topic, "", b"0")
        end = b'"received_at":""' + _BETWEEN + b"0}"
        head = whole[: -len(end) + len(b'"received_at":')] if whole.endswith(end) else b""
        return cls(gateway, gateway.encode(), head, topic)

    def record(self, received_at: str, payload: bytes) -> bytes:
        """The down-event record of ``payload`` (a JSON value) received at ``received_at``."""
        if not self.head:  # not the shape above (the schema changed): msgspec, whole
            return _encode(self.gateway or "", self.topic, received_at, payload)
        return b"".join((self.head, _ENCODER.encode(received_at), _BETWEEN, payload, b"}"))


def _encode(gateway: str, topic: str, received_at: str, payload: bytes) -> bytes:
    record = DownEventRecord(
        gateway_id=gateway, mqtt_topic=topic, received_at=received_at, event=msgspec.Raw(payload)
    )
    return _ENCODER.encode(record)


class Lander:
    """Decides what each message becomes, under the configured limits.

    Args:
        max_payload: payloads above this many bytes are dead-lettered undecoded.
        max_record: the biggest record Kafka takes, in bytes (the least of the producer's
            ``max_request_size`` and the topics' ``max.message.bytes``).
    """

    def __init__(self, *, max_payload: int, max_record: int) -> None:
        self._max_payload = max_payload
        self._max_record = max_record - _FRAMING
        self._topics: dict[str, _Topic] = {}

    def _topic(self, topic: str) -> _Topic:
        """What a topic gives every record of it, worked out once per topic."""
        known = self._topics.get(topic)
        if known is None:
            if len(self._topics) >= _TOPICS_KEPT:
                self._topics.clear()
            known = self._topics[topic] = _Topic.of(topic)
        return known

    def land(self, topic: str, payload: bytes, received_at: str) -> Landing:
        """The record for the message ``payload`` received on ``topic`` at ``received_at``."""
        of = self._topic(topic)
        gateway = of.gateway
        if gateway is None:
            reason = (
                f"MQTT topic {topic!r} does not match $oc/devices/{{device_id}}/sys/events/down"
            )
            return self.dead_letter(topic, payload, received_at, reason)
        if len(payload) > self._max_payload:
            reason = (
                f"payload is {len(payload):,} bytes, over mqtt.max_payload ({self._max_payload:,})"
            )
            return self.dead_letter(topic, payload, received_at, reason)
        try:
            event = decode_down(payload)
        except DecodeError as exc:
            return self.dead_letter(topic, payload, received_at, str(exc))
        value = of.record(received_at, payload)
        if (size := len(value) + len(gateway)) > self._max_record:
            reason = (
                f"the event record would be {size:,} bytes, over what Kafka takes "
                f"({self._max_record:,}: see kafka.max_record_size and the topic's "
                "max.message.bytes)"
            )
            return self.dead_letter(topic, payload, received_at, reason)
        return Landing(
            dead=False, key=of.key, value=value, headers=[], gateway=gateway, event=event
        )

    def dead_letter(self, topic: str, payload: bytes, received_at: str, reason: str) -> Landing:
        """The DLQ record for ``payload``: the bytes as received, or a bounded prefix."""
        gateway = gateway_from_topic(topic)
        headers = [
            ("error", reason.encode()),
            ("mqtt-topic", topic.encode()),
            ("received-at", received_at.encode()),
        ]
        value = payload
        key = gateway.encode() if gateway else None
        size = len(payload) + len(key or b"") + sum(len(k) + len(v) for k, v in headers)
        if size > self._max_record:
            value = payload[:DLQ_PREFIX]
            headers += [
                ("payload-size", str(len(payload)).encode()),
                ("payload-sha256", hashlib.sha256(payload).hexdigest().encode()),
                ("payload-truncated", f"the first {DLQ_PREFIX} bytes are kept".encode()),
            ]
        key = gateway.encode() if gateway else None
        return Landing(
            dead=True, key=key, value=value, headers=headers, gateway=gateway, reason=reason
        )
