"""Readiness: every stage says "not ready" from its start until it really is."""

from __future__ import annotations

import asyncio

import aiohttp

from pipeline.config import Config, load_config
from pipeline.ops.server import Health, ops_server
from pipeline.stages import runtime
from pipeline.stages.ingest import Ingest
from pipeline.stages.router import Router
from pipeline.stages.sink import Sink
from pipeline.tools.services import free_port


def test_a_stage_made_registers_nothing() -> None:
    # Constructors only keep their configuration: the runtime registers a stage's checks.
    health = Health()
    assert not health.ready  # nothing registered: not ready either
    Ingest(Config())
    Router(Config())
    Sink(Config())
    assert health.report() == {}


async def test_stages_are_not_ready_from_their_start_until_they_really_are() -> None:
    # While the runtime still waits for Kafka, every check it registered says "no".
    closed = f"127.0.0.1:{free_port()}"
    cfg = load_config(environ={"PIPELINE_KAFKA__BOOTSTRAP_SERVERS": closed})
    health = Health()
    stop = asyncio.Event()
    stages: list[runtime.Stage] = [Router(cfg), Sink(cfg)]
    waiting = asyncio.create_task(runtime.run_all(stages, stop, health))
    async with asyncio.timeout(10):
        while len(health.report()) < 3:
            await asyncio.sleep(0.01)
    assert health.report() == {"route.kafka": False, "sink.kafka": False, "sink.dps": False}
    assert not health.ready
    stop.set()
    await asyncio.wait_for(waiting, 10)


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
