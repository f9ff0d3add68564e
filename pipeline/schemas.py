"""Wire schemas: the IoTDA down event, the Kafka records and the DPS API, in one place.

These msgspec Structs are the only definition of each shape; ``pipeline schemas export``
generates ``schemas/`` from them. Pass-through values (the event as received, the
DeviceInfo/Reason as received, the PvsDevice DPS returned) are ``msgspec.Raw``: they are
validated against their Struct but copied byte for byte, so fields the platform adds
later are never lost. Their JSON Schema points at the Struct they were validated against.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Annotated, Any, Literal

import msgspec

__all__ = [
    "MAX_PAGE_SIZE",
    "AddSubDeviceNotify",
    "AddSubDeviceResponse",
    "AddedChild",
    "AllocateRequest",
    "Allocation",
    "AllocationFailure",
    "DeleteDevicesRequest",
    "DeleteSubDeviceNotify",
    "DeleteSubDeviceResponse",
    "DeviceInfo",
    "DeviceStatus",
    "DownEvent",
    "DownEventRecord",
    "DpsEnvelope",
    "DpsPageEnvelope",
    "FailedChild",
    "Pagination",
    "PaginationRequest",
    "PvsDevice",
    "PvsDeviceStatus",
    "Reason",
    "ResetAllocationRequest",
    "SearchRequest",
    "ServiceEvent",
    "Sorter",
    "StatusUpdateResponse",
    "TokenData",
    "TokenRequest",
    "TokenResponse",
    "format_time",
    "normalise_event_time",
    "utc_now",
]


def _raw(ref: str, description: str) -> msgspec.Meta:
    """Schema metadata for a pass-through field validated against the Struct ``ref``."""
    return msgspec.Meta(description=description, extra_json_schema={"$ref": f"#/$defs/{ref}"})


RawDownEvent = Annotated[
    msgspec.Raw, _raw("DownEvent", "The down event exactly as received, unknown fields kept.")
]
RawDeviceInfo = Annotated[msgspec.Raw, _raw("DeviceInfo", "The DeviceInfo exactly as received.")]
RawReason = Annotated[msgspec.Raw, _raw("Reason", "The Reason exactly as received.")]
RawPvsDevice = Annotated[msgspec.Raw, _raw("PvsDevice", "The PvsDevice DPS returned.")]
RawAddedChild = Annotated[msgspec.Raw, _raw("AddedChild", "The input record, as consumed.")]


# --------------------------------------------------------------------------------------
# IoTDA: $oc/devices/{device_id}/sys/events/down


class DeviceInfo(msgspec.Struct, kw_only=True):
    """A child device as the platform describes it (add_sub_device_response/notify)."""

    node_id: str
    device_id: str
    # Documented as mandatory, yet the platform's own example sends null.
    parent_device_id: str | None = None
    name: str | None = None
    description: str | None = None
    manufacturer_id: str | None = None
    model: str | None = None
    product_id: str | None = None
    fw_version: str | None = None
    sw_version: str | None = None
    status: str | None = None
    """ONLINE, OFFLINE or INACTIVE; kept as a string so new values do not break decoding."""
    extension_info: dict[str, Any] | None = None


class Reason(msgspec.Struct, kw_only=True):
    """Why the platform could not add one child."""

    node_id: str
    product_id: str
    error_code: str
    error_msg: str


class AddSubDeviceResponse(msgspec.Struct, kw_only=True):
    """``paras`` of ``$sub_device_manager`` / ``add_sub_device_response``."""

    successful_devices: list[DeviceInfo]
    failed_devices: list[Reason]


class AddSubDeviceNotify(msgspec.Struct, kw_only=True):
    """``paras`` of ``add_sub_device_notify``: children added elsewhere (console, API)."""

    devices: list[DeviceInfo]
    version: int


class DeletedDevice(msgspec.Struct, kw_only=True):
    """A child in ``delete_sub_device_notify``."""

    device_id: str
    node_id: str | None = None
    parent_device_id: str | None = None


class DeleteSubDeviceNotify(msgspec.Struct, kw_only=True):
    """``paras`` of ``delete_sub_device_notify``."""

    devices: list[DeletedDevice]
    version: int | None = None


class DeleteFailure(msgspec.Struct, kw_only=True):
    """A child the platform could not delete."""

    device_id: str
    error_code: str
    error_msg: str


class DeleteSubDeviceResponse(msgspec.Struct, kw_only=True):
    """``paras`` of ``delete_sub_device_response``."""

    successful_devices: list[str]
    failed_devices: list[DeleteFailure]


class DeviceStatus(msgspec.Struct, kw_only=True):
    """A child whose status update was accepted."""

    device_id: str
    status: str


class StatusFailure(msgspec.Struct, kw_only=True):
    """A child whose status update was refused."""

    device_id: str
    error_code: str
    error_msg: str


class StatusUpdateResponse(msgspec.Struct, kw_only=True):
    """``paras`` of the status-update response.

    The docs call the event ``sub_device_update_status``; a public Go device SDK matches
    ``sub_device_update_status_response``. Both spellings are accepted.
    """

    successful_devices: list[DeviceStatus]
    failed_devices: list[StatusFailure]


class ServiceEvent(msgspec.Struct, kw_only=True):
    """One entry of ``services``; ``paras`` is decoded per (service_id, event_type)."""

    service_id: str
    event_type: str
    event_time: str | None = None
    event_id: str | None = None
    paras: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)
    """Kept raw (empty when absent, ``null`` when null) and decoded per event type."""


class DownEvent(msgspec.Struct, kw_only=True):
    """The envelope of every message on ``$oc/devices/{device_id}/sys/events/down``."""

    object_device_id: str | None = None
    services: list[ServiceEvent] | None = None


SUB_DEVICE_MANAGER = "$sub_device_manager"
ADD_RESPONSE = "add_sub_device_response"

PARAS: dict[tuple[str, str], type[msgspec.Struct]] = {
    (SUB_DEVICE_MANAGER, ADD_RESPONSE): AddSubDeviceResponse,
    (SUB_DEVICE_MANAGER, "add_sub_device_notify"): AddSubDeviceNotify,
    (SUB_DEVICE_MANAGER, "delete_sub_device_notify"): DeleteSubDeviceNotify,
    (SUB_DEVICE_MANAGER, "delete_sub_device_response"): DeleteSubDeviceResponse,
    (SUB_DEVICE_MANAGER, "sub_device_update_status"): StatusUpdateResponse,
    (SUB_DEVICE_MANAGER, "sub_device_update_status_response"): StatusUpdateResponse,
}
"""The ``paras`` shape of each known ``$sub_device_manager`` down event."""


# --------------------------------------------------------------------------------------
# Kafka records


class DownEventRecord(msgspec.Struct, kw_only=True):
    """``iotda.down-events``, keyed by gateway device_id."""

    gateway_id: str
    mqtt_topic: str
    received_at: str
    event: RawDownEvent


class AddedChild(msgspec.Struct, kw_only=True):
    """``iotda.subdevices.added``, keyed by the child's device_id."""

    gateway_id: str
    event_id: str
    event_time: str | None
    """RFC 3339 UTC with milliseconds, or null when absent or unreadable."""
    event_time_raw: str | None
    device: RawDeviceInfo


class FailedChild(msgspec.Struct, kw_only=True):
    """``iotda.subdevices.failed``, keyed by the child's node_id."""

    gateway_id: str
    event_id: str
    event_time: str | None
    event_time_raw: str | None
    reason: RawReason


class Allocation(msgspec.Struct, kw_only=True):
    """``dps.allocations``, keyed by sn: DPS allocated the child."""

    sn: str
    org_id: str
    device_id: str
    gateway_id: str
    event_id: str
    attempts: int
    request_id: str | None
    allocated_at: str
    device: RawPvsDevice


class AllocationFailure(msgspec.Struct, kw_only=True):
    """``dps.allocations.dlq``, keyed by sn: the child was not allocated, and why."""

    sn: str | None
    org_id: str | None
    device_id: str | None
    gateway_id: str | None
    event_id: str | None
    attempts: int
    error_kind: Literal["rejected", "exhausted", "invalid"]
    code: int | None
    msg: str
    request_id: str | None
    failed_at: str
    record: RawAddedChild


# --------------------------------------------------------------------------------------
# EnOS API gateway and DPS


class TokenRequest(msgspec.Struct, kw_only=True, rename="camel"):
    """``POST /apim-token-service/v2.0/token/get``."""

    app_key: str
    encryption: str
    """lowercase hex SHA-256 of appKey + timestamp + appSecret."""
    timestamp: int
    """Unix milliseconds."""


class TokenData(msgspec.Struct, kw_only=True, rename="camel"):
    """The token and its lifetime in seconds."""

    access_token: str
    expire: int


class TokenResponse(msgspec.Struct, kw_only=True):
    """The token service's envelope (``status``, not ``code``)."""

    status: int
    msg: str | None = None
    business: str | None = None
    data: TokenData | None = None


class AllocateRequest(msgspec.Struct, kw_only=True, omit_defaults=True, rename="camel"):
    """``POST /dps-service/v2.5/pvs/device?action=allocate&orgId=...``."""

    sn: str
    device_data: dict[str, Any] | None = None
    """Master-data identifier -> value; left out when empty."""


class ResetAllocationRequest(msgspec.Struct, kw_only=True, rename="camel"):
    """``POST /dps-service/v2.5/pvs/device?action=resetAllocationStatus&orgId=...``."""

    group_id: str
    """The registration group every sn of the batch belongs to."""
    sns: list[str]


class DeleteDevicesRequest(msgspec.Struct, kw_only=True, rename="camel"):
    """``POST /dps-service/v2.5/pvs/device?action=delete&orgId=...``."""

    group_id: str
    """The registration group the sns belong to."""
    sn_list: list[str]


MAX_PAGE_SIZE = 1000
"""Search DPS Device: "The maximum records per page is 1,000"."""


class Sorter(msgspec.Struct, kw_only=True):
    """One sort key of a search (EnOS Sorter Struct)."""

    field: str
    order: str = "ASC"
    """``ASC`` or ``DESC``."""


class PaginationRequest(msgspec.Struct, kw_only=True, omit_defaults=True, rename="camel"):
    """EnOS Pagination Request Struct: which page of a search, and how it is sorted."""

    page_no: Annotated[int, msgspec.Meta(ge=1)]
    """Pages are numbered from 1."""
    page_size: Annotated[int, msgspec.Meta(ge=1, le=MAX_PAGE_SIZE)]
    sorters: list[Sorter] | None = None
    """Left out: DPS sorts by ``createTime``, newest first."""


class SearchRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    """``POST /dps-service/v2.5/pvs/device?action=search&orgId=...``."""

    expression: Annotated[str, msgspec.Meta(min_length=1)]
    """An FQL query over sn, groupId, regionId, productKey, status, batchOrder,
    createTime and deviceData."""
    pagination: PaginationRequest | None = None
    """Left out: the first page of 10."""


class Pagination(msgspec.Struct, kw_only=True, rename="camel"):
    """The ``pagination`` of a search answer: the page returned and how many match."""

    page_no: int
    page_size: int
    total_size: int | None = None


class PvsDeviceStatus(msgspec.Struct, kw_only=True, rename="camel"):
    """Where a DPS device is in its life (init, allocated, connected, finished, ...)."""

    current_status: str | None = None
    connected_time: int | None = None
    allocated_time: int | None = None
    finished_time: int | None = None
    discarded_time: int | None = None


class I18nString(msgspec.Struct, kw_only=True, rename="camel"):
    """EnOS StringI18n."""

    default_value: str | None = None
    i18n_value: dict[str, str] | None = None


class PvsDevice(msgspec.Struct, kw_only=True, rename="camel"):
    """A DPS device (the ``data`` of allocate and get)."""

    sn: str
    group_id: str | None = None
    region_id: str | None = None
    org_id: str | None = None
    product_key: str | None = None
    batch_order: int | None = None
    batch_tag: I18nString | None = None
    device_data: dict[str, Any] | None = None
    desc: str | None = None
    status: PvsDeviceStatus | None = None
    reprovisioning: bool | None = None
    allocate_error_msg: str | None = None
    create_by: str | None = None
    create_time: int | None = None
    update_by: str | None = None
    update_time: int | None = None
    manufacturer_org_id: str | None = None
    connect_status: str | None = None
    allocate_status: str | None = None


class DpsEnvelope(msgspec.Struct, kw_only=True, rename="camel"):
    """Every EnOS 2.x service response: ``{code, msg, requestId, data}``; code 0 is OK."""

    code: int
    msg: str | None = None
    request_id: str | None = None
    data: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"null"))
    """``null`` on errors; kept raw so what DPS returned is passed on unchanged."""


class DpsPageEnvelope(msgspec.Struct, kw_only=True, rename="camel"):
    """A search answer: the :class:`DpsEnvelope` fields and the page's ``pagination``."""

    code: int
    msg: str | None = None
    request_id: str | None = None
    data: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"null"))
    """The page's PvsDevices (a list); ``null`` on errors."""
    pagination: Pagination | None = None


# --------------------------------------------------------------------------------------
# Times: RFC 3339 UTC with milliseconds everywhere.


def format_time(when: dt.datetime) -> str:
    """``2026-11-22T06:30:00.123Z``."""
    when = when.astimezone(dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


_second: list[object] = [-1, ""]  # the last whole second and its formatted prefix


def utc_now() -> str:
    """The current time, formatted by :func:`format_time` (once per message: kept cheap).

    The ``YYYY-MM-DDTHH:MM:SS.`` prefix is formatted once per second.
    """
    now = time.time()
    second = int(now)
    if second != _second[0]:
        _second[1] = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
        _second[0] = second
    return f"{_second[1]}{int((now - second) * 1000):03d}Z"


def normalise_event_time(raw: str | None) -> str | None:
    """IoTDA ``event_time`` as RFC 3339 in UTC, or None when absent or unreadable.

    The docs give ``20151212T121212Z``; the official device SDK sends
    ``2015-12-12T12:12:12Z``. Both are UTC; any ISO 8601 time with a zone is read, one
    without a zone is unreadable (the zone would be a guess).
    """
    if not raw:
        return None
    try:
        when = dt.datetime.fromisoformat(raw)
    except ValueError:
        return None
    return None if when.tzinfo is None else format_time(when)
