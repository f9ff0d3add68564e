"""``pipeline trace``: one device's journey, read from the topics themselves.

Given an sn, a child's device_id or a down event's event_id, it finds every record the
pipeline wrote about that device, oldest first: the down event (gateway, MQTT topic,
event time, when it landed), the router's added, failed or deleted record, every
allocation, DLQ record and release of the sink, and every redrive (an added record with
the header ``redriven-from``). Each with its topic, partition, offset, timestamp and
trace id (the W3C ``traceparent`` header, when the record carries one).

It reads only the partition a key can be in, the one every pipeline producer puts that
key in (:func:`pipeline.io.kafka.partition_of`), and follows the keys from record to
record until nothing new turns up:

- an sn: ``dps.allocations``, ``dps.allocations.dlq`` and ``dps.releases`` (keyed by sn);
  with ``sink.sn_from = "node_id"`` the sn is the node_id, so ``iotda.subdevices.failed``
  (keyed by node_id) too. Their records name the device_id. An sn with no outcome yet
  names none: then every partition of the added and deleted topics is read (within the
  window) for the child that maps to it.
- a device_id: ``iotda.subdevices.added`` and ``iotda.subdevices.deleted`` (keyed by
  device_id). Their DeviceInfo gives the node_id (failed) and the sn (as the sink maps
  it, ``[sink]``).
- every record names its gateway and event_id: the down event is in the gateway's
  partition of ``iotda.down-events``, before the first record that names it. It is
  looked for backwards from that record's time (the brokers' time index), in growing
  steps, so a busy gateway's partition is not read whole.
- an event_id is no key: the down events are read (every partition, within the window
  when one is given) for the events carrying it, and the children each names are traced.

With a window (``since``, ``until``) only the records timestamped in it are read, found
by the brokers' time index (:func:`pipeline.io.kafka.window`).

The exit code: 0 when something was found, :data:`NOT_FOUND` when nothing was, 1 and 2
as for every command.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sys
from typing import TYPE_CHECKING, Any, Literal

import msgspec
from aiokafka import TopicPartition
from rich.markup import escape
from rich.table import Table

from pipeline.core.mapping import Mapper
from pipeline.core.tracecontext import record_trace_id
from pipeline.errors import InputError, MappingError
from pipeline.io import kafka
from pipeline.schemas import (
    AddedChild,
    Allocation,
    AllocationFailure,
    DeletedChild,
    DeviceInfo,
    FailedChild,
    Reason,
    Release,
    format_ms,
)
from pipeline.tools.console import make_console

if TYPE_CHECKING:
    from typing import IO

    from aiokafka import AIOKafkaConsumer, ConsumerRecord

    from pipeline.config import Config

__all__ = ["NOT_FOUND", "Journey", "Step", "check_query", "trace", "walk"]

NOT_FOUND = 4
"""The exit code when no record of the device is in the topics (or the window)."""

StepKind = Literal[
    "down_event", "added", "redriven", "deleted", "failed", "allocated", "dlq", "released"
]
_RANK = {"down_event": 0, "added": 1, "redriven": 1, "deleted": 1, "failed": 1}
"""Of records with the same timestamp, the cause first."""

_FIRST_STEP = 1_000
"""Offsets read in the first step backwards when looking for a down event (x4 each step)."""

_SCAN = {"fetch_max_wait_ms": 10}
"""No waiting at a range's end for records that may follow (the broker's 500 ms default,
per fetch). Fetches stay ``kafka.max_record_size`` a partition: larger ones read (and
aiokafka decodes) far past a short range's end."""


class Step(msgspec.Struct, kw_only=True):
    """One record of the journey."""

    step: StepKind
    topic: str
    partition: int
    offset: int
    timestamp: str
    """The record's timestamp (when it was written), RFC 3339 UTC."""
    trace_id: str | None
    """From the record's ``traceparent`` header; None when it has none."""
    detail: dict[str, Any]
    """What the record says, by field (gateway_id, sn, error_kind, code, msg, ...)."""

    @property
    def order(self) -> tuple[str, int, str, int, int]:
        """Where the step sorts: oldest first; at one timestamp, in the pipeline's order."""
        return (self.timestamp, _RANK.get(self.step, 2), self.topic, self.partition, self.offset)


class Journey(msgspec.Struct, kw_only=True):
    """What ``pipeline trace`` found, oldest first."""

    query: dict[str, str]
    """What was asked: ``{"sn": ...}``, ``{"device_id": ...}`` or ``{"event_id": ...}``."""
    since: str | None
    until: str | None
    steps: list[Step]


# -- Decoding ------------------------------------------------------------------------------


class _Service(msgspec.Struct, kw_only=True):
    service_id: str | None = None
    event_type: str | None = None
    event_time: str | None = None
    event_id: str | None = None
    paras: Any = None


class _Event(msgspec.Struct, kw_only=True):
    services: list[_Service] | None = None


class _Down(msgspec.Struct, kw_only=True):
    gateway_id: str
    mqtt_topic: str
    received_at: str
    event: _Event


_DECODERS: dict[str, msgspec.json.Decoder[Any]] = {
    "down": msgspec.json.Decoder(_Down),
    "added": msgspec.json.Decoder(AddedChild),
    "deleted": msgspec.json.Decoder(DeletedChild),
    "failed": msgspec.json.Decoder(FailedChild),
    "allocations": msgspec.json.Decoder(Allocation),
    "dlq": msgspec.json.Decoder(AllocationFailure),
    "releases": msgspec.json.Decoder(Release),
}
_DEVICE = msgspec.json.Decoder(DeviceInfo | None)
_REASON = msgspec.json.Decoder(Reason)


def _ms(when: dt.datetime | None) -> int | None:
    return None if when is None else int(when.timestamp() * 1000)


def _children_of(paras: Any) -> tuple[set[str], set[str]]:
    """The device_ids and node_ids a down event's ``paras`` names."""
    devices: set[str] = set()
    nodes: set[str] = set()
    if not isinstance(paras, dict):
        return devices, nodes
    for name in ("successful_devices", "failed_devices", "devices"):
        items = paras.get(name)
        for item in items if isinstance(items, list) else ():
            if isinstance(item, str):
                devices.add(item)
            elif isinstance(item, dict):
                if isinstance(item.get("device_id"), str):
                    devices.add(item["device_id"])
                if isinstance(item.get("node_id"), str):
                    nodes.add(item["node_id"])
    return devices, nodes


# -- The walk ------------------------------------------------------------------------------


class _Walk:
    """Follows the keys from record to record; every partition read is one a key is in."""

    def __init__(
        self, cfg: Config, client: AIOKafkaConsumer, since: int | None, until: int | None
    ) -> None:
        s = cfg.sink
        self._mapper = Mapper(
            sn_from=s.sn_from, org_id=s.org_id, org_overrides=s.org_overrides,
            device_data=s.device_data,
        )  # fmt: skip
        self._sn_is_node = s.sn_from == "node_id"
        self._topics = cfg.kafka.topics
        self._client = client
        self._since = since
        self._until = until
        self._counts: dict[str, int] = {}
        self.steps: list[Step] = []
        self._seen: set[tuple[str, int, int]] = set()
        self._done: dict[str, set[str]] = {"sn": set(), "device": set(), "node": set()}
        self._todo: dict[str, set[str]] = {"sn": set(), "device": set(), "node": set()}
        self._events: dict[tuple[str, str], int] = {}
        """(gateway, event_id) -> the earliest timestamp of a record naming it."""
        self._found_events: set[tuple[str, str]] = set()

    async def start(self) -> None:
        t = self._topics
        names = (t.down_events, t.added, t.deleted, t.failed, t.allocations,
                 t.allocations_dlq, t.releases)  # fmt: skip
        for tp in await kafka.partitions(self._client, *names):
            self._counts[tp.topic] = self._counts.get(tp.topic, 0) + 1

    def want(self, kind: Literal["sn", "device", "node"], value: str | None) -> None:
        if value and value not in self._done[kind]:
            self._todo[kind].add(value)

    async def follow(self) -> None:
        """Read the partitions of every key not read yet, until no new key turns up."""
        t = self._topics
        while any(self._todo.values()):
            wanted: dict[str, set[str]] = {}
            for sn in self._todo["sn"]:
                for topic in (t.allocations, t.allocations_dlq, t.releases):
                    wanted.setdefault(topic, set()).add(sn)
                if self._sn_is_node:
                    wanted.setdefault(t.failed, set()).add(sn)
                    self._done["node"].add(sn)
            for device in self._todo["device"]:
                for topic in (t.added, t.deleted):
                    wanted.setdefault(topic, set()).add(device)
            for node in self._todo["node"] - self._done["node"]:
                wanted.setdefault(t.failed, set()).add(node)
            for kind, values in self._todo.items():
                self._done[kind] |= values
                values.clear()
            for record in await self._read_keys(wanted):
                self._take(record)

    async def by_sn(self, sn: str) -> None:
        """Every record of the child whose sn is ``sn``.

        The outcomes name the device_id. A child without one yet (the sink has not got to
        it, or it is a gap) has only its added record, keyed by a device_id the sn does
        not give: then the added and deleted topics are read, every partition (within
        the window), for the child that maps to ``sn``.
        """
        self.want("sn", sn)
        await self.follow()
        if self.steps:  # an outcome (naming the device_id), or a failed child
            return
        t = self._topics
        tps = await kafka.partitions(self._client, t.added, t.deleted)
        ranges = await kafka.window(self._client, tps, self._since, self._until)
        wanted = sn.encode()
        async for record in kafka.read_range(self._client, ranges):
            if record.value is not None and wanted in record.value and self._maps_to(record, sn):
                self._take(record)
        await self.follow()

    def _maps_to(self, record: ConsumerRecord[bytes, bytes], sn: str) -> bool:
        """Whether the added or deleted child ``record`` has the sn ``sn``."""
        decoder = _DECODERS["added" if record.topic == self._topics.added else "deleted"]
        try:
            device = _DEVICE.decode(decoder.decode(record.value or b"").device)
            return device is not None and self._mapper.locate(device)[0] == sn
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError, MappingError):
            return False

    async def _read_keys(self, wanted: dict[str, set[str]]) -> list[ConsumerRecord[bytes, bytes]]:
        """The records of ``wanted``'s keys, from the one partition each key can be in."""
        keys: dict[TopicPartition, set[bytes]] = {}
        for topic, values in wanted.items():
            count = self._counts.get(topic)
            if not count:  # the topic does not exist: nothing was written to it
                continue
            for value in values:
                key = value.encode()
                tp = TopicPartition(topic, kafka.partition_of(key, count))
                keys.setdefault(tp, set()).add(key)
        ranges = await kafka.window(self._client, list(keys), self._since, self._until)
        return [
            record
            async for record in kafka.read_range(self._client, ranges)
            if record.key in keys[TopicPartition(record.topic, record.partition)]
        ]

    def _add(self, record: ConsumerRecord[bytes, bytes], step: StepKind, **detail: Any) -> bool:
        where = (record.topic, record.partition, record.offset)
        if where in self._seen:
            return False
        self._seen.add(where)
        kept = {k: v for k, v in detail.items() if v is not None}
        found = Step(
            step=step, topic=record.topic, partition=record.partition, offset=record.offset,
            timestamp=format_ms(record.timestamp), trace_id=record_trace_id(record.headers),
            detail=kept,
        )  # fmt: skip
        self.steps.append(found)
        return True

    def _event(self, gateway: str | None, event_id: str | None, at_ms: int) -> None:
        if gateway and event_id:
            key = (gateway, event_id)
            self._events[key] = min(at_ms, self._events.get(key, at_ms))

    def _take(self, record: ConsumerRecord[bytes, bytes]) -> None:
        """Turn a record into a step, and want the keys it names."""
        t = self._topics
        decoder = {
            t.added: "added", t.deleted: "deleted", t.failed: "failed",
            t.allocations: "allocations", t.allocations_dlq: "dlq", t.releases: "releases",
        }[record.topic]  # fmt: skip
        try:
            value = _DECODERS[decoder].decode(record.value or b"null")
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
            self._add(record, _UNREADABLE[decoder], unreadable=str(exc))
            return
        match value:
            case AddedChild() | DeletedChild():
                self._child(record, value)
            case FailedChild():
                reason = _reason(value.reason)
                self._add(
                    record, "failed", gateway_id=value.gateway_id, event_id=value.event_id,
                    event_time=value.event_time or value.event_time_raw,
                    node_id=reason.get("node_id"), error_code=reason.get("error_code"),
                    error_msg=reason.get("error_msg"),
                )  # fmt: skip
                self._event(value.gateway_id, value.event_id, record.timestamp)
            case Allocation():
                self._add(
                    record, "allocated", sn=value.sn, org_id=value.org_id,
                    device_id=value.device_id, gateway_id=value.gateway_id,
                    event_id=value.event_id, attempts=value.attempts,
                    request_id=value.request_id, allocated_at=value.allocated_at,
                )  # fmt: skip
                self._outcome(value.device_id, value.gateway_id, value.event_id, record)
            case AllocationFailure():
                self._add(
                    record, "dlq", sn=value.sn, device_id=value.device_id,
                    gateway_id=value.gateway_id, event_id=value.event_id,
                    operation=value.operation, error_kind=value.error_kind, code=value.code,
                    http_status=value.http_status, msg=value.msg, attempts=value.attempts,
                    failed_at=value.failed_at,
                )  # fmt: skip
                self._outcome(value.device_id, value.gateway_id, value.event_id, record)
            case Release():
                self._add(
                    record, "released", sn=value.sn, device_id=value.device_id,
                    gateway_id=value.gateway_id, action=value.action,
                    generation=value.generation, released_at=value.released_at,
                )  # fmt: skip
                self._outcome(value.device_id, value.gateway_id, None, record)

    def _outcome(
        self,
        device_id: str | None,
        gateway: str | None,
        event_id: str | None,
        record: ConsumerRecord[bytes, bytes],
    ) -> None:
        self.want("device", device_id)
        self._event(gateway, event_id, record.timestamp)

    def _child(
        self, record: ConsumerRecord[bytes, bytes], child: AddedChild | DeletedChild
    ) -> None:
        try:
            device = _DEVICE.decode(child.device)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            device = None
        origin = dict(record.headers or ()).get("redriven-from")
        step: StepKind = "deleted" if isinstance(child, DeletedChild) else "added"
        if origin is not None:
            step = "redriven"
        self._add(
            record, step, device_id=record.key.decode(errors="replace") if record.key else None,
            node_id=device.node_id if device else None, gateway_id=child.gateway_id,
            event_id=child.event_id, event_time=child.event_time or child.event_time_raw,
            source_event=child.source_event, generation=child.generation,
            redriven_from=bytes(origin).decode(errors="replace") if origin else None,
        )  # fmt: skip
        self._event(child.gateway_id, child.event_id, record.timestamp)
        if device is not None:
            self.want("node", device.node_id)
            # No sn: the sink dead-lettered it as invalid, keyed by nothing.
            with contextlib.suppress(MappingError):
                self.want("sn", self._mapper.locate(device)[0])

    async def down_events(self) -> None:
        """Each (gateway, event_id) named: its down event, backwards from the first record."""
        for (gateway, event_id), before in sorted(self._events.items()):
            if (gateway, event_id) in self._found_events:
                continue
            count = self._counts.get(self._topics.down_events)
            if not count:
                return
            key = gateway.encode()
            tp = TopicPartition(self._topics.down_events, kafka.partition_of(key, count))
            # The down event landed before the first record naming it (up to that ms).
            until = before + 1 if self._until is None else min(before + 1, self._until)
            low, end = (await kafka.window(self._client, [tp], self._since, until))[tp]
            step = _FIRST_STEP
            while end > low:
                start = max(low, end - step)
                found = False
                async for record in kafka.read_range(self._client, {tp: (start, end)}):
                    if record.key == key and self._down(record, event_id.encode()):
                        found = True
                if found:
                    break
                end, step = start, step * 4

    def _down(
        self, record: ConsumerRecord[bytes, bytes], event_id: bytes, *, children: bool = False
    ) -> bool:
        """A step for the down event ``record`` if it carries ``event_id``.

        With ``children``, every child the event names is traced too (``--event-id``);
        otherwise the event is one step of a journey already known, and its siblings are
        not this device.
        """
        if record.value is None or event_id not in record.value:
            return False  # the cheap test first: most of a gateway's events are others
        try:
            down = _DECODERS["down"].decode(record.value)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            return False
        wanted = event_id.decode()
        hit = False
        for service in down.event.services or ():
            if service.event_id != wanted:
                continue
            hit = True
            self._found_events.add((down.gateway_id, wanted))
            self._add(
                record, "down_event", gateway_id=down.gateway_id, mqtt_topic=down.mqtt_topic,
                event_type=service.event_type, event_id=service.event_id,
                event_time=service.event_time, received_at=down.received_at,
            )  # fmt: skip
            if not children:
                continue
            devices, nodes = _children_of(service.paras)
            for device in devices:
                self.want("device", device)
            for node in nodes:
                self.want("node", node)
        return hit

    async def by_event(self, event_id: str) -> None:
        """Every down event carrying ``event_id`` (every partition), and its children."""
        tps = await kafka.partitions(self._client, self._topics.down_events)
        ranges = await kafka.window(self._client, tps, self._since, self._until)
        wanted = event_id.encode()
        async for record in kafka.read_range(self._client, ranges):
            self._down(record, wanted, children=True)


_UNREADABLE: dict[str, StepKind] = {
    "added": "added", "deleted": "deleted", "failed": "failed",
    "allocations": "allocated", "dlq": "dlq", "releases": "released",
}  # fmt: skip


def _reason(raw: msgspec.Raw) -> dict[str, str]:
    try:
        reason = _REASON.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return {}
    return {"node_id": reason.node_id, "error_code": reason.error_code,
            "error_msg": reason.error_msg}  # fmt: skip


def check_query(
    *,
    sn: str | None = None,
    device_id: str | None = None,
    event_id: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> dict[str, str]:
    """What is asked, as ``{name: value}``; checked before any broker is asked.

    Raises:
        InputError: not exactly one of them, an empty one, or ``since`` not before ``until``.
    """
    given = {
        k: v for k, v in (("sn", sn), ("device_id", device_id), ("event_id", event_id))
        if v is not None
    }  # fmt: skip
    if len(given) != 1:
        msg = "give one of --sn, --device-id, --event-id"
        raise InputError(msg)
    ((name, value),) = given.items()
    if not value.strip():
        msg = f"--{name.replace('_', '-')}: empty"
        raise InputError(msg)
    if since is not None and until is not None and since >= until:
        msg = f"--since {since.isoformat()} is not before --until {until.isoformat()}"
        raise InputError(msg)
    return given


async def walk(
    cfg: Config,
    *,
    sn: str | None = None,
    device_id: str | None = None,
    event_id: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> Journey:
    """The journey of the device given by ``sn``, ``device_id`` or ``event_id`` (one of them).

    Raises:
        InputError: not exactly one of them, an empty one, or ``since`` after ``until``.
    """
    given = check_query(sn=sn, device_id=device_id, event_id=event_id, since=since, until=until)
    (value,) = given.values()
    async with kafka.reader(cfg.kafka, **_SCAN) as client:
        walker = _Walk(cfg, client, _ms(since), _ms(until))
        await walker.start()
        if sn is not None:
            await walker.by_sn(sn)
        elif device_id is not None:
            walker.want("device", device_id)
        else:
            await walker.by_event(value)
        await walker.follow()
        await walker.down_events()
    steps = sorted(walker.steps, key=lambda s: s.order)
    return Journey(
        query=given,
        since=None if since is None else format_ms(_ms(since) or 0),
        until=None if until is None else format_ms(_ms(until) or 0),
        steps=steps,
    )


# -- The command ---------------------------------------------------------------------------

_SHOWN = (
    "gateway_id", "mqtt_topic", "event_type", "event_id", "event_time", "received_at",
    "device_id", "node_id", "sn", "source_event", "generation", "redriven_from", "operation",
    "error_kind", "code", "http_status", "msg", "error_code", "error_msg", "action",
    "attempts", "unreadable",
)  # fmt: skip
"""The detail fields shown, in this order (``--json`` has every field)."""


def _detail(step: Step) -> str:
    return " ".join(f"{k}={step.detail[k]}" for k in _SHOWN if k in step.detail)


def _table(journey: Journey) -> Table:
    ((name, value),) = journey.query.items()
    table = Table(title=escape(f"pipeline trace {name}={value}"))
    for column in ("time", "step", "topic", "partition", "offset", "trace id", "detail"):
        table.add_column(column, justify="right" if column in ("partition", "offset") else "left")
    for s in journey.steps:
        step = s.step if s.step not in ("dlq", "failed") else f"[red]{s.step}[/red]"
        table.add_row(
            s.timestamp, step, escape(s.topic), str(s.partition), str(s.offset),
            s.trace_id or "-", escape(_detail(s)),
        )  # fmt: skip
    return table


def _line(step: Step) -> str:
    where = f"{step.topic}/{step.partition}/{step.offset}"
    return f"{step.timestamp} {step.step} {where} trace={step.trace_id or '-'} {_detail(step)}"


async def trace(
    cfg: Config,
    *,
    sn: str | None = None,
    device_id: str | None = None,
    event_id: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    as_json: bool = False,
    out: IO[str] | None = None,
) -> int:
    """Find and print the journey; returns the exit code (0, or :data:`NOT_FOUND`)."""
    stream = out or sys.stdout
    journey = await walk(
        cfg, sn=sn, device_id=device_id, event_id=event_id, since=since, until=until
    )
    ((name, value),) = journey.query.items()
    if as_json:
        stream.write(msgspec.json.encode(journey).decode() + "\n")
    else:
        console = make_console(file=stream)
        window = "".join(
            f" {word} {when}" for word, when in (("since", journey.since), ("until", journey.until))
            if when
        )  # fmt: skip
        if not journey.steps:
            console.print(escape(f"{name} {value}: no record in the topics{window}"))
        elif console.is_terminal:
            console.print(_table(journey))
        else:
            for step in journey.steps:
                console.print(escape(_line(step)), soft_wrap=True, highlight=False)
        if journey.steps:
            console.print(escape(f"{name} {value}: {len(journey.steps)} records{window}"))
    return 0 if journey.steps else NOT_FOUND
