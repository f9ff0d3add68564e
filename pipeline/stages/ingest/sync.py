"""Sync requests: ask IoTDA again for the notifications a gateway missed.

The router writes a :class:`~pipeline.schemas.SyncRequest` to ``kafka.topics.sync_requests``
when a gateway's notification versions skip. Ingest holds the gateway's MQTT session, so
it answers: it publishes the documented ``sub_device_sync_request`` (IoTDA "Gateway
Synchronizing Child Device Information") on the gateway's up topic, carrying the last
version seen, and the platform sends the later versions' notifications again. In IoTDA
device mode that is the default (``mqtt.sync_requests = "auto"``); through an edge
broker it is the gateway software's job unless ``mqtt.sync_requests = "on"``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import TYPE_CHECKING

import aiomqtt
import msgspec
from aiokafka.errors import KafkaError

from pipeline.io import kafka, mqtt
from pipeline.io.aio import Backoff, sleep_unless_stopped
from pipeline.schemas import SUB_DEVICE_MANAGER, SYNC_REQUEST, SyncRequest

if TYPE_CHECKING:
    from collections.abc import Callable

    from aiokafka import ConsumerRecord

    from pipeline.config import Config, MqttConfig
    from pipeline.stages.ingest.session import Session

__all__ = ["SyncRequests", "enabled", "group_id", "sync_event"]

log = logging.getLogger(__name__)

_DECODER = msgspec.json.Decoder(SyncRequest)
_ENCODER = msgspec.json.Encoder()
_PUBLISH_TIMEOUT = 10.0


def enabled(cfg: MqttConfig) -> bool:
    """Whether ingest publishes sync requests (``auto``: in IoTDA device mode only)."""
    return cfg.sync_requests == "on" or (cfg.sync_requests == "auto" and cfg.iotda is not None)


def group_id(cfg: MqttConfig) -> str:
    """The consumer group of this ingest's sync requests: its own, as its gateways are."""
    return f"{cfg.client_id}-sync"


def sync_event(gateway: str, version: int, now: dt.datetime) -> bytes:
    """The ``sub_device_sync_request`` payload, as IoTDA documents it (pure)."""
    return _ENCODER.encode({
        "object_device_id": gateway,
        "services": [{
            "service_id": SUB_DEVICE_MANAGER,
            "event_type": SYNC_REQUEST,
            "event_time": now.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ"),
            "paras": {"version": version},
        }],
    })  # fmt: skip


class SyncRequests:
    """Consume the sync requests and publish those of the gateways this ingest holds.

    Args:
        cfg: the whole configuration.
        holder: the session that holds a gateway, or None when this ingest does not.
    """

    def __init__(self, cfg: Config, holder: Callable[[str], Session | None]) -> None:
        self.cfg = cfg
        self._holder = holder
        self._retry = Backoff(0.5, 10.0)

    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop``; a request is committed once published (or not this ingest's)."""
        k = self.cfg.kafka
        while not stop.is_set():
            try:
                consumer = kafka.consumer(
                    k, k.topics.sync_requests, group_id=group_id(self.cfg.mqtt)
                )
                async with consumer:
                    while not stop.is_set():
                        batch = await consumer.getmany(timeout_ms=500)
                        for records in batch.values():
                            for record in records:
                                if not await self._answer(record, stop):
                                    return  # stopped: the rest is read again next time
                        if batch:
                            await consumer.commit()
            except KafkaError as exc:
                if not exc.retriable:
                    raise
                delay = self._retry.next()
                log.warning("sync requests: %s; again in %.1f s", exc, delay)
                await sleep_unless_stopped(stop, delay)

    async def _answer(self, record: ConsumerRecord[bytes, bytes], stop: asyncio.Event) -> bool:
        """Publish ``record``'s request if this ingest holds its gateway; False if stopped."""
        try:
            request = _DECODER.decode(record.value)
        except msgspec.DecodeError as exc:
            log.warning("skipping a sync request that is not one: %s", exc)
            return True
        session = self._holder(request.gateway_id)
        if session is None:
            return True
        topic = mqtt.up_topic(self.cfg.mqtt, request.gateway_id)
        payload = sync_event(request.gateway_id, request.version, dt.datetime.now(dt.UTC))
        backoff = Backoff(0.2, 5.0)
        while True:
            try:
                async with asyncio.timeout(_PUBLISH_TIMEOUT):
                    await session.publish(topic, payload)
            except (aiomqtt.MqttError, TimeoutError) as exc:  # not connected now: wait
                if await sleep_unless_stopped(stop, backoff.next()):
                    return False
                log.debug("sync request for %s waits for its session: %s", request.gateway_id, exc)
                continue
            log.info(
                "asked IoTDA to resend gateway %s's notifications after version %d "
                "(versions %d-%d never arrived)",
                request.gateway_id, request.version, request.missing_from, request.missing_to,
                extra={"gateway": request.gateway_id},
            )  # fmt: skip
            return True
