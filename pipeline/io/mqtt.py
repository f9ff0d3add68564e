"""The MQTT connection, wrapped once: options, IoTDA device auth and manual acknowledgement."""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import hmac
import logging
from typing import TYPE_CHECKING

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from pipeline.io.tls import client_context

if TYPE_CHECKING:
    from collections.abc import Callable

    from pipeline.config import MqttConfig

__all__ = [
    "InOrderAcks",
    "Received",
    "ack",
    "connect",
    "iotda_credentials",
    "manual_ack",
    "subscribe",
    "subscription_topic",
]

log = logging.getLogger(__name__)

# One timestamp per process for IoTDA sign_type 0: reconnects keep the client id, and
# with it the broker session that holds unacknowledged messages.
_STARTED = dt.datetime.now(dt.UTC)


def iotda_credentials(
    device_id: str, secret: str, sign_type: int = 0, now: dt.datetime | None = None
) -> tuple[str, str, str]:
    """IoTDA device authentication: ``(client_id, username, password)``.

    The client id is ``{device_id}_0_{sign_type}_{YYYYMMDDHH}`` (UTC) and the password is
    HMAC-SHA256 keyed by that same timestamp over the device secret, as lowercase hex.
    """
    stamp = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).strftime("%Y%m%d%H")
    password = hmac.new(stamp.encode(), secret.encode(), hashlib.sha256).hexdigest()
    return f"{device_id}_0_{sign_type}_{stamp}", device_id, password


def subscription_topic(cfg: MqttConfig) -> str:
    """The filter to subscribe to, as a shared subscription when a group is configured."""
    return f"$share/{cfg.shared_group}/{cfg.topic}" if cfg.shared_group else cfg.topic


async def subscribe(client: aiomqtt.Client, cfg: MqttConfig) -> str:
    """Subscribe ``client`` to the configured events; returns the filter subscribed to.

    With MQTT 5, retained messages are sent only for a new subscription (retain handling
    1), so a stale retained event is not handed back on every reconnect of the
    persistent session. (IoTDA itself sends no retained messages.)
    """
    topic = subscription_topic(cfg)
    if cfg.protocol == "5":
        options = SubscribeOptions(qos=cfg.qos, retainHandling=1)
        await client.subscribe(topic, options=options)
    else:
        await client.subscribe(topic, qos=cfg.qos)
    return topic


def connect(
    cfg: MqttConfig, *, client_id: str | None = None, persistent: bool = True
) -> aiomqtt.Client:
    """An unconnected client for ``cfg``; enter it with ``async with``.

    Args:
        cfg: the MQTT section of the configuration.
        client_id: overrides the configured (or IoTDA-derived) client id.
        persistent: keep the session across disconnects (clean session off / MQTT 5
            clean start off with a session expiry), so the broker queues QoS 1
            messages while we are away. Publishers pass ``False``.
    """
    username, password = cfg.username, cfg.password.reveal() if cfg.password else None
    identifier = cfg.client_id
    if cfg.iotda is not None:
        when = None  # sign_type 1: the platform checks the time, so it must be now
        if cfg.iotda.sign_type == 0:
            when = (
                dt.datetime.strptime(cfg.iotda.timestamp, "%Y%m%d%H").replace(tzinfo=dt.UTC)
                if cfg.iotda.timestamp
                else _STARTED
            )
        identifier, username, password = iotda_credentials(
            cfg.iotda.device_id, cfg.iotda.secret.reveal(), cfg.iotda.sign_type, when
        )
    v5 = cfg.protocol == "5"
    properties = None
    if v5:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = cfg.session_expiry if persistent else 0
        # The broker never has more unacknowledged QoS 1 messages out to us than this.
        properties.ReceiveMaximum = max(1, min(cfg.max_inflight, 65535))
    return aiomqtt.Client(
        cfg.host,
        cfg.port,
        identifier=client_id or identifier,
        username=username,
        password=password,
        protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
        clean_session=None if v5 else not persistent,
        clean_start=not persistent,
        properties=properties,
        keepalive=cfg.keepalive,
        tls_context=client_context(cfg.tls) if cfg.tls.enabled else None,
        max_inflight_messages=cfg.max_inflight,
        timeout=10,
    )


def manual_ack(client: aiomqtt.Client) -> None:
    """Stop the client acknowledging messages on receipt; :func:`ack` does it instead.

    aiomqtt 2.x has no public switch, so this reaches the paho client it wraps, here and
    only here; a test pins this down so an aiomqtt upgrade that moves it fails loudly.
    Call before entering the client.
    """
    client._client.manual_ack_set(on=True)  # noqa: SLF001


def ack(client: aiomqtt.Client, message: aiomqtt.Message) -> None:
    """Acknowledge ``message`` to the broker (PUBACK); QoS 0 messages need none."""
    if message.qos > 0:
        client._client.ack(message.mid, message.qos)  # noqa: SLF001


class Received:
    """A message waiting in :class:`InOrderAcks` until it is safe."""

    __slots__ = ("done", "message")

    def __init__(self, message: aiomqtt.Message) -> None:
        self.message = message
        self.done = False


class InOrderAcks:
    """Acknowledges QoS 1 messages in the order they were received, each once it is safe.

    MQTT requires PUBACKs in the order the PUBLISHes arrived ([MQTT-4.6.0-2]); Kafka
    acknowledges records in its own order (partitions complete independently). So a
    message whose record Kafka has taken waits here until every message received before
    it is safe too; then the contiguous prefix is acknowledged. One per connection: a new
    connection starts a new window (the broker redelivers what was never acknowledged).

    Args:
        acknowledge: sends the PUBACK of one message (``functools.partial(ack, client)``).
    """

    def __init__(self, acknowledge: Callable[[aiomqtt.Message], None]) -> None:
        self._acknowledge = acknowledge
        self._window: collections.deque[Received] = collections.deque()

    def __len__(self) -> int:
        return len(self._window)

    def received(self, message: aiomqtt.Message) -> Received:
        """A message arrived; returns its token for :meth:`done`."""
        token = Received(message)
        if message.qos > 0:  # QoS 0 needs no acknowledgement: nothing to wait for
            self._window.append(token)
        return token

    def done(self, token: Received) -> int:
        """The message of ``token`` is safe; returns how many messages were acknowledged."""
        token.done = True
        acked = 0
        window = self._window
        while window and window[0].done:
            message = window.popleft().message
            try:
                self._acknowledge(message)
            except Exception as exc:  # the connection is gone: the broker will redeliver
                log.debug("could not acknowledge mid %d: %s", message.mid, exc)
            acked += 1
        return acked
