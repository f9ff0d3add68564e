"""Redrive of the ingest DLQ: payloads go back to their MQTT topic, byte for byte."""

from __future__ import annotations

import json

import orjson
import pytest

from pipeline.config import Config
from pipeline.io import kafka
from pipeline.ops.server import Health
from pipeline.stages.ingest import Ingest
from pipeline.tools.redrive import redrive
from tests.harness import add_response, read_topic, running, wait_check

pytestmark = pytest.mark.services


async def test_redrive_down_events_republishes_to_mqtt(cfg: Config, uid: str) -> None:
    # As if an older decoder had refused this payload: it sits in the DLQ with its topic.
    payload = orjson.dumps(add_response(f"redrive-{uid}", ["r1"]))
    topic = f"$oc/devices/gw-r-{uid}/sys/events/down"
    t = cfg.kafka.topics
    await kafka.ensure_topics(cfg.kafka, t.all())
    async with kafka.producer(cfg.kafka) as producer:
        await producer.send_and_wait(
            t.down_events_dlq,
            payload,
            key=f"gw-r-{uid}".encode(),
            headers=[
                ("error", b"old decoder"),
                ("mqtt-topic", topic.encode()),
                ("received-at", b"x"),
            ],
        )
        await producer.send_and_wait(t.down_events_dlq, b"no topic header", key=None, headers=[])
    assert await redrive(cfg, "down-events", dry_run=True) == 1  # counts, moves nothing
    health = Health()
    async with running(Ingest(cfg), health) as task:
        await wait_check(health, "ingest.mqtt", task)
        assert await redrive(cfg, "down-events") == 1
        landed = await read_topic(cfg.kafka, t.down_events, expect=1)
    assert [r.key for r in landed] == [f"gw-r-{uid}".encode()]
    value = json.loads(landed[0].value)
    assert value["mqtt_topic"] == topic
    assert orjson.dumps(value["event"]) == payload
    assert await redrive(cfg, "down-events") == 0  # moved already
    assert await redrive(cfg, "down-events", from_beginning=True, dry_run=True) == 1


async def test_redrive_skips_tombstones_and_what_cannot_be_redriven(cfg: Config, uid: str) -> None:
    t = cfg.kafka.topics
    await kafka.ensure_topics(cfg.kafka, t.all())
    async with kafka.producer(cfg.kafka) as producer:
        for topic in (t.allocations_dlq, t.down_events_dlq):
            await producer.send_and_wait(topic, None, key=b"tombstone")
            await producer.send_and_wait(
                topic, b"not json", key=b"garbage", headers=[("mqtt-topic", b"x/y")]
            )
        truncated = [
            ("mqtt-topic", b"x/y"),
            ("payload-truncated", b"the first 65536 bytes are kept"),
        ]
        await producer.send_and_wait(t.down_events_dlq, b"{...", key=b"big", headers=truncated)
    assert await redrive(cfg, "allocations") == 0
    # The down-events DLQ: only the readable, whole payload with a topic can go back.
    assert await redrive(cfg, "down-events", dry_run=True) == 1
