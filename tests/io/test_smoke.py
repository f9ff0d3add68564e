"""The real brokers answer: a round trip through Mosquitto and one through Kafka."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from pipeline.config import Config
from pipeline.io import kafka, mqtt

pytestmark = pytest.mark.services


async def test_mqtt_round_trip(cfg: Config, uid: str) -> None:
    topic = f"smoke/{uid}"
    payloads = [f"message {i} \N{SNOWMAN}".encode() for i in range(5)]
    async with mqtt.connect(cfg.mqtt, client_id=f"smoke-{uid}", persistent=False) as client:
        await client.subscribe(topic, qos=1)
        for payload in payloads:
            await client.publish(topic, payload, qos=1)
        received = []
        async with asyncio.timeout(10):
            async for message in client.messages:
                received.append((str(message.topic), message.payload, message.qos))
                if len(received) == len(payloads):
                    break
    assert received == [(topic, p, 1) for p in payloads]


async def test_kafka_round_trip(cfg: Config, uid: str) -> None:
    topic = f"smoke.{uid}"
    assert await kafka.ensure_topics(cfg.kafka, [topic], partitions=2) == [topic]
    assert await kafka.ensure_topics(cfg.kafka, [topic]) == []  # idempotent
    sent = {f"key-{i}".encode(): f"value-{i}".encode() for i in range(20)}
    async with kafka.producer(cfg.kafka) as producer:
        for key, value in sent.items():
            await producer.send(topic, value, key=key)
        await producer.flush()
    received: dict[bytes, bytes] = {}
    async with kafka.consumer(cfg.kafka, topic, group_id=f"smoke-{uid}") as consumer:
        async with asyncio.timeout(30):
            while len(received) < len(sent):
                batch = await consumer.getmany(timeout_ms=1000)
                for records in batch.values():
                    received.update((r.key, r.value) for r in records)
    assert received == sent


async def test_mqtt_session_keeps_unacked_message(cfg: Config, uid: str) -> None:
    """Manual ack: an unacknowledged QoS 1 message is redelivered to the same session."""
    topic = f"smoke/{uid}/ack"

    async def receive_one(ack: bool) -> bytes | None:
        client = mqtt.connect(cfg.mqtt, client_id=f"sess-{uid}")
        mqtt.manual_ack(client)
        async with client:
            await client.subscribe(topic, qos=1)
            try:
                async with asyncio.timeout(3):
                    async for message in client.messages:
                        if ack:
                            mqtt.ack(client, message)
                            await asyncio.sleep(0.2)  # let the PUBACK reach the broker
                        return bytes(message.payload)
            except TimeoutError:
                return None
        return None

    # Create the persistent session and subscription before publishing.
    assert await receive_one(ack=True) is None
    async with mqtt.connect(cfg.mqtt, client_id=f"pub-{uid}", persistent=False) as pub:
        await pub.publish(topic, b"keep me", qos=1)
    assert await receive_one(ack=False) == b"keep me"  # received, not acked
    assert await receive_one(ack=True) == b"keep me"  # redelivered, acked now
    assert await receive_one(ack=True) is None  # gone


async def test_state_topics_are_made_compacted(cfg: Config) -> None:
    t = cfg.kafka.topics
    await kafka.ensure_topics(cfg.kafka, t.all())
    wanted = {"cleanup.policy": None}
    async with kafka.admin(cfg.kafka) as client:
        responses = await client.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, name, configs=wanted) for name in t.all()]
        )
    policies = {
        name: {key: value for key, value, *_ in entries}["cleanup.policy"]
        for response in responses
        for _, _, _, name, entries in response.resources
    }
    assert policies == {
        name: "compact" if name in (t.lifecycle, t.router_state) else "delete" for name in t.all()
    }
