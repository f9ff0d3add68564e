"""The emulator's Get, Search, Reset Device Allocation Status and Delete DPS Device.

Each as its V2.5 page documents it (request and answer shapes, error codes), behind the
same gateway checks and faults as allocate, and logged in the call ledger.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import aiohttp
import orjson
import pytest

from pipeline.dps.emulator import EmulatedDevice, start_emulator
from pipeline.dps.emulator.search import SearchError, matcher, sort_devices
from pipeline.schemas import Sorter
from tests.dps.support import (
    DEVICE_URL,
    ORG,
    admin,
    allocate,
    call,
    operation,
    sign_headers,
    token,
)

DEVICES: list[dict[str, Any]] = [
    {"sn": "SN-1", "group_id": "g-1", "product_key": "pk-1", "device_data": {"capacity": 12}},
    {"sn": "SN-2", "group_id": "g-1"},
    {"sn": "SN-3", "group_id": "g-2", "product_key": "pk-1"},
    {"sn": "SN-NOGROUP", "group_id": None},
]
SEED_KEYS = {
    "sn", "groupId", "regionId", "orgId", "productKey", "batchOrder", "batchTag",
    "deviceData", "desc", "status", "reprovisioning", "allocateErrorMsg", "createBy",
    "createTime", "updateBy", "updateTime", "manufacturerOrgId", "connectStatus",
    "allocateStatus",
}  # fmt: skip
ENVELOPE = {"code", "msg", "requestId", "data"}

# One call of each operation that succeeds on DEVICES (action, JSON body, extra query).
OPERATIONS: list[tuple[str, Any, dict[str, str]]] = [
    ("allocate", {"sn": "SN-1"}, {}),
    ("get", None, {"sn": "SN-1"}),
    ("search", {"expression": "groupId = 'g-1'"}, {}),
    ("resetAllocationStatus", {"groupId": "g-1", "sns": ["SN-1"]}, {}),
    ("delete", {"groupId": "g-1", "snList": ["SN-1"]}, {}),
]
OPERATION_IDS = [action for action, _, _ in OPERATIONS]


@pytest.fixture
async def emu():
    async with await start_emulator(devices=DEVICES) as running:
        yield running


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def search(http, emu, expression: str, **pagination: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"expression": expression}
    if pagination:
        body["pagination"] = pagination
    status, answer = await operation(http, emu, "search", body)
    assert status == 200
    return answer


def sns_of(answer: dict[str, Any]) -> list[str]:
    return [device["sn"] for device in answer["data"]]


# --------------------------------------------------------------------------------------
# Get DPS Device


async def test_get_is_logged_with_its_sn(http, emu):
    await operation(http, emu, "get", sn="SN-2")
    await operation(http, emu, "get", sn="SN-9")
    await operation(http, emu, "get", sn=" ")
    calls = [(c.action, c.sn, c.org_id, c.code) for c in emu.state.calls]
    assert calls == [
        ("get", "SN-2", ORG, 0),
        ("get", "SN-9", ORG, 35601),
        ("get", " ", ORG, 35400),
    ]


async def test_get_of_a_reset_device_says_reprovisioning(http, emu):
    await allocate(http, emu, "SN-1")
    await operation(http, emu, "resetAllocationStatus", {"groupId": "g-1", "sns": ["SN-1"]})
    status, answer = await operation(http, emu, "get", sn="SN-1")
    assert (status, answer["code"]) == (200, 0)
    device = answer["data"]
    assert set(device) == SEED_KEYS
    assert (device["reprovisioning"], device["allocateStatus"]) == (True, "init")
    assert device["status"]["currentStatus"] == "init"
    assert (device["orgId"], device["regionId"], device["status"]["allocatedTime"]) == (
        None,
        None,
        None,
    )


# --------------------------------------------------------------------------------------
# Search DPS Device


async def test_search_answer_shape(http, emu):
    answer = await search(http, emu, "groupId = 'g-1'")
    assert set(answer) == ENVELOPE | {"pagination"}
    assert (answer["code"], answer["msg"]) == (0, "OK")
    assert uuid.UUID(answer["requestId"]).version == 4
    assert answer["pagination"] == {"pageNo": 1, "pageSize": 10, "totalSize": 2}
    assert all(set(device) == SEED_KEYS for device in answer["data"])
    # Newest first; registered in the same millisecond, the later registration first.
    assert sns_of(answer) == ["SN-2", "SN-1"]
    assert answer["data"][1]["deviceData"] == {"capacity": 12}
    assert [(c.action, c.expression, c.code) for c in emu.state.calls] == [
        ("search", "groupId = 'g-1'", 0)
    ]


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("sn = 'SN-3'", ["SN-3"]),
        ("sn in ('SN-1', 'SN-3', 'SN-9')", ["SN-3", "SN-1"]),
        ('sn IN ("SN-2")', ["SN-2"]),
        ("sn like 'SN-_'", ["SN-3", "SN-2", "SN-1"]),
        ("sn LIKE '%GROUP'", ["SN-NOGROUP"]),
        ("productKey = 'pk-1'", ["SN-3", "SN-1"]),
        ("productKey = 'pk-1' and groupId = 'g-2'", ["SN-3"]),
        ("groupId in ('g-1','g-2') AND sn = 'SN-2'", ["SN-2"]),
        ("status = 'init'", ["SN-NOGROUP", "SN-3", "SN-2", "SN-1"]),
        ("status = 'allocated'", []),
        ("regionId = 'emulator-region'", []),
    ],
)
async def test_search_filters(http, emu, expression, expected):
    answer = await search(http, emu, expression)
    assert sns_of(answer) == expected
    assert answer["pagination"]["totalSize"] == len(expected)


async def test_search_by_status_and_region_after_allocation(http, emu):
    await allocate(http, emu, "SN-2")
    assert sns_of(await search(http, emu, "status = 'allocated'")) == ["SN-2"]
    assert sns_of(await search(http, emu, "regionId in ('emulator-region')")) == ["SN-2"]
    answer = await search(http, emu, "status in ('init') and groupId = 'g-1'")
    assert sns_of(answer) == ["SN-1"]


async def test_search_pages(http, emu):
    await admin(http, emu, "POST", "/_emulator/devices",
                [{"sn": f"P-{i:02d}", "group_id": "g-p"} for i in range(12)])  # fmt: skip
    first = await search(http, emu, "groupId = 'g-p'")
    assert first["pagination"] == {"pageNo": 1, "pageSize": 10, "totalSize": 12}
    assert sns_of(first) == [f"P-{i:02d}" for i in range(11, 1, -1)]
    second = await search(http, emu, "groupId = 'g-p'", pageNo=2, pageSize=10)
    assert second["pagination"] == {"pageNo": 2, "pageSize": 10, "totalSize": 12}
    assert sns_of(second) == ["P-01", "P-00"]
    beyond = await search(http, emu, "groupId = 'g-p'", pageNo=3, pageSize=10)
    assert (beyond["data"], beyond["pagination"]["totalSize"]) == ([], 12)
    largest = await search(http, emu, "groupId = 'g-p'", pageNo=1, pageSize=1000)
    assert len(largest["data"]) == 12


async def test_search_sorters(http, emu):
    by_sn = {"pageNo": 1, "pageSize": 10, "sorters": [{"field": "sn", "order": "ASC"}]}
    answer = await search(http, emu, "sn like 'SN-%'", **by_sn)
    assert sns_of(answer) == ["SN-1", "SN-2", "SN-3", "SN-NOGROUP"]
    two_keys = [{"field": "groupId", "order": "DESC"}, {"field": "sn"}]
    answer = await search(http, emu, "sn like 'SN-_'", pageNo=1, pageSize=10, sorters=two_keys)
    assert sns_of(answer) == ["SN-3", "SN-1", "SN-2"]


@pytest.mark.parametrize(
    ("body", "msg"),
    [
        ({}, "Invalid Argument expression:expression is missing"),
        ({"expression": "  "}, "Invalid Argument expression:expression is missing"),
        (
            {"expression": "sn = 'a'", "pagination": {"pageNo": 1, "pageSize": 1001}},
            "Invalid Argument Expected `int` <= 1000 - at `$.pagination.pageSize`",
        ),
        (
            {"expression": "sn = 'a'", "pagination": {"pageNo": 0, "pageSize": 10}},
            "Invalid Argument Expected `int` >= 1 - at `$.pagination.pageNo`",
        ),
        (
            {"expression": "batchOrder > 1"},
            (
                "Invalid Argument expression: field 'batchOrder' is not searchable here "
                "(sn, groupId, regionId, productKey, status)"
            ),
        ),
        (
            {"expression": "sn = 'a' or sn = 'b'"},
            "Invalid Argument expression: expected AND between terms, got 'or'",
        ),
        (
            {"expression": "groupId like 'g%'"},
            "Invalid Argument expression: operator 'like' is not supported on groupId",
        ),
        ({"expression": "sn = "}, "Invalid Argument expression: expected a quoted value at the end"),
        (
            {"expression": "sn = 'a' and"},
            "Invalid Argument expression: expected a field at the end",
        ),
        (
            {"expression": "sn in ('a' 'b')"},
            "Invalid Argument expression: expected ',' or ')', got \"'b'\"",
        ),
        ({"expression": "sn = 'a';"}, "Invalid Argument expression: unexpected character ';'"),
        (
            {"expression": "sn != 'a'"},
            "Invalid Argument expression: operator '!=' is not supported on sn",
        ),
        (
            {"expression": "sn = 'a'", "pagination": {"pageNo": 1, "pageSize": 5,
                                                      "sorters": [{"field": "desc"}]}},
            (
                "Invalid Argument pagination.sorters: cannot sort by 'desc' (sn, groupId, "
                "createTime, updateTime, batchOrder)"
            ),
        ),
        (
            {"expression": "sn = 'a'", "pagination": {"pageNo": 1, "pageSize": 5,
                                                      "sorters": [{"field": "sn", "order": "UP"}]}},
            "Invalid Argument pagination.sorters: sort order 'UP' is neither ASC nor DESC",
        ),
    ],
)  # fmt: skip
async def test_search_refusals(http, emu, body, msg):
    status, answer = await operation(http, emu, "search", body)
    assert status == 200
    assert (answer["code"], answer["msg"], answer["data"]) == (99400, msg, None)
    assert "pagination" not in answer


async def test_search_needs_an_org_id(http, emu):
    _, answer = await operation(http, emu, "search", {"expression": "sn = 'SN-1'"}, org_id=None)
    assert (answer["code"], answer["msg"]) == (99400, "Invalid Argument orgId:orgId is missing")


def test_search_subset_directly():
    device = EmulatedDevice(
        sn="A-1", group_id=None, product_key=None, manufacturer_org_id=None,
        registered_data={}, batch_order=1, create_time=1, update_time=1,
    )  # fmt: skip
    assert matcher("SN = 'A-1' AND GROUPID IN ('x')")(device) is False
    assert matcher("sn like 'A%' and sn like '%1'")(device) is True
    assert matcher("sn like 'a%'")(device) is False  # values are case-sensitive
    assert matcher("sn like '.%'")(device) is False  # LIKE's pattern is not a regex
    with pytest.raises(SearchError, match="the expression is empty"):
        matcher("")
    with pytest.raises(SearchError, match=r"expected '\(' after IN"):
        matcher("sn in 'a'")
    with pytest.raises(SearchError, match="expected a quoted value, got 'a'"):
        matcher("sn = a")
    with pytest.raises(SearchError, match="expected a quoted value, got '1'"):
        matcher("sn = 1")
    assert sort_devices([device], [Sorter(field="batchOrder", order="desc")]) == [device]


# --------------------------------------------------------------------------------------
# Reset Device Allocation Status


async def test_reset_answer_and_a_later_allocate_allocates_again(http, emu):
    _, first = await allocate(http, emu, "SN-1", deviceData={"scale": 1})
    await allocate(http, emu, "SN-2")
    body = {"groupId": "g-1", "sns": ["SN-1", "SN-2", "SN-1"]}
    status, answer = await operation(http, emu, "resetAllocationStatus", body)
    assert status == 200
    assert set(answer) == ENVELOPE
    assert (answer["code"], answer["msg"], answer["data"]) == (0, "OK", ["SN-1", "SN-2"])
    assert uuid.UUID(answer["requestId"]).version == 4
    for sn in ("SN-1", "SN-2"):
        device = emu.state.devices[sn]
        assert (device.allocated_time, device.org_id, device.reprovisioning) == (None, None, True)
    # Allocating again allocates anew (a second allocate of an allocated sn would not).
    await asyncio.sleep(0.002)
    _, again = await allocate(http, emu, "SN-1")
    assert again["code"] == 0
    device = again["data"]
    assert (device["status"]["currentStatus"], device["reprovisioning"]) == ("allocated", False)
    assert device["status"]["allocatedTime"] > first["data"]["status"]["allocatedTime"]
    assert device["deviceData"] == {"capacity": 12}  # the old allocation's data is gone
    assert [(c.action, c.sn, c.sns, c.group_id, c.code) for c in emu.state.calls] == [
        ("allocate", "SN-1", None, None, 0),
        ("allocate", "SN-2", None, None, 0),
        ("resetAllocationStatus", None, ["SN-1", "SN-2", "SN-1"], "g-1", 0),
        ("allocate", "SN-1", None, None, 0),
    ]


async def test_resetting_an_unallocated_device_lists_it(http, emu):
    _, answer = await operation(http, emu, "resetAllocationStatus",
                                {"groupId": "g-2", "sns": ["SN-3"]})  # fmt: skip
    assert (answer["code"], answer["data"]) == (0, ["SN-3"])
    assert emu.state.devices["SN-3"].reprovisioning is True


@pytest.mark.parametrize(
    ("body", "code", "msg"),
    [
        ({"groupId": "g-9", "sns": ["SN-1"]}, 35404, "Group/sn not found"),
        ({"groupId": "g-1", "sns": ["SN-9"]}, 35404, "Group/sn not found"),
        ({"groupId": "g-1", "sns": ["SN-1", "SN-3"]}, 35404, "Group/sn not found"),
        ({"sns": ["SN-1"]}, 99400, "Invalid Argument groupId:groupId is missing"),
        ({"groupId": " ", "sns": ["SN-1"]}, 99400, "Invalid Argument groupId:groupId is missing"),
        ({"groupId": "g-1"}, 99400, "Invalid Argument sns:sns is missing"),
        ({"groupId": "g-1", "sns": []}, 99400, "Invalid Argument sns:sns is missing"),
        ({"groupId": "g-1", "sns": "SN-1"}, 99400, "Invalid Argument sns:sns is missing"),
        ({"groupId": "g-1", "sns": ["SN-1", ""]}, 99400, "Invalid Argument sns:sns is missing"),
        (["g-1"], 99400, "Invalid Argument body: not a JSON object"),
    ],
)
async def test_reset_refusals_change_nothing(http, emu, body, code, msg):
    await allocate(http, emu, "SN-1")
    status, answer = await operation(http, emu, "resetAllocationStatus", body)
    assert status == 200
    assert (answer["code"], answer["msg"], answer["data"]) == (code, msg, None)
    assert emu.state.devices["SN-1"].allocated_time is not None


async def test_reset_without_a_dps_role_is_35603(http, emu):
    await admin(http, emu, "POST", "/_emulator/faults", {"no_dps_role": True})
    body = {"groupId": "g-1", "sns": ["SN-1"]}
    _, answer = await operation(http, emu, "resetAllocationStatus", body)
    assert (answer["code"], answer["msg"]) == (35603, "Unauthorized to access the resource")
    # Only the reset page documents 35603: the other operations go on.
    _, answer = await allocate(http, emu, "SN-2")
    assert answer["code"] == 0


async def test_reset_and_delete_have_no_batch_limit(http, emu):
    sns = [f"B-{i:04d}" for i in range(1500)]
    await admin(
        http, emu, "POST", "/_emulator/devices", [{"sn": sn, "group_id": "g-b"} for sn in sns]
    )
    _, answer = await operation(http, emu, "resetAllocationStatus", {"groupId": "g-b", "sns": sns})
    assert (answer["code"], len(answer["data"])) == (0, 1500)
    _, answer = await operation(http, emu, "delete", {"groupId": "g-b", "snList": sns})
    assert (answer["code"], len(answer["data"])) == (0, 1500)


async def test_accept_any_sn_resets_in_the_demo_group(http):
    async with await start_emulator(accept_any_sn=True) as emu:
        body = {"groupId": "demo-group", "sns": ["ANY-1"]}
        _, answer = await operation(http, emu, "resetAllocationStatus", body)
        assert (answer["code"], answer["data"]) == (0, ["ANY-1"])


# --------------------------------------------------------------------------------------
# Delete DPS Device


async def test_delete_answer_and_it_is_idempotent(http, emu):
    await allocate(http, emu, "SN-1")
    body = {"groupId": "g-1", "snList": ["SN-1", "SN-9", "SN-1"]}
    status, answer = await operation(http, emu, "delete", body)
    assert status == 200
    assert set(answer) == ENVELOPE
    assert (answer["code"], answer["msg"], answer["data"]) == (0, "OK", ["SN-1", "SN-9"])
    assert "SN-1" not in emu.state.devices
    _, again = await operation(http, emu, "delete", body)
    assert (again["code"], again["data"]) == (0, ["SN-1", "SN-9"])
    _, got = await operation(http, emu, "get", sn="SN-1")
    assert got["code"] == 35601
    _, allocated = await allocate(http, emu, "SN-1")
    assert allocated["code"] == 35601
    # The group outlives its devices.
    _, answer = await operation(http, emu, "delete", {"groupId": "g-1", "snList": ["SN-2"]})
    _, answer = await operation(http, emu, "delete", {"groupId": "g-1", "snList": ["SN-2"]})
    assert (answer["code"], answer["data"]) == (0, ["SN-2"])
    assert [(c.action, c.sns, c.group_id) for c in emu.state.calls][:2] == [
        ("allocate", None, None),
        ("delete", ["SN-1", "SN-9", "SN-1"], "g-1"),
    ]


async def test_delete_leaves_an_sn_of_another_group(http, emu):
    _, answer = await operation(http, emu, "delete", {"groupId": "g-1", "snList": ["SN-2", "SN-3"]})
    assert (answer["code"], answer["data"]) == (0, ["SN-2"])
    assert "SN-3" in emu.state.devices


@pytest.mark.parametrize(
    ("body", "code", "msg"),
    [
        ({"groupId": "g-9", "snList": ["SN-1"]}, 35404, "Group/sn not found"),
        ({"snList": ["SN-1"]}, 99400, "Invalid Argument groupId:groupId is missing"),
        ({"groupId": "g-1", "sns": ["SN-1"]}, 99400, "Invalid Argument snList:snList is missing"),
        ({"groupId": "g-1", "snList": []}, 99400, "Invalid Argument snList:snList is missing"),
    ],
)
async def test_delete_refusals_change_nothing(http, emu, body, code, msg):
    _, answer = await operation(http, emu, "delete", body)
    assert (answer["code"], answer["msg"], answer["data"]) == (code, msg, None)
    assert "SN-1" in emu.state.devices


@pytest.mark.parametrize("action", ["resetAllocationStatus", "delete"])
async def test_batches_need_an_org_id(http, emu, action):
    listed = "sns" if action == "resetAllocationStatus" else "snList"
    body = {"groupId": "g-1", listed: ["SN-1"]}
    _, answer = await operation(http, emu, action, body, org_id=" ")
    assert (answer["code"], answer["msg"]) == (99400, "Invalid Argument orgId:orgId is missing")


async def test_wrong_method_is_an_unsupported_action(http, emu):
    tok = await token(http, emu)
    _, answer = await call(http, emu, "GET", {"action": "search", "orgId": ORG}, access_token=tok)
    assert (answer["code"], answer["msg"]) == (
        99400,
        "Invalid Argument action: unsupported value 'search'",
    )


# --------------------------------------------------------------------------------------
# Every operation: the gateway's checks, the faults, the ledger


@pytest.mark.parametrize(("action", "body", "query"), OPERATIONS, ids=OPERATION_IDS)
async def test_every_operation_succeeds_and_is_logged(http, emu, action, body, query):
    status, answer = await operation(http, emu, action, body, **query)
    assert (status, answer["code"]) == (200, 0)
    assert [(c.action, c.http_status, c.code, c.cut) for c in emu.state.calls] == [
        (action, 200, 0, False)
    ]


@pytest.mark.parametrize(("action", "body", "query"), OPERATIONS, ids=OPERATION_IDS)
async def test_every_operation_checks_token_and_signature(http, emu, action, body, query):
    method = "GET" if action == "get" else "POST"
    params = {"action": action, "orgId": ORG} | query
    raw = orjson.dumps(body) if body is not None else b""
    status, answer = await call(http, emu, method, params, raw, access_token="bogus")
    assert (status, answer["code"]) == (200, 1203)
    tok = await token(http, emu)
    status, answer = await call(http, emu, method, params, raw, access_token=tok,
                                signed_params=params | {"orgId": "other"})  # fmt: skip
    assert (status, answer["code"]) == (401, 497)
    status, answer = await call(http, emu, method, params, raw, access_token=tok,
                                headers={"apim-signature": ""})  # fmt: skip
    assert (status, answer["code"]) == (401, 1202)
    assert [(c.action, c.code) for c in emu.state.calls] == [
        (action, 1203),
        (action, 497),
        (action, 1202),
    ]
    assert emu.state.devices["SN-1"].allocated_time is None
    assert "SN-1" in emu.state.devices


@pytest.mark.parametrize(("action", "body", "query"), OPERATIONS, ids=OPERATION_IDS)
async def test_every_operation_suffers_outage_errors_and_latency(http, emu, action, body, query):
    await admin(http, emu, "POST", "/_emulator/faults", {"error_rate": 1.0, "error_status": 502})
    status, answer = await operation(http, emu, action, body, **query)
    assert (status, answer["code"], answer["msg"]) == (502, 502, "Bad Gateway")
    tok = await token(http, emu)
    await admin(http, emu, "POST", "/_emulator/faults", {"error_rate": 0.0, "outage": True})
    method = "GET" if action == "get" else "POST"
    params = {"action": action, "orgId": ORG} | query
    raw = orjson.dumps(body) if body is not None else b""
    async with http.request(
        method, emu.url + DEVICE_URL, params=params, data=raw or None,
        headers=sign_headers(tok, params, raw),
    ) as resp:  # fmt: skip
        assert (resp.status, await resp.text()) == (503, "service unavailable")
    await admin(http, emu, "POST", "/_emulator/faults", {"outage": False, "latency_ms": 100})
    started = time.monotonic()
    status, answer = await call(http, emu, method, params, raw, access_token=tok)
    # Less 2 ms: on uvloop (make test-uvloop) a sleep may end up to about 1 ms early.
    assert time.monotonic() - started >= 0.1 - 0.002
    assert (status, answer["code"]) == (200, 0)
    assert [(c.action, c.http_status, c.code) for c in emu.state.calls] == [
        (action, 502, 502),
        (action, 503, None),
        (action, 200, 0),
    ]
    assert [c.action for c in emu.state.calls if c.action == action] == [action] * 3


async def test_throttling_is_one_budget_for_every_operation(http, emu):
    await admin(http, emu, "POST", "/_emulator/faults", {"throttle_rps": 2, "retry_after": 3})
    tok = await token(http, emu)
    answers = []
    for action, body, query in OPERATIONS[:3]:
        method = "GET" if action == "get" else "POST"
        params = {"action": action, "orgId": ORG} | query
        raw = orjson.dumps(body) if body is not None else b""
        async with http.request(
            method, emu.url + DEVICE_URL, params=params, data=raw or None,
            headers=sign_headers(tok, params, raw),
        ) as resp:  # fmt: skip
            answers.append((action, resp.status, resp.headers.get("Retry-After")))
    assert answers == [("allocate", 200, None), ("get", 200, None), ("search", 429, "3")]


@pytest.mark.parametrize(
    ("action", "body", "query"),
    [
        ("get", None, {"sn": "SN-2"}),
        ("resetAllocationStatus", {"groupId": "g-1", "sns": ["SN-1", "SN-2"]}, {}),
        ("delete", {"groupId": "g-1", "snList": ["SN-2"]}, {}),
    ],
    ids=["get", "reset", "delete"],
)
async def test_fail_sns_fail_every_call_naming_them(http, emu, action, body, query):
    await admin(http, emu, "POST", "/_emulator/faults", {"fail_sns": ["SN-2"], "error_status": 503})
    status, answer = await operation(http, emu, action, body, **query)
    assert (status, answer["code"]) == (503, 503)
    assert "SN-2" in emu.state.devices
    status, answer = await operation(http, emu, "get", sn="SN-1")
    assert (status, answer["code"]) == (200, 0)


@pytest.mark.parametrize(
    ("action", "body", "query"),
    [op for op in OPERATIONS if op[0] != "get"],
    ids=[a for a in OPERATION_IDS if a != "get"],
)
async def test_a_cut_connection_loses_the_answer_not_the_effect(http, emu, action, body, query):
    await admin(http, emu, "POST", "/_emulator/faults", {"cut_rate": 1.0})
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await operation(http, emu, action, body, **query)
    assert [(c.action, c.http_status, c.code, c.cut) for c in emu.state.calls] == [
        (action, 200, 0, True)
    ]
    await admin(http, emu, "POST", "/_emulator/faults", {"cut_rate": 0.0})
    _, answer = await operation(http, emu, "get", sn="SN-1")
    if action == "allocate":
        assert answer["data"]["status"]["currentStatus"] == "allocated"
    elif action == "delete":
        assert answer["code"] == 35601
    else:
        assert answer["code"] == 0


async def test_a_cut_get_is_sent_again_by_aiohttp_on_a_reused_connection(http, emu):
    # aiohttp retries an idempotent request once when a kept-alive connection drops: the
    # log shows both, each cut.
    await admin(http, emu, "POST", "/_emulator/faults", {"cut_rate": 1.0})
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await operation(http, emu, "get", sn="SN-1")
    assert {(c.action, c.code, c.cut) for c in emu.state.calls} == {("get", 0, True)}
    assert 1 <= len(emu.state.calls) <= 2


async def test_calls_can_be_listed_by_action(http, emu):
    for action, body, query in OPERATIONS:
        await operation(http, emu, action, body, **query)
    status, calls = await admin(http, emu, "GET", "/_emulator/calls")
    assert status == 200
    assert isinstance(calls, list)
    assert [c["action"] for c in calls] == OPERATION_IDS
    assert calls[3] | {"at": None} == {
        "seq": 4, "action": "resetAllocationStatus", "sn": None, "sns": ["SN-1"],
        "group_id": "g-1", "expression": None, "org_id": ORG, "device_data": None,
        "http_status": 200, "code": 0, "cut": False, "hung": False, "abandoned": False,
        "at": None,
    }  # fmt: skip
    status, resets = await admin(http, emu, "GET", "/_emulator/calls?action=resetAllocationStatus")
    assert status == 200
    assert resets == [calls[3]]
    assert await admin(http, emu, "GET", "/_emulator/calls?action=nothing") == (200, [])
