"""The emulator's HTTP application: the API gateway, DPS v2.5, and the admin API.

Every gateway request passes through three middlewares, outermost first:

1. ``ledger``: counts token requests and logs every allocate call with its answer;
2. ``faults``: injected latency and outage (token service and DPS), then throttling,
   the sns that always fail and the random error rate (DPS only);
3. ``authenticate``: the gateway's access-token and signature check (DPS only).

The admin API (``/_emulator/...``) is a sub-application that none of them touch.

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
import random
import time
import uuid
from typing import TYPE_CHECKING

import msgspec
import orjson
from aiohttp import web

from pipeline.dps.emulator.state import REGION_ID, EmulatorState
from pipeline.dps.protocol import DEVICE_PATH, TOKEN_PATH, sign, token_encryption
from pipeline.schemas import DpsEnvelope, TokenData, TokenRequest, TokenResponse

if TYPE_CHECKING:
    from collections.abc import Mapping

    from aiohttp.typedefs import Handler, Middleware

__all__ = ["build_app"]

log = logging.getLogger(__name__)

_BUSINESS = "apim-token-service"
_TOKEN = f"/{TOKEN_PATH}"
_DEVICE = f"/{DEVICE_PATH}"
_CODE = web.ResponseKey("dps_code", int)
"""Key under which a response carries the envelope's code, for the call log."""

_encode = msgspec.json.Encoder().encode


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
) -> web.Response:
    request_id = str(uuid.uuid4())
    if data is None:  # the Struct's default encodes as "data": null
        envelope = DpsEnvelope(code=code, msg=msg, request_id=request_id)
    else:
        envelope = DpsEnvelope(code=code, msg=msg, request_id=request_id, data=data)
    response = _json(_encode(envelope), status, headers)
    response[_CODE] = code
    return response


def _token_reply(status: int, msg: str, data: TokenData | None = None) -> web.Response:
    return _json(_encode(TokenResponse(status=status, msg=msg, business=_BUSINESS, data=data)))


def _admin_error(msg: str) -> web.Response:
    return _json(orjson.dumps({"error": msg}), 400)


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Injected Error"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _sn_of(body: bytes) -> str | None:
    """The ``sn`` of an allocate body, if it has a readable one."""
    with contextlib.suppress(orjson.JSONDecodeError):
        data = orjson.loads(body)
        sn = data.get("sn") if isinstance(data, dict) else None
        return sn if isinstance(sn, str) else None
    return None


# --------------------------------------------------------------------------------------
# Middlewares


def _ledger(state: EmulatorState) -> Middleware:
    @web.middleware
    async def ledger(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == _TOKEN:
            state.token_requests += 1
        if not (request.path == _DEVICE and request.method == "POST"):
            return await handler(request)
        if request.query.get("action") != "allocate":
            return await handler(request)
        sn = device_data = None
        with contextlib.suppress(orjson.JSONDecodeError):
            data = orjson.loads(await request.read())
            if isinstance(data, dict):
                sn = data.get("sn") if isinstance(data.get("sn"), str) else None
                raw = data.get("deviceData")
                device_data = raw if isinstance(raw, dict) else None
        call = state.record_call(sn, request.query.get("orgId"), device_data)
        response = await handler(request)
        call.http_status = response.status
        call.code = response.get(_CODE)
        return response

    return ledger


def _faults(state: EmulatorState) -> Middleware:
    @web.middleware
    async def faults(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in (_TOKEN, _DEVICE):
            return await handler(request)
        current = state.faults
        if current.latency_ms:
            await asyncio.sleep(current.latency_ms / 1000)
        if state.faults.outage:
            return web.Response(status=503, text="service unavailable")
        if request.path == _DEVICE:
            allocate = request.method == "POST" and request.query.get("action") == "allocate"
            if allocate and state.throttled():
                retry_after = f"{current.retry_after:g}"
                return _reply(
                    429, "Too Many Requests", status=429, headers={"Retry-After": retry_after}
                )
            failing = allocate and current.fail_sns and _sn_of(await request.read())
            if failing in current.fail_sns or (
                current.error_rate and random.random() < current.error_rate
            ):
                status = current.error_status
                return _reply(status, _phrase(status), status=status)
        return await handler(request)

    return faults


def _authenticate(state: EmulatorState) -> Middleware:
    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path != _DEVICE:
            return await handler(request)
        headers = request.headers
        for name in ("apim-accesstoken", "apim-timestamp", "apim-signature"):
            if not headers.get(name):
                return _reply(1202, f"parameter empty: {name}", status=401)
        token = headers["apim-accesstoken"]
        if not state.token_valid(token):
            return _reply(1203, "access token expired")
        stamp = headers["apim-timestamp"]
        if not (stamp.isascii() and stamp.isdigit()):
            return _reply(1004, "invalid parameter: apim-timestamp", status=401)
        # The signature covers every query parameter received and the body byte for byte.
        body = await request.read()
        expected = sign(token, request.query, body, int(stamp), state.app_secret)
        if not hmac.compare_digest(headers["apim-signature"], expected):
            return _reply(497, "signature check failed", status=401)
        return await handler(request)

    return authenticate


# --------------------------------------------------------------------------------------
# The gateway and DPS


class _Gateway:
    """The token service and the DPS device endpoint, over one :class:`EmulatorState`."""

    def __init__(self, state: EmulatorState) -> None:
        self.state = state

    async def token(self, request: web.Request) -> web.Response:  # noqa: PLR0911  (one per error code)
        state = self.state
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

    async def device(self, request: web.Request) -> web.Response:
        action = request.query.get("action")
        match request.method, action:
            case "POST", "allocate":
                response = self._allocate(request.query.get("orgId", ""), await request.read())
            case "GET", "get":
                response = self._get(request.query.get("orgId", ""), request.query.get("sn", ""))
            case _:
                response = _reply(99400, f"Invalid Argument action: unsupported value {action!r}")
        log.debug(
            "DPS %s %s -> HTTP %d code %s",
            request.method,
            action,
            response.status,
            response.get(_CODE),
        )
        return response

    def _allocate(self, org_id: str, body: bytes) -> web.Response:  # noqa: PLR0911  (one per error code)
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

    def _get(self, org_id: str, sn: str) -> web.Response:
        if not org_id.strip() or not sn.strip():
            return _reply(35400, "OrgId/sn is required")
        device = self.state.lookup(sn)
        if device is None:
            return _reply(35601, "Verify not pass/sn not found")
        return _reply(0, "OK", data=msgspec.Raw(_encode(device.view())))


# --------------------------------------------------------------------------------------
# Admin


class _Admin:
    """``/_emulator/...``: register devices, read the call log, set faults, reset."""

    def __init__(self, state: EmulatorState) -> None:
        self.state = state

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


def _admin_app(state: EmulatorState) -> web.Application:
    admin = _Admin(state)
    app = web.Application()
    app.router.add_get("/devices", admin.list_devices, allow_head=False)
    app.router.add_post("/devices", admin.register_devices)
    app.router.add_get("/calls", admin.list_calls, allow_head=False)
    app.router.add_delete("/calls", admin.clear_calls)
    app.router.add_get("/faults", admin.get_faults, allow_head=False)
    app.router.add_post("/faults", admin.set_faults)
    app.router.add_post("/reset", admin.reset)
    return app


def build_app(state: EmulatorState) -> web.Application:
    """The emulator's aiohttp application over ``state``."""
    gateway = _Gateway(state)
    app = web.Application(middlewares=[_ledger(state), _faults(state), _authenticate(state)])
    app.router.add_post(_TOKEN, gateway.token)
    app.router.add_post(_DEVICE, gateway.device)
    app.router.add_get(_DEVICE, gateway.device, allow_head=False)
    app.add_subapp("/_emulator/", _admin_app(state))
    return app
