"""Ingest stage: MQTT ``$oc/devices/+/sys/events/down`` -> Kafka, losing nothing.

Each message is acknowledged to the MQTT broker only after Kafka has acknowledged its
record (``acks=all``), and acknowledgements go out in the order the messages arrived
([MQTT-4.6.0-2]). Until then the broker keeps the message in our persistent session, so
a crash at any point means redelivery, never loss. Redeliveries are removed downstream
by the router's (gateway, event_id) de-duplication.

No message can stop the stage: what it becomes is decided by the pure
:class:`~pipeline.core.landing.Lander` (the event, or a DLQ record with the reason),
under limits learned from the topics when each session starts, so Kafka is never handed
a record it would refuse; a bug while handling one message dead-letters that message.
When Kafka does not take a record (unavailable, or a topic's limit lowered since), the
MQTT session ends, so that the broker redelivers what was not yet safe; after a refusal
the producer is replaced (aiokafka's idempotent producer is unusable after one) and the
limits are learned again, so the redelivered message is dead-lettered this time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from typing import TYPE_CHECKING

import aiomqtt
from aiokafka.errors import KafkaError

from pipeline.core.decode import service_label
from pipeline.core.landing import Lander, Landing
from pipeline.io import kafka, mqtt
from pipeline.io.aio import Backoff, sleep_unless_stopped
from pipeline.ops.metrics import (
    INGEST_EVENTS,
    INGEST_INFLIGHT,
    INGEST_MESSAGES,
    MQTT_CONNECTED,
    MQTT_RECONNECTS,
    UNEXPECTED_ERRORS,
)
from pipeline.schemas import utc_now

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer

    from pipeline.config import Config
    from pipeline.ops.server import Health

__all__ = ["Ingest"]

log = logging.getLogger(__name__)


class _KafkaFailedError(Exception):
    """Kafka did not take a record; the session restarts so MQTT redelivers."""


@dataclasses.dataclass(frozen=True, slots=True)
class _Inbound:
    """One received message, until Kafka has its record and it is acknowledged."""

    acks: mqtt.InOrderAcks
    token: mqtt.Received
    topic: str
    payload: bytes
    received_at: str


def _refused(exc: BaseException) -> bool:
    """Kafka said no to this record for what it is, and would say it again."""
    return isinstance(exc, KafkaError) and not exc.retriable


class Ingest:
    """The ingest worker.

    Args:
        cfg: the whole configuration (``mqtt`` and ``kafka`` sections are used).
        health: readiness checks to keep up to date (``mqtt``, ``kafka``) and progress.
    """

    def __init__(self, cfg: Config, health: Health | None = None) -> None:
        self._cfg = cfg
        self._topics = cfg.kafka.topics
        self._health = health
        self._lander = Lander(
            max_payload=cfg.mqtt.max_payload, max_record=cfg.kafka.max_record_size
        )
        self._refused = False
        self._reconnect = Backoff(cfg.mqtt.reconnect_min, cfg.mqtt.reconnect_max)
        self._pending = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._failure: BaseException | None = None
        self._failed = asyncio.Event()
        # Registered now, so /readyz says no until this stage has really subscribed.
        self._set_health("kafka", False)
        self._set_health("mqtt", False)
        if health is not None:
            health.watch("ingest", lambda: self._pending > 0)

    def _set_health(self, name: str, ok: bool, detail: str | None = None) -> None:
        if self._health is not None:
            self._health.set(f"ingest.{name}", ok, detail)

    def _beat(self) -> None:
        if self._health is not None:
            self._health.beat("ingest")

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, reconnecting with capped jittered backoff."""
        await kafka.prepare_topics(
            self._cfg.kafka, [self._topics.down_events, self._topics.down_events_dlq]
        )
        liveness = kafka.Liveness(
            self._cfg.kafka, "ingest", lambda ok, why: self._set_health("kafka", ok, why)
        )
        watcher = asyncio.create_task(liveness.run(), name="ingest.kafka-liveness")
        try:
            while not stop.is_set():
                self._refused = False
                async with kafka.producer(self._cfg.kafka) as producer:
                    await self._sessions(producer, stop)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        log.info("ingest stopped")

    async def _sessions(self, producer: AIOKafkaProducer, stop: asyncio.Event) -> None:
        """MQTT sessions on this producer, until stopped or Kafka refused a record."""
        while not stop.is_set() and not self._refused:
            try:
                await self._learn_limits()
                await self._session(producer, stop)
                self._reconnect.reset()
            except (aiomqtt.MqttError, _KafkaFailedError) as exc:
                MQTT_RECONNECTS.inc()
                delay = self._reconnect.next()
                log.warning("ingest session ended (%s); reconnecting in %.2f s", exc, delay)
                await sleep_unless_stopped(stop, delay)

    async def _learn_limits(self) -> None:
        topics = [self._topics.down_events, self._topics.down_events_dlq]
        try:
            limit = await kafka.record_limit(self._cfg.kafka, topics)
        except KafkaError as exc:
            msg = f"cannot read the topics' record limits: {exc}"
            raise _KafkaFailedError(msg) from exc
        if limit < self._cfg.mqtt.max_payload + 4096:
            log.warning(
                "Kafka takes records of at most %d bytes on %s: events above about that size "
                "will be dead-lettered (raise the topics' max.message.bytes)",
                limit,
                " and ".join(topics),
            )
        self._lander = Lander(max_payload=self._cfg.mqtt.max_payload, max_record=limit)

    async def _session(self, producer: AIOKafkaProducer, stop: asyncio.Event) -> None:
        cfg = self._cfg.mqtt
        client = mqtt.connect(cfg)
        mqtt.manual_ack(client)
        self._failure = None
        self._failed.clear()
        try:
            async with client:
                acks = mqtt.InOrderAcks(functools.partial(mqtt.ack, client))
                topic = await mqtt.subscribe(client, cfg)
                MQTT_CONNECTED.set(1)
                self._set_health("mqtt", True)
                log.info("ingest subscribed to %s on %s:%d", topic, cfg.host, cfg.port)
                receive = asyncio.create_task(
                    self._receive(client, producer, acks), name="ingest.receive"
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

    async def _receive(
        self, client: aiomqtt.Client, producer: AIOKafkaProducer, acks: mqtt.InOrderAcks
    ) -> None:
        async for message in client.messages:
            payload = message.payload
            if not isinstance(payload, bytes):  # aiomqtt gives bytes for received messages
                payload = str(payload).encode()
            inbound = _Inbound(
                acks, acks.received(message), message.topic.value, payload, utc_now()
            )
            await self._send(producer, inbound, self._landing(inbound))

    def _landing(self, inbound: _Inbound) -> Landing:
        try:
            return self._lander.land(inbound.topic, inbound.payload, inbound.received_at)
        except Exception as exc:
            # A bug must not stop the stage, nor hold the message hostage: dead-letter it.
            UNEXPECTED_ERRORS.labels("ingest").inc()
            log.exception("unexpected error handling a message on %s", inbound.topic)
            reason = f"internal error: {type(exc).__name__}: {exc}"
            return self._lander.dead_letter(
                inbound.topic, inbound.payload, inbound.received_at, reason
            )

    async def _send(self, producer: AIOKafkaProducer, inbound: _Inbound, landing: Landing) -> None:
        """Hand one record to the producer; :meth:`_landed` runs with Kafka's answer."""
        topic = self._topics.down_events_dlq if landing.dead else self._topics.down_events
        try:
            future = await producer.send(
                topic, landing.value, key=landing.key, headers=landing.headers
            )
        except KafkaError as exc:
            self._refused = self._refused or _refused(exc)
            raise _KafkaFailedError(str(exc)) from exc
        self._pending += 1
        self._idle.clear()
        INGEST_INFLIGHT.inc()
        future.add_done_callback(functools.partial(self._landed, inbound, landing))

    def _landed(self, inbound: _Inbound, landing: Landing, future: asyncio.Future[object]) -> None:
        self._pending -= 1
        INGEST_INFLIGHT.dec()
        if not self._pending:
            self._idle.set()
        exc = asyncio.CancelledError() if future.cancelled() else future.exception()
        if exc is None:
            self._counted(landing)
            inbound.acks.done(inbound.token)
            self._beat()
            return
        if _refused(exc):
            # Kafka will not take this record as it is; nor, after that, anything else
            # from this producer. Renew it, learn the limits again: the redelivered
            # message is then dead-lettered.
            self._refused = True
        if self._failure is None:
            log.error("Kafka did not take a record (%s); MQTT message left unacknowledged", exc)
            self._failure = exc
        self._failed.set()

    def _counted(self, landing: Landing) -> None:
        if landing.dead:
            INGEST_MESSAGES.labels("dlq").inc()
            log.warning(
                "dead-lettered a message from %s: %s",
                landing.gateway or "an unknown topic",
                landing.reason,
                extra={"gateway": landing.gateway},
            )
            return
        INGEST_MESSAGES.labels("landed").inc()
        if landing.event is not None:
            for service in landing.event.services or ():
                INGEST_EVENTS.labels(*service_label(service)).inc()
