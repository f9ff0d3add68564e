"""What Kafka refuses, and bugs, never stop ingest or the router: that one record goes to
the DLQ with the reason, the rest flows, nothing is lost."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import orjson
import pytest
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.admin.new_topic import NewTopic
from prometheus_client import REGISTRY

from pipeline.config import Config
from pipeline.core.landing import Lander
from pipeline.core.routing import route
from pipeline.errors import StageFailed
from pipeline.io import kafka
from pipeline.ops.server import Health
from pipeline.schemas import AddedChild, DeviceInfo, DownEventRecord
from pipeline.stages import runtime
from pipeline.stages.ingest import Ingest
from pipeline.stages.router import Router
from pipeline.tools.replay import FixtureMessage, replay_messages
from tests.harness import arrived, read_topic, running, wait_check
from tests.stages.hostile import event

pytestmark = pytest.mark.services


def unexpected(stage: str) -> float:
    return REGISTRY.get_sample_value("pipeline_unexpected_errors_total", {"stage": stage}) or 0.0


async def create(cfg: Config, limits: dict[str, int]) -> None:
    """Create topics with a small max.message.bytes, before a stage would create them."""
    async with kafka.admin(cfg.kafka) as client:
        await client.create_topics(
            [
                NewTopic(name, 1, 1, topic_configs={"max.message.bytes": str(n)})
                for name, n in limits.items()
            ]
        )


async def set_limit(cfg: Config, topic: str, limit: int) -> None:
    async with kafka.admin(cfg.kafka) as client:
        config = {"max.message.bytes": str(limit)}
        await client.alter_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, configs=config)]
        )
        # The broker applies the change when it replays the cluster's metadata log, a
        # moment later (later still on a busy machine): until then it takes bigger records.
        wanted = {"max.message.bytes": None}
        async with asyncio.timeout(30):
            while True:
                [response] = await client.describe_configs(
                    [ConfigResource(ConfigResourceType.TOPIC, topic, configs=wanted)]
                )
                [(_, _, _, _, entries)] = response.resources
                if any(k == "max.message.bytes" and v == str(limit) for k, v, *_ in entries):
                    return
                await asyncio.sleep(0.05)


def sized(event_id: str, sn: str, size: int) -> bytes:
    body = event(event_id, [sn])
    body["services"][0]["paras"]["successful_devices"][0]["description"] = "d" * size
    return orjson.dumps(body)


def landed_ids(records: list[Any]) -> list[str]:
    return [
        orjson.loads(bytes(msgspec.json.decode(r.value, type=DownEventRecord).event))["services"][
            0
        ]["event_id"]
        for r in records
    ]


async def test_ingest_dead_letters_what_the_topic_would_refuse(cfg: Config, uid: str) -> None:
    t = cfg.kafka.topics
    await create(cfg, {t.down_events: 20_000, t.down_events_dlq: 200_000})
    messages = [
        FixtureMessage(
            topic=f"$oc/devices/gw-{uid}/sys/events/down", payload=sized(f"e{i}", f"sn{i}", size)
        )
        for i, size in enumerate((100, 50_000, 100))
    ]
    health = Health()
    async with running(Ingest(cfg), health) as task:
        await wait_check(health, "ingest.mqtt", task)
        await replay_messages(cfg.mqtt, messages, progress=False)
        landed = await read_topic(cfg.kafka, t.down_events, expect=2)
        dlq = await read_topic(cfg.kafka, t.down_events_dlq, expect=1)
    assert landed_ids(landed) == ["e0", "e2"]
    [record] = dlq
    assert record.value == messages[1].payload
    reason = dict(record.headers)["error"].decode()
    size = len(messages[1].payload) + 200  # the envelope around it
    assert reason.startswith("the event record would be ")
    assert int(reason.split()[5].replace(",", "")) in range(size - 100, size + 100)
    assert reason.endswith(
        "bytes, over what Kafka takes (18,976: see kafka.max_record_size and the topic's max.message.bytes)"
    )


async def test_ingest_survives_a_limit_lowered_while_it_runs(cfg: Config, uid: str) -> None:
    t = cfg.kafka.topics
    topic = f"$oc/devices/gw-{uid}/sys/events/down"
    health = Health()
    async with running(Ingest(cfg), health) as task:
        await wait_check(health, "ingest.mqtt", task)
        await set_limit(cfg, t.down_events, 20_000)  # behind ingest's back: Kafka refuses
        await replay_messages(
            cfg.mqtt,
            [
                FixtureMessage(topic=topic, payload=sized(f"e{i}", f"sn{i}", size))
                for i, size in enumerate((100, 50_000, 100))
            ],
            progress=False,
        )
        await arrived(
            cfg.kafka,
            t.down_events,
            until=lambda records: {"e0", "e2"} <= set(landed_ids(records)),
            timeout=90,
        )
        await arrived(cfg.kafka, t.down_events_dlq, 1, timeout=90)
        assert not task.done()
    landed = await read_topic(cfg.kafka, t.down_events)
    dlq = await read_topic(cfg.kafka, t.down_events_dlq)
    # The refused one went to the DLQ once the session restarted with the new limit; the
    # others landed (the first perhaps twice: it was redelivered with the refused one).
    assert set(landed_ids(landed)) == {"e0", "e2"}
    assert [dict(r.headers)["error"].decode().split(" bytes")[0][:26] for r in dlq] == [
        "the event record would be "
    ]


async def test_a_bug_in_ingest_dead_letters_that_message(
    cfg: Config, uid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Lander.land

    def buggy(self: Lander, topic: str, payload: bytes, received_at: str) -> Any:
        if b"boom" in payload:
            msg = "simulated bug"
            raise RuntimeError(msg)
        return real(self, topic, payload, received_at)

    monkeypatch.setattr(Lander, "land", buggy)
    before = unexpected("ingest")
    topic = f"$oc/devices/gw-{uid}/sys/events/down"
    messages = [
        FixtureMessage(topic=topic, payload=orjson.dumps(event("e1", ["a"]))),
        FixtureMessage(topic=topic, payload=orjson.dumps(event("boom", ["b"]))),
        FixtureMessage(topic=topic, payload=orjson.dumps(event("e3", ["c"]))),
    ]
    health = Health()
    async with running(Ingest(cfg), health) as task:
        await wait_check(health, "ingest.mqtt", task)
        await replay_messages(cfg.mqtt, messages, progress=False)
        landed = await read_topic(cfg.kafka, cfg.kafka.topics.down_events, expect=2)
        dlq = await read_topic(cfg.kafka, cfg.kafka.topics.down_events_dlq, expect=1)
    assert landed_ids(landed) == ["e1", "e3"]
    assert [(r.value, dict(r.headers)["error"]) for r in dlq] == [
        (messages[1].payload, b"internal error: RuntimeError: simulated bug")
    ]
    assert unexpected("ingest") == before + 1


async def produce_events(cfg: Config, values: list[bytes]) -> None:
    t = cfg.kafka.topics  # the router's memory is partitioned as its input
    await kafka.ensure_topics(cfg.kafka, [t.down_events, t.router_state], partitions=1)
    async with kafka.producer(cfg.kafka) as producer:
        for value in values:
            record = DownEventRecord(
                gateway_id="gw",
                mqtt_topic="t",
                received_at="2026-11-23T00:00:00.000Z",
                event=msgspec.Raw(value),
            )
            await producer.send_and_wait(
                cfg.kafka.topics.down_events, msgspec.json.encode(record), key=b"gw"
            )


def child_sns(records: list[Any]) -> list[str]:
    return [
        msgspec.json.decode(
            msgspec.json.decode(r.value, type=AddedChild).device, type=DeviceInfo
        ).node_id
        for r in records
    ]


async def test_router_dead_letters_an_event_whose_children_kafka_refuses(cfg: Config) -> None:
    t = cfg.kafka.topics
    await create(cfg, {t.added: 20_000})
    await produce_events(
        cfg, [sized("e1", "a", 100), sized("e2", "big", 50_000), sized("e3", "c", 100)]
    )
    async with running(Router(cfg)):
        added = await read_topic(cfg.kafka, t.added, expect=2)
        dlq = await read_topic(cfg.kafka, t.down_events_dlq, expect=1)
        async with asyncio.timeout(30):
            while await kafka.backlog(cfg.kafka, cfg.router.group_id, t.down_events):
                await asyncio.sleep(0.2)
    assert sorted(child_sns(added)) == ["a", "c"]
    [record] = dlq
    assert msgspec.json.decode(record.value, type=DownEventRecord).gateway_id == "gw"
    assert dict(record.headers)["error"].decode() == (
        "router: Kafka refused the child records of this event: [Error 10] MessageSizeTooLargeError"
    )


async def test_a_bug_in_the_router_dead_letters_that_record(
    cfg: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = route

    def buggy(value: bytes) -> Any:
        if b"boom" in value:
            msg = "simulated bug"
            raise RuntimeError(msg)
        return real(value)

    monkeypatch.setattr("pipeline.stages.router.route", buggy)
    before = unexpected("route")
    await produce_events(
        cfg,
        [
            orjson.dumps(event("e1", ["a"])),
            orjson.dumps(event("boom", ["b"])),
            orjson.dumps(event("e3", ["c"])),
        ],
    )
    async with running(Router(cfg)):
        added = await read_topic(cfg.kafka, cfg.kafka.topics.added, expect=2)
        dlq = await read_topic(cfg.kafka, cfg.kafka.topics.down_events_dlq, expect=1)
    assert sorted(child_sns(added)) == ["a", "c"]
    assert dict(dlq[0].headers)["error"] == b"router: internal error: RuntimeError: simulated bug"
    assert unexpected("route") == before + 1


async def test_router_stops_when_its_dedup_rebuild_fails(
    cfg: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(self: Router, assigned: object) -> None:
        msg = "cannot read the input's history"
        raise OSError(msg)

    monkeypatch.setattr(Router, "rebuild_dedup", broken)
    await produce_events(cfg, [orjson.dumps(event("e1", ["a"]))])
    with pytest.raises(
        StageFailed, match="route stopped: a rebalance callback failed: cannot read"
    ):
        async with asyncio.timeout(60):
            await runtime.run(Router(cfg), asyncio.Event())
