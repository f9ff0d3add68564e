"""What the DPS emulator knows: credentials, devices, tokens, the call log and faults.

Plain data and the rules over it, with no HTTP (that is :mod:`.app`); tests can drive
it directly.
"""

from __future__ import annotations

import asyncio
import math
import random
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
import orjson

from pipeline.errors import InputError
from pipeline.schemas import I18nString, PvsDevice, PvsDeviceStatus, utc_now

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

__all__ = [
    "DEMO_GROUP",
    "REGION_ID",
    "CallRecord",
    "DeviceSpec",
    "EmulatedDevice",
    "EmulatorState",
    "Faults",
    "load_devices",
]

DEMO_GROUP = "demo-group"
"""The registration group of devices registered on first sight (``accept_any_sn``)."""
REGION_ID = "emulator-region"
"""The region every allocation lands in."""


class DeviceSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A registered device, as given in a devices file or to ``POST /_emulator/devices``."""

    sn: Annotated[str, msgspec.Meta(min_length=1)]
    group_id: str | None = None
    """The registration group; null means the group is missing (allocate answers 35404)."""
    product_key: str | None = None
    org_id: str | None = None
    """The organisation the device was pre-registered in (``manufacturerOrgId``)."""
    device_data: dict[str, Any] | None = None
    """Master data known before allocation; allocate merges the request's over it."""


class EmulatedDevice(msgspec.Struct, kw_only=True):
    """One device DPS knows, with its allocation state."""

    sn: str
    group_id: str | None
    product_key: str | None
    manufacturer_org_id: str | None
    registered_data: dict[str, Any]
    batch_order: int
    create_time: int
    update_time: int
    org_id: str | None = None
    region_id: str | None = None
    allocated_data: dict[str, Any] | None = None
    allocated_time: int | None = None
    reprovisioning: bool = False
    """Its allocation was reset (Reset Device Allocation Status) and not made again."""

    @property
    def current_status(self) -> str:
        """``allocated`` or ``init`` (the emulator never reaches connected or finished)."""
        return "init" if self.allocated_time is None else "allocated"

    def release(self, now: int) -> None:
        """Reset its allocation: it is ``init`` again, and the next allocate allocates it."""
        self.org_id = None
        self.region_id = None
        self.allocated_data = None
        self.allocated_time = None
        self.reprovisioning = True
        self.update_time = now

    def view(self) -> PvsDevice:
        """The PvsDevice DPS would return, shaped like the V2.5 Allocate return sample."""
        state = self.current_status
        data = self.allocated_data if self.allocated_data is not None else self.registered_data
        return PvsDevice(
            sn=self.sn,
            group_id=self.group_id,
            region_id=self.region_id,
            org_id=self.org_id,
            product_key=self.product_key,
            batch_order=self.batch_order,
            batch_tag=I18nString(default_value="emulator", i18n_value={}),
            device_data=data,
            desc=None,
            status=PvsDeviceStatus(
                current_status=state,
                connected_time=None,
                allocated_time=self.allocated_time,
                finished_time=None,
                discarded_time=None,
            ),
            reprovisioning=self.reprovisioning,
            allocate_error_msg=None,
            create_by=None,
            create_time=self.create_time,
            update_by=None,
            update_time=self.update_time,
            manufacturer_org_id=self.manufacturer_org_id,
            connect_status="init",
            allocate_status=state,
        )


class CallRecord(msgspec.Struct, kw_only=True):
    """One DPS call as received (any operation), and how it was answered.

    Fields a call does not have are null: ``sn`` for a batch, ``sns`` for a single device.
    """

    seq: int
    action: str = "allocate"
    """The ``action`` query parameter: ``allocate``, ``get``, ``search``,
    ``resetAllocationStatus``, ``delete`` (or whatever else was sent)."""
    sn: str | None
    """The sn of an allocate (body) or a get (query)."""
    sns: list[str] | None = None
    """The sns of a reset (``sns``) or a delete (``snList``)."""
    group_id: str | None = None
    """The ``groupId`` of a reset or a delete."""
    expression: str | None = None
    """The ``expression`` of a search."""
    org_id: str | None
    device_data: dict[str, Any] | None
    http_status: int | None = None
    """None while the call is still being answered."""
    code: int | None = None
    """The envelope's code; None when the answer had no JSON envelope (outage)."""
    cut: bool = False
    """The connection was closed instead of answering (fault ``cut_rate``): the call took
    effect as ``http_status`` and ``code`` say, but the caller never heard it."""
    hung: bool = False
    """Held unanswered by the hang fault (``hang_rate``, ``hang_sns``)."""
    abandoned: bool = False
    """The caller closed the connection (gave up) before it was answered. A call that hung
    before taking effect and was abandoned never takes effect: its ``http_status`` is 499
    (nginx's "client closed request") and its ``code`` null."""
    at: str
    """When it was received, RFC 3339 UTC."""


class Faults(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Faults injected into gateway calls (the token service and DPS).

    "DPS calls" are every operation: allocate, get, search, resetAllocationStatus and
    delete alike.
    """

    latency_ms: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    """Added before answering every token and DPS call."""
    error_rate: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0
    """Share of DPS calls answered with ``error_status`` (before they take effect)."""
    error_status: Annotated[int, msgspec.Meta(ge=400, le=599)] = 500
    throttle_rps: Annotated[float, msgspec.Meta(gt=0)] | None = None
    """DPS calls per second, all operations together, beyond which the answer is HTTP 429."""
    retry_after: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    """Seconds sent in the ``Retry-After`` header of a 429."""
    outage: bool = False
    """Every token and DPS call is answered HTTP 503 with a non-JSON body."""
    fail_sns: list[str] = msgspec.field(default_factory=list)
    """Sns whose DPS calls are always answered with ``error_status``: an allocate or get
    of one, a reset or delete naming one (a record that keeps failing while the others go
    through)."""
    cut_rate: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0
    """Share of DPS calls that take effect and whose connection is then closed without an
    answer: an allocate that happened although the caller saw only a dropped connection."""
    no_dps_role: bool = False
    """The application's service account has no DPS role: Reset Device Allocation Status,
    the one operation that documents it, answers 35603."""
    hang_rate: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0
    """Share of DPS calls held without an answer (a hung call): until the caller gives up
    (closes the connection), ``hang_ms`` pass, or the fault is lifted (``hang_rate`` set
    to 0); then it is answered as usual if the caller is still there."""
    hang_sns: list[str] = msgspec.field(default_factory=list)
    """Sns whose DPS calls are always held as ``hang_rate`` holds them (lifted when the
    sn leaves the list)."""
    hang_ms: Annotated[float, msgspec.Meta(ge=0)] | None = None
    """How long a hung call is held at most; null: until the caller gives up or the fault
    is lifted."""
    hang_after_effect: bool = False
    """Hung calls take effect first and are held after (an allocate that happened while
    the caller sees only a timeout); otherwise they are held before taking effect, and
    one whose caller gave up never takes effect."""


class _Bucket:
    """A token bucket: ``rate`` calls per second, bursts of ``max(1, rate)``."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _parse_devices(entries: Iterable[Any]) -> list[DeviceSpec]:
    specs = []
    for index, entry in enumerate(entries):
        try:
            specs.append(msgspec.convert(entry, DeviceSpec))
        except msgspec.ValidationError as exc:
            msg = f"device #{index + 1}: {exc}"
            raise ValueError(msg) from None
    return specs


class EmulatorState:
    """Everything the emulator knows: credentials, devices, tokens, calls and faults.

    Args:
        app_key: the only application key the token service accepts.
        app_secret: its secret.
        token_ttl: lifetime of an access token, in seconds.
        devices: devices to register (see :class:`DeviceSpec`).
        accept_any_sn: register every unknown sn on first sight, in group ``demo-group``.
    """

    def __init__(
        self,
        *,
        app_key: str = "demo-app-key",
        app_secret: str = "demo-app-secret",  # noqa: S107  (the documented demo credential)
        token_ttl: int = 7200,
        devices: Iterable[Mapping[str, Any]] | None = None,
        accept_any_sn: bool = False,
    ) -> None:
        self.app_key = app_key
        self.app_secret = app_secret
        self.token_ttl = token_ttl
        self.accept_any_sn = accept_any_sn
        self.devices: dict[str, EmulatedDevice] = {}
        self.groups: set[str] = set()
        """Every registration group a device was registered in; deleting its devices
        does not delete a group."""
        self.tokens: dict[str, float] = {}
        """Issued access token -> when it expires (``time.monotonic()``)."""
        self.token_requests = 0
        """Requests received by the token service."""
        self.calls: list[CallRecord] = []
        self.faults = Faults()
        self._bucket: _Bucket | None = None
        self._seq = 0
        self._changed: asyncio.Future[None] | None = None
        self.in_flight = 0
        """DPS calls received and not yet finished (answered, cut, or given up by a hung
        call whose caller left)."""
        self.peak_in_flight = 0
        """The most DPS calls in flight at once since the start or the last
        :meth:`reset_peak`."""
        if devices is not None:
            self.register(devices)

    # -- Devices -----------------------------------------------------------------------

    def register(self, entries: Iterable[Any]) -> tuple[int, int]:
        """Register new sns or update existing ones (their allocation state is kept).

        Returns:
            How many devices were created and how many updated.

        Raises:
            ValueError: an entry is not a valid :class:`DeviceSpec`; nothing was changed.
        """
        specs = _parse_devices(entries)
        created = updated = 0
        now = _now_ms()
        for spec in specs:
            if spec.group_id is not None:
                self.groups.add(spec.group_id)
            device = self.devices.get(spec.sn)
            if device is None:
                self.devices[spec.sn] = EmulatedDevice(
                    sn=spec.sn,
                    group_id=spec.group_id,
                    product_key=spec.product_key,
                    manufacturer_org_id=spec.org_id,
                    registered_data=dict(spec.device_data or {}),
                    batch_order=len(self.devices) + 1,
                    create_time=now,
                    update_time=now,
                )
                created += 1
            else:
                device.group_id = spec.group_id
                device.product_key = spec.product_key
                device.manufacturer_org_id = spec.org_id
                device.registered_data = dict(spec.device_data or {})
                device.update_time = now
                updated += 1
        return created, updated

    def lookup(self, sn: str) -> EmulatedDevice | None:
        """The device ``sn``; registered on first sight when ``accept_any_sn`` is on."""
        device = self.devices.get(sn)
        if device is None and self.accept_any_sn:
            self.register([{"sn": sn, "group_id": DEMO_GROUP}])
            device = self.devices[sn]
        return device

    def in_group(self, group_id: str, sns: Iterable[str]) -> list[EmulatedDevice] | None:
        """The devices ``sns`` if the group exists and every one is registered in it.

        Looked up as :meth:`lookup` does; in order and without repeats. None when the
        group does not exist or one of the sns is not registered in it.
        """
        if group_id not in self.groups and not (self.accept_any_sn and group_id == DEMO_GROUP):
            return None
        found = []
        for sn in dict.fromkeys(sns):
            device = self.lookup(sn)
            if device is None or device.group_id != group_id:
                return None
            found.append(device)
        return found

    def release(self, devices: Iterable[EmulatedDevice]) -> None:
        """Reset the allocation of ``devices``: each is ``init`` again."""
        now = _now_ms()
        for device in devices:
            device.release(now)

    def delete(self, group_id: str, sns: Iterable[str]) -> list[str]:
        """Delete the sns registered in ``group_id``.

        Returns:
            The sns, in order and without repeats, that were deleted or were not
            registered at all; an sn registered in another group stays and is left out.
        """
        gone = []
        for sn in dict.fromkeys(sns):
            device = self.devices.get(sn)
            if device is None:
                gone.append(sn)
            elif device.group_id == group_id:
                del self.devices[sn]
                gone.append(sn)
        return gone

    # -- Tokens ------------------------------------------------------------------------

    def issue_token(self) -> tuple[str, int]:
        """The unexpired token if there is one, else a new one; and its lifetime (s)."""
        now = time.monotonic()
        self.tokens = {token: until for token, until in self.tokens.items() if until > now}
        if self.tokens:
            token, until = max(self.tokens.items(), key=lambda item: item[1])
            return token, math.ceil(until - now)
        token = secrets.token_hex(16)
        self.tokens[token] = now + self.token_ttl
        return token, self.token_ttl

    def token_valid(self, token: str) -> bool:
        """Whether ``token`` was issued here and has not expired."""
        until = self.tokens.get(token)
        return until is not None and until > time.monotonic()

    def expire_tokens(self) -> None:
        """Expire every issued token now (the next DPS call answers 1203)."""
        now = time.monotonic()
        self.tokens = dict.fromkeys(self.tokens, now)

    # -- Calls and faults --------------------------------------------------------------

    def record_call(
        self,
        *,
        action: str = "allocate",
        org_id: str | None,
        sn: str | None = None,
        sns: list[str] | None = None,
        group_id: str | None = None,
        expression: str | None = None,
        device_data: dict[str, Any] | None = None,
    ) -> CallRecord:
        """Append a DPS call to the log, in the order received."""
        self._seq += 1
        call = CallRecord(
            seq=self._seq,
            action=action,
            sn=sn,
            sns=sns,
            group_id=group_id,
            expression=expression,
            org_id=org_id,
            device_data=device_data,
            at=utc_now(),
        )
        self.calls.append(call)
        return call

    def call_started(self) -> None:
        """A DPS call is being handled: count it in flight."""
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def call_ended(self) -> None:
        """A DPS call counted by :meth:`call_started` is finished."""
        self.in_flight -= 1

    def reset_peak(self) -> None:
        """Start measuring the peak of calls in flight afresh (from the calls in flight now)."""
        self.peak_in_flight = self.in_flight

    def hang(self, call: CallRecord) -> bool:
        """Whether the hang fault holds ``call`` (drawn once per call for ``hang_rate``).

        Sets ``call.hung``; :meth:`still_hung` then says whether the fault still holds it.
        """
        faults = self.faults
        call.hung = bool(
            (call.sn is not None and call.sn in faults.hang_sns)
            or (faults.hang_rate and random.random() < faults.hang_rate)
        )
        return call.hung

    def still_hung(self, call: CallRecord) -> bool:
        """Whether the fault that holds ``call`` is still set (lifting it releases the call)."""
        faults = self.faults
        return faults.hang_rate > 0 or (call.sn is not None and call.sn in faults.hang_sns)

    def faults_changed(self) -> asyncio.Future[None]:
        """A future done at the next change of the faults (hung calls look again)."""
        if self._changed is None or self._changed.done():
            self._changed = asyncio.get_running_loop().create_future()
        return self._changed

    def _notify(self) -> None:
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)
        self._changed = None

    def set_faults(self, changes: Mapping[str, Any]) -> Faults:
        """Merge ``changes`` into the current faults.

        Raises:
            msgspec.ValidationError: an unknown fault or a value out of range.
        """
        faults = msgspec.convert(msgspec.structs.asdict(self.faults) | dict(changes), Faults)
        if faults.throttle_rps != self.faults.throttle_rps:
            self._bucket = _Bucket(faults.throttle_rps) if faults.throttle_rps else None
        self.faults = faults
        self._notify()
        return faults

    def throttled(self) -> bool:
        """Whether this DPS call exceeds ``throttle_rps``."""
        return self._bucket is not None and not self._bucket.take()

    def reset(self) -> None:
        """Forget calls, faults and tokens; registered devices and their state stay."""
        self.calls.clear()
        self._seq = 0
        self.reset_peak()
        self.faults = Faults()
        self._notify()
        self._bucket = None
        self.tokens.clear()
        self.token_requests = 0


def load_devices(path: str | Path) -> list[dict[str, Any]]:
    """Read registered devices from a JSON file (a list, or ``{"devices": [...]}``) or JSON Lines.

    Each device is ``{"sn", "group_id", "product_key"?, "org_id"?, "device_data"?}``; a
    null or absent ``group_id`` means its registration group is missing.

    Raises:
        InputError: the file cannot be read, or one line naming the entry at fault.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        msg = f"devices file {path}: {exc.strerror}"
        raise InputError(msg) from None
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:
        data = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                data.append(orjson.loads(line))
            except orjson.JSONDecodeError as exc:
                msg = f"devices file {path}, line {lineno}: not valid JSON: {exc}"
                raise InputError(msg) from None
    if isinstance(data, dict):
        # A JSON object is either the {"devices": [...]} wrapper or a one-line JSON Lines file.
        data = data.get("devices", [data])
    if not isinstance(data, list):
        msg = f'devices file {path}: expected a list of devices or {{"devices": [...]}}'
        raise InputError(msg)
    try:
        specs = _parse_devices(data)
    except ValueError as exc:
        msg = f"devices file {path}: {exc}"
        raise InputError(msg) from None
    return [msgspec.to_builtins(spec) for spec in specs]
