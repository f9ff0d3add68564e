"""The emulator's HTTP application: the API gateway, DPS v2.5, and the admin API.

Every gateway request passes through three middlewares, outermost first:

1. ``ledger``: counts token requests and logs every DPS call (every operation) with its
   action and its answer, and counts the DPS calls in flight;
2. ``faults``: injected latency and outage (token service and DPS), then throttling,
   the sns that always fail, the random error rate, hung calls and connection cuts (DPS
   only, every operation alike);
3. ``authenticate``: the gateway's access-token and signature check (DPS only).

The admin API (``/_emulator/...``) is a sub-application that none of them touch.

A DPS call runs to its end whether or not its caller stays (as a real server would: a
call whose caller timed out during ``latency_ms`` still takes effect): the ledger runs
the rest of the chain as a task of its own, and when the caller closes the connection
(the server cancels the request's handler, :func:`.serve.start_emulator`) it only marks
the call abandoned and tells a hung call its caller left.

Where the docs are silent the emulator makes one choice and says so (the documented
facts are in the package docstring):

- Token and business errors are answered with HTTP 200 and the code in the body; a missing
  gateway header is HTTP 401 with code 1202, a wrong signature HTTP 401 with legacy code
  497, an unknown or expired token HTTP 200 with code 1203.
- Asking for a token while one is unexpired returns that token (documented) with its
  remaining lifetime, rounded up, as ``expire``.
- Allocating an already allocated sn returns the same device again, unchanged.
- A body that is not a JSON object, a missing ``orgId`` on the operations whose pages
  list no code for it (search, reset, delete), an empty ``sns``/``snList`` or
  ``expression``, a page beyond the documented 1,000 records and anything outside the
  emulator's FQL subset (:mod:`.search`) are answered 99400 ``Invalid Argument ...``,
  the code the reset page gives for a missing argument.
- Reset: resetting a device that is not allocated succeeds and lists it; every sn must
  exist in the group or nothing is reset (35404); a reset device is ``init`` with
  ``reprovisioning`` true, and the next allocate allocates it again.
- Delete: a group that was never registered is 35404 (the reset page's code); an sn
  registered in another group is neither deleted nor listed; an sn that does not exist
  is listed (the page: "successfully deleted and do not exist").
- Search: the answer carries ``pagination`` (``pageNo``, ``pageSize``, ``totalSize``)
  beside ``data``, as EnOS search APIs do; ``orgId`` does not filter (devices have none
  before allocation).
- No batch limit is documented for reset or delete; the emulator enforces none.
- Throttling (``throttle_rps``) is one budget for every DPS operation (the gateway's
  limits are not documented per operation).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import http
import logging
import random
import time
import uuid
from typing import TYPE_CHECKING, Any

import msgspec
import orjson
from aiohttp import web

from pipeline.dps.emulator.search import SearchError, matcher, sort_devices
from pipeline.dps.emulator.state import REGION_ID, CallRecord, EmulatorState, Faults
from pipeline.dps.protocol import (
    DEFAULT_PAGE_SIZE,
    DEVICE_PATH,
    TOKEN_PATH,
    sign,
    token_encryption,
)
from pipeline.schemas import (
    DpsEnvelope,
    DpsPageEnvelope,
    Pagination,
    PaginationRequest,
    SearchRequest,
    TokenData,
    TokenRequest,
    TokenResponse,
)

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from aiohttp.typedefs import Handler, Middleware

__all__ = ["build_app"]

log = logging.getLogger(__name__)

_BUSINESS = "apim-token-service"
_TOKEN = f"/{TOKEN_PATH}"
_DEVICE = f"/{DEVICE_PATH}"
_CODE = web.ResponseKey("dps_code", int)
"""Key under which a response carries the envelope's code, for the call log."""
_CUT = web.ResponseKey("dps_cut", bool)
"""Set on a response that was never sent: the connection was cut instead."""
_CALL = web.RequestKey("dps_call", CallRecord)
"""The call log's entry for this DPS request (set by the ledger, read by faults)."""
_GONE = web.RequestKey("dps_gone", asyncio.Future[None])
"""Done when the caller of this DPS request closed the connection (set by the ledger)."""
_CLIENT_CLOSED = 499
"""The status logged for a hung call whose caller left before it took effect (nginx's)."""

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


def _page_reply(devices: msgspec.Raw, pagination: Pagination) -> web.Response:
    envelope = DpsPageEnvelope(
        code=0, msg="OK", request_id=str(uuid.uuid4()), data=devices, pagination=pagination
    )
    response = _json(_encode(envelope))
    response[_CODE] = 0
    return response


def _missing(name: str) -> web.Response:
    """99400 in the words of the reset page: ``Invalid Argument groupId:groupId is missing``."""
    return _reply(99400, f"Invalid Argument {name}:{name} is missing")


def _object(body: bytes) -> dict[str, Any] | web.Response:
    """The JSON object of a request body, or the 99400 answer when it is not one."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _reply(99400, "Invalid Argument body: not valid JSON")
    if not isinstance(data, dict):
        return _reply(99400, "Invalid Argument body: not a JSON object")
    return data


def _text(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    return value if isinstance(value, str) else None


def _sns(value: Any) -> list[str] | None:
    """A non-empty list of non-blank sns, or None."""
    if not isinstance(value, list) or not value:
        return None
    if not all(isinstance(sn, str) and sn.strip() for sn in value):
        return None
    return value


def _record(state: EmulatorState, request: web.Request, body: bytes) -> CallRecord:
    """Log a DPS call with what its action names: sn, sns, group, expression, deviceData."""
    query = request.query
    action = query.get("action", "")
    data: Mapping[str, Any] = {}
    if request.method == "POST":
        with contextlib.suppress(orjson.JSONDecodeError):
            loaded = orjson.loads(body)
            data = loaded if isinstance(loaded, dict) else {}
    org_id = query.get("orgId")
    match action:
        case "allocate":
            raw = data.get("deviceData")
            return state.record_call(
                org_id=org_id,
                sn=_text(data, "sn"),
                device_data=raw if isinstance(raw, dict) else None,
            )
        case "get":
            return state.record_call(action=action, org_id=org_id, sn=query.get("sn"))
        case "resetAllocationStatus" | "delete":
            listed = data.get("sns" if action == "resetAllocationStatus" else "snList")
            return state.record_call(
                action=action,
                org_id=org_id,
                group_id=_text(data, "groupId"),
                sns=[sn for sn in listed if isinstance(sn, str)]
                if isinstance(listed, list)
                else None,
            )
        case "search":
            expression = _text(data, "expression")
            return state.record_call(action=action, org_id=org_id, expression=expression)
        case _:
            return state.record_call(action=action, org_id=org_id)


# --------------------------------------------------------------------------------------
# Middlewares


def _ledger(state: EmulatorState, running: set[asyncio.Task[web.StreamResponse]]) -> Middleware:
    @web.middleware
    async def ledger(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == _TOKEN:
            state.token_requests += 1
        if not (request.path == _DEVICE and request.method in {"GET", "POST"}):
            return await handler(request)
        call = _record(state, request, await request.read())
        gone = asyncio.get_running_loop().create_future()
        request[_CALL] = call
        request[_GONE] = gone
        state.call_started()
        task = asyncio.ensure_future(handler(request))
        running.add(task)
        task.add_done_callback(lambda done: _settle(state, call, done, running))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # The caller closed the connection: the call goes on without it.
            if not task.done():
                call.abandoned = True
                gone.set_result(None)
            raise

    return ledger


def _settle(
    state: EmulatorState,
    call: CallRecord,
    task: asyncio.Task[web.StreamResponse],
    running: set[asyncio.Task[web.StreamResponse]],
) -> None:
    """A DPS call ended: log how it was answered, and count it out of flight."""
    running.discard(task)
    state.call_ended()
    if task.cancelled() or task.exception() is not None:
        return  # the emulator is stopping, or aiohttp answers the error itself
    response = task.result()
    call.http_status = response.status
    call.code = response.get(_CODE)
    call.cut = response.get(_CUT, False)


async def _hold(state: EmulatorState, call: CallRecord, gone: asyncio.Future[None]) -> bool:
    """Hold a hung call until its caller leaves, ``hang_ms`` pass or the fault is lifted.

    Returns whether the caller is still there.
    """
    loop = asyncio.get_running_loop()
    limit = state.faults.hang_ms
    until = None if limit is None else loop.time() + limit / 1000
    while not gone.done() and state.still_hung(call):
        left = None if until is None else until - loop.time()
        if left is not None and left <= 0:
            break
        await asyncio.wait(
            {gone, state.faults_changed()}, timeout=left, return_when=asyncio.FIRST_COMPLETED
        )
    return not gone.done()


def _faults(state: EmulatorState) -> Middleware:
    @web.middleware
    async def faults(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in (_TOKEN, _DEVICE):
            return await handler(request)
        if state.faults.latency_ms:
            await asyncio.sleep(state.faults.latency_ms / 1000)
        current = state.faults  # as they are once the latency has passed
        if current.outage:
            return web.Response(status=503, text="service unavailable")
        if request.path != _DEVICE:
            return await handler(request)
        if state.throttled():
            retry_after = f"{current.retry_after:g}"
            return _reply(
                429, "Too Many Requests", status=429, headers={"Retry-After": retry_after}
            )
        return await _dps_faults(state, current, request, handler)

    return faults


async def _dps_faults(
    state: EmulatorState, current: Faults, request: web.Request, handler: Handler
) -> web.StreamResponse:
    """The faults of DPS calls alone, after throttling: errors, hangs and cuts."""
    call = request.get(_CALL)
    named = {call.sn, *(call.sns or ())} if call is not None else set()
    if not named.isdisjoint(current.fail_sns) or (
        current.error_rate and random.random() < current.error_rate
    ):
        status = current.error_status
        return _reply(status, _phrase(status), status=status)
    gone = request.get(_GONE)
    hold = None
    if call is not None and gone is not None and state.hang(call):
        hold = functools.partial(_hold, state, call, gone)
    if hold is not None and not current.hang_after_effect and not await hold():
        return web.Response(status=_CLIENT_CLOSED)  # the caller left: never takes effect
    response = await handler(request)
    if hold is not None and current.hang_after_effect:
        await hold()  # it took effect; the answer may find nobody
    if current.cut_rate and random.random() < current.cut_rate:
        # The call took effect; the caller gets a dropped connection instead of the answer.
        response[_CUT] = True
        if request.transport is not None:
            request.transport.close()
    return response


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
        org_id = request.query.get("orgId", "")
        match request.method, action:
            case "POST", "allocate":
                response = self._allocate(org_id, await request.read())
            case "GET", "get":
                response = self._get(org_id, request.query.get("sn", ""))
            case "POST", "search":
                response = self._search(org_id, await request.read())
            case "POST", "resetAllocationStatus":
                response = self._reset(org_id, await request.read())
            case "POST", "delete":
                response = self._delete(org_id, await request.read())
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

    def _allocate(self, org_id: str, body: bytes) -> web.Response:
        data = _object(body)
        if isinstance(data, web.Response):
            return data
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
            device.reprovisioning = False
        return _reply(0, "OK", data=msgspec.Raw(_encode(device.view())))

    def _get(self, org_id: str, sn: str) -> web.Response:
        if not org_id.strip() or not sn.strip():
            return _reply(35400, "OrgId/sn is required")
        device = self.state.lookup(sn)
        if device is None:
            return _reply(35601, "Verify not pass/sn not found")
        return _reply(0, "OK", data=msgspec.Raw(_encode(device.view())))

    def _search(self, org_id: str, body: bytes) -> web.Response:  # noqa: PLR0911  (one per error)
        data = _object(body)
        if isinstance(data, web.Response):
            return data
        if not org_id.strip():
            return _missing("orgId")
        if not (_text(data, "expression") or "").strip():
            return _missing("expression")
        try:
            request = msgspec.convert(data, SearchRequest)
        except msgspec.ValidationError as exc:
            return _reply(99400, f"Invalid Argument {exc}")
        page = request.pagination or PaginationRequest(page_no=1, page_size=DEFAULT_PAGE_SIZE)
        try:
            match = matcher(request.expression)
        except SearchError as exc:
            return _reply(99400, f"Invalid Argument expression: {exc}")
        try:
            found = sort_devices(
                [device for device in self.state.devices.values() if match(device)],
                page.sorters,
            )
        except SearchError as exc:
            return _reply(99400, f"Invalid Argument pagination.sorters: {exc}")
        start = (page.page_no - 1) * page.page_size
        devices = [device.view() for device in found[start : start + page.page_size]]
        pagination = Pagination(
            page_no=page.page_no, page_size=page.page_size, total_size=len(found)
        )
        return _page_reply(msgspec.Raw(_encode(devices)), pagination)

    def _batch(self, org_id: str, body: bytes, listed: str) -> tuple[str, list[str]] | web.Response:
        """The ``groupId`` and the sns (body field ``listed``) of a reset or a delete."""
        data = _object(body)
        if isinstance(data, web.Response):
            return data
        if not org_id.strip():
            return _missing("orgId")
        group_id = _text(data, "groupId")
        if group_id is None or not group_id.strip():
            return _missing("groupId")
        sns = _sns(data.get(listed))
        if sns is None:
            return _missing(listed)
        return group_id, sns

    def _reset(self, org_id: str, body: bytes) -> web.Response:
        if self.state.faults.no_dps_role:
            return _reply(35603, "Unauthorized to access the resource")
        batch = self._batch(org_id, body, "sns")
        if isinstance(batch, web.Response):
            return batch
        group_id, sns = batch
        devices = self.state.in_group(group_id, sns)
        if devices is None:
            return _reply(35404, "Group/sn not found")
        self.state.release(devices)
        return _sn_reply([device.sn for device in devices])

    def _delete(self, org_id: str, body: bytes) -> web.Response:
        batch = self._batch(org_id, body, "snList")
        if isinstance(batch, web.Response):
            return batch
        group_id, sns = batch
        if group_id not in self.state.groups:
            return _reply(35404, "Group/sn not found")
        return _sn_reply(self.state.delete(group_id, sns))


def _sn_reply(sns: Sequence[str]) -> web.Response:
    return _reply(0, "OK", data=msgspec.Raw(_encode(list(sns))))


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

    async def list_calls(self, request: web.Request) -> web.Response:
        action = request.query.get("action")
        calls = self.state.calls
        if action is not None:
            calls = [call for call in calls if call.action == action]
        return _json(_encode(calls))

    async def clear_calls(self, _request: web.Request) -> web.Response:
        self.state.calls.clear()
        return web.Response(status=204)

    async def in_flight(self, _request: web.Request) -> web.Response:
        state = self.state
        return _json(orjson.dumps({"in_flight": state.in_flight, "peak": state.peak_in_flight}))

    async def reset_peak(self, _request: web.Request) -> web.Response:
        self.state.reset_peak()
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
    app.router.add_get("/in-flight", admin.in_flight, allow_head=False)
    app.router.add_delete("/in-flight", admin.reset_peak)
    app.router.add_get("/faults", admin.get_faults, allow_head=False)
    app.router.add_post("/faults", admin.set_faults)
    app.router.add_post("/reset", admin.reset)
    return app


def build_app(state: EmulatorState) -> web.Application:
    """The emulator's aiohttp application over ``state``."""
    gateway = _Gateway(state)
    running: set[asyncio.Task[web.StreamResponse]] = set()
    app = web.Application(
        middlewares=[_ledger(state, running), _faults(state), _authenticate(state)]
    )

    async def stop_calls(_app: web.Application) -> None:
        """Calls that outlived their callers (a long latency) end with the emulator."""
        for task in list(running):
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    app.on_cleanup.append(stop_calls)
    app.router.add_post(_TOKEN, gateway.token)
    app.router.add_post(_DEVICE, gateway.device)
    app.router.add_get(_DEVICE, gateway.device, allow_head=False)
    app.add_subapp("/_emulator/", _admin_app(state))
    return app
