"""Readiness: every stage says "not ready" from construction until it really is."""

from __future__ import annotations

import asyncio

import aiohttp

from pipeline.config import Config
from pipeline.ops.server import Health, ops_server
from pipeline.stages.ingest import Ingest
from pipeline.stages.router import Router
from pipeline.stages.sink import Sink


def test_stages_register_not_ready_at_construction() -> None:
    health = Health()
    assert not health.ready  # nothing registered: not ready either
    cfg = Config()
    Ingest(cfg, health)
    Router(cfg, health)
    health.set("ingest.kafka", True)
    health.set("route.kafka", True)
    assert not health.ready  # ingest has not subscribed yet
    health.set("ingest.mqtt", True)
    assert health.ready


async def test_sink_registers_not_ready() -> None:
    health = Health()
    Sink(Config(), health)
    assert health.report() == {"sink.kafka": False, "sink.dps": False}


async def test_a_stage_with_work_waiting_and_no_progress_is_stalled() -> None:
    health = Health(stall_after=0.2)
    waiting = {"ingest": True, "route": False}
    health.watch("ingest", lambda: waiting["ingest"])
    health.watch("route", lambda: waiting["route"])
    assert health.stalled() == {}
    await asyncio.sleep(0.3)
    assert list(health.stalled()) == ["ingest"]  # the router has nothing to do: fine
    health.beat("ingest")
    assert health.stalled() == {}
    await asyncio.sleep(0.3)
    waiting["ingest"] = False  # idle is not stuck
    assert health.stalled() == {}


async def test_healthz_fails_while_a_stage_is_stalled() -> None:
    health = Health(stall_after=0.1)
    health.watch("sink", lambda: True)
    async with ops_server("127.0.0.1", 0, health) as port, aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
            assert (response.status, await response.json()) == (200, {"status": "ok"})
        await asyncio.sleep(0.2)
        async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
            body = await response.json()
            assert (response.status, body["status"], list(body["stalled"])) == (
                503,
                "stalled",
                ["sink"],
            )
        health.set("sink.dps", False, "DPS code 1003 (invalid encryption)")
        async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
            assert (response.status, await response.json()) == (
                503,
                {
                    "ready": False,
                    "checks": {"sink.dps": False},
                    "details": {"sink.dps": "DPS code 1003 (invalid encryption)"},
                },
            )
