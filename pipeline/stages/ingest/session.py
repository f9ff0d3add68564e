"""One MQTT session of the ingest stage: connect, subscribe, receive, acknowledge in order.

A session is one connection under one identity (the broker keys the persistent session
by its client id): in broker mode ingest holds one, in IoTDA device mode one per
gateway. It hands each message to the worker (:meth:`Ingest.send`), which lands it in
Kafka and calls :meth:`Session.landed`; the session acknowledges the contiguous prefix
of safe messages in arrival order. A Kafka failure, a lost connection or a refused login
ends the connection; the session reconnects with its own backoff, paced with every other
session of the process so that a restart is not a connection storm.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from typing import TYPE_CHECKING, Protocol

import aiomqtt

from pipeline.errors import ConfigError, PipelineError
from pipeline.io import mqtt
from pipeline.io.aio import Backoff, sleep_unless_stopped
from pipeline.ops.metrics import MQTT_BRIDGE_UP, MQTT_CONNECTED, MQTT_RECONNECTS
from pipeline.schemas import utc_now

if TYPE_CHECKING:
    from pipeline.config import MqttConfig
    from pipeline.io.aio import Pacer
    from pipeline.ops.server import Health

__all__ = ["Inbound", "Session"]

log = logging.getLogger(__name__)

_IOTDA_CLIENT_ID = re.compile(r"^(?P<device>.+)_0_[01]_\d{10}$")
_REFUSED = (4, 5, 134, 135)  # bad user name or password / not authorised (3.1.1, 5)


class KafkaFailedError(PipelineError):
    """Kafka did not take a record of this session; it reconnects so MQTT redelivers."""

    retriable = True


class Inbound(mqtt.Received):
    """One received message, until Kafka has its record and it is acknowledged.

    It is its own place in the session's in-order acknowledgements (a
    :class:`~pipeline.io.mqtt.Received`): one object per message, made without a
    dataclass's frozen ``__init__`` (ingest makes thousands a second).
    """

    __slots__ = ("payload", "properties", "received_at", "session", "topic")

    def __init__(
        self,
        message: aiomqtt.Message,
        session: Session,
        *,
        topic: str,
        payload: bytes,
        received_at: str,
        properties: object = None,
    ) -> None:
        self.message = message  # Received's own, set here: one call less per message
        self.done = False
        self.session = session
        self.topic = topic
        self.payload = payload
        self.received_at = received_at
        self.properties = properties
        """The MQTT 5 properties it came with (its ``traceparent`` user property, say)."""


class Sender(Protocol):
    """Where a session's messages go (the ingest worker)."""

    async def send(self, inbound: Inbound) -> None:
        """Hand ``inbound`` to Kafka; call ``inbound.session.landed`` with the answer."""


class Session:
    """One MQTT session.

    Args:
        cfg: the MQTT section.
        who: the identity to connect as.
        filters: the topic filters to subscribe to.
        sender: lands each message in Kafka.
        pacer: paces connection attempts across the sessions of this process.
        health: readiness (``ingest.mqtt`` when alone; ``ingest.mqtt.<name>``, not
            required, when one of many).
        alone: whether this is the only session of the process.
    """

    def __init__(
        self,
        cfg: MqttConfig,
        who: mqtt.Identity,
        filters: list[str],
        *,
        sender: Sender,
        pacer: Pacer,
        health: Health,
        alone: bool,
    ) -> None:
        self.cfg = cfg
        self.who = who
        self._filters = filters
        self._sender = sender
        self._pacer = pacer
        self._health = health
        self._check = "ingest.mqtt" if alone else f"ingest.mqtt.{who.name}"
        self._alone = alone
        self._backoff = Backoff(cfg.reconnect_min, cfg.reconnect_max)
        self._acks: mqtt.InOrderAcks | None = None
        self._client: aiomqtt.Client | None = None
        self.pending = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._failure: BaseException | None = None
        self._failed = asyncio.Event()
        self.connected = False
        self._bridges: dict[str, bool] = {}
        self._refused_before = False
        MQTT_CONNECTED.labels(who.name).set(0)
        for reason in ("refused", "lost", "kafka"):  # series exist from the start (alerts)
            MQTT_RECONNECTS.labels(who.name, reason)
        self._set_health(ok=False, detail="not connected yet")

    def _set_health(self, *, ok: bool, detail: str | None = None) -> None:
        self._health.set(self._check, ok, detail, required=self._alone)

    async def run(self, stop: asyncio.Event, *, retire: bool, abandon: asyncio.Event) -> None:
        """Connect and receive until ``stop`` (or ``abandon``: the producer is being replaced).

        Raises:
            ConfigError: the configuration is known to receive nothing.
        """
        while not (stop.is_set() or abandon.is_set()):
            await self._pacer.wait()
            try:
                await self._connection(stop, abandon, retire=retire)
                self._backoff.reset()
            except (aiomqtt.MqttError, KafkaFailedError) as exc:
                delay = self._ended(exc)
                await sleep_unless_stopped(stop, delay)

    def _ended(self, exc: BaseException) -> float:
        refused = isinstance(exc, aiomqtt.MqttCodeError) and exc.rc in _REFUSED
        reason = "refused" if refused else "kafka" if isinstance(exc, KafkaFailedError) else "lost"
        MQTT_RECONNECTS.labels(self.who.name, reason).inc()
        # A refused login will not fix itself soon: retry slowly (the broker may be told).
        delay = self._backoff.next(floor=self.cfg.reconnect_max if refused else None)
        if refused:
            detail = f"refused by {self.cfg.host}:{self.cfg.port}: {exc} (check its credentials)"
            self._set_health(ok=False, detail=detail)
            if not self._refused_before:
                log.warning(
                    "MQTT session %s %s", self.who.name, detail, extra={"gateway": self.who.name}
                )
            self._refused_before = True
        else:
            self._set_health(ok=False, detail=str(exc))
            log.warning(
                "MQTT session %s ended (%s); reconnecting in %.2f s",
                self.who.name, exc, delay, extra={"gateway": self.who.name},
            )  # fmt: skip
        return delay

    async def _connection(
        self, stop: asyncio.Event, abandon: asyncio.Event, *, retire: bool
    ) -> None:
        client = mqtt.connect(self.cfg, who=self.who)
        mqtt.manual_ack(client)
        self._failure = None
        self._failed.clear()
        async with client:
            await self._refuse_if_deaf(client)
            self._acks = mqtt.InOrderAcks(functools.partial(mqtt.ack_all, client))
            for topic in self._filters:
                await mqtt.subscribe(client, self.cfg, topic)
            if self.cfg.bridge_state:
                await client.subscribe(self.cfg.bridge_state, qos=1)
            self._client = client
            self._up()
            mqtt.buffer_reads(client)
            intake = mqtt.IntakeLimit(client, self.cfg.max_inflight)
            receive = asyncio.create_task(
                self._receive(client, intake), name=f"ingest[{self.who.name}].receive"
            )
            waits = {
                receive,
                asyncio.create_task(stop.wait()),
                asyncio.create_task(abandon.wait()),
                asyncio.create_task(self._failed.wait()),
            }
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                if retire and stop.is_set() and not self._failed.is_set():
                    await self._retire(client, receive)
            finally:
                # Stop intake; messages not yet handed to Kafka stay unacknowledged in the
                # broker's session and come back on the next connection.
                for task in waits:
                    task.cancel()
                await asyncio.gather(*waits, return_exceptions=True)
                self._down()
            # Hand-over: acknowledge what Kafka has; the rest is redelivered.
            await self._drain()
        if not receive.cancelled() and (error := receive.exception()) is not None:
            raise error
        if self._failure is not None:
            raise KafkaFailedError(str(self._failure)) from self._failure

    def _up(self) -> None:
        self.connected = True
        self._refused_before = False
        MQTT_CONNECTED.labels(self.who.name).set(1)
        self._set_health(ok=True)
        log.info(
            "ingest session %s subscribed to %s on %s:%d",
            self.who.name, ", ".join(self._filters), self.cfg.host, self.cfg.port,
        )  # fmt: skip

    def _down(self) -> None:
        self.connected = False
        self._client = None
        MQTT_CONNECTED.labels(self.who.name).set(0)
        self._set_health(ok=False, detail="disconnected")

    async def publish(self, topic: str, payload: bytes) -> None:
        """Publish ``payload`` to ``topic`` (QoS 1) through this session, as its identity.

        Raises:
            aiomqtt.MqttError: the session is not connected, or the publish failed.
        """
        client = self._client
        if client is None:
            msg = f"session {self.who.name} is not connected"
            raise aiomqtt.MqttError(msg)
        await client.publish(topic, payload, qos=1)

    async def _refuse_if_deaf(self, client: aiomqtt.Client) -> None:
        """A shared subscription on a ``$`` topic receives nothing on Mosquitto: refuse."""
        if not (self.cfg.shared_group and self.cfg.topic.startswith("$")):
            return
        version = await mqtt.broker_version(client)
        if version is not None and "mosquitto" in version.lower():
            msg = (
                f"config key mqtt.shared_group: {version} never delivers $-topics such as "
                f"{self.cfg.topic} to a shared subscription, so this ingest would receive "
                "nothing; split the gateways with mqtt.gateways and mqtt.shard instead, or "
                "run replicas without a shared group (the router removes duplicates)"
            )
            raise ConfigError(msg)
        log.warning(
            "mqtt.shared_group with a $-topic filter: some brokers (Mosquitto) deliver "
            "nothing to such a subscription; the broker (%s) did not say what it is. Check "
            "that messages arrive",
            version or "unknown",
        )

    async def _receive(self, client: aiomqtt.Client, intake: mqtt.IntakeLimit) -> None:
        acks = self._acks
        assert acks is not None  # noqa: S101
        bridge_state = self.cfg.bridge_state
        async for message in client.messages:
            intake.took()
            payload = message.payload
            if not isinstance(payload, bytes):  # aiomqtt gives bytes for received messages
                payload = str(payload).encode()
            if bridge_state and message.topic.matches(bridge_state):
                token = acks.received(message)
                self._bridge(message.topic.value, payload)
                acks.done(token)
                continue
            inbound = Inbound(
                message, self, topic=message.topic.value, payload=payload,
                received_at=utc_now(), properties=message.properties,
            )  # fmt: skip
            acks.track(inbound)
            self.pending += 1
            self._idle.clear()
            await self._sender.send(inbound)

    def landed(self, inbound: Inbound, exc: BaseException | None) -> None:
        """Kafka answered for ``inbound``: acknowledge it (in order) or end the connection."""
        self.pending -= 1
        if exc is None:
            if self._acks is not None:
                self._acks.done(inbound)
            if not self.pending:
                self._idle.set()
            return
        if not self.pending:
            self._idle.set()
        if self._failure is None:
            log.error(
                "Kafka did not take a record (%s); MQTT message left unacknowledged",
                exc, extra={"gateway": self.who.name},
            )  # fmt: skip
            self._failure = exc
        self._failed.set()

    async def _drain(self) -> None:
        try:
            async with asyncio.timeout(30):
                await self._idle.wait()
        except TimeoutError:
            log.warning(
                "%d messages of session %s still awaiting Kafka; MQTT will redeliver them",
                self.pending, self.who.name,
            )  # fmt: skip
        if self._acks is not None:
            self._acks.flush()  # what is safe goes out before the DISCONNECT

    async def _retire(self, client: aiomqtt.Client, receive: asyncio.Task[None]) -> None:
        """Stop new messages, land what the broker still has for us, end the session."""
        for topic in self._filters:
            await client.unsubscribe(topic)
        quiet = 0
        while quiet < 5 and not receive.done():  # noqa: PLR2004  (0.2 s polls: 1 s of quiet)
            before = self.pending
            await asyncio.sleep(0.2)
            quiet = quiet + 1 if self.pending == 0 and before == 0 else 0
        await self._drain()
        with contextlib.suppress(aiomqtt.MqttError):
            await mqtt.end_session(client, self.cfg, self.who)
        log.info("ingest session %s retired: the broker keeps nothing more for it", self.who.name)

    def _bridge(self, topic: str, payload: bytes) -> None:
        level = topic.rstrip("/").split("/")
        raw = level[-2] if len(level) >= 2 and level[-1] == "state" else level[-1]  # noqa: PLR2004
        name = match["device"] if (match := _IOTDA_CLIENT_ID.match(raw)) else raw
        up = payload.strip() == b"1"
        if self._bridges.get(name) == up:
            return
        self._bridges[name] = up
        MQTT_BRIDGE_UP.labels(name).set(1 if up else 0)
        detail = None if up else f"the edge broker's bridge {raw} to IoTDA is down"
        self._health.set(f"ingest.bridge.{name}", up, detail, required=False)
        if up:
            log.info("bridge %s is up", name)
        else:
            log.warning("bridge %s is down (the edge broker cannot reach IoTDA as it)", name)
