"""What ``pipeline reconcile`` compares, and how it judges each child (pure).

The lifecycle topic says, per child, what IoTDA last said of it (a
:class:`~pipeline.schemas.ChildState`); DPS says what it holds of the child's sn (a
:class:`Seen`, or nothing). :func:`expect` turns a child's state
into what should hold in DPS, the sn and orgId computed by the sink's own
:class:`~pipeline.core.mapping.Mapper`; :func:`judge` compares that with what DPS said.

Kinds of finding:

- ``missing``: the child was last added, and DPS does not know its sn or has not
  allocated it. Counted.
- ``deleted_allocated``: the child was last deleted, DPS has it allocated, and
  ``sink.on_delete`` is ``reset`` or ``delete``. Counted.
- ``other_org``: last added, allocated, in another orgId than the mapping says. Counted.
- ``unchecked``: its sn cannot be computed (the sink would dead-letter it as invalid) or
  DPS refused the lookup. Counted: nothing says it agrees.
- ``kept``: last deleted and still allocated while ``sink.on_delete = "record"``: the
  sink is told to only record deletions, so this is what it should look like. Listed,
  not counted.
- ``unknown_sn``: last deleted, but the pipeline never saw it added (the state holds no
  DeviceInfo), so its sn is unknown and nothing can be looked up. Listed, not counted.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import TYPE_CHECKING, Literal

import msgspec

from pipeline.errors import InputError, MappingError
from pipeline.schemas import AddedChild, ChildState

if TYPE_CHECKING:
    from pipeline.core.mapping import Mapper

__all__ = [
    "COUNTED",
    "Expected",
    "Finding",
    "Kind",
    "OnDelete",
    "Seen",
    "added_record",
    "expect",
    "has_device",
    "judge",
    "parse_duration",
    "parse_since",
    "within",
]

Kind = Literal["missing", "deleted_allocated", "other_org", "unchecked", "kept", "unknown_sn"]
OnDelete = Literal["record", "reset", "delete"]
COUNTED: frozenset[Kind] = frozenset({"missing", "deleted_allocated", "other_org", "unchecked"})
"""The kinds that are differences (exit 3); ``kept`` and ``unknown_sn`` are only listed."""

_encode = msgspec.json.Encoder().encode


class Expected(msgspec.Struct, frozen=True, kw_only=True):
    """One child as the lifecycle topic has it, and where the sink puts it in DPS.

    Attributes:
        state: its latest ChildState.
        sn: the sn the sink computes from its DeviceInfo; None when it cannot.
        org_id: the orgId the sink computes; None with ``sn``.
        problem: why there is no sn.
    """

    state: ChildState
    sn: str | None
    org_id: str | None
    problem: str | None = None


class Finding(msgspec.Struct, kw_only=True):
    """A child whose DPS state is not what the lifecycle topic says (or only listed)."""

    kind: Kind
    counted: bool
    device_id: str
    gateway_id: str
    state: Literal["added", "deleted"]
    generation: int
    changed_at: str
    sn: str | None
    org_id: str | None
    """The orgId the mapping says."""
    dps_status: str | None
    """``unknown`` (DPS has no such sn), or its allocation status (``init``, ``allocated``);
    None when it was not looked up."""
    dps_org_id: str | None
    detail: str


_NULL = b"null"


def has_device(state: ChildState) -> bool:
    """Whether the state holds a DeviceInfo (null when the child was never seen added)."""
    return bytes(state.device) != _NULL


def added_record(state: ChildState) -> AddedChild:
    """The added-topic record that (re)allocates the child ``state`` describes.

    ``source_event`` ``reconcile``; the state's generation, so that the sink's supersede
    rule lets it through unless a later add or delete came since. The event's time is not
    in the state: it is null.
    """
    if not has_device(state):
        msg = f"child {state.device_id} has no DeviceInfo to put back"
        raise ValueError(msg)
    return AddedChild(
        gateway_id=state.gateway_id,
        event_id=state.event_id,
        event_time=None,
        event_time_raw=None,
        source_event="reconcile",
        version=state.version,
        generation=state.generation,
        device=state.device,
    )


def expect(state: ChildState, mapper: Mapper) -> Expected:
    """Where the sink puts ``state``'s child: the sn and orgId its Mapper computes.

    The mapping is run on the very added record :func:`added_record` builds, so it is the
    sink's computation, deviceData included (a child whose deviceData the sink refuses has
    no sn here either).
    """
    if not has_device(state):
        return Expected(state=state, sn=None, org_id=None, problem="no DeviceInfo recorded")
    try:
        mapped = mapper.map(_encode(added_record(state)))
    except MappingError as exc:
        return Expected(state=state, sn=None, org_id=None, problem=str(exc))
    return Expected(state=state, sn=mapped.sn, org_id=mapped.org_id)


class Seen(msgspec.Struct, frozen=True, kw_only=True):
    """What DPS said of an sn it knows (from a Get or a Search DPS Device answer).

    Attributes:
        allocated: :func:`pipeline.dps.protocol.is_allocated` of the device.
        status: its allocation status as DPS put it (``init``, ``allocated``, ...).
        org_id: the orgId it is allocated in.
    """

    allocated: bool
    status: str
    org_id: str | None


def judge(  # noqa: PLR0911  (one return per kind)
    child: Expected,
    device: Seen | None,
    *,
    on_delete: OnDelete,
    refused: str | None = None,
) -> Finding | None:
    """What is wrong with ``child`` given what DPS said of its sn; None when they agree.

    Args:
        child: the child and its mapping.
        device: what DPS answered for the sn (None: DPS has no such sn).
        on_delete: ``sink.on_delete``.
        refused: DPS refused to look the sn up (why); ``device`` is then ignored.
    """
    state = child.state
    if child.sn is None:
        if state.state == "deleted" and not has_device(state):
            return _finding(child, "unknown_sn", "never seen added: its sn is unknown")
        return _finding(child, "unchecked", f"no sn: {child.problem}")
    if refused is not None:
        return _finding(child, "unchecked", f"DPS refused the lookup: {refused}")
    if state.state == "added":
        return _added(child, device)
    if device is None or not device.allocated:
        return None
    if on_delete == "record":
        detail = 'deleted in IoTDA, still allocated: sink.on_delete = "record" keeps it'
        return _finding(child, "kept", detail, device, looked=True)
    detail = f'deleted in IoTDA, still allocated (sink.on_delete = "{on_delete}")'
    return _finding(child, "deleted_allocated", detail, device, looked=True)


def _added(child: Expected, device: Seen | None) -> Finding | None:
    if device is None:
        return _finding(child, "missing", "DPS has no device with this sn", looked=True)
    if not device.allocated:
        detail = f"registered in DPS, not allocated ({device.status})"
        return _finding(child, "missing", detail, device, looked=True)
    if device.org_id != child.org_id:
        detail = f"allocated in {device.org_id}, the mapping says {child.org_id}"
        return _finding(child, "other_org", detail, device, looked=True)
    return None


def _finding(
    child: Expected, kind: Kind, detail: str, seen: Seen | None = None, *, looked: bool = False
) -> Finding:
    state = child.state
    return Finding(
        kind=kind,
        counted=kind in COUNTED,
        device_id=state.device_id,
        gateway_id=state.gateway_id,
        state=state.state,
        generation=state.generation,
        changed_at=state.changed_at,
        sn=child.sn,
        org_id=child.org_id,
        dps_status=("unknown" if seen is None else seen.status) if looked else None,
        dps_org_id=seen.org_id if seen is not None else None,
        detail=detail,
    )


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str, flag: str) -> dt.timedelta:
    """A duration (``30s``, ``90m``, ``24h``, ``7d``, ``2w``) given to ``flag``.

    Raises:
        InputError: not a duration.
    """
    match = _DURATION.match(text)
    if match is None:
        msg = f"{flag} {text!r}: give a duration (30s, 90m, 24h, 7d, 2w)"
        raise InputError(msg)
    return dt.timedelta(seconds=float(match[1]) * _UNIT[match[2]])


def parse_since(text: str, now: dt.datetime, flag: str = "--since") -> dt.datetime:
    """``--since`` (or ``flag``): a duration back from ``now`` (``90m``, ``24h``) or a time.

    A time is ISO 8601 (``2026-12-01``, ``2026-12-01T08:00:00Z``); without an offset it
    is UTC.

    Raises:
        InputError: neither.
    """
    if _DURATION.match(text):
        return now - parse_duration(text, flag)
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        msg = (
            f"{flag} {text!r}: give a duration (30s, 90m, 24h, 7d, 2w) or an ISO 8601 time "
            "(2026-12-01T08:00:00Z)"
        )
        raise InputError(msg) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def within(state: ChildState, since: dt.datetime, record_time_ms: int) -> bool:
    """Whether the child's latest change is at or after ``since``.

    The change's time is the state's ``changed_at`` (when the router recorded it); when
    that cannot be read, the lifecycle record's Kafka timestamp.
    """
    try:
        changed = dt.datetime.fromisoformat(state.changed_at)
    except ValueError:
        changed = dt.datetime.fromtimestamp(record_time_ms / 1000, dt.UTC)
    if changed.tzinfo is None:
        changed = changed.replace(tzinfo=dt.UTC)
    return changed >= since
