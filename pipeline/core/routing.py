"""Routing: one down-event record in, the child records it yields out (pure, no I/O).

:func:`route` splits an ``iotda.down-events`` value into ``iotda.subdevices.added`` and
``iotda.subdevices.failed`` records, children copied byte for byte; :class:`Dedup`
remembers which (gateway, event_id) pairs were already routed, so an MQTT redelivery
yields nothing new. The router stage (``pipeline.stages.router``) moves the bytes.
"""

from __future__ import annotations

import collections
import dataclasses

import msgspec

from pipeline.core.decode import service_label
from pipeline.errors import DecodeError
from pipeline.schemas import (
    ADD_RESPONSE,
    SUB_DEVICE_MANAGER,
    AddedChild,
    DownEvent,
    DownEventRecord,
    FailedChild,
    normalise_event_time,
)

__all__ = ["Dedup", "Response", "Routed", "route"]


class _AddParas(msgspec.Struct):
    # Validated by ingest; kept raw so the children are copied byte for byte.
    successful_devices: list[msgspec.Raw]
    failed_devices: list[msgspec.Raw]


class _DeviceKey(msgspec.Struct):
    # Of a child ingest validated as a DeviceInfo: only the key is needed here.
    device_id: str


class _ReasonKey(msgspec.Struct):
    # Of a failure ingest validated as a Reason.
    node_id: str


_RECORD = msgspec.json.Decoder(DownEventRecord)
_EVENT = msgspec.json.Decoder(DownEvent)
_PARAS = msgspec.json.Decoder(_AddParas)
_DEVICE = msgspec.json.Decoder(_DeviceKey)
_REASON = msgspec.json.Decoder(_ReasonKey)
_ENCODER = msgspec.json.Encoder()


_MARK = msgspec.Raw(b"0")


def _head(record: AddedChild | FailedChild) -> bytes:
    """The encoding of ``record`` up to its last field's value (the child, kept raw).

    Every child of a response shares it: its record is ``head + child + b"}"``, the
    bytes msgspec would write for the whole record (pinned in test_routing).
    """
    encoded = _ENCODER.encode(record)
    assert encoded.endswith(b":0}")  # noqa: S101 - the child is the last field
    return encoded[:-2]


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
            if paras.successful_devices:
                head = _head(AddedChild(
                    gateway_id=gateway, event_id=event_id, event_time=event_time,
                    event_time_raw=raw_time, device=_MARK,
                ))  # fmt: skip
                added = [
                    (_DEVICE.decode(raw).device_id.encode(), b"".join((head, raw, b"}")))
                    for raw in paras.successful_devices
                ]
            else:
                added = []
            if paras.failed_devices:
                head = _head(FailedChild(
                    gateway_id=gateway, event_id=event_id, event_time=event_time,
                    event_time_raw=raw_time, reason=_MARK,
                ))  # fmt: skip
                failed = [
                    (_REASON.decode(raw).node_id.encode(), b"".join((head, raw, b"}")))
                    for raw in paras.failed_devices
                ]
            else:
                failed = []
            responses.append(Response(service.event_id, added, failed))
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError) as exc:
        msg = f"not a down-event record: {exc}"
        raise DecodeError(msg) from None
    except RecursionError:
        msg = "not a down-event record: it nests deeper than the decoder allows"
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
