"""What an operator meets: metrics and health endpoints, JSON logs, SIGTERM, CLI tools."""

from __future__ import annotations

import asyncio
import json
import sys

import aiohttp
import msgspec
import orjson
import pytest

from pipeline.config import Config
from pipeline.dps.emulator import start_emulator
from pipeline.io import kafka
from pipeline.tools.replay import FixtureMessage, replay_messages
from pipeline.tools.services import free_port
from pipeline.tools.status import collect
from tests import harness
from tests.harness import add_response, read_topic, wait_readyz, worker_env

pytestmark = pytest.mark.services

SECRET = "app-secret-never-logged-77"


async def test_run_serves_ops_endpoints_logs_json_and_stops_on_sigterm(
    cfg: Config, uid: str
) -> None:
    port = free_port()
    async with await start_emulator(app_secret=SECRET, accept_any_sn=True) as emu:
        cfg = msgspec.structs.replace(
            cfg,
            sink=msgspec.structs.replace(
                cfg.sink, dps=msgspec.structs.replace(cfg.sink.dps, base_url=emu.url)
            ),
        )
        env = worker_env(
            cfg,
            METRICS__ENABLED="true",
            METRICS__RUN_PORT=str(port),
            SINK__DPS__APP_SECRET=SECRET,
        )
        proc = await harness.start(
            sys.executable,
            "-m",
            "pipeline",
            "run",
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        await wait_readyz(port, proc)
        message = FixtureMessage(
            topic="$oc/devices/gw-ops/sys/events/down",
            payload=orjson.dumps(add_response(f"ops-{uid}", ["ops-sn-1", "ops-sn-2"])),
        )
        await replay_messages(cfg.mqtt, [message], progress=False)
        allocations = await read_topic(cfg.kafka, cfg.kafka.topics.allocations, expect=2)
        assert sorted(r.key for r in allocations) == [b"ops-sn-1", b"ops-sn-2"]
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                assert (response.status, await response.json()) == (200, {"status": "ok"})
            async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                assert response.status == 200
                assert await response.json() == {
                    "ready": True,
                    "checks": {
                        "ingest.kafka": True,
                        "ingest.mqtt": True,
                        "route.kafka": True,
                        "sink.kafka": True,
                        "sink.dps": True,
                    },
                    "details": {},
                }
            async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
                metrics = await response.text()
        for line in (
            'pipeline_ingest_messages_total{outcome="landed"}',
            "pipeline_router_children_total",
            'pipeline_sink_calls_total{result="ok"}',
            'pipeline_mqtt_connected{session="ingest"} 1.0',
        ):
            assert line in metrics
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        assert proc.stderr is not None
        stderr = (await proc.stderr.read()).decode()
    lines = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    assert lines, "no log lines"
    assert all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
    messages = [line["msg"] for line in lines]
    assert "ingest stopped" in messages
    assert "route stopped" in messages
    assert "sink stopped" in messages
    assert SECRET not in stderr


async def test_topics_create_cli(cfg: Config) -> None:
    env = worker_env(cfg)
    command = [sys.executable, "-m", "pipeline", "topics", "create", "--partitions", "2"]
    first = await harness.start(*command, env=env, stdout=asyncio.subprocess.PIPE)
    out, _ = await first.communicate()
    t = cfg.kafka.topics
    assert out.decode().splitlines() == [f"{name}: created" for name in t.all()]
    second = await harness.start(*command, env=env, stdout=asyncio.subprocess.PIPE)
    out, _ = await second.communicate()
    assert out.decode().splitlines() == [f"{name}: exists" for name in t.all()]
    reader = kafka.consumer(cfg.kafka, group_id=None)
    async with reader:
        assert len(await kafka.partitions(reader, t.added)) == 2


async def test_status_reports_lag_and_dlq(cfg: Config) -> None:
    t = cfg.kafka.topics
    await kafka.ensure_topics(cfg.kafka, t.all())
    async with kafka.producer(cfg.kafka) as producer:
        for i in range(4):
            await producer.send(t.down_events_dlq, b"bad", key=b"gw")
            await producer.send(t.added, b"{}", key=f"k{i}".encode())
        await producer.flush()
    rows = await collect(cfg, sample=0.2)
    assert [row["stage"] for row in rows] == ["ingest", "route", "sink"]
    ingest, route, sink = rows
    assert ingest["dlq"] == 4
    assert route["lag"] == 0
    assert sink["lag"] == 4  # nobody consumed the four added records yet
    assert sink["dlq"] == 0


async def test_dps_emulator_cli_serves_and_stops(cfg: Config) -> None:
    port = free_port()
    proc = await harness.start(
        sys.executable,
        "-m",
        "pipeline",
        "dps-emulator",
        "--port",
        str(port),
        "--accept-any-sn",
        env=worker_env(cfg),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    async with aiohttp.ClientSession() as http, asyncio.timeout(30):
        while True:
            try:
                async with http.get(f"http://127.0.0.1:{port}/_emulator/devices") as response:
                    assert response.status == 200
                    break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.1)
    proc.terminate()
    assert await asyncio.wait_for(proc.wait(), 30) == 0
