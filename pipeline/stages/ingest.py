"""Ingest stage: MQTT ``$oc/devices/+/sys/events/down`` -> Kafka, losing nothing.

Each message is acknowledged to the MQTT broker only after Kafka has acknowledged its
record (``acks=all``). Until then the broker keeps it in our persistent session, so a
crash at any point means redelivery, never loss. Redeliveries are removed downstream by
the router's (gateway, event_id) de-duplication.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
from typing import TYPE_CHECKING

import aiomqtt
import msgspec

from pipeline.core.decode import decode_down, gateway_from_topic, service_label
from pipeline.errors import DecodeError
from pipeline.io import kafka, mqtt
from pipeline.ops.metrics import (
    INGEST_EVENTS,
    INGEST_INFLIGHT,
    INGEST_MESSAGES,
    MQTT_CONNECTED,
    MQTT_RECONNECTS,
)
from pipeline.schemas import DownEventRecord, utc_now

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer

    from pipeline.config import Config
    from pipeline.ops.server import Health

__all__ = ["Ingest"]

log = logging.getLogger(__name__)

_ENCODER = msgspec.json.Encoder()


class _KafkaFailedError(Exception):
    """A record could not be written to Kafka; the session restarts so MQTT redelivers."""


class Ingest:
    """The ingest worker.

    Args:
        cfg: the whole configuration (``mqtt`` and ``kafka`` sections are used).
        health: readiness checks to keep up to date (``mqtt``, ``kafka``).
    """

    def __init__(self, cfg: Config, health: Health | None = None) -> None:
        self._cfg = cfg
        self._topics = cfg.kafka.topics
        self._health = health
        self._pending = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._failure: BaseException | None = None
        self._failed = asyncio.Event()
        # Registered now, so /readyz says no until this stage has really subscribed.
        self._set_health("kafka", False)
        self._set_health("mqtt", False)

    def _set_health(self, name: str, ok: bool) -> None:
        if self._health is not None:
            self._health.set(f"ingest.{name}", ok)

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, reconnecting with capped jittered backoff."""
        await kafka.wait_until_reachable(self._cfg.kafka, stop)
        await kafka.ensure_topics(
            self._cfg.kafka, [self._topics.down_events, self._topics.down_events_dlq]
        )
        async with kafka.producer(self._cfg.kafka) as producer:
            self._set_health("kafka", True)
            attempt = 0
            while not stop.is_set():
                try:
                    await self._session(producer, stop)
                    attempt = 0
                except (aiomqtt.MqttError, _KafkaFailedError) as exc:
                    MQTT_RECONNECTS.inc()
                    delay = min(
                        self._cfg.mqtt.reconnect_max, self._cfg.mqtt.reconnect_min * 2**attempt
                    ) * random.uniform(0.5, 1.0)
                    attempt = min(attempt + 1, 30)
                    log.warning("ingest session ended (%s); reconnecting in %.2f s", exc, delay)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await stop.wait()
            log.info("ingest stopped")

    async def _session(self, producer: AIOKafkaProducer, stop: asyncio.Event) -> None:
        cfg = self._cfg.mqtt
        client = mqtt.connect(cfg)
        mqtt.manual_ack(client)
        self._failure = None
        self._failed.clear()
        try:
            async with client:
                topic = mqtt.subscription_topic(cfg)
                await client.subscribe(topic, qos=cfg.qos)
                MQTT_CONNECTED.set(1)
                self._set_health("mqtt", True)
                log.info("ingest subscribed to %s on %s:%d", topic, cfg.host, cfg.port)
                receive = asyncio.create_task(
                    self._receive(client, producer), name="ingest.receive"
                )
                waits = {
                    receive,
                    asyncio.create_task(stop.wait(), name="ingest.stop"),
                    asyncio.create_task(self._failed.wait(), name="ingest.kafka-failure"),
                }
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    # Stop intake; messages not yet handed to Kafka stay unacknowledged
                    # in the broker's session and come back on the next connection.
                    for task in waits:
                        task.cancel()
                    await asyncio.gather(*waits, return_exceptions=True)
                # Hand-over: acknowledge what Kafka has; the rest is redelivered.
                await self._drain(producer)
        finally:
            MQTT_CONNECTED.set(0)
            self._set_health("mqtt", False)
        if not receive.cancelled() and (error := receive.exception()) is not None:
            raise error
        if self._failure is not None:
            raise _KafkaFailedError(str(self._failure)) from self._failure

    async def _drain(self, producer: AIOKafkaProducer) -> None:
        try:
            async with asyncio.timeout(self._cfg.kafka.request_timeout):
                await producer.flush()
                await self._idle.wait()
        except TimeoutError:
            log.warning("%d messages still awaiting Kafka at shutdown; MQTT will redeliver them",
                        self._pending)  # fmt: skip

    async def _receive(self, client: aiomqtt.Client, producer: AIOKafkaProducer) -> None:
        async for message in client.messages:
            future = await self._land(producer, message)
            self._pending += 1
            self._idle.clear()
            INGEST_INFLIGHT.inc()
            future.add_done_callback(
                functools.partial(self._landed, client=client, message=message)
            )

    def _landed(
        self, future: asyncio.Future[object], *, client: aiomqtt.Client, message: aiomqtt.Message
    ) -> None:
        self._pending -= 1
        INGEST_INFLIGHT.dec()
        if not self._pending:
            self._idle.set()
        if future.cancelled() or future.exception() is not None:
            exc = future.exception() if not future.cancelled() else asyncio.CancelledError()
            if self._failure is None:
                log.error("Kafka did not take a record (%s); MQTT message left unacknowledged", exc)
                self._failure = exc
            self._failed.set()
            return
        try:
            mqtt.ack(client, message)
        except Exception as exc:  # the connection is gone: the broker will redeliver
            log.debug("could not acknowledge mid %d: %s", message.mid, exc)

    async def _land(
        self, producer: AIOKafkaProducer, message: aiomqtt.Message
    ) -> asyncio.Future[object]:
        """Hand one message to the producer; returns the future of Kafka's acknowledgement."""
        topic = message.topic.value
        payload = message.payload
        if not isinstance(payload, bytes):  # aiomqtt always gives bytes for received messages
            payload = str(payload).encode()
        received_at = utc_now()
        gateway = gateway_from_topic(topic)
        event = None
        if gateway is None:
            reason = (
                f"MQTT topic {topic!r} does not match $oc/devices/{{device_id}}/sys/events/down"
            )
        else:
            try:
                event = decode_down(payload)
            except DecodeError as exc:
                reason = str(exc)
        if event is None or gateway is None:
            INGEST_MESSAGES.labels("dlq").inc()
            log.warning("dead-lettering message on %s: %s", topic, reason)
            return await producer.send(  # type: ignore[no-any-return]
                self._topics.down_events_dlq,
                payload,
                key=gateway.encode() if gateway else None,
                headers=[
                    ("error", reason.encode()),
                    ("mqtt-topic", topic.encode()),
                    ("received-at", received_at.encode()),
                ],
            )
        for service in event.services or ():
            INGEST_EVENTS.labels(*service_label(service)).inc()
        INGEST_MESSAGES.labels("landed").inc()
        record = DownEventRecord(
            gateway_id=gateway,
            mqtt_topic=topic,
            received_at=received_at,
            event=msgspec.Raw(payload),
        )
        return await producer.send(  # type: ignore[no-any-return]
            self._topics.down_events, _ENCODER.encode(record), key=gateway.encode()
        )
