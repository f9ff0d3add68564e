"""Ingest answers the router's sync requests on the gateway's up topic (real Mosquitto, Kafka)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json

import aiomqtt
import msgspec
import pytest

from pipeline.config import Config, IotdaAuthConfig, Secret, load_config
from pipeline.errors import ConfigError
from pipeline.io import kafka, mqtt
from pipeline.ops.server import Health
from pipeline.schemas import SyncRequest
from pipeline.stages.ingest import Ingest, sync
from tests.harness import caught_up, running, wait_check


def request(gateway: str, version: int) -> bytes:
    return msgspec.json.encode(
        SyncRequest(
            gateway_id=gateway, version=version, missing_from=version + 1,
            missing_to=version + 2, detected_at="2024-12-02T13:00:00.000Z",
        )
    )  # fmt: skip


def test_the_documented_payload() -> None:
    when = dt.datetime(2015, 12, 12, 20, 12, 12, tzinfo=dt.timezone(dt.timedelta(hours=8)))
    assert json.loads(sync.sync_event("gw-1", 41, when)) == {
        "object_device_id": "gw-1",
        "services": [
            {
                "service_id": "$sub_device_manager",
                "event_type": "sub_device_sync_request",
                "event_time": "20151212T121212Z",
                "paras": {"version": 41},
            }
        ],
    }


def test_when_ingest_publishes_and_where() -> None:
    device = IotdaAuthConfig(device_id="gw", secret=Secret("s"))
    base = load_config(environ={}).mqtt
    broker = base
    bridged = msgspec.structs.replace(base, topic="edge/site-1/$oc/devices/+/sys/events/down")
    assert sync.enabled(msgspec.structs.replace(base, iotda=device))
    assert not sync.enabled(broker)  # auto: IoTDA device mode only
    assert sync.enabled(msgspec.structs.replace(bridged, sync_requests="on"))
    assert not sync.enabled(msgspec.structs.replace(base, iotda=device, sync_requests="off"))
    assert mqtt.up_topic(base, "gw-7") == "$oc/devices/gw-7/sys/events/up"
    assert mqtt.up_topic(bridged, "gw-7") == "edge/site-1/$oc/devices/gw-7/sys/events/up"
    assert sync.group_id(base) == "iot-pipeline-ingest-sync"
    with pytest.raises(
        ConfigError,
        match=r"^config key mqtt\.sync_requests \(from PIPELINE_MQTT__SYNC_REQUESTS\): "
        r"mqtt\.topic 'a/\+/b' does not end in /down: no up topic to publish on$",
    ):
        load_config(environ={"PIPELINE_MQTT__TOPIC": "a/+/b", "PIPELINE_MQTT__SYNC_REQUESTS": "on"})


@pytest.mark.services
async def test_device_mode_ingest_publishes_the_sync_request(cfg: Config, uid: str) -> None:
    """Only the requests for the gateway it holds, through that gateway's session."""
    held, other = f"gw-{uid}", f"gw-other-{uid}"
    device = IotdaAuthConfig(device_id=held, secret=Secret("s"))
    cfg = msgspec.structs.replace(cfg, mqtt=msgspec.structs.replace(cfg.mqtt, iotda=device))
    topics = cfg.kafka.topics
    # One partition: the request for the other gateway is handled before the held one's.
    await kafka.ensure_topics(cfg.kafka, [topics.sync_requests], partitions=1)
    up = [mqtt.up_topic(cfg.mqtt, gw) for gw in (other, held)]
    health = Health()
    async with aiomqtt.Client(cfg.mqtt.host, cfg.mqtt.port, identifier=f"watch-{uid}") as watch:
        for topic in up:
            await watch.subscribe(topic, qos=1)
        async with running(Ingest(cfg), health) as task:
            await wait_check(health, "ingest.mqtt", task)
            async with kafka.producer(cfg.kafka) as producer:
                await producer.send_and_wait(
                    topics.sync_requests, request(other, 3), key=other.encode()
                )
                await producer.send_and_wait(
                    topics.sync_requests, request(held, 7), key=held.encode()
                )
            async with asyncio.timeout(30):
                message = await anext(aiter(watch.messages))
            await caught_up(cfg.kafka, sync.group_id(cfg.mqtt), topics.sync_requests)
    assert message.topic.value == f"$oc/devices/{held}/sys/events/up"
    assert message.qos == 1
    assert isinstance(message.payload, bytes)
    event = json.loads(message.payload)
    assert event["object_device_id"] == held
    [service] = event["services"]
    assert {k: v for k, v in service.items() if k != "event_time"} == {
        "service_id": "$sub_device_manager",
        "event_type": "sub_device_sync_request",
        "paras": {"version": 7},
    }
    assert dt.datetime.strptime(service["event_time"], "%Y%m%dT%H%M%SZ").replace(
        tzinfo=dt.UTC
    ) <= dt.datetime.now(dt.UTC)
