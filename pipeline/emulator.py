"""A DPS emulator that follows the documented contract, served over real HTTP.

EnOS cannot be reached from tests or demos, so the sink is exercised against this. It
implements the API gateway's access token and request signature checks
(reference/protocols.md B2), DPS V2.5 Allocate and Get with their documented error codes
(B1), and admin endpoints under ``/_emulator/`` to register devices, read the log of
allocate calls and inject faults (latency, errors, throttling, outage).

Where the docs are silent the emulator makes one choice and says so:

- Token and business errors are answered with HTTP 200 and the code in the body; a missing
  gateway header is HTTP 401 with code 1202, a wrong signature HTTP 401 with legacy code
  497, an unknown or expired token HTTP 200 with code 1203.
- Asking for a token while one is unexpired returns that token (documented) with its
  remaining lifetime, rounded up, as ``expire``.
- Allocating an already allocated sn returns the same device again, unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import http
import logging
import math
import random
import secrets
import signal
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple, Self

import msgspec
import orjson
import yarl
from aiohttp import web

from pipeline.dps import DEVICE_PATH, TOKEN_PATH, sign, token_encryption
from pipeline.errors import ConfigError
from pipeline.schemas import (
    DpsEnvelope,
    I18nString,
    PvsDevice,
    PvsDeviceStatus,
    TokenData,
    TokenRequest,
    TokenResponse,
    utc_now,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from types import TracebackType

__all__ = [
    "CallRecord",
    "DeviceSpec",
    "EmulatedDevice",
    "EmulatorState",
    "Faults",
    "RunningEmulator",
    "build_app",
    "load_devices",
    "serve",
    "start_emulator",
]

log = logging.getLogger(__name__)

DEMO_GROUP = "demo-group"
"""The registration group of devices registered on first sight (``accept_any_sn``)."""
REGION_ID = "emulator-region"
"""The region every allocation lands in."""

_SHUTDOWN_TIMEOUT = 2.0
_BUSINESS = "apim-token-service"

_encode = msgspec.json.Encoder().encode


# --------------------------------------------------------------------------------------
# State


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

    def view(self) -> PvsDevice:
        """The PvsDevice DPS would return, shaped like the V2.5 Allocate return sample."""
        allocated = self.allocated_time is not None
        state = "allocated" if allocated else "init"
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
            reprovisioning=False,
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
    """One allocate call as received, and how it was answered."""

    seq: int
    sn: str | None
    org_id: str | None
    device_data: dict[str, Any] | None
    http_status: int | None = None
    """None while the call is still being answered."""
    code: int | None = None
    """The envelope's code; None when the answer had no JSON envelope (outage)."""
    at: str
    """When it was received, RFC 3339 UTC."""


class Faults(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Faults injected into gateway calls (the token service and DPS)."""

    latency_ms: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    """Added before answering every token and DPS call."""
    error_rate: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0
    """Share of DPS calls (allocate and get) answered with ``error_status``."""
    error_status: Annotated[int, msgspec.Meta(ge=400, le=599)] = 500
    throttle_rps: Annotated[float, msgspec.Meta(gt=0)] | None = None
    """Allocate calls per second beyond which the answer is HTTP 429."""
    retry_after: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    """Seconds sent in the ``Retry-After`` header of a 429."""
    outage: bool = False
    """Every token and DPS call is answered HTTP 503 with a non-JSON body."""


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
        self.tokens: dict[str, float] = {}
        """Issued access token -> when it expires (``time.monotonic()``)."""
        self.token_requests = 0
        """Requests received by the token service."""
        self.calls: list[CallRecord] = []
        self.faults = Faults()
        self._bucket: _Bucket | None = None
        self._seq = 0
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
        self, sn: str | None, org_id: str | None, device_data: dict[str, Any] | None
    ) -> CallRecord:
        """Append an allocate call to the log, in the order received."""
        self._seq += 1
        call = CallRecord(
            seq=self._seq, sn=sn, org_id=org_id, device_data=device_data, at=utc_now()
        )
        self.calls.append(call)
        return call

    def set_faults(self, changes: Mapping[str, Any]) -> Faults:
        """Merge ``changes`` into the current faults.

        Raises:
            msgspec.ValidationError: an unknown fault or a value out of range.
        """
        faults = msgspec.convert(msgspec.structs.asdict(self.faults) | dict(changes), Faults)
        if faults.throttle_rps != self.faults.throttle_rps:
            self._bucket = _Bucket(faults.throttle_rps) if faults.throttle_rps else None
        self.faults = faults
        return faults

    def throttled(self) -> bool:
        """Whether this allocate call exceeds ``throttle_rps``."""
        return self._bucket is not None and not self._bucket.take()

    def reset(self) -> None:
        """Forget calls, faults and tokens; registered devices and their state stay."""
        self.calls.clear()
        self._seq = 0
        self.faults = Faults()
        self._bucket = None
        self.tokens.clear()
        self.token_requests = 0


# --------------------------------------------------------------------------------------
# HTTP


class _Reply(NamedTuple):
    response: web.Response
    code: int | None


def _json(
    payload: bytes, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=payload, status=status, headers=headers, content_type="application/json"
    )


def _reply(
    code: int,
    msg: str,
    *,
    status: int = 200,
    data: msgspec.Raw | None = None,
    headers: Mapping[str, str] | None = None,
) -> _Reply:
    request_id = str(uuid.uuid4())
    if data is None:  # the Struct's default encodes as "data": null
        envelope = DpsEnvelope(code=code, msg=msg, request_id=request_id)
    else:
        envelope = DpsEnvelope(code=code, msg=msg, request_id=request_id, data=data)
    return _Reply(_json(_encode(envelope), status, headers), code)


def _token_reply(status: int, msg: str, data: TokenData | None = None) -> web.Response:
    return _json(_encode(TokenResponse(status=status, msg=msg, business=_BUSINESS, data=data)))


def _admin_error(msg: str) -> web.Response:
    return _json(orjson.dumps({"error": msg}), 400)


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Injected Error"


_STATE = web.AppKey("state", EmulatorState)


class _Gateway:
    """The request handlers, over one :class:`EmulatorState`."""

    def __init__(self, state: EmulatorState) -> None:
        self.state = state

    async def _gateway_faults(self) -> _Reply | None:
        faults = self.state.faults
        if faults.latency_ms:
            await asyncio.sleep(faults.latency_ms / 1000)
        if self.state.faults.outage:
            return _Reply(web.Response(status=503, text="service unavailable"), None)
        return None

    # -- Token service -----------------------------------------------------------------

    async def token(self, request: web.Request) -> web.Response:  # noqa: PLR0911  (one per error code)
        state = self.state
        state.token_requests += 1
        fault = await self._gateway_faults()
        if fault is not None:
            return fault.response
        try:
            data = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _token_reply(1004, "invalid parameter: the body is not JSON")
        if not isinstance(data, dict):
            return _token_reply(1004, "invalid parameter: the body is not a JSON object")
        for name in ("appKey", "encryption", "timestamp"):
            if data.get(name) in (None, ""):
                return _token_reply(1202, f"parameter empty: {name}")
        try:
            body = msgspec.convert(data, TokenRequest)
        except msgspec.ValidationError as exc:
            return _token_reply(1004, f"invalid parameter: {exc}")
        if body.app_key != state.app_key:
            return _token_reply(1002, "appKey does not exist")
        expected = token_encryption(body.app_key, body.timestamp, state.app_secret)
        if not hmac.compare_digest(body.encryption, expected):
            return _token_reply(1003, "invalid encryption")
        token, expire = state.issue_token()
        log.debug("issued an access token valid for %d s", expire)
        return _token_reply(0, "SUCCESS", TokenData(access_token=token, expire=expire))

    # -- DPS ---------------------------------------------------------------------------

    async def device(self, request: web.Request) -> web.Response:
        body = await request.read()
        action = request.query.get("action")
        call = None
        if request.method == "POST" and action == "allocate":
            call = self._record(request, body)
        reply = await self._device(request, action, body)
        if call is not None:
            call.http_status = reply.response.status
            call.code = reply.code
        log.debug(
            "DPS %s %s -> HTTP %d code %s",
            request.method,
            action,
            reply.response.status,
            reply.code,
        )
        return reply.response

    def _record(self, request: web.Request, body: bytes) -> CallRecord:
        sn = device_data = None
        with contextlib.suppress(orjson.JSONDecodeError):
            data = orjson.loads(body)
            if isinstance(data, dict):
                sn = data.get("sn") if isinstance(data.get("sn"), str) else None
                raw = data.get("deviceData")
                device_data = raw if isinstance(raw, dict) else None
        return self.state.record_call(sn, request.query.get("orgId"), device_data)

    async def _device(  # noqa: PLR0911  (one return per documented refusal)
        self, request: web.Request, action: str | None, body: bytes
    ) -> _Reply:
        fault = await self._gateway_faults()
        if fault is not None:
            return fault
        faults = self.state.faults
        if request.method == "POST" and action == "allocate" and self.state.throttled():
            retry_after = f"{faults.retry_after:g}"
            return _reply(
                429, "Too Many Requests", status=429, headers={"Retry-After": retry_after}
            )
        if faults.error_rate and random.random() < faults.error_rate:
            status = faults.error_status
            return _reply(status, _phrase(status), status=status)
        refused = self._authenticate(request, body)
        if refused is not None:
            return refused
        match request.method, action:
            case "POST", "allocate":
                return self._allocate(request.query.get("orgId", ""), body)
            case "GET", "get":
                return self._get(request.query.get("orgId", ""), request.query.get("sn", ""))
            case _:
                return _reply(99400, f"Invalid Argument action: unsupported value {action!r}")

    def _authenticate(self, request: web.Request, body: bytes) -> _Reply | None:
        headers = request.headers
        for name in ("apim-accesstoken", "apim-timestamp", "apim-signature"):
            if not headers.get(name):
                return _reply(1202, f"parameter empty: {name}", status=401)
        token = headers["apim-accesstoken"]
        if not self.state.token_valid(token):
            return _reply(1203, "access token expired")
        stamp = headers["apim-timestamp"]
        if not (stamp.isascii() and stamp.isdigit()):
            return _reply(1004, "invalid parameter: apim-timestamp", status=401)
        # The signature covers every query parameter received and the body byte for byte.
        expected = sign(token, request.query, body, int(stamp), self.state.app_secret)
        if not hmac.compare_digest(headers["apim-signature"], expected):
            return _reply(497, "signature check failed", status=401)
        return None

    def _allocate(self, org_id: str, body: bytes) -> _Reply:  # noqa: PLR0911  (one per error code)
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return _reply(99400, "Invalid Argument body: not valid JSON")
        if not isinstance(data, dict):
            return _reply(99400, "Invalid Argument body: not a JSON object")
        sn = data.get("sn")
        if not org_id.strip() or not isinstance(sn, str) or not sn.strip():
            return _reply(35400, "OrgId/sn is required")
        extra = data.get("deviceData")
        if extra is not None and not isinstance(extra, dict):
            return _reply(99400, "Invalid Argument deviceData: not a JSON object")
        device = self.state.lookup(sn)
        if device is None:
            return _reply(35601, "Verify not pass/sn not found")
        if device.group_id is None:
            return _reply(35404, "Group/Device group not found")
        if device.allocated_time is None:
            now = _now_ms()
            device.org_id = org_id
            device.region_id = REGION_ID
            device.allocated_data = device.registered_data | (extra or {})
            device.allocated_time = now
            device.update_time = now
        return _reply(0, "OK", data=msgspec.Raw(_encode(device.view())))

    def _get(self, org_id: str, sn: str) -> _Reply:
        if not org_id.strip() or not sn.strip():
            return _reply(35400, "OrgId/sn is required")
        device = self.state.lookup(sn)
        if device is None:
            return _reply(35601, "Verify not pass/sn not found")
        return _reply(0, "OK", data=msgspec.Raw(_encode(device.view())))

    # -- Admin -------------------------------------------------------------------------

    async def list_devices(self, _request: web.Request) -> web.Response:
        return _json(_encode([device.view() for device in self.state.devices.values()]))

    async def register_devices(self, request: web.Request) -> web.Response:
        try:
            data = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            return _admin_error(f"body is not JSON: {exc}")
        if isinstance(data, dict) and "devices" in data:
            data = data["devices"]
        if not isinstance(data, list):
            return _admin_error('expected a JSON list of devices or {"devices": [...]}')
        try:
            created, updated = self.state.register(data)
        except ValueError as exc:
            return _admin_error(str(exc))
        return _json(orjson.dumps({"created": created, "updated": updated}))

    async def list_calls(self, _request: web.Request) -> web.Response:
        return _json(_encode(self.state.calls))

    async def clear_calls(self, _request: web.Request) -> web.Response:
        self.state.calls.clear()
        return web.Response(status=204)

    async def get_faults(self, _request: web.Request) -> web.Response:
        return _json(_encode(self.state.faults))

    async def set_faults(self, request: web.Request) -> web.Response:
        try:
            data = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            return _admin_error(f"body is not JSON: {exc}")
        if not isinstance(data, dict):
            return _admin_error("expected a JSON object of faults")
        try:
            faults = self.state.set_faults(data)
        except msgspec.ValidationError as exc:
            return _admin_error(str(exc))
        log.info("emulator faults now %s", msgspec.structs.asdict(faults))
        return _json(_encode(faults))

    async def reset(self, _request: web.Request) -> web.Response:
        self.state.reset()
        return web.Response(status=204)


def build_app(state: EmulatorState) -> web.Application:
    """The emulator's aiohttp application over ``state``."""
    gateway = _Gateway(state)
    app = web.Application()
    app[_STATE] = state
    app.router.add_post(f"/{TOKEN_PATH}", gateway.token)
    app.router.add_post(f"/{DEVICE_PATH}", gateway.device)
    app.router.add_get(f"/{DEVICE_PATH}", gateway.device, allow_head=False)
    app.router.add_get("/_emulator/devices", gateway.list_devices, allow_head=False)
    app.router.add_post("/_emulator/devices", gateway.register_devices)
    app.router.add_get("/_emulator/calls", gateway.list_calls, allow_head=False)
    app.router.add_delete("/_emulator/calls", gateway.clear_calls)
    app.router.add_get("/_emulator/faults", gateway.get_faults, allow_head=False)
    app.router.add_post("/_emulator/faults", gateway.set_faults)
    app.router.add_post("/_emulator/reset", gateway.reset)
    return app


# --------------------------------------------------------------------------------------
# Running it


class RunningEmulator:
    """An emulator serving on a port: its base URL, its state, and how to stop it."""

    def __init__(self, runner: web.AppRunner, state: EmulatorState, url: str) -> None:
        self._runner = runner
        self.state = state
        self.url = url
        """The base URL, e.g. ``http://127.0.0.1:54321``: use it as ``dps.base_url``."""

    async def close(self) -> None:
        """Stop serving; calls in flight get a short grace period."""
        await self._runner.cleanup()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def start_emulator(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    app_key: str = "demo-app-key",
    app_secret: str = "demo-app-secret",  # noqa: S107  (the documented demo credential)
    devices: Iterable[Mapping[str, Any]] | None = None,
    accept_any_sn: bool = False,
    token_ttl: int = 7200,
) -> RunningEmulator:
    """Start an emulator on ``host:port`` (0 picks a free port) and return once it listens.

    Raises:
        ValueError: an entry of ``devices`` is not a valid :class:`DeviceSpec`.
        OSError: the address cannot be bound.
    """
    state = EmulatorState(
        app_key=app_key,
        app_secret=app_secret,
        token_ttl=token_ttl,
        devices=devices,
        accept_any_sn=accept_any_sn,
    )
    runner = web.AppRunner(build_app(state), access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1]
    url = str(yarl.URL.build(scheme="http", host=host, port=bound))
    return RunningEmulator(runner, state, url)


def load_devices(path: str | Path) -> list[dict[str, Any]]:
    """Read registered devices from a JSON file (a list, or ``{"devices": [...]}``) or JSON Lines.

    Each device is ``{"sn", "group_id", "product_key"?, "org_id"?, "device_data"?}``; a
    null or absent ``group_id`` means its registration group is missing.

    Raises:
        ConfigError: the file cannot be read, or one line naming the entry at fault.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        msg = f"devices file {path}: {exc.strerror}"
        raise ConfigError(msg) from None
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
                raise ConfigError(msg) from None
    if isinstance(data, dict):
        # A JSON object is either the {"devices": [...]} wrapper or a one-line JSON Lines file.
        data = data.get("devices", [data])
    if not isinstance(data, list):
        msg = f'devices file {path}: expected a list of devices or {{"devices": [...]}}'
        raise ConfigError(msg)
    try:
        specs = _parse_devices(data)
    except ValueError as exc:
        msg = f"devices file {path}: {exc}"
        raise ConfigError(msg) from None
    return [msgspec.to_builtins(spec) for spec in specs]


async def serve(  # noqa: PLR0917  (mirrors the dps-emulator command line)
    host: str,
    port: int,
    devices_file: str | None,
    accept_any_sn: bool,
    app_key: str,
    app_secret: str,
    token_ttl: int,
) -> int:
    """Serve the emulator until cancelled or sent SIGTERM/SIGINT (``pipeline dps-emulator``).

    Returns:
        0 after a clean stop; 2 when the devices file is unusable (logged as an error).
    """
    devices = None
    if devices_file is not None:
        try:
            devices = load_devices(devices_file)
        except ConfigError as exc:
            log.error("%s", exc)  # noqa: TRY400  (one line for the operator, no traceback)
            return 2
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
            installed.append(signum)
    try:
        async with await start_emulator(
            host=host,
            port=port,
            app_key=app_key,
            app_secret=app_secret,
            devices=devices,
            accept_any_sn=accept_any_sn,
            token_ttl=token_ttl,
        ) as emulator:
            log.info("emulator listening on %s", emulator.url)
            log.info(
                "%d devices registered%s",
                len(emulator.state.devices),
                "; unknown sns are registered on first sight" if accept_any_sn else "",
            )
            await stop.wait()
            log.info("emulator stopping")
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
    return 0
