"""The router's memory of versions and children, through the real Kafka.

Down-event records are written straight to ``down_events`` (ingest is not under test
here); what the router writes is read back exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import msgspec
import orjson
import pytest
from prometheus_client import REGISTRY

from pipeline.config import Config
from pipeline.errors import StageFailed
from pipeline.io import kafka
from pipeline.ops.server import Health
from pipeline.schemas import ChildState, DownEventRecord
from pipeline.stages import runtime
from pipeline.stages.router import Router
from tests.harness import group_stable, read_topic, running

pytestmark = pytest.mark.services

MANAGER = "$sub_device_manager"


def device(node: str, gateway: str) -> dict[str, Any]:
    return {"parent_device_id": gateway, "node_id": node, "device_id": f"p_{node}", "name": node}


def notify(kind: str, version: int, gateway: str, *nodes: str) -> dict[str, Any]:
    devices = [device(n, gateway) for n in nodes]
    if kind == "delete":
        devices = [{k: d[k] for k in ("parent_device_id", "node_id", "device_id")} for d in devices]
    return {
        "service_id": MANAGER,
        "event_type": f"{kind}_sub_device_notify",
        "event_time": "20241202T130000Z",
        "paras": {"devices": devices, "version": version},
    }


def response(kind: str, event_id: str, gateway: str, *nodes: str) -> dict[str, Any]:
    ok: list[Any] = (
        [device(n, gateway) for n in nodes] if kind == "add" else [f"p_{n}" for n in nodes]
    )
    return {
        "service_id": MANAGER,
        "event_type": f"{kind}_sub_device_response",
        "event_time": "20241202T130000Z",
        "event_id": event_id,
        "paras": {"successful_devices": ok, "failed_devices": []},
    }


async def send(cfg: Config, gateway: str, *services: dict[str, Any]) -> None:
    """One down-event record per service, keyed by the gateway, in order."""
    async with kafka.producer(cfg.kafka) as producer:
        for service in services:
            event = orjson.dumps({"object_device_id": gateway, "services": [service]})
            value = msgspec.json.encode(
                DownEventRecord(
                    gateway_id=gateway,
                    mqtt_topic=f"$oc/devices/{gateway}/sys/events/down",
                    received_at="2024-12-02T13:00:00.000Z",
                    event=msgspec.Raw(event),
                )
            )
            await producer.send_and_wait(cfg.kafka.topics.down_events, value, key=gateway.encode())


def summary(records: list[Any], *fields: str) -> list[tuple[Any, ...]]:
    """(key, the fields) of each record, in the order written (one gateway: one partition)."""
    return [
        (r.key.decode(), *(json.loads(r.value)[f] for f in fields))
        for r in sorted(records, key=lambda r: r.offset)
    ]


async def test_memory_survives_restart_and_takeover(cfg: Config) -> None:
    """Versions and children kept across a replica taking the partition over, then a restart."""
    gw = "gw-life"
    topics = cfg.kafka.topics
    await kafka.ensure_topics(cfg.kafka, Router(cfg).topics(), partitions=1)
    async with contextlib.AsyncExitStack() as first:
        await first.enter_async_context(running(Router(cfg)))
        await send(cfg, gw, notify("add", 1, gw, "d1"), response("add", "ev-1", gw, "d2"))
        await read_topic(cfg.kafka, topics.added, expect=2)
        # A second replica joins; the first leaves and hands it the partition.
        async with running(Router(cfg)):
            await group_stable(cfg.kafka, cfg.router.group_id, 2)
            await first.aclose()
            await send(
                cfg, gw,
                notify("add", 1, gw, "d1"),  # stale: version 1 was seen
                response("add", "ev-2", gw, "d2"),  # d2 is added already
                notify("delete", 2, gw, "d1"),
            )  # fmt: skip
            await read_topic(cfg.kafka, topics.deleted, expect=1)
    # A restart: the memory comes back from router_state.
    async with running(Router(cfg)):
        await send(
            cfg, gw,
            notify("delete", 2, gw, "d1"),  # stale
            response("delete", "ev-3", gw, "d1"),  # d1 is deleted already
            notify("add", 3, gw, "d1"),  # added again
        )  # fmt: skip
        added = await read_topic(cfg.kafka, topics.added, expect=3)
    deleted = await read_topic(cfg.kafka, topics.deleted)
    assert summary(added, "source_event", "version", "generation") == [
        ("p_d1", "add_sub_device_notify", 1, 1),
        ("p_d2", "add_sub_device_response", None, 1),
        ("p_d1", "add_sub_device_notify", 3, 3),
    ]
    assert summary(deleted, "source_event", "version", "generation", "device") == [
        ("p_d1", "delete_sub_device_notify", 2, 2, device("d1", gw)),
    ]
    lifecycle = await read_topic(cfg.kafka, topics.lifecycle)
    assert summary(lifecycle, "state", "generation") == [
        ("p_d1", "added", 1), ("p_d2", "added", 1), ("p_d1", "deleted", 2), ("p_d1", "added", 3),
    ]  # fmt: skip
    assert await read_topic(cfg.kafka, topics.sync_requests) == []
    # The memory itself, as the last transaction of each key left it.
    state = {r.key: json.loads(r.value) for r in await read_topic(cfg.kafka, topics.router_state)}
    assert state[f"v/{gw}".encode()] == {"last": 3, "missing": []}
    assert {
        k: (v["state"], v["generation"]) for k, v in state.items() if k != f"v/{gw}".encode()
    } == {
        f"c/{gw}/p_d1".encode(): ("added", 3),
        f"c/{gw}/p_d2".encode(): ("added", 1),
    }


def gaps_total() -> float:
    return REGISTRY.get_sample_value("pipeline_router_version_gaps_total") or 0.0


async def test_a_gap_is_reported_and_asks_for_a_sync(
    cfg: Config, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pipeline")
    gw = "gw-gap"
    topics = cfg.kafka.topics
    health = Health()
    before = gaps_total()
    async with running(Router(cfg), health):
        await send(cfg, gw, notify("add", 1, gw, "a1"), notify("add", 4, gw, "a4"))
        [request] = await read_topic(cfg.kafka, topics.sync_requests, expect=1)
        assert request.key == gw.encode()
        assert json.loads(request.value) | {"detected_at": None} == {
            "gateway_id": gw, "version": 1, "missing_from": 2, "missing_to": 3,
            "detected_at": None,
        }  # fmt: skip
        await read_topic(cfg.kafka, topics.added, expect=2)  # a4 is applied all the same
        async with asyncio.timeout(10):  # set once the transaction has committed
            while "route.versions" not in health.details():
                await asyncio.sleep(0.02)
        assert gaps_total() == before + 1
        assert health.report()["route.versions"] is True  # seen, but not unready
        assert health.details()["route.versions"].startswith(
            "version gaps open: gw-gap missing 2-3"
        )
        assert [r.getMessage() for r in caplog.records if r.name == "pipeline.stages.router"] == [
            (
                f"gateway {gw} skipped notification versions 2-3; a sync request from version 1 "
                f"is on {topics.sync_requests}"
            )
        ]
    # A restarted router knows the gap is open (from router_state) and says so.
    health = Health()
    async with running(Router(cfg), health):
        async with asyncio.timeout(30):
            while "route.versions" not in health.details():
                await asyncio.sleep(0.02)
        assert health.details()["route.versions"].startswith(
            "version gaps open: gw-gap missing 2-3"
        )
        # The sync's answer fills the gap: the detail goes.
        await send(cfg, gw, notify("add", 2, gw, "a2"), notify("add", 3, gw, "a3"))
        await read_topic(cfg.kafka, topics.added, expect=4)
        async with asyncio.timeout(10):
            while "route.versions" in health.report():
                await asyncio.sleep(0.02)
    assert "route.versions" not in health.report()
    assert len(await read_topic(cfg.kafka, topics.sync_requests)) == 1


async def test_router_state_must_be_partitioned_as_down_events(cfg: Config) -> None:
    topics = cfg.kafka.topics
    await kafka.ensure_topics(cfg.kafka, [topics.down_events], partitions=2)
    await kafka.ensure_topics(cfg.kafka, [topics.router_state], partitions=1)
    with pytest.raises(StageFailed) as raised:
        await runtime.run(Router(cfg), asyncio.Event())
    assert str(raised.value) == (
        f"topic {topics.router_state} (kafka.topics.router_state) has 1 partitions and "
        f"{topics.down_events} has 2: they must be equal (the router keeps partition p's "
        "memory in partition p)"
    )


async def test_an_upgraded_router_reads_the_memory_an_earlier_one_wrote(cfg: Config) -> None:
    """Memory records holding the DeviceInfo (before) and compact ones (now), side by side.

    A compact record's DeviceInfo comes from the child's lifecycle record, looked up when
    a delete needs it: the transaction is made again, each record in it once.
    """
    gw = "gw-upgrade"
    topics = cfg.kafka.topics
    await kafka.ensure_topics(cfg.kafka, Router(cfg).topics(), partitions=1)
    u1, u2 = (orjson.dumps(device(n, gw)) for n in ("u1", "u2"))
    async with kafka.producer(cfg.kafka) as producer:
        for key, value in [
            (f"v/{gw}", b'{"last":1,"missing":[]}'),
            (f"c/{gw}/p_u1", b'{"generation":1,"state":"added","version":1,"device":' + u1 + b"}"),
            (f"c/{gw}/p_u2", b'{"generation":1,"state":"added","version":1}'),
        ]:
            await producer.send_and_wait(topics.router_state, value, key=key.encode(), partition=0)
        state = ChildState(
            device_id="p_u2", gateway_id=gw, state="added", generation=1,
            source_event="add_sub_device_notify", event_id=None, version=1,
            changed_at="2024-12-02T13:00:00.000Z", device=msgspec.Raw(u2),
        )  # fmt: skip
        await producer.send_and_wait(topics.lifecycle, msgspec.json.encode(state), key=b"p_u2")
    async with running(Router(cfg)):
        await send(
            cfg, gw,
            notify("add", 1, gw, "u9"),  # stale: version 1 was seen
            notify("add", 2, gw, "u3"),
            notify("delete", 3, gw, "u1", "u2"),
        )  # fmt: skip
        deleted = await read_topic(cfg.kafka, topics.deleted, expect=2)
    assert summary(await read_topic(cfg.kafka, topics.added), "generation") == [("p_u3", 1)]
    assert summary(deleted, "generation", "device") == [
        ("p_u1", 2, device("u1", gw)),  # from the earlier router's record
        ("p_u2", 2, device("u2", gw)),  # from the lifecycle record
    ]
    lifecycle = await read_topic(cfg.kafka, topics.lifecycle)
    assert summary(lifecycle, "state", "generation") == [
        ("p_u2", "added", 1), ("p_u3", "added", 1), ("p_u1", "deleted", 2), ("p_u2", "deleted", 2),
    ]  # fmt: skip
    memory = {r.key: r.value for r in await read_topic(cfg.kafka, topics.router_state)}
    assert memory[f"c/{gw}/p_u1".encode()] == b'{"generation":2,"state":"deleted","version":3}'
