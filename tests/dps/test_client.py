"""The DPS client over real HTTP, against the emulator and against bare servers."""

from __future__ import annotations

import asyncio
import re
import uuid
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web

from pipeline.config import DpsConfig, Secret
from pipeline.dps.client import DpsClient
from pipeline.dps.emulator import RunningEmulator, start_emulator
from pipeline.dps.protocol import is_allocated
from pipeline.errors import DpsRejected, DpsTransient
from pipeline.io.http import ConnectFailed
from pipeline.schemas import AllocateRequest, PvsDevice

ORG = "o15735524440141"
DEVICES: list[dict[str, Any]] = [
    {"sn": "SN-1", "group_id": "g-1", "product_key": "pk-1", "device_data": {"capacity": 12}},
    {"sn": "SN-2", "group_id": "g-1"},
    {"sn": "SN-NOGROUP", "group_id": None},
]
decode_device = msgspec.json.Decoder(PvsDevice).decode


def dps_cfg(url: str, **changes) -> DpsConfig:
    return msgspec.structs.replace(DpsConfig(), **({"base_url": url, "timeout": 2.0} | changes))


async def admin(emu: RunningEmulator, method: str, path: str, payload=None):
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, f"{emu.url}{path}", json=payload) as resp,
    ):
        assert resp.status in (200, 204), await resp.text()
        return await resp.json() if resp.status == 200 else None


@pytest.fixture
async def emulator():
    async with await start_emulator(devices=DEVICES) as emu:
        yield emu


@pytest.fixture
async def client(emulator):
    async with DpsClient(dps_cfg(emulator.url)) as dps:
        yield dps


# --------------------------------------------------------------------------------------
# Client against the emulator, over real HTTP


async def test_allocate_returns_the_device_as_dps_sent_it(client, emulator):
    data, request_id = await client.allocate(ORG, AllocateRequest(sn="SN-1"))
    device = decode_device(data)
    assert device.sn == "SN-1"
    assert device.org_id == ORG
    assert device.status is not None
    assert device.status.current_status == "allocated"
    assert device.device_data == {"capacity": 12}
    assert request_id is not None
    assert uuid.UUID(request_id).version == 4
    # Raw is the data exactly as DPS returned it: re-encoding the device gives the same bytes.
    assert bytes(data) == msgspec.json.encode(device)
    calls = await admin(emulator, "GET", "/_emulator/calls")
    assert [
        (c["sn"], c["org_id"], c["device_data"], c["http_status"], c["code"]) for c in calls
    ] == [("SN-1", ORG, None, 200, 0)]


async def test_allocate_sends_device_data(client, emulator):
    data, _ = await client.allocate(ORG, AllocateRequest(sn="SN-2", device_data={"scale": 1}))
    assert decode_device(data).device_data == {"scale": 1}
    calls = await admin(emulator, "GET", "/_emulator/calls")
    assert [c["device_data"] for c in calls] == [{"scale": 1}]


async def test_org_id_is_url_encoded_and_signed_raw(client, emulator):
    org = "o 1&x=é+%"
    data, _ = await client.allocate(org, AllocateRequest(sn="SN-1"))
    assert decode_device(data).org_id == org
    assert [c.org_id for c in emulator.state.calls] == [org]


@pytest.mark.parametrize(
    ("org_id", "sn", "code", "msg"),
    [
        (ORG, "SN-UNKNOWN", 35601, "Verify not pass/sn not found"),
        (ORG, "SN-NOGROUP", 35404, "Group/Device group not found"),
        ("", "SN-1", 35400, "OrgId/sn is required"),
        (ORG, "", 35400, "OrgId/sn is required"),
    ],
)
async def test_business_errors_are_rejected(client, org_id, sn, code, msg):
    with pytest.raises(DpsRejected) as caught:
        await client.allocate(org_id, AllocateRequest(sn=sn))
    assert (caught.value.code, caught.value.http_status) == (code, 200)
    assert caught.value.msg == msg
    assert caught.value.retriable is False
    assert caught.value.retry_after is None
    assert caught.value.request_id is not None
    assert str(caught.value) == f"DPS error {code}: {msg}"


async def test_get_device_before_and_after_allocation(client, emulator):
    before = await client.get_device(ORG, "SN-2")
    assert before is not None
    assert before.status is not None
    assert before.status.current_status == "init"
    assert (before.org_id, before.region_id) == (None, None)
    assert not is_allocated(before)
    data, _ = await client.allocate(ORG, AllocateRequest(sn="SN-2"))
    after = await client.get_device(ORG, "SN-2")
    assert after == decode_device(data)
    assert after.status is not None
    assert after.status.current_status == "allocated"
    assert after.org_id == ORG
    assert is_allocated(after)
    assert [(c.action, c.sn, c.code) for c in emulator.state.calls] == [
        ("get", "SN-2", 0),
        ("allocate", "SN-2", 0),
        ("get", "SN-2", 0),
    ]


async def test_get_device_of_an_unknown_sn_is_none(client, emulator):
    assert await client.get_device(ORG, "SN-UNKNOWN") is None
    assert [(c.action, c.code) for c in emulator.state.calls] == [("get", 35601)]


@pytest.mark.parametrize(("org_id", "sn"), [("", "SN-1"), (ORG, "")])
async def test_get_device_without_org_or_sn_is_rejected(client, org_id, sn):
    with pytest.raises(DpsRejected) as caught:
        await client.get_device(org_id, sn)
    assert (caught.value.code, caught.value.msg) == (35400, "OrgId/sn is required")


async def test_token_is_reused(client, emulator):
    await client.allocate(ORG, AllocateRequest(sn="SN-1"))
    await client.allocate(ORG, AllocateRequest(sn="SN-2"))
    await client.get_device(ORG, "SN-1")
    assert emulator.state.token_requests == 1


async def test_concurrent_callers_share_one_token_request():
    async with (
        await start_emulator(accept_any_sn=True) as emu,
        DpsClient(dps_cfg(emu.url)) as dps,
    ):
        results = await asyncio.gather(
            *(dps.allocate(ORG, AllocateRequest(sn=f"SN-{i}")) for i in range(20))
        )
        assert sorted(decode_device(data).sn for data, _ in results) == sorted(
            f"SN-{i}" for i in range(20)
        )
        assert emu.state.token_requests == 1
        assert len(emu.state.calls) == 20


async def test_token_is_refreshed_before_it_expires():
    async with (
        await start_emulator(devices=DEVICES, token_ttl=2) as emu,
        DpsClient(dps_cfg(emu.url, token_refresh_margin=1.0)) as dps,
    ):
        await dps.allocate(ORG, AllocateRequest(sn="SN-1"))
        await dps.allocate(ORG, AllocateRequest(sn="SN-2"))
        assert emu.state.token_requests == 1
        await asyncio.sleep(1.1)
        await dps.get_device(ORG, "SN-1")
        assert emu.state.token_requests == 2
        assert len(emu.state.tokens) == 1  # the gateway handed back the unexpired token


async def test_expired_token_is_replaced_transparently(client, emulator):
    await client.allocate(ORG, AllocateRequest(sn="SN-1"))
    await admin(emulator, "POST", "/_emulator/reset")  # forgets every issued token
    data, _ = await client.allocate(ORG, AllocateRequest(sn="SN-2"))
    assert decode_device(data).sn == "SN-2"
    assert emulator.state.token_requests == 1
    assert [(c.sn, c.http_status, c.code) for c in emulator.state.calls] == [
        ("SN-2", 200, 1203),
        ("SN-2", 200, 0),
    ]


async def test_token_expired_twice_is_transient():
    async with (
        await start_emulator(devices=DEVICES, token_ttl=0) as emu,
        DpsClient(dps_cfg(emu.url)) as dps,
    ):
        with pytest.raises(DpsTransient) as caught:
            await dps.allocate(ORG, AllocateRequest(sn="SN-1"))
        assert caught.value.code == 1203
        assert caught.value.msg == "access token expired (again, with a freshly fetched token)"
        assert emu.state.token_requests == 2
        assert [c.code for c in emu.state.calls] == [1203, 1203]


async def test_wrong_secret_is_transient_and_never_shown(emulator):
    secret = "s3cr3t-that-must-not-leak"
    cfg = dps_cfg(emulator.url, app_secret=Secret(secret))
    async with DpsClient(cfg) as dps:
        with pytest.raises(DpsTransient) as caught:
            await dps.allocate(ORG, AllocateRequest(sn="SN-1"))
    assert caught.value.code == 1003
    assert caught.value.msg == "token request for app key demo-app-key refused: invalid encryption"
    assert caught.value.retriable is True
    assert caught.value.hint == "check sink.dps.app_key and sink.dps.app_secret"
    assert caught.value.diagnosis() == (
        "DPS code 1003 (token request for app key demo-app-key refused: invalid encryption): "
        "check sink.dps.app_key and sink.dps.app_secret"
    )
    assert secret not in str(caught.value)
    assert secret not in repr(caught.value)
    assert emulator.state.calls == []


async def test_unknown_app_key_is_transient(emulator):
    async with DpsClient(dps_cfg(emulator.url, app_key="nobody")) as dps:
        with pytest.raises(DpsTransient) as caught:
            await dps.allocate(ORG, AllocateRequest(sn="SN-1"))
    assert (caught.value.code, caught.value.msg, caught.value.hint) == (
        1002,
        "token request for app key nobody refused: appKey does not exist",
        "check sink.dps.app_key (the API gateway does not know it)",
    )


async def test_throttling_is_transient_with_retry_after(client, emulator):
    await admin(emulator, "POST", "/_emulator/faults", {"throttle_rps": 1, "retry_after": 3})
    await client.allocate(ORG, AllocateRequest(sn="SN-1"))
    with pytest.raises(DpsTransient) as caught:
        await client.allocate(ORG, AllocateRequest(sn="SN-2"))
    assert caught.value.code == 429
    assert caught.value.msg == "Too Many Requests"
    assert caught.value.retry_after == 3.0
    assert (caught.value.throttled, caught.value.hint) == (True, None)


async def test_injected_server_error_is_transient(client, emulator):
    await admin(emulator, "POST", "/_emulator/faults", {"error_rate": 1.0, "error_status": 502})
    with pytest.raises(DpsTransient) as caught:
        await client.allocate(ORG, AllocateRequest(sn="SN-1"))
    assert (caught.value.code, caught.value.msg) == (502, "Bad Gateway")
    assert caught.value.retry_after is None
    assert (caught.value.throttled, caught.value.hint) == (False, None)
    assert caught.value.diagnosis() == "DPS code 502: Bad Gateway"


async def test_outage_of_the_token_service_is_transient(client, emulator):
    await admin(emulator, "POST", "/_emulator/faults", {"outage": True})
    with pytest.raises(DpsTransient) as caught:
        await client.allocate(ORG, AllocateRequest(sn="SN-1"))
    assert (caught.value.code, caught.value.http_status) == (None, 503)
    assert caught.value.msg == "token service answered HTTP 503: service unavailable"
    assert (caught.value.throttled, caught.value.hint) == (False, None)


async def test_outage_of_dps_is_transient(client, emulator):
    await client.allocate(ORG, AllocateRequest(sn="SN-1"))
    await admin(emulator, "POST", "/_emulator/faults", {"outage": True})
    with pytest.raises(DpsTransient) as caught:
        await client.allocate(ORG, AllocateRequest(sn="SN-2"))
    assert (caught.value.code, caught.value.http_status) == (None, 503)
    assert caught.value.msg == "HTTP 503 without a DPS envelope: service unavailable"
    assert caught.value.request_id is None


async def test_timeout_is_transient(emulator):
    async with DpsClient(dps_cfg(emulator.url, timeout=0.2)) as dps:
        await dps.allocate(ORG, AllocateRequest(sn="SN-1"))
        await admin(emulator, "POST", "/_emulator/faults", {"latency_ms": 400})
        with pytest.raises(DpsTransient) as caught:
            await dps.allocate(ORG, AllocateRequest(sn="SN-2"))
    host = emulator.url.removeprefix("http://")
    assert (caught.value.code, caught.value.http_status) == (None, None)  # no answer
    assert caught.value.msg == f"DPS allocate to {host} timed out after 0.2 s"
    assert isinstance(caught.value.__cause__, TimeoutError)


async def test_connection_refused_is_transient():
    emu = await start_emulator()
    await emu.close()
    async with DpsClient(dps_cfg(emu.url)) as dps:
        with pytest.raises(DpsTransient) as caught:
            await dps.allocate(ORG, AllocateRequest(sn="SN-1"))
    host = emu.url.removeprefix("http://")
    assert caught.value.code is None
    assert caught.value.msg == f"token request: connection refused by {host}"
    assert isinstance(caught.value.__cause__, ConnectFailed)
    assert isinstance(caught.value.__cause__.os_error, ConnectionRefusedError)
    assert caught.value.diagnosis() == (
        f"DPS (token request: connection refused by {host}): "
        "check sink.dps.base_url and that the API gateway is reachable from here"
    )


async def test_a_base_url_without_the_api_says_to_check_it():
    runner = web.AppRunner(web.Application(), access_log=None)  # answers 404 to everything
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        async with DpsClient(dps_cfg(url)) as dps:
            with pytest.raises(DpsTransient) as caught:
                await dps.allocate(ORG, AllocateRequest(sn="SN-1"))
    finally:
        await runner.cleanup()
    assert (caught.value.code, caught.value.http_status, caught.value.msg, caught.value.hint) == (
        None,
        404,
        "token service answered HTTP 404: 404: Not Found",
        "check sink.dps.base_url (no DPS API answers there)",
    )


async def test_client_must_be_opened():
    dps = DpsClient(DpsConfig())
    with pytest.raises(RuntimeError, match="async with"):
        await dps.allocate(ORG, AllocateRequest(sn="SN-1"))


# --------------------------------------------------------------------------------------
# Answers the emulator never gives: a bare server


@pytest.fixture
async def bare_server():
    """A gateway whose token service works and whose DPS answers whatever the test sets."""
    answer: dict[str, web.Response] = {}

    async def token(_request: web.Request) -> web.Response:
        return web.json_response({"status": 0, "data": {"accessToken": "t", "expire": 60}})

    async def device(_request: web.Request) -> web.Response:
        return answer["device"]

    app = web.Application()
    app.router.add_post("/apim-token-service/v2.0/token/get", token)
    app.router.add_post("/dps-service/v2.5/pvs/device", device)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield url, answer
    await runner.cleanup()


@pytest.mark.parametrize(
    ("response", "code", "msg", "retry_after"),
    [
        # An answer without a DPS envelope (an HTML page, say) has an HTTP status, no code.
        (lambda: web.Response(text="OK"), None, "HTTP 200 without a DPS envelope: OK", None),
        (
            lambda: web.json_response({"code": 0, "msg": "OK"}),
            0,
            "DPS answered code 0 without data (HTTP 200)",
            None,
        ),
        (
            lambda: web.Response(
                status=503,
                text="<html>\n  busy\n</html>",
                headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"},
            ),
            None,
            "HTTP 503 without a DPS envelope: <html> busy </html>",
            0.0,
        ),
    ],
)
async def test_unreadable_answers_are_transient(bare_server, response, code, msg, retry_after):
    url, answer = bare_server
    answer["device"] = response()
    async with DpsClient(dps_cfg(url)) as dps:
        with pytest.raises(DpsTransient) as caught:
            await dps.allocate(ORG, AllocateRequest(sn="SN-1"))
    assert (caught.value.code, caught.value.msg, caught.value.retry_after) == (
        code,
        msg,
        retry_after,
    )
    assert caught.value.http_status == answer["device"].status


async def test_unreadable_device_is_transient(bare_server):
    url, answer = bare_server
    answer["device"] = web.json_response({"code": 0, "data": {"groupId": "g"}})
    async with DpsClient(dps_cfg(url)) as dps:
        with pytest.raises(DpsTransient) as caught:
            await dps.allocate(ORG, AllocateRequest(sn="SN-1"))
    assert caught.value.msg == (
        "DPS answered code 0 with an unreadable PvsDevice: Object missing required field `sn`"
    )


async def test_other_client_errors_are_rejected(bare_server):
    url, answer = bare_server
    answer["device"] = web.json_response({"code": 400, "msg": "Bad thing"}, status=400)
    async with DpsClient(dps_cfg(url)) as dps:
        with pytest.raises(DpsRejected) as caught:
            await dps.allocate(ORG, AllocateRequest(sn="SN-1"))
    assert (caught.value.code, caught.value.msg) == (400, "Bad thing")


# --------------------------------------------------------------------------------------
# Get, Search, Reset Device Allocation Status and Delete, against the emulator

OPERATIONS = {
    "get": lambda dps: dps.get_device(ORG, "SN-1"),
    "search": lambda dps: dps.search_devices(ORG, group_id="g-1"),
    "resetAllocationStatus": lambda dps: dps.reset_allocation(ORG, "g-1", ["SN-1"]),
    "delete": lambda dps: dps.delete_devices(ORG, "g-1", ["SN-2"]),
}


async def test_an_ambiguous_allocate_is_settled_by_get_device(client, emulator):
    await admin(emulator, "POST", "/_emulator/faults", {"cut_rate": 1.0})
    with pytest.raises(DpsTransient) as caught:
        await client.allocate(ORG, AllocateRequest(sn="SN-1"))
    host = emulator.url.removeprefix("http://")
    assert caught.value.msg == (
        f"DPS allocate to {host} failed: ExchangeFailed: the server closed the connection "
        "before the whole answer"
    )
    await admin(emulator, "POST", "/_emulator/faults", {"cut_rate": 0.0})
    device = await client.get_device(ORG, "SN-1")
    assert device is not None
    assert is_allocated(device)
    assert [(c.action, c.code, c.cut) for c in emulator.state.calls] == [
        ("allocate", 0, True),
        ("get", 0, False),
    ]


async def test_search_devices_walks_every_page(client, emulator):
    await admin(emulator, "POST", "/_emulator/devices",
                [{"sn": f"P-{i:02d}", "group_id": "g-p"} for i in range(25)])  # fmt: skip
    seen: list[str] = []
    pages = []
    page: int | None = 1
    while page is not None:
        result = await client.search_devices(ORG, group_id="g-p", page=page, page_size=10)
        pages.append((result.page_no, result.page_size, result.total_size, len(result.devices)))
        assert result.request_id is not None
        seen += [device.sn for device in result.devices]
        page = result.next_page
    assert pages == [(1, 10, 25, 10), (2, 10, 25, 10), (3, 10, 25, 5)]
    assert sorted(seen) == [f"P-{i:02d}" for i in range(25)]
    assert [c.expression for c in emulator.state.calls] == ["groupId = 'g-p'"] * 3


async def test_search_devices_by_status_and_sns(client, emulator):
    await client.allocate(ORG, AllocateRequest(sn="SN-2"))
    allocated = await client.search_devices(ORG, group_id="g-1", status="allocated")
    assert [(d.sn, is_allocated(d)) for d in allocated.devices] == [("SN-2", True)]
    assert allocated.next_page is None
    listed = await client.search_devices(ORG, sns=["SN-1", "SN-9", "SN-1"])
    assert [d.sn for d in listed.devices] == ["SN-1"]
    assert (listed.page_no, listed.page_size, listed.total_size) == (1, 10, 1)
    assert emulator.state.calls[-1].expression == "sn in ('SN-1', 'SN-9')"


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({}, "a search needs at least one criterion"),
        ({"sns": []}, "sns: an empty list matches nothing"),
        ({"group_id": "it's"}, 'groupId "it\'s": a search value cannot contain a single quote'),
        ({"group_id": "g", "page": 0}, "page 0, page_size 10: pages start at 1"),
        ({"group_id": "g", "page_size": 1001}, "page 1, page_size 1001: pages start at 1"),
    ],
)
async def test_search_devices_refuses_what_dps_would_not_read(client, emulator, kwargs, error):
    with pytest.raises(ValueError, match=re.escape(error)):
        await client.search_devices(ORG, **kwargs)
    assert (emulator.state.calls, emulator.state.token_requests) == ([], 0)


async def test_search_devices_refused_by_dps(client):
    with pytest.raises(DpsRejected) as caught:
        await client.search_devices("", group_id="g-1")
    assert (caught.value.code, caught.value.msg) == (
        99400,
        "Invalid Argument orgId:orgId is missing",
    )


async def test_reset_allocation_then_allocate_allocates_again(client, emulator):
    first, _ = await client.allocate(ORG, AllocateRequest(sn="SN-1"))
    assert await client.reset_allocation(ORG, "g-1", ["SN-1", "SN-2", "SN-1"]) == ["SN-1", "SN-2"]
    device = await client.get_device(ORG, "SN-1")
    assert device is not None
    assert not is_allocated(device)
    assert device.reprovisioning is True
    await asyncio.sleep(0.002)
    again, _ = await client.allocate(ORG, AllocateRequest(sn="SN-1"))
    assert decode_device(again).status != decode_device(first).status
    assert is_allocated(decode_device(again))
    assert [(c.action, c.sn, c.sns, c.group_id, c.code) for c in emulator.state.calls] == [
        ("allocate", "SN-1", None, None, 0),
        ("resetAllocationStatus", None, ["SN-1", "SN-2"], "g-1", 0),
        ("get", "SN-1", None, None, 0),
        ("allocate", "SN-1", None, None, 0),
    ]


@pytest.mark.parametrize(
    ("batch", "faults", "expected"),
    [
        (("g-9", ["SN-1"]), {}, (35404, "Group/sn not found")),
        (("g-1", ["SN-NOGROUP"]), {}, (35404, "Group/sn not found")),
        (("", ["SN-1"]), {}, (99400, "Invalid Argument groupId:groupId is missing")),
        (("g-1", ["SN-1"]), {"no_dps_role": True}, (35603, "Unauthorized to access the resource")),
    ],
)
async def test_reset_allocation_refusals(client, emulator, batch, faults, expected):
    if faults:
        await admin(emulator, "POST", "/_emulator/faults", faults)
    group_id, sns = batch
    with pytest.raises(DpsRejected) as caught:
        await client.reset_allocation(ORG, group_id, sns)
    assert (caught.value.code, caught.value.msg) == expected
    assert caught.value.retriable is False


@pytest.mark.parametrize("method", ["reset_allocation", "delete_devices"])
async def test_an_empty_batch_sends_nothing(client, emulator, method):
    assert await getattr(client, method)(ORG, "g-1", []) == []
    assert (emulator.state.calls, emulator.state.token_requests) == ([], 0)


async def test_delete_devices_is_idempotent(client, emulator):
    await client.allocate(ORG, AllocateRequest(sn="SN-1"))
    assert await client.delete_devices(ORG, "g-1", ["SN-1", "SN-9"]) == ["SN-1", "SN-9"]
    assert await client.delete_devices(ORG, "g-1", ["SN-1", "SN-9"]) == ["SN-1", "SN-9"]
    assert await client.get_device(ORG, "SN-1") is None
    assert [(c.action, c.sns) for c in emulator.state.calls] == [
        ("allocate", None),
        ("delete", ["SN-1", "SN-9"]),
        ("delete", ["SN-1", "SN-9"]),
        ("get", None),
    ]


async def test_delete_devices_of_an_unknown_group_is_rejected(client):
    with pytest.raises(DpsRejected) as caught:
        await client.delete_devices(ORG, "g-9", ["SN-1"])
    assert (caught.value.code, caught.value.msg) == (35404, "Group/sn not found")


@pytest.mark.parametrize("action", list(OPERATIONS))
async def test_every_operation_succeeds_once_and_is_logged(client, emulator, action):
    await OPERATIONS[action](client)
    assert [(c.action, c.code) for c in emulator.state.calls] == [(action, 0)]


@pytest.mark.parametrize("action", list(OPERATIONS))
async def test_every_operation_replaces_an_expired_token(client, emulator, action):
    await client.get_device(ORG, "SN-1")
    await admin(emulator, "POST", "/_emulator/reset")  # forgets every issued token
    await OPERATIONS[action](client)
    assert [(c.action, c.code) for c in emulator.state.calls] == [(action, 1203), (action, 0)]
    assert emulator.state.token_requests == 1


@pytest.mark.parametrize("action", list(OPERATIONS))
async def test_every_operation_with_a_wrong_secret_is_transient(emulator, action):
    async with DpsClient(dps_cfg(emulator.url, app_secret=Secret("wrong"))) as dps:
        with pytest.raises(DpsTransient) as caught:
            await OPERATIONS[action](dps)
    assert (caught.value.code, caught.value.hint) == (
        1003,
        "check sink.dps.app_key and sink.dps.app_secret",
    )
    assert emulator.state.calls == []


@pytest.mark.parametrize("action", list(OPERATIONS))
async def test_every_operation_under_faults_is_transient(emulator, action):
    host = emulator.url.removeprefix("http://")
    async with DpsClient(dps_cfg(emulator.url, timeout=0.2)) as dps:
        await OPERATIONS[action](dps)  # a token, and the connection, before the faults
        await admin(emulator, "POST", "/_emulator/faults", {"error_rate": 1.0, "error_status": 502})
        with pytest.raises(DpsTransient) as caught:
            await OPERATIONS[action](dps)
        assert (caught.value.code, caught.value.msg) == (502, "Bad Gateway")
        await admin(emulator, "POST", "/_emulator/faults", {"error_rate": 0.0, "outage": True})
        with pytest.raises(DpsTransient) as caught:
            await OPERATIONS[action](dps)
        assert caught.value.msg == "HTTP 503 without a DPS envelope: service unavailable"
        await admin(emulator, "POST", "/_emulator/faults", {"outage": False, "latency_ms": 400})
        with pytest.raises(DpsTransient) as caught:
            await OPERATIONS[action](dps)
        assert caught.value.msg == f"DPS {action} to {host} timed out after 0.2 s"
        await admin(emulator, "POST", "/_emulator/faults",
                    {"latency_ms": 0, "throttle_rps": 1, "retry_after": 3})  # fmt: skip
        await OPERATIONS[action](dps)
        with pytest.raises(DpsTransient) as caught:
            await OPERATIONS[action](dps)
        assert (caught.value.code, caught.value.throttled, caught.value.retry_after) == (
            429,
            True,
            3.0,
        )


# --------------------------------------------------------------------------------------
# Search answers the emulator never gives: a bare server


@pytest.mark.parametrize(
    ("extra", "page_size", "total", "next_page"),
    [
        ({}, 2, None, 2),
        ({}, 3, None, None),
        ({"pagination": "unreadable"}, 2, None, 2),
        ({"pagination": {"pageNo": 1, "pageSize": 2, "totalSize": 2}}, 2, 2, None),
    ],
)
async def test_search_pages_without_a_total(bare_server, extra, page_size, total, next_page):
    url, answer = bare_server
    answer["device"] = web.json_response({"code": 0, "data": [{"sn": "A"}, {"sn": "B"}]} | extra)
    async with DpsClient(dps_cfg(url)) as dps:
        result = await dps.search_devices(ORG, group_id="g", page_size=page_size)
    assert [d.sn for d in result.devices] == ["A", "B"]
    assert (result.total_size, result.next_page) == (total, next_page)


@pytest.mark.parametrize(
    ("call", "data", "msg"),
    [
        (
            lambda dps: dps.search_devices(ORG, group_id="g"),
            {"sn": "A"},
            "DPS answered code 0 with an unreadable PvsDevice list: Expected `array`, got `object`",
        ),
        (
            lambda dps: dps.reset_allocation(ORG, "g", ["A"]),
            [1],
            "DPS answered code 0 with an unreadable sn list: Expected `str`, got `int` - at `$[0]`",
        ),
        (
            lambda dps: dps.delete_devices(ORG, "g", ["A"]),
            None,
            "DPS answered code 0 without data (HTTP 200)",
        ),
    ],
    ids=["search", "reset", "delete"],
)
async def test_unreadable_data_is_transient(bare_server, call, data, msg):
    url, answer = bare_server
    answer["device"] = web.json_response({"code": 0, "data": data})
    async with DpsClient(dps_cfg(url)) as dps:
        with pytest.raises(DpsTransient) as caught:
            await call(dps)
    assert caught.value.msg == msg
