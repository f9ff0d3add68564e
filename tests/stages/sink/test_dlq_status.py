"""A DLQ record keeps DPS's code and the HTTP status of its last answer apart.

The sink runs against a gateway that answers each sn its own way: an HTML page with
status 200 (no DPS envelope: a status, no code), DPS's 35404 (a code, status 200), or
nothing before the deadline (neither: its Get DPS Device, asked before a retry, gets
no answer either).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
import pytest
from aiohttp import web

from pipeline.config import Config
from pipeline.ops.server import Health
from pipeline.schemas import AllocationFailure
from pipeline.stages.sink import Sink
from tests.harness import read_topic, running
from tests.stages.sink.support import child, prepare, produce_children

pytestmark = pytest.mark.services

_TIMEOUT = 1.0
"""The DPS client's deadline (the sink reads back its outcomes within twice that)."""


@pytest.fixture
async def gateway(uid: str) -> AsyncIterator[str]:
    """The API gateway: the token service works; DPS answers by sn (see the module)."""

    async def token(_request: web.Request) -> web.Response:
        return web.json_response({"status": 0, "data": {"accessToken": "t", "expire": 600}})

    async def device(request: web.Request) -> web.Response:
        sn = (await request.json())["sn"]
        if sn == f"{uid}-html":
            return web.Response(
                text="<html><body>maintenance</body></html>", content_type="text/html"
            )
        if sn == f"{uid}-nogroup":
            return web.json_response({"code": 35404, "msg": "Group/Device group not found"})
        await asyncio.sleep(_TIMEOUT * 2)  # past the client's deadline: no answer
        return web.json_response({"code": 0})

    async def get_device(_request: web.Request) -> web.Response:
        # Asked after an allocate that got no answer: none either (so still no status).
        await asyncio.sleep(_TIMEOUT * 2)
        return web.json_response({"code": 0})

    app = web.Application()
    app.router.add_post("/apim-token-service/v2.0/token/get", token)
    app.router.add_post("/dps-service/v2.5/pvs/device", device)
    app.router.add_get("/dps-service/v2.5/pvs/device", get_device)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=_TIMEOUT * 2)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def test_dead_letters_keep_the_dps_code_and_the_http_status_apart(
    cfg: Config, uid: str, gateway: str
) -> None:
    s = cfg.sink
    dps = msgspec.structs.replace(s.dps, base_url=gateway, timeout=_TIMEOUT)
    sink = msgspec.structs.replace(
        s, dps=dps, retry_initial=0.05, retry_max=0.2, give_up_after=2.0, breaker_failures=1000
    )
    cfg = msgspec.structs.replace(cfg, sink=sink)
    sns = [f"{uid}-html", f"{uid}-nogroup", f"{uid}-slow"]
    await prepare(cfg)
    await produce_children(cfg, [child(sn) for sn in sns])
    async with running(Sink(cfg), Health()):
        dlq = await read_topic(cfg.kafka, cfg.kafka.topics.allocations_dlq, expect=3)
    failures = {r.key.decode(): msgspec.json.decode(r.value, type=AllocationFailure) for r in dlq}
    assert {sn: (f.error_kind, f.code, f.http_status) for sn, f in failures.items()} == {
        f"{uid}-html": ("exhausted", None, 200),  # an HTML page: not DPS's code 200
        f"{uid}-nogroup": ("rejected", 35404, 200),
        f"{uid}-slow": ("exhausted", None, None),  # timed out: no answer, no status
    }
    assert failures[f"{uid}-html"].msg == (
        "HTTP 200 without a DPS envelope: <html><body>maintenance</body></html>"
    )
    assert failures[f"{uid}-slow"].msg.endswith(f"timed out after {_TIMEOUT} s")
