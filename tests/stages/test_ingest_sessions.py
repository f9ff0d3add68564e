"""Ingest's sessions: gateways split between replicas on the real topics, and retiring."""

from __future__ import annotations

import collections
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import orjson
import pytest

from pipeline.config import Config
from pipeline.core.shards import shard_of
from pipeline.ops.server import Health
from pipeline.stages.ingest import Ingest, sessions_for
from pipeline.tools.replay import FixtureMessage, replay_messages
from tests.harness import add_response, read_topic, running, wait_check

pytestmark = pytest.mark.services


def on_gateways(cfg: Config, gateways: list[str], **mqtt: Any) -> Config:
    """``cfg`` on the real $oc/... topics, subscribed to ``gateways`` only."""
    return msgspec.structs.replace(
        cfg,
        mqtt=msgspec.structs.replace(
            cfg.mqtt, topic="$oc/devices/+/sys/events/down", gateways=gateways, **mqtt
        ),
    )


def events(gateways: list[str], per_gateway: int, tag: str) -> list[FixtureMessage]:
    return [
        FixtureMessage(
            topic=f"$oc/devices/{gw}/sys/events/down",
            payload=orjson.dumps(add_response(f"{tag}-{gw}-{i}", [f"{gw}-{i}"])),
        )
        for i in range(per_gateway)
        for gw in gateways
    ]


def event_ids(records: list[Any]) -> list[str]:
    return [json.loads(r.value)["event"]["services"][0]["event_id"] for r in records]


@contextlib.asynccontextmanager
async def ingest(cfg: Config, *, retire: bool = False) -> AsyncIterator[Ingest]:
    health = Health()
    worker = Ingest(cfg, retire=retire)
    async with running(worker, health) as task:
        await wait_check(health, "ingest.mqtt", task)
        yield worker


def test_one_subscription_per_gateway_and_shards_split_a_list() -> None:
    gateways = [f"gw-{i}" for i in range(40)]
    cfg = on_gateways(Config(), gateways)
    [(who, filters)] = sessions_for(cfg)
    assert (who.name, who.client_id) == ("ingest", "iot-pipeline-ingest")
    assert filters == [f"$oc/devices/{gw}/sys/events/down" for gw in gateways]
    halves = [sessions_for(on_gateways(Config(), gateways, shard=f"{i}/2"))[0][1] for i in range(2)]
    assert sorted(halves[0] + halves[1]) == sorted(filters)  # together: all, once
    assert not set(halves[0]) & set(halves[1])
    assert all(shard_of(f.split("/")[2], 2) == 0 for f in halves[0])
    assert 10 < len(halves[0]) < 30  # a fair split of 40


async def test_replicas_with_shards_split_the_gateways_on_the_real_topics(
    cfg: Config, uid: str
) -> None:
    gateways = [f"gw-{uid}-{i}" for i in range(12)]
    replicas = [
        on_gateways(cfg, gateways, shard=f"{i}/2", client_id=f"ingest-{uid}-{i}") for i in range(2)
    ]
    messages = events(gateways, 20, uid)
    async with ingest(replicas[0]), ingest(replicas[1]):
        assert await replay_messages(cfg.mqtt, messages, progress=False) == len(messages)
        records = await read_topic(cfg.kafka, cfg.kafka.topics.down_events, expect=len(messages))
    # Each message landed once (by the replica owning its gateway), in its gateway's order.
    assert sorted(event_ids(records)) == sorted(
        f"{uid}-{gw}-{i}" for i in range(20) for gw in gateways
    )
    per_gateway = collections.defaultdict(list)
    for event_id in event_ids(records):
        gateway, _, n = event_id.removeprefix(f"{uid}-").rpartition("-")
        per_gateway[gateway].append(int(n))
    assert all(ns == list(range(20)) for ns in per_gateway.values())


async def test_a_retired_session_is_gone_and_a_kept_one_queues(cfg: Config, uid: str) -> None:
    gateway = f"gw-{uid}"
    kept = on_gateways(cfg, [gateway], client_id=f"kept-{uid}")
    retired = on_gateways(cfg, [gateway], client_id=f"retired-{uid}")
    async with ingest(kept), ingest(retired, retire=True):
        await replay_messages(cfg.mqtt, events([gateway], 50, f"{uid}-a"), progress=False)
        first = await read_topic(cfg.kafka, cfg.kafka.topics.down_events, expect=100)
    # Both took all 50 (no shared group: active-active), and both stopped.
    assert collections.Counter(event_ids(first)) == {f"{uid}-a-{gateway}-{i}": 2 for i in range(50)}
    # Published while both are down: the kept session queues them, the retired one is gone.
    await replay_messages(cfg.mqtt, events([gateway], 30, f"{uid}-b"), progress=False)
    async with ingest(kept), ingest(retired):
        records = await read_topic(cfg.kafka, cfg.kafka.topics.down_events, expect=130)
    later = [e for e in event_ids(records) if e.startswith(f"{uid}-b-")]
    assert sorted(later) == sorted(f"{uid}-b-{gateway}-{i}" for i in range(30))  # once
