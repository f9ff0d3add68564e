"""Calls to the DPS emulator over raw HTTP, signed by hand from the pure functions."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import orjson

from pipeline.dps.protocol import sign, token_encryption

if TYPE_CHECKING:
    import aiohttp

KEY = "demo-app-key"
SECRET = "demo-app-secret"
ORG = "o15735524440141"
TOKEN_URL = "/apim-token-service/v2.0/token/get"
DEVICE_URL = "/dps-service/v2.5/pvs/device"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def request_token(http, emu, body) -> tuple[int, dict[str, Any]]:
    async with http.post(emu.url + TOKEN_URL, data=orjson.dumps(body)) as resp:
        return resp.status, await resp.json()


async def token(http, emu) -> str:
    ts = now_ms()
    body = {"appKey": KEY, "encryption": token_encryption(KEY, ts, SECRET), "timestamp": ts}
    status, answer = await request_token(http, emu, body)
    assert (status, answer["status"]) == (200, 0)
    access_token: str = answer["data"]["accessToken"]
    return access_token


async def call(
    http,
    emu,
    method: str,
    params: dict[str, str],
    body: bytes = b"",
    *,
    access_token: str,
    signed_params: dict[str, str] | None = None,
    signed_body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: aiohttp.ClientTimeout | None = None,
) -> tuple[int, dict[str, Any]]:
    """A DPS call signed by hand; ``signed_*`` sign something else than what is sent."""
    ts = now_ms()
    signature = sign(
        access_token,
        params if signed_params is None else signed_params,
        body if signed_body is None else signed_body,
        ts,
        SECRET,
    )
    sent = {
        "apim-accesstoken": access_token,
        "apim-timestamp": str(ts),
        "apim-signature": signature,
        "Content-Type": "application/json",
    } | (headers or {})
    sent = {k: v for k, v in sent.items() if v}
    async with http.request(
        method, emu.url + DEVICE_URL, params=params, data=body or None, headers=sent,
        **({"timeout": timeout} if timeout is not None else {}),
    ) as resp:  # fmt: skip
        return resp.status, await resp.json()


async def allocate(http, emu, sn: str | None, org_id: str | None = ORG, **body_fields):
    params = {"action": "allocate"} | ({"orgId": org_id} if org_id is not None else {})
    body = orjson.dumps(({"sn": sn} if sn is not None else {}) | body_fields)
    return await call(http, emu, "POST", params, body, access_token=await token(http, emu))


async def admin(http, emu, method: str, path: str, payload=None) -> tuple[int, object]:
    data = orjson.dumps(payload) if payload is not None else None
    async with http.request(method, emu.url + path, data=data) as resp:
        text = await resp.read()
        return resp.status, orjson.loads(text) if text else None


def sign_headers(tok: str, params: dict[str, str], body: bytes) -> dict[str, str]:
    ts = now_ms()
    return {
        "apim-accesstoken": tok,
        "apim-timestamp": str(ts),
        "apim-signature": sign(tok, params, body, ts, SECRET),
        "Content-Type": "application/json",
    }


async def operation(
    http, emu, action: str, body: Any = None, *, org_id: str | None = ORG, **query: str
) -> tuple[int, dict[str, Any]]:
    """A DPS call of ``action`` (GET for get, POST otherwise), ``body`` sent as JSON."""
    method = "GET" if action == "get" else "POST"
    params = {"action": action} | ({"orgId": org_id} if org_id is not None else {}) | query
    raw = orjson.dumps(body) if body is not None else b""
    return await call(http, emu, method, params, raw, access_token=await token(http, emu))
