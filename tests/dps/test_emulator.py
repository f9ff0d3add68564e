"""The DPS emulator over raw HTTP, with requests signed by hand from the pure functions."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import time
import uuid
from typing import Any

import aiohttp
import msgspec
import orjson
import pytest

from pipeline.dps.emulator import EmulatorState, load_devices, serve, start_emulator
from pipeline.dps.protocol import token_encryption
from pipeline.errors import InputError
from tests.dps.support import (
    DEVICE_URL,
    KEY,
    ORG,
    SECRET,
    TOKEN_URL,
    admin,
    allocate,
    call,
    now_ms,
    request_token,
    sign_headers,
    token,
)

DEVICES: list[dict[str, Any]] = [
    {"sn": "SN-1", "group_id": "g-1", "product_key": "pk-1", "device_data": {"capacity": 12}},
    {"sn": "SN-2", "group_id": "g-1", "org_id": "o-maker"},
    {"sn": "SN-NOGROUP", "group_id": None},
]
SEED_KEYS = {
    "sn",
    "groupId",
    "regionId",
    "orgId",
    "productKey",
    "batchOrder",
    "batchTag",
    "deviceData",
    "desc",
    "status",
    "reprovisioning",
    "allocateErrorMsg",
    "createBy",
    "createTime",
    "updateBy",
    "updateTime",
    "manufacturerOrgId",
    "connectStatus",
    "allocateStatus",
}
STATUS_KEYS = {"currentStatus", "connectedTime", "allocatedTime", "finishedTime", "discardedTime"}


@pytest.fixture
async def emu():
    async with await start_emulator(devices=DEVICES) as running:
        yield running


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


# --------------------------------------------------------------------------------------
# Token service


async def test_token_is_issued_and_reused_while_unexpired(http, emu):
    ts = now_ms()
    body = {"appKey": KEY, "encryption": token_encryption(KEY, ts, SECRET), "timestamp": ts}
    status, first = await request_token(http, emu, body)
    assert status == 200
    assert set(first) == {"status", "msg", "business", "data"}
    assert (first["status"], first["msg"], first["business"]) == (
        0,
        "SUCCESS",
        "apim-token-service",
    )
    assert re.fullmatch(r"[0-9a-f]{32}", first["data"]["accessToken"])
    assert first["data"]["expire"] == 7200
    _, second = await request_token(http, emu, body)
    assert second["data"] == first["data"]
    assert emu.state.token_requests == 2
    assert list(emu.state.tokens) == [first["data"]["accessToken"]]


@pytest.mark.parametrize(
    ("body", "status", "msg"),
    [
        ({"appKey": KEY, "encryption": "0" * 64, "timestamp": 1}, 1003, "invalid encryption"),
        (
            {
                "appKey": "nobody",
                "encryption": token_encryption("nobody", 1, SECRET),
                "timestamp": 1,
            },
            1002,
            "appKey does not exist",
        ),
        ({"appKey": KEY, "timestamp": 1}, 1202, "parameter empty: encryption"),
        ({"appKey": "", "encryption": "x", "timestamp": 1}, 1202, "parameter empty: appKey"),
        (
            {"appKey": KEY, "encryption": "x", "timestamp": "1"},
            1004,
            "invalid parameter: Expected `int`, got `str` - at `$.timestamp`",
        ),
        ([1, 2], 1004, "invalid parameter: the body is not a JSON object"),
    ],
)
async def test_token_refusals(http, emu, body, status, msg):
    code, answer = await request_token(http, emu, body)
    assert code == 200
    assert answer == {"status": status, "msg": msg, "business": "apim-token-service", "data": None}
    assert emu.state.tokens == {}


async def test_token_body_not_json(http, emu):
    async with http.post(emu.url + TOKEN_URL, data=b"{nope") as resp:
        answer = await resp.json()
    assert (answer["status"], answer["msg"]) == (1004, "invalid parameter: the body is not JSON")


# --------------------------------------------------------------------------------------
# Gateway checks on DPS calls


async def test_wrong_signature_is_refused(http, emu):
    tok = await token(http, emu)
    params = {"action": "allocate", "orgId": ORG}
    body = b'{"sn":"SN-1"}'
    for tampered in (
        {"signed_body": b'{"sn": "SN-1"}'},
        {"signed_params": {"action": "allocate"}},
        {"signed_params": {"action": "allocate", "orgId": ORG, "extra": "1"}},
    ):
        status, answer = await call(http, emu, "POST", params, body, access_token=tok, **tampered)
        assert status == 401
        assert (answer["code"], answer["msg"]) == (497, "signature check failed")
    status, answer = await call(http, emu, "POST", params, body, access_token=tok)
    assert (status, answer["code"]) == (200, 0)
    assert emu.state.devices["SN-1"].allocated_time is not None


async def test_unknown_or_expired_token_is_1203(http, emu):
    params = {"action": "allocate", "orgId": ORG}
    status, answer = await call(http, emu, "POST", params, b'{"sn":"SN-1"}', access_token="bogus")
    assert status == 200
    assert (answer["code"], answer["msg"], answer["data"]) == (1203, "access token expired", None)
    tok = await token(http, emu)
    emu.state.expire_tokens()
    _, answer = await call(http, emu, "POST", params, b'{"sn":"SN-1"}', access_token=tok)
    assert answer["code"] == 1203
    assert emu.state.devices["SN-1"].allocated_time is None


@pytest.mark.parametrize("header", ["apim-accesstoken", "apim-timestamp", "apim-signature"])
async def test_missing_gateway_header_is_refused(http, emu, header):
    tok = await token(http, emu)
    status, answer = await call(
        http, emu, "GET", {"action": "get", "orgId": ORG, "sn": "SN-1"}, access_token=tok,
        headers={header: ""},
    )  # fmt: skip
    assert status == 401
    assert (answer["code"], answer["msg"]) == (1202, f"parameter empty: {header}")


# --------------------------------------------------------------------------------------
# Allocate


@pytest.mark.parametrize(
    ("sn", "org_id", "expected"),
    [
        ("SN-1", None, (35400, "OrgId/sn is required")),
        ("SN-1", " ", (35400, "OrgId/sn is required")),
        (None, ORG, (35400, "OrgId/sn is required")),
        ("", ORG, (35400, "OrgId/sn is required")),
        ("SN-UNKNOWN", ORG, (35601, "Verify not pass/sn not found")),
        ("SN-NOGROUP", ORG, (35404, "Group/Device group not found")),
    ],
)
async def test_allocate_refusals(http, emu, sn, org_id, expected):
    status, answer = await allocate(http, emu, sn, org_id)
    assert status == 200
    assert (answer["code"], answer["msg"], answer["data"]) == (*expected, None)
    assert uuid.UUID(answer["requestId"]).version == 4


@pytest.mark.parametrize(
    ("body", "msg"),
    [
        (b"{nope", "Invalid Argument body: not valid JSON"),
        (b'["SN-1"]', "Invalid Argument body: not a JSON object"),
        (b'{"sn":"SN-1","deviceData":[1]}', "Invalid Argument deviceData: not a JSON object"),
    ],
)
async def test_allocate_malformed_body(http, emu, body, msg):
    tok = await token(http, emu)
    params = {"action": "allocate", "orgId": ORG}
    status, answer = await call(http, emu, "POST", params, body, access_token=tok)
    assert (status, answer["code"], answer["msg"]) == (200, 99400, msg)


async def test_unknown_action(http, emu):
    tok = await token(http, emu)
    _, answer = await call(http, emu, "POST", {"action": "destroy", "orgId": ORG}, b"{}",
                           access_token=tok)  # fmt: skip
    assert (answer["code"], answer["msg"]) == (
        99400,
        "Invalid Argument action: unsupported value 'destroy'",
    )


async def test_allocate_success_is_shaped_like_the_seed(http, emu):
    before = now_ms()
    status, answer = await allocate(http, emu, "SN-1", deviceData={"scale": 1})
    assert status == 200
    assert set(answer) == {"code", "msg", "requestId", "data"}
    assert (answer["code"], answer["msg"]) == (0, "OK")
    device = answer["data"]
    assert set(device) == SEED_KEYS
    assert set(device["status"]) == STATUS_KEYS
    assert device["status"]["currentStatus"] == "allocated"
    assert before <= device["status"]["allocatedTime"] <= now_ms()
    assert device["status"]["connectedTime"] is None
    assert (device["sn"], device["groupId"], device["orgId"], device["productKey"]) == (
        "SN-1",
        "g-1",
        ORG,
        "pk-1",
    )
    assert device["regionId"] == "emulator-region"
    assert device["deviceData"] == {"capacity": 12, "scale": 1}
    assert device["batchTag"] == {"defaultValue": "emulator", "i18nValue": {}}
    assert (device["reprovisioning"], device["allocateErrorMsg"]) == (False, None)
    assert (device["connectStatus"], device["allocateStatus"]) == ("init", "allocated")


async def test_allocating_again_returns_the_same_device(http, emu):
    _, first = await allocate(http, emu, "SN-2")
    _, again = await allocate(http, emu, "SN-2", deviceData={"other": True})
    assert again["data"] == first["data"]
    assert again["requestId"] != first["requestId"]
    assert first["data"]["manufacturerOrgId"] == "o-maker"


async def test_get_before_and_after_allocation(http, emu):
    tok = await token(http, emu)
    params = {"action": "get", "orgId": ORG, "sn": "SN-1"}
    status, answer = await call(http, emu, "GET", params, access_token=tok)
    assert (status, answer["code"]) == (200, 0)
    device = answer["data"]
    assert set(device) == SEED_KEYS
    assert device["status"] == {
        "currentStatus": "init",
        "connectedTime": None,
        "allocatedTime": None,
        "finishedTime": None,
        "discardedTime": None,
    }
    assert (device["regionId"], device["orgId"], device["allocateStatus"]) == (None, None, "init")
    assert device["deviceData"] == {"capacity": 12}
    _, allocated = await allocate(http, emu, "SN-1")
    _, answer = await call(http, emu, "GET", params, access_token=tok)
    assert answer["data"] == allocated["data"]
    _, answer = await call(http, emu, "GET", params | {"sn": "SN-9"}, access_token=tok)
    assert (answer["code"], answer["msg"]) == (35601, "Verify not pass/sn not found")
    _, answer = await call(http, emu, "GET", {"action": "get", "sn": "SN-1"}, access_token=tok)
    assert (answer["code"], answer["msg"]) == (35400, "OrgId/sn is required")


async def test_accept_any_sn_registers_on_first_sight(http):
    async with await start_emulator(accept_any_sn=True) as emu:
        _, answer = await allocate(http, emu, "ANY-1")
        assert answer["code"] == 0
        assert (answer["data"]["sn"], answer["data"]["groupId"]) == ("ANY-1", "demo-group")
        assert list(emu.state.devices) == ["ANY-1"]


# --------------------------------------------------------------------------------------
# Admin


async def test_devices_can_be_listed_and_registered(http, emu):
    status, devices = await admin(http, emu, "GET", "/_emulator/devices")
    assert status == 200
    assert isinstance(devices, list)
    assert [(d["sn"], d["groupId"]) for d in devices] == [
        ("SN-1", "g-1"),
        ("SN-2", "g-1"),
        ("SN-NOGROUP", None),
    ]
    assert all(d["status"]["currentStatus"] == "init" for d in devices)
    _, answer = await allocate(http, emu, "SN-NOGROUP")
    assert answer["code"] == 35404
    # The operator creates the missing group, then the same allocate succeeds.
    status, result = await admin(
        http, emu, "POST", "/_emulator/devices",
        {"devices": [{"sn": "SN-NOGROUP", "group_id": "g-2"}, {"sn": "SN-3", "group_id": "g-2"}]},
    )  # fmt: skip
    assert (status, result) == (200, {"created": 1, "updated": 1})
    _, answer = await allocate(http, emu, "SN-NOGROUP")
    assert (answer["code"], answer["data"]["groupId"]) == (0, "g-2")
    status, result = await admin(http, emu, "POST", "/_emulator/devices", [{"sn": "SN-4"}])
    assert (status, result) == (200, {"created": 1, "updated": 0})
    assert emu.state.devices["SN-4"].group_id is None


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        ({"sn": "SN-5"}, 'expected a JSON list of devices or {"devices": [...]}'),
        ([{"sn": ""}], "device #1: Expected `str` of length >= 1 - at `$.sn`"),
        (
            [{"sn": "SN-5"}, {"sn": "SN-6", "groupid": "g"}],
            "device #2: Object contains unknown field `groupid`",
        ),
    ],
)
async def test_bad_device_registration(http, emu, payload, error):
    status, result = await admin(http, emu, "POST", "/_emulator/devices", payload)
    assert (status, result) == (400, {"error": error})
    assert list(emu.state.devices) == ["SN-1", "SN-2", "SN-NOGROUP"]


async def test_calls_are_logged_in_order_and_cleared(http, emu):
    await allocate(http, emu, "SN-1", deviceData={"scale": 1})
    await allocate(http, emu, "SN-UNKNOWN")
    await allocate(http, emu, "SN-2", org_id=None)
    params = {"action": "allocate", "orgId": ORG}
    await call(http, emu, "POST", params, b'{"sn":"SN-2"}', access_token="bogus")
    status, calls = await admin(http, emu, "GET", "/_emulator/calls")
    assert status == 200
    assert isinstance(calls, list)
    assert [
        (c["seq"], c["sn"], c["org_id"], c["device_data"], c["http_status"], c["code"])
        for c in calls
    ] == [
        (1, "SN-1", ORG, {"scale": 1}, 200, 0),
        (2, "SN-UNKNOWN", ORG, None, 200, 35601),
        (3, "SN-2", None, None, 200, 35400),
        (4, "SN-2", ORG, None, 200, 1203),
    ]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", c["at"]) for c in calls)
    assert await admin(http, emu, "DELETE", "/_emulator/calls") == (204, None)
    assert await admin(http, emu, "GET", "/_emulator/calls") == (200, [])


async def test_faults_merge_and_validate(http, emu):
    defaults: dict[str, object] = {
        "latency_ms": 0.0,
        "error_rate": 0.0,
        "error_status": 500,
        "throttle_rps": None,
        "retry_after": 1.0,
        "outage": False,
        "fail_sns": [],
        "cut_rate": 0.0,
        "no_dps_role": False,
        "hang_rate": 0.0,
        "hang_sns": [],
        "hang_ms": None,
        "hang_after_effect": False,
    }
    assert await admin(http, emu, "GET", "/_emulator/faults") == (200, defaults)
    await admin(http, emu, "POST", "/_emulator/faults", {"error_status": 502})
    status, faults = await admin(http, emu, "POST", "/_emulator/faults", {"latency_ms": 5})
    assert (status, faults) == (200, defaults | {"error_status": 502, "latency_ms": 5.0})
    status, result = await admin(http, emu, "POST", "/_emulator/faults", {"error_rate": 2})
    assert (status, result) == (400, {"error": "Expected `float` <= 1.0 - at `$.error_rate`"})
    status, result = await admin(http, emu, "POST", "/_emulator/faults", {"outages": True})
    assert (status, result) == (400, {"error": "Object contains unknown field `outages`"})
    assert emu.state.faults.error_rate == 0.0


async def test_error_rate_injects_the_status(http, emu):
    await admin(http, emu, "POST", "/_emulator/faults", {"error_rate": 1.0, "error_status": 502})
    status, answer = await allocate(http, emu, "SN-1")
    assert status == 502
    assert (answer["code"], answer["msg"]) == (502, "Bad Gateway")
    assert emu.state.devices["SN-1"].allocated_time is None
    assert [(c.http_status, c.code) for c in emu.state.calls] == [(502, 502)]


async def test_fail_sns_always_fail_and_the_others_go_through(http, emu):
    await admin(http, emu, "POST", "/_emulator/faults", {"fail_sns": ["SN-1"], "error_status": 503})
    answers = [await allocate(http, emu, sn) for sn in ("SN-1", "SN-2", "SN-1")]
    assert [(status, answer["code"]) for status, answer in answers] == [
        (503, 503),
        (200, 0),
        (503, 503),
    ]
    assert emu.state.devices["SN-1"].allocated_time is None
    assert [(c.sn, c.http_status) for c in emu.state.calls] == [
        ("SN-1", 503),
        ("SN-2", 200),
        ("SN-1", 503),
    ]


async def test_throttle_answers_429_with_retry_after(http, emu):
    await admin(http, emu, "POST", "/_emulator/faults", {"throttle_rps": 2, "retry_after": 2})
    tok = await token(http, emu)
    params = {"action": "allocate", "orgId": ORG}
    answers = []
    for sn in ("SN-1", "SN-2", "SN-1"):
        async with http.post(
            emu.url + DEVICE_URL,
            params=params,
            data=f'{{"sn":"{sn}"}}'.encode(),
            headers=sign_headers(tok, params, f'{{"sn":"{sn}"}}'.encode()),
        ) as resp:
            answers.append((resp.status, resp.headers.get("Retry-After"), await resp.json()))
    assert [(s, r, a["code"]) for s, r, a in answers] == [
        (200, None, 0),
        (200, None, 0),
        (429, "2", 429),
    ]
    assert answers[2][2]["msg"] == "Too Many Requests"
    # One budget for every operation: reads are throttled too.
    status, answer = await call(
        http, emu, "GET", {"action": "get", "orgId": ORG, "sn": "SN-1"}, access_token=tok
    )
    assert (status, answer["code"]) == (429, 429)


async def test_outage_answers_503_without_json(http, emu):
    tok = await token(http, emu)
    await admin(http, emu, "POST", "/_emulator/faults", {"outage": True})
    ts = now_ms()
    body = {"appKey": KEY, "encryption": token_encryption(KEY, ts, SECRET), "timestamp": ts}
    async with http.post(emu.url + TOKEN_URL, data=orjson.dumps(body)) as resp:
        assert (resp.status, await resp.text()) == (503, "service unavailable")
    params = {"action": "allocate", "orgId": ORG}
    async with http.post(
        emu.url + DEVICE_URL, params=params, data=b'{"sn":"SN-1"}',
        headers=sign_headers(tok, params, b'{"sn":"SN-1"}'),
    ) as resp:  # fmt: skip
        assert (resp.status, resp.content_type, await resp.text()) == (
            503,
            "text/plain",
            "service unavailable",
        )
    assert [(c.sn, c.http_status, c.code) for c in emu.state.calls] == [("SN-1", 503, None)]
    await admin(http, emu, "POST", "/_emulator/faults", {"outage": False})
    _, answer = await allocate(http, emu, "SN-1")
    assert answer["code"] == 0


async def test_latency_delays_answers(http, emu):
    await admin(http, emu, "POST", "/_emulator/faults", {"latency_ms": 150})
    started = time.monotonic()
    await token(http, emu)
    # Less 2 ms: on uvloop (make test-uvloop) a sleep may end up to about 1 ms early.
    assert time.monotonic() - started >= 0.15 - 0.002


async def until(check, what: str) -> None:
    """Poll ``check`` (the emulator's state) until it holds; fail after 10 s."""
    async with asyncio.timeout(10):
        while not check():
            await asyncio.sleep(0.01)


async def test_a_hung_call_is_held_until_the_fault_is_lifted_and_counted_in_flight(http, emu):
    await admin(http, emu, "POST", "/_emulator/faults", {"hang_sns": ["SN-1"]})
    hung = asyncio.create_task(allocate(http, emu, "SN-1"))
    await until(lambda: emu.state.in_flight == 1, "the hung call in flight")
    status, answer = await allocate(http, emu, "SN-2")  # the others go through meanwhile
    assert (status, answer["code"]) == (200, 0)
    assert not hung.done()
    assert emu.state.devices["SN-1"].allocated_time is None  # held before taking effect
    assert await admin(http, emu, "GET", "/_emulator/in-flight") == (
        200, {"in_flight": 1, "peak": 2},
    )  # fmt: skip
    await admin(http, emu, "POST", "/_emulator/faults", {"hang_sns": []})  # lifted: released
    status, answer = await hung
    assert (status, answer["code"]) == (200, 0)
    assert emu.state.devices["SN-1"].allocated_time is not None
    assert [(c.sn, c.http_status, c.code, c.hung, c.abandoned) for c in emu.state.calls] == [
        ("SN-1", 200, 0, True, False),
        ("SN-2", 200, 0, False, False),
    ]
    assert await admin(http, emu, "DELETE", "/_emulator/in-flight") == (204, None)
    assert await admin(http, emu, "GET", "/_emulator/in-flight") == (
        200, {"in_flight": 0, "peak": 0},
    )  # fmt: skip


@pytest.mark.parametrize("after_effect", [False, True])
async def test_a_hung_call_whose_caller_gives_up(http, emu, after_effect):
    """Held until the caller closes the connection: before the effect, it never takes effect."""
    tok = await token(http, emu)
    await admin(
        http, emu, "POST", "/_emulator/faults",
        {"hang_rate": 1.0, "hang_after_effect": after_effect},
    )  # fmt: skip
    params = {"action": "allocate", "orgId": ORG}
    with pytest.raises(TimeoutError):
        await call(
            http, emu, "POST", params, b'{"sn":"SN-1"}', access_token=tok,
            timeout=aiohttp.ClientTimeout(total=0.3),
        )  # fmt: skip
    await until(lambda: emu.state.in_flight == 0, "the abandoned call to end")
    [logged] = emu.state.calls
    assert (logged.hung, logged.abandoned) == (True, True)
    if after_effect:
        assert (logged.http_status, logged.code) == (200, 0)
        assert emu.state.devices["SN-1"].allocated_time is not None
    else:
        assert (logged.http_status, logged.code) == (499, None)
        assert emu.state.devices["SN-1"].allocated_time is None
    assert emu.state.peak_in_flight == 1


async def test_hang_ms_answers_a_hung_call_late(http, emu):
    await admin(http, emu, "POST", "/_emulator/faults", {"hang_rate": 1.0, "hang_ms": 50})
    status, answer = await allocate(http, emu, "SN-1")
    assert (status, answer["code"]) == (200, 0)
    assert [(c.http_status, c.hung, c.abandoned) for c in emu.state.calls] == [(200, True, False)]


async def test_reset_keeps_devices(http, emu):
    await allocate(http, emu, "SN-1")
    await admin(http, emu, "POST", "/_emulator/faults", {"outage": True})
    assert await admin(http, emu, "POST", "/_emulator/reset") == (204, None)
    state = emu.state
    assert (state.calls, state.tokens, state.token_requests) == ([], {}, 0)
    assert state.faults.outage is False
    assert list(state.devices) == ["SN-1", "SN-2", "SN-NOGROUP"]
    assert state.devices["SN-1"].allocated_time is not None


def test_state_rejects_bad_devices():
    with pytest.raises(ValueError, match=r"^device #1: Object missing required field `sn`$"):
        EmulatorState(devices=[{"group_id": "g"}])


# --------------------------------------------------------------------------------------
# Devices file and serve()


def test_load_devices_json_and_json_lines(tmp_path):
    listed = tmp_path / "devices.json"
    listed.write_bytes(orjson.dumps(DEVICES))
    expected = [
        {"sn": "SN-1", "group_id": "g-1", "product_key": "pk-1", "org_id": None,
         "device_data": {"capacity": 12}},
        {"sn": "SN-2", "group_id": "g-1", "product_key": None, "org_id": "o-maker",
         "device_data": None},
        {"sn": "SN-NOGROUP", "group_id": None, "product_key": None, "org_id": None,
         "device_data": None},
    ]  # fmt: skip
    assert load_devices(listed) == expected
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_bytes(orjson.dumps({"devices": DEVICES}))
    assert load_devices(str(wrapped)) == expected
    lines = tmp_path / "devices.jsonl"
    lines.write_bytes(b"\n".join(orjson.dumps(d) for d in DEVICES) + b"\n\n")
    assert load_devices(lines) == expected
    single = tmp_path / "single.jsonl"
    single.write_bytes(orjson.dumps(DEVICES[0]) + b"\n")
    assert load_devices(single) == expected[:1]


def test_load_devices_errors(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"sn": "A", "group_id": "g"}\n{oops\n', encoding="utf-8")
    with pytest.raises(InputError, match=rf"^devices file {path}, line 2: not valid JSON: "):
        load_devices(path)
    path.write_text('[{"sn": "A"}, {"group_id": "g"}]', encoding="utf-8")
    with pytest.raises(InputError) as caught:
        load_devices(path)
    assert (
        str(caught.value) == f"devices file {path}: device #2: Object missing required field `sn`"
    )
    path.write_text("42", encoding="utf-8")
    with pytest.raises(InputError, match="expected a list of devices"):
        load_devices(path)
    with pytest.raises(InputError, match=r"^devices file .*missing\.json: No such file"):
        load_devices(tmp_path / "missing.json")


async def wait_for_url(caplog) -> str:
    for _ in range(200):
        for record in caplog.records:
            found = re.fullmatch(r"emulator listening on (http://\S+)", record.getMessage())
            if found:
                return found.group(1)
        await asyncio.sleep(0.01)
    pytest.fail("the emulator never said it was listening")


async def test_serve_until_sigterm(tmp_path, caplog, http):
    caplog.set_level(logging.INFO, logger="pipeline.dps.emulator")
    devices = tmp_path / "devices.json"
    devices.write_bytes(orjson.dumps(DEVICES[:1]))
    task = asyncio.create_task(
        serve(port=0, devices_file=str(devices), app_key=KEY, app_secret=SECRET, token_ttl=60)
    )
    url = await wait_for_url(caplog)
    async with http.get(url + "/_emulator/devices") as resp:
        assert [d["sn"] for d in await resp.json()] == ["SN-1"]
    os.kill(os.getpid(), signal.SIGTERM)
    assert await asyncio.wait_for(task, 5) == 0
    with pytest.raises(aiohttp.ClientConnectorError):
        await http.get(url + "/_emulator/devices")


async def test_serve_until_cancelled(caplog):
    caplog.set_level(logging.INFO, logger="pipeline.dps.emulator")
    task = asyncio.create_task(
        serve(port=0, accept_any_sn=True, app_key=KEY, app_secret=SECRET, token_ttl=60)
    )
    await wait_for_url(caplog)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_serve_refuses_a_bad_devices_file(tmp_path, caplog):
    path = tmp_path / "devices.json"
    path.write_text("[{}]", encoding="utf-8")
    assert (
        await serve(port=0, devices_file=str(path), app_key=KEY, app_secret=SECRET, token_ttl=60)
        == 2
    )
    assert caplog.records[-1].getMessage() == (
        f"devices file {path}: device #1: Object missing required field `sn`"
    )


def test_state_is_plain_data():
    state = EmulatorState(devices=DEVICES[:1])
    assert msgspec.to_builtins(state.devices["SN-1"].view())["status"]["currentStatus"] == "init"
