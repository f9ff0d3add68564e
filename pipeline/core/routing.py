"""Routing: one down-event record in, the records it yields out (pure, no I/O).

:func:`route` reads an ``iotda.down-events`` value into the child events it carries
(add and delete responses, add and delete notifications), children kept byte for byte.
:class:`Memory` is the router's memory of one input partition: each gateway's version
watermark and each child's state. :func:`apply` decides, against a :class:`Changes` view
of that memory, what one child event yields: ``added`` / ``failed`` / ``deleted`` /
``lifecycle`` records, a :class:`Gap` with its ``SyncRequest``, and the memory's new
entries (written to ``router_state`` in the same transaction, so the memory is exactly
as committed as the outputs). :class:`Dedup` remembers which (gateway, event_id) pairs
were already routed, so an MQTT redelivery of a response yields nothing new. The router
stage (``pipeline.stages.router``) moves the bytes.
"""

from __future__ import annotations

import collections
import dataclasses
import struct
import sys
from collections.abc import Sequence
from typing import Annotated, Literal, NamedTuple

import msgspec

from pipeline.core.decode import service_label
from pipeline.errors import DecodeError, PipelineError
from pipeline.schemas import (
    ADD_NOTIFY,
    ADD_RESPONSE,
    DELETE_NOTIFY,
    DELETE_RESPONSE,
    SUB_DEVICE_MANAGER,
    AddedChild,
    ChildState,
    DeletedChild,
    DownEvent,
    DownEventRecord,
    FailedChild,
    ServiceEvent,
    SourceEvent,
    SyncRequest,
    normalise_event_time,
)

__all__ = [
    "Applied",
    "Changes",
    "Child",
    "ChildEvent",
    "Dedup",
    "DeviceUnknown",
    "Gap",
    "Memory",
    "Out",
    "Routed",
    "Versions",
    "apply",
    "route",
]


# --------------------------------------------------------------------------------------
# Reading a down-event record


class _AddParas(msgspec.Struct):
    # Validated by ingest; kept raw so the children are copied byte for byte.
    successful_devices: list[msgspec.Raw]
    failed_devices: list[msgspec.Raw]


class _NotifyParas(msgspec.Struct):
    # add_sub_device_notify and delete_sub_device_notify (version is a long; documented
    # for both, yet the delete's example may leave it out).
    devices: list[msgspec.Raw]
    version: int | None = None


class _DeleteParas(msgspec.Struct):
    successful_devices: list[str]


class _DeviceKey(msgspec.Struct):
    # Of a child as IoTDA describes it: only the key is needed here.
    device_id: str


class _ReasonKey(msgspec.Struct):
    # Of a failure ingest validated as a Reason.
    node_id: str


_RECORD = msgspec.json.Decoder(DownEventRecord)
_EVENT = msgspec.json.Decoder(DownEvent)
_ADD = msgspec.json.Decoder(_AddParas)
_NOTIFY = msgspec.json.Decoder(_NotifyParas)
_DELETE = msgspec.json.Decoder(_DeleteParas)
_DEVICE = msgspec.json.Decoder(_DeviceKey)
_REASON = msgspec.json.Decoder(_ReasonKey)
_ENCODER = msgspec.json.Encoder()

Kind = Literal["add", "delete"]


@dataclasses.dataclass(frozen=True, slots=True)
class ChildEvent:
    """One ``$sub_device_manager`` service that adds or deletes children.

    ``children`` are (device_id, the child as received) for adds and delete
    notifications, (device_id, ``null``) for a delete response (it lists ids only).
    """

    kind: Kind
    source_event: SourceEvent
    event_id: str | None
    version: int | None
    event_time_raw: str | None
    children: Sequence[tuple[str, msgspec.Raw]]
    failed: list[tuple[bytes, bytes]] = dataclasses.field(default_factory=list)
    """The failed children of an add response, as encoded (key, FailedChild) pairs."""


@dataclasses.dataclass(frozen=True, slots=True)
class Routed:
    """What one down-event record carries."""

    gateway_id: str
    mqtt_topic: str
    events: list[ChildEvent]
    skipped: list[tuple[str, str]]


_MARK = msgspec.Raw(b"0")
_NULL = msgspec.Raw(b"null")


def _head(record: AddedChild | FailedChild | DeletedChild | ChildState) -> bytes:
    """The encoding of ``record`` up to its last field's value (the child, kept raw).

    The record is ``head + child + b"}"``: the bytes msgspec would write for the whole
    record (pinned in test_routing).
    """
    encoded = _ENCODER.encode(record)
    assert encoded.endswith(b":0}")  # noqa: S101 - the child is the last field
    return encoded[:-2]


def _with_device(head: bytes, device: msgspec.Raw) -> bytes:
    return b"".join((head, device, b"}"))


_STATE_OPEN = b'{"device_id":'
_STATE_EMPTY_ID = _STATE_OPEN + b'""'


def _state_tail(state: ChildState) -> bytes:
    """:func:`_head` of ``state`` (made with ``device_id=""``) after its device_id.

    ``_STATE_OPEN + encode(device_id) + tail + child + b"}"`` is then the encoding of
    the state of any child: the same for every child of an event but its first field
    (pinned in test_routing).
    """
    head = _head(state)
    assert head.startswith(_STATE_EMPTY_ID + b",")  # noqa: S101 - device_id is the first field
    return head[len(_STATE_EMPTY_ID) :]


def _read(gateway: str, service: ServiceEvent) -> ChildEvent | None:
    if service.service_id != SUB_DEVICE_MANAGER:
        return None
    event_type, event_id, raw_time, paras = (
        service.event_type,
        service.event_id,
        service.event_time,
        service.paras,
    )
    if event_type == ADD_RESPONSE:
        if event_id is None:
            msg = "add_sub_device_response without event_id"
            raise DecodeError(msg)
        add = _ADD.decode(paras)
        failed: list[tuple[bytes, bytes]] = []
        if add.failed_devices:
            head = _head(FailedChild(
                gateway_id=gateway, event_id=event_id, event_time=normalise_event_time(raw_time),
                event_time_raw=raw_time, reason=_MARK,
            ))  # fmt: skip
            failed = [
                (_REASON.decode(raw).node_id.encode(), b"".join((head, raw, b"}")))
                for raw in add.failed_devices
            ]
        children = [(_DEVICE.decode(raw).device_id, raw) for raw in add.successful_devices]
        return ChildEvent(
            "add", "add_sub_device_response", event_id, None, raw_time, children, failed
        )
    if event_type in (ADD_NOTIFY, DELETE_NOTIFY):
        notify = _NOTIFY.decode(paras)
        kind: Kind = "add" if event_type == ADD_NOTIFY else "delete"
        source: SourceEvent = (
            "add_sub_device_notify" if kind == "add" else "delete_sub_device_notify"
        )
        devices = [(_DEVICE.decode(raw).device_id, raw) for raw in notify.devices]
        if kind == "add" and notify.version is None:
            msg = "add_sub_device_notify without paras.version"
            raise DecodeError(msg)
        return ChildEvent(kind, source, None, notify.version, raw_time, devices)
    if event_type == DELETE_RESPONSE:
        if event_id is None:
            msg = "delete_sub_device_response without event_id"
            raise DecodeError(msg)
        ids = _DELETE.decode(paras).successful_devices
        return ChildEvent("delete", "delete_sub_device_response", event_id, None, raw_time,
                          [(i, _NULL) for i in ids])  # fmt: skip
    return None


def route(value: bytes) -> Routed:
    """Read one ``iotda.down-events`` value into the child events it carries (pure).

    Raises:
        DecodeError: the record is not a down-event record this pipeline wrote, or one
            of its child events breaks the documented shape.
    """
    try:
        record = _RECORD.decode(value)
        event = _EVENT.decode(record.event)
        events: list[ChildEvent] = []
        skipped: list[tuple[str, str]] = []
        for i, service in enumerate(event.services or ()):
            try:
                read = _read(record.gateway_id, service)
            except msgspec.DecodeError as exc:  # the event's own paras: say which
                msg = f"services[{i}] ({service.event_type}): {exc}"
                raise DecodeError(msg) from None
            if read is None:
                skipped.append(service_label(service))
            else:
                events.append(read)
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError) as exc:
        msg = f"not a down-event record: {exc}"
        raise DecodeError(msg) from None
    except RecursionError:
        msg = "not a down-event record: it nests deeper than the decoder allows"
        raise DecodeError(msg) from None
    return Routed(record.gateway_id, record.mqtt_topic, events, skipped)


# --------------------------------------------------------------------------------------
# The router's memory (persisted in router_state) and the decisions made against it


class Versions(msgspec.Struct, kw_only=True):
    """``router_state`` ``v/{gateway_id}``: a gateway's notification versions."""

    last: int
    """The highest version seen."""
    missing: list[tuple[int, int]] = msgspec.field(default_factory=list)
    """Open gaps: inclusive ranges of versions below ``last`` that never arrived."""


_GENERATION_MAX = 2**62


class Child(msgspec.Struct, kw_only=True, gc=False):
    """``router_state`` ``c/{gateway_id}/{device_id}``: a child's state.

    Only what the router decides by; the DeviceInfo a delete carries is not repeated here
    (the ``lifecycle`` record written beside it holds it, see :meth:`Memory.learn_device`).
    Not tracked by the garbage collector (``gc=False``: it holds no container). The
    memory keeps children packed (:class:`Memory`), not as these.
    """

    generation: Annotated[int, msgspec.Meta(ge=0, le=_GENERATION_MAX)]
    """Changes of state so far. Bounded so that it packs in a signed 64-bit integer
    (:class:`Memory`) after one more: a record beyond it is not one the router wrote."""
    state: Literal["added", "deleted"]
    version: int | None
    """The version of the notification that set this state; null for a response."""


class _StoredChild(Child, kw_only=True):
    """A ``c/`` record as read: routers before the compact record also wrote ``device``."""

    device: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    """The DeviceInfo the child was last added with, as received, or ``null`` when the
    router never saw it added (written by earlier routers; read so an upgrade keeps it)."""


_VERSIONS = msgspec.json.Decoder(Versions)
_CHILD = msgspec.json.Decoder(_StoredChild)


class _LifecycleDevice(msgspec.Struct):
    """What :meth:`Memory.learn_device` reads of a ``lifecycle`` record (a ChildState)."""

    gateway_id: str
    generation: int
    state: Literal["added", "deleted"]
    device: msgspec.Raw


_LIFECYCLE = msgspec.json.Decoder(_LifecycleDevice)

Key = tuple[str, str]
"""(gateway_id, device_id): a child in the router's memory."""


class DeviceUnknown(PipelineError):
    """A delete needs the DeviceInfo of an added child whose memory record does not hold it.

    The router reads it from ``lifecycle`` (:meth:`Memory.learn_device`) and routes the
    transaction again.
    """

    retriable = True

    def __init__(self, key: Key) -> None:
        super().__init__(f"the DeviceInfo of child {key[1]} of gateway {key[0]} is not in memory")
        self.key = key


_PACKED = struct.Struct("<qBq")
"""A child in memory: generation, flags, version; then its DeviceInfo, when known.

A version outside a signed 64-bit integer (IoTDA's are Java longs; the decoder takes
any) is written after the head as decimal digits, their count in the version's place.
"""
_F_DELETED, _F_VERSIONED, _F_DEVICE, _F_WIDE = 1, 2, 4, 8
_FLAGS = 8
"""Where the flags are in a packed child."""
_STATES: tuple[Literal["added"], Literal["deleted"]] = ("added", "deleted")
_LONG = range(-(2**63), 2**63)


def _pack(child: Child, device: bytes | msgspec.Raw | None) -> bytes:
    """``device``: bytes, or a Raw (its bytes are copied, not the record it views)."""
    version = child.version
    flags = (child.state == "deleted") | (device is not None) << 2
    if version is not None:
        flags |= _F_VERSIONED
        if version not in _LONG:
            wide = str(version).encode()
            head = _PACKED.pack(child.generation, flags | _F_WIDE, len(wide)) + wide
            return head if device is None else b"".join((head, device))
    head = _PACKED.pack(child.generation, flags, version or 0)
    return head if device is None else b"".join((head, device))


def _unpack(packed: bytes) -> Child:
    generation, flags, version = _PACKED.unpack_from(packed)
    if flags & _F_WIDE:
        version = int(packed[_PACKED.size : _PACKED.size + version])
    return Child(
        generation=generation,
        state=_STATES[flags & _F_DELETED],
        version=version if flags & _F_VERSIONED else None,
    )


def _device(packed: bytes) -> bytes | None:
    flags = packed[_FLAGS]
    if not flags & _F_DEVICE:
        return None
    start = _PACKED.size + (_PACKED.unpack_from(packed)[2] if flags & _F_WIDE else 0)
    return packed[start:]


class Memory:
    """What the router remembers of one input partition.

    Each gateway's versions, and each child's state with the DeviceInfo it was last added
    with, for the added children whose DeviceInfo this memory knows (those added since it
    was read back, those whose record held it (an earlier router's), and those
    :meth:`learn_device` found). A deleted child's DeviceInfo is not kept: a delete of a
    deleted child is a duplicate, and an add brings its own.

    The router keeps every child of its partitions, so a child is one ``bytes`` (its
    state packed, then its DeviceInfo) in a dict per gateway: about 200 bytes a child less
    than a ``Child`` and a DeviceInfo in dicts keyed by (gateway, device_id) tuples.
    """

    __slots__ = ("_gateways", "versions")

    def __init__(self) -> None:
        self.versions: dict[str, Versions] = {}
        self._gateways: dict[str, dict[str, bytes]] = {}

    def child(self, key: Key) -> Child | None:
        """The child's state; None for a child never seen."""
        packed = self._packed(key)
        return None if packed is None else _unpack(packed)

    def device(self, key: Key) -> bytes | None:
        """The DeviceInfo the child was last added with; None when this memory lacks it."""
        packed = self._packed(key)
        return None if packed is None else _device(packed)

    def _packed(self, key: Key) -> bytes | None:
        children = self._gateways.get(key[0])
        return None if children is None else children.get(key[1])

    def children(self) -> dict[Key, Child]:
        """Every child's state (a copy: for checks and tests, not the routing path)."""
        return {
            (gateway, device_id): _unpack(packed)
            for gateway, children in self._gateways.items()
            for device_id, packed in children.items()
        }

    def put(self, key: Key, child: Child, device: bytes | None) -> None:
        """Remember ``child`` as it is: for an added one, ``device``, or None when not known.

        What was remembered of it is replaced whole, DeviceInfo included (a record read
        back is the child's state then, not an update of an earlier one).
        """
        self._of(key[0])[key[1]] = _pack(child, device if child.state == "added" else None)

    def _of(self, gateway: str) -> dict[str, bytes]:
        """The gateway's children (a dict keyed by the one string it keeps of its id)."""
        children = self._gateways.get(gateway)
        if children is None:
            children = self._gateways[sys.intern(gateway)] = {}
        return children

    def take(self, children: dict[Key, Child], devices: dict[Key, msgspec.Raw]) -> None:
        """Remember ``children``: an added one with its DeviceInfo from ``devices``.

        Of a Raw, the memory copies its bytes, not the record it views. An added child
        without one there keeps the DeviceInfo remembered already.
        """
        for key, child in children.items():
            device: bytes | msgspec.Raw | None = None
            if child.state == "added":
                device = devices.get(key)
                if device is None:
                    device = self.device(key)
            self._of(key[0])[key[1]] = _pack(child, device)

    def learn(self, key: bytes | None, value: bytes | None) -> bool:
        """Take one ``router_state`` record in; False when it is not one the router wrote."""
        if key is None or value is None:
            return False
        try:
            text = key.decode()
            if text.startswith("v/"):
                self.versions[text[2:]] = _VERSIONS.decode(value)
                return True
            if text.startswith("c/"):
                gateway, _, device_id = text[2:].partition("/")
                stored = _CHILD.decode(value)
                child = Child(generation=stored.generation, state=stored.state,
                              version=stored.version)  # fmt: skip
                # An earlier router's record holds the DeviceInfo (not the whole record
                # is kept); the one that stopped knew it, this memory does not.
                device = None if stored.device is msgspec.UNSET else bytes(stored.device)
                self.put((gateway, device_id), child, device)
                return True
        except (UnicodeDecodeError, msgspec.DecodeError):
            return False
        return False

    def unknown_devices(self) -> dict[Key, int]:
        """The added children whose DeviceInfo this memory lacks, and their generations."""
        return {
            (gateway, device_id): _PACKED.unpack_from(packed)[0]
            for gateway, children in self._gateways.items()
            for device_id, packed in children.items()
            if not packed[_FLAGS] & (_F_DELETED | _F_DEVICE)
        }

    def learn_device(self, key: bytes | None, value: bytes | None, wanted: dict[Key, int]) -> bool:
        """Take a ``lifecycle`` record in: the DeviceInfo of a child of ``wanted``, if it is one.

        It is when it is the record written beside the child's memory: the same gateway,
        the same generation, added. A child's ``lifecycle`` record is overwritten only by a
        later change of that child (of any gateway: the topic is keyed by device_id).
        """
        if key is None or value is None:
            return False
        try:
            record = _LIFECYCLE.decode(value)
            child = (record.gateway_id, key.decode())
        except (UnicodeDecodeError, msgspec.DecodeError):
            return False
        if wanted.get(child) != record.generation or record.state != "added":
            return False
        known = self.child(child)
        if known is None:
            return False
        self.put(child, known, bytes(record.device))  # not the whole lifecycle record
        return True

    def settle(self, wanted: dict[Key, int]) -> list[Key]:
        """After :meth:`learn_device`: the children of ``wanted`` still without a DeviceInfo.

        They get ``null``, as a child never seen added: their ``lifecycle`` record is gone
        or another gateway's (the child moved), so a delete carries no DeviceInfo.
        """
        lost = [key for key in wanted if self.device(key) is None]
        for key in lost:
            known = self.child(key)
            if known is not None:
                self.put(key, known, b"null")
        return lost

    def open_gaps(self) -> dict[str, list[tuple[int, int]]]:
        """Each gateway with versions still missing, and the ranges."""
        return {gw: list(v.missing) for gw, v in self.versions.items() if v.missing}


class Changes:
    """A transaction's view of a :class:`Memory`: reads see its own writes; ``commit``."""

    def __init__(self, memory: Memory) -> None:
        self._memory = memory
        self._versions: dict[str, Versions] = {}
        self._children: dict[Key, Child] = {}
        self._devices: dict[Key, msgspec.Raw] = {}

    def version(self, gateway: str) -> Versions | None:
        """The gateway's versions, as this transaction leaves them so far."""
        found = self._versions.get(gateway)
        return found if found is not None else self._memory.versions.get(gateway)

    def child(self, key: Key) -> Child | None:
        """The child's state, as this transaction leaves it so far."""
        found = self._children.get(key)
        return found if found is not None else self._memory.child(key)

    def device(self, key: Key) -> msgspec.Raw | None:
        """The DeviceInfo the child was last added with; None when the memory lacks it."""
        found = self._devices.get(key)
        if found is not None:
            return found
        kept = self._memory.device(key)
        return None if kept is None else msgspec.Raw(kept)

    def set_version(self, gateway: str, versions: Versions) -> None:
        """Change the gateway's versions."""
        self._versions[gateway] = versions

    def set_child(self, key: Key, child: Child, device: msgspec.Raw | None = None) -> None:
        """Change the child's state (and, for an add, the DeviceInfo it was added with)."""
        self._children[key] = child
        if device is not None:
            self._devices[key] = device

    def records(self) -> list[tuple[bytes, bytes]]:
        """The ``router_state`` (key, value) pairs of every entry this transaction changed."""
        out = [(f"v/{gw}".encode(), _ENCODER.encode(v)) for gw, v in self._versions.items()]
        out += [
            (f"c/{gw}/{device_id}".encode(), _ENCODER.encode(c))
            for (gw, device_id), c in self._children.items()
        ]
        return out

    def commit(self) -> None:
        """The transaction committed: the memory takes its changes."""
        self._memory.versions.update(self._versions)
        # A decoded Raw is a view of the whole record it came from (the down event, a few
        # KB): the memory copies the DeviceInfo's bytes alone.
        self._memory.take(self._children, self._devices)


@dataclasses.dataclass(frozen=True, slots=True)
class Gap:
    """Versions of a gateway's notifications that never arrived (``first``..``last``)."""

    gateway_id: str
    first: int
    last: int
    sync_from: int
    """What the sync request carries: the last version before every open gap."""


Topic = Literal["added", "failed", "deleted", "lifecycle", "sync_requests"]


class Out(NamedTuple):
    """One record to write: the topic (by its ``kafka.topics`` field), key and value.

    (A named tuple: three a child, made at a tenth of a frozen dataclass's cost.)
    """

    topic: Topic
    key: bytes
    value: bytes


@dataclasses.dataclass(slots=True)
class Applied:
    """What one child event yields."""

    outs: list[Out] = dataclasses.field(default_factory=list)
    gap: Gap | None = None
    counts: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    """``added``, ``failed``, ``deleted`` children written; ``duplicate`` (a child already
    in that state), ``stale`` (a notification whose version was already seen),
    ``superseded`` (a child a later notification already decided) skipped; ``filled``: the
    notification was one of the versions an open gap missed."""


def _remove(missing: list[tuple[int, int]], version: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for first, last in missing:
        if first <= version <= last:
            out += [r for r in ((first, version - 1), (version + 1, last)) if r[0] <= r[1]]
        else:
            out.append((first, last))
    return out


def _sequence(gateway: str, version: int, view: Changes, now: str, applied: Applied) -> bool:
    """Move the gateway's watermark for a notification of ``version``; False: skip it."""
    known = view.version(gateway)
    if known is None:  # the first version seen sets the watermark
        view.set_version(gateway, Versions(last=version))
        return True
    if version > known.last:
        missing = list(known.missing)
        if version > known.last + 1:
            missing.append((known.last + 1, version - 1))
            gap = Gap(gateway, known.last + 1, version - 1, missing[0][0] - 1)
            applied.gap = gap
            request = SyncRequest(
                gateway_id=gateway, version=gap.sync_from, missing_from=gap.first,
                missing_to=gap.last, detected_at=now,
            )  # fmt: skip
            applied.outs.append(Out("sync_requests", gateway.encode(), _ENCODER.encode(request)))
        view.set_version(gateway, Versions(last=version, missing=missing))
        return True
    if any(first <= version <= last for first, last in known.missing):  # a gap filled
        filled = _remove(known.missing, version)
        view.set_version(gateway, Versions(last=known.last, missing=filled))
        applied.counts["filled"] += 1
        return True
    return False


def _last_device(view: Changes, child: Key, known: Child | None) -> msgspec.Raw:
    """What a delete of ``child`` carries: the DeviceInfo it was last added with, or null."""
    if known is None:  # never seen added
        return _NULL
    found = view.device(child)
    if found is None:
        raise DeviceUnknown(child)
    return found


def apply(gateway: str, event: ChildEvent, view: Changes, now: str) -> Applied:
    """What ``event`` of ``gateway`` yields against ``view`` (which it updates).

    Adds: a child already added is a duplicate (a notification repeating a response, a
    redelivery); otherwise its generation goes up by one and it is written to ``added``
    and ``lifecycle``. Deletes: a child already deleted is a duplicate; otherwise its
    generation goes up by one and it is written to ``deleted`` (with the DeviceInfo it
    was last added with, or null when the router never saw it added) and ``lifecycle``.
    A notification whose version was already seen is skipped whole (``stale``); one that
    skips versions opens a :class:`Gap` and is applied; one that fills a gap is applied,
    except to a child a later notification already decided (``superseded``).

    Raises:
        DeviceUnknown: a delete of an added child whose DeviceInfo the memory lacks (read
            back from compact records): look it up (:meth:`Memory.learn_device`) and apply
            the transaction's events again, against a fresh :class:`Changes`.
    """
    applied = Applied()
    gateway = sys.intern(gateway)  # one string for all of a gateway's children in memory
    if event.version is not None and not _sequence(gateway, event.version, view, now, applied):
        applied.counts["stale"] += 1
        return applied
    event_time = normalise_event_time(event.event_time_raw)
    # What differs between the records of an event's children is their device_id, their
    # DeviceInfo and their generation: the rest is encoded once per generation.
    heads: dict[int, bytes] = {}
    tails: dict[int, bytes] = {}
    for device_id, raw in event.children:
        child = (gateway, device_id)
        known = view.child(child)
        if (
            known is not None
            and event.version is not None
            and known.version is not None
            and known.version > event.version
        ):
            applied.counts["superseded"] += 1
            continue
        wanted: Literal["added", "deleted"] = "added" if event.kind == "add" else "deleted"
        if known is not None and known.state == wanted:
            applied.counts["duplicate"] += 1
            continue
        generation = (known.generation if known is not None else 0) + 1
        device = raw if event.kind == "add" else _last_device(view, child, known)
        view.set_child(child, Child(generation=generation, state=wanted, version=event.version),
                       raw if event.kind == "add" else None)  # fmt: skip
        key = device_id.encode()
        if event.kind == "add":
            head = heads.get(generation)
            if head is None:
                head = heads[generation] = _head(AddedChild(
                    gateway_id=gateway, event_id=event.event_id, event_time=event_time,
                    event_time_raw=event.event_time_raw, source_event=event.source_event,
                    version=event.version, generation=generation, device=_MARK,
                ))  # fmt: skip
            applied.outs.append(Out("added", key, _with_device(head, device)))
        else:
            deleted = DeletedChild(
                gateway_id=gateway, device_id=device_id, source_event=event.source_event,
                event_id=event.event_id, version=event.version, event_time=event_time,
                event_time_raw=event.event_time_raw, generation=generation, device=_MARK,
            )  # fmt: skip
            applied.outs.append(Out("deleted", key, _with_device(_head(deleted), device)))
        tail = tails.get(generation)
        if tail is None:
            tail = tails[generation] = _state_tail(ChildState(
                device_id="", gateway_id=gateway, state=wanted, generation=generation,
                source_event=event.source_event, event_id=event.event_id, version=event.version,
                changed_at=now, device=_MARK,
            ))  # fmt: skip
        value = b"".join((_STATE_OPEN, _ENCODER.encode(device_id), tail, device, b"}"))
        applied.outs.append(Out("lifecycle", key, value))
        applied.counts[wanted] += 1
    for key, value in event.failed:
        applied.outs.append(Out("failed", key, value))
    if event.failed:
        applied.counts["failed"] += len(event.failed)
    return applied


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
