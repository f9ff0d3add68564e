"""``pipeline demo``: bring up the local services and run the flow once, end to end."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING

from rich.console import Console

from pipeline import kafka, mqtt
from pipeline.services import services

if TYPE_CHECKING:
    from pipeline.config import Config

__all__ = ["run"]


async def run(cfg: Config) -> int:
    """Start Mosquitto and Kafka, then push one message through each and read it back."""
    console = Console(stderr=True)
    await asyncio.to_thread(services, "up")
    tag = uuid.uuid4().hex[:8]
    started = time.monotonic()

    topic = f"demo/{tag}"
    async with mqtt.connect(cfg.mqtt, client_id=f"demo-{tag}", persistent=False) as client:
        await client.subscribe(topic, qos=1)
        await client.publish(topic, b"hello mqtt", qos=1)
        async with asyncio.timeout(10):
            async for message in client.messages:
                mqtt_payload = bytes(message.payload)
                break

    ktopic = f"demo.{tag}"
    await kafka.ensure_topics(cfg.kafka, [ktopic], partitions=1)
    async with kafka.producer(cfg.kafka) as producer:
        await producer.send_and_wait(ktopic, b"hello kafka", key=tag.encode())
    async with kafka.consumer(cfg.kafka, ktopic, group_id=None) as consumer:
        record = await asyncio.wait_for(consumer.getone(), 30)

    console.print(f"MQTT  {cfg.mqtt.host}:{cfg.mqtt.port}  {topic}: {mqtt_payload.decode()}")
    console.print(f"Kafka {cfg.kafka.bootstrap_servers}  {ktopic}: {record.value.decode()}")
    console.print(f"smoke flow ok in {time.monotonic() - started:.2f} s")
    return 0
