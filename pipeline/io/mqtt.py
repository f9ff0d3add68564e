"""The MQTT connection, wrapped once: options, IoTDA device auth and manual acknowledgement."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import hashlib
import hmac
import logging
import ssl
import struct
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import aiomqtt
from aiomqtt.exceptions import MqttConnectError  # not re-exported by aiomqtt 2.x
from paho.mqtt.client import PUBACK, connack_string
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from pipeline.config import Secret
from pipeline.errors import ServiceUnreachable
from pipeline.io import _aiomqtt_internals
from pipeline.io.aio import wait_for_service, why_unreachable
from pipeline.tls import client_context

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Sequence

    from pipeline.config import Gateway, MqttConfig

__all__ = [
    "Identity",
    "InOrderAcks",
    "IntakeLimit",
    "Received",
    "ack",
    "ack_all",
    "broker_version",
    "buffer_reads",
    "connect",
    "connected",
    "end_session",
    "identity",
    "iotda_credentials",
    "manual_ack",
    "probe",
    "subscribe",
    "subscription_topic",
    "up_topic",
    "wait_until_reachable",
]

_PROBE_TIMEOUT = 10.0

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


def subscription_topic(cfg: MqttConfig, gateway: str | None = None) -> str:
    """The filter to subscribe to.

    That is ``mqtt.topic``, with ``+`` replaced by ``gateway`` when one is given, as a
    shared subscription when a group is configured.
    """
    topic = cfg.topic.replace("+", gateway, 1) if gateway is not None else cfg.topic
    return f"$share/{cfg.shared_group}/{topic}" if cfg.shared_group else topic


def up_topic(cfg: MqttConfig, gateway: str) -> str:
    """The gateway's up topic: ``mqtt.topic`` for ``gateway``, ``.../down`` made ``.../up``.

    An edge bridge's prefix is kept, as it is for the down topic (``mqtt.topic`` ending
    in ``/down`` is checked when the configuration is loaded, where it matters).
    """
    down = cfg.topic.replace("+", gateway, 1)
    return down.removesuffix("down") + "up"


async def subscribe(client: aiomqtt.Client, cfg: MqttConfig, topic: str) -> None:
    """Subscribe ``client`` to ``topic`` at the configured QoS.

    With MQTT 5, retained messages are sent only for a new subscription (retain handling
    1), so a stale retained event is not handed back on every reconnect of the
    persistent session. (IoTDA itself sends no retained messages.)
    """
    if cfg.protocol == "5":
        options = SubscribeOptions(qos=cfg.qos, retainHandling=1)
        await client.subscribe(topic, options=options)
    else:
        await client.subscribe(topic, qos=cfg.qos)


@dataclasses.dataclass(frozen=True, slots=True)
class Identity:
    """Who a session connects as: client id (the broker keys the session by it), credentials."""

    name: str
    """For logs, metrics and readiness: the gateway's device id, or ``ingest``."""
    client_id: str
    username: str | None = None
    password: Secret | None = None


def identity(cfg: MqttConfig, gateway: Gateway | None = None) -> Identity:
    """The identity of a session.

    In IoTDA device mode it is derived from a gateway's id and secret (``gateway``, or the
    one gateway of ``[mqtt.iotda]``); otherwise it is the configured client id and login.
    """
    iotda = cfg.iotda
    device_id, secret = (
        (
            (gateway.device_id, gateway.secret)
            if gateway is not None
            else (iotda.device_id, iotda.secret)
        )
        if iotda is not None
        else (None, None)
    )
    if iotda is None or device_id is None or secret is None:
        return Identity("ingest", cfg.client_id, cfg.username, cfg.password)
    when = None  # sign_type 1: the platform checks the time, so it must be now
    if iotda.sign_type == 0:
        when = (
            dt.datetime.strptime(iotda.timestamp, "%Y%m%d%H").replace(tzinfo=dt.UTC)
            if iotda.timestamp
            else _STARTED
        )
    client_id, username, password = iotda_credentials(
        device_id, secret.reveal(), iotda.sign_type, when
    )
    return Identity(device_id, client_id, username, Secret(password))


def connect(
    cfg: MqttConfig,
    *,
    who: Identity | None = None,
    client_id: str | None = None,
    persistent: bool = True,
) -> aiomqtt.Client:
    """An unconnected client for ``cfg``; enter it with ``async with``.

    Args:
        cfg: the MQTT section of the configuration.
        who: the identity to connect as; :func:`identity` of ``cfg`` by default.
        client_id: overrides the identity's client id (tools connect beside ingest).
        persistent: keep the session across disconnects (clean session off / MQTT 5
            clean start off with a session expiry), so the broker queues QoS 1
            messages while we are away. Publishers pass ``False``.
    """
    who = who or identity(cfg)
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
        identifier=client_id or who.client_id,
        username=who.username,
        password=who.password.reveal() if who.password else None,
        protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
        clean_session=None if v5 else not persistent,
        clean_start=not persistent,
        properties=properties,
        keepalive=cfg.keepalive,
        tls_context=client_context(cfg.tls, key="mqtt.tls") if cfg.tls.enabled else None,
        max_inflight_messages=cfg.max_inflight,
        timeout=10,
    )


async def end_session(client: aiomqtt.Client, cfg: MqttConfig, who: Identity) -> None:
    """Disconnect and have the broker drop the session, so it stops queueing for us.

    MQTT 5: DISCONNECT with a session expiry of 0. MQTT 3.1.1 has no such field: a
    clean-session connection under the same client id discards the old session.
    """
    if cfg.protocol == "5":
        properties = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 0
        paho = _aiomqtt_internals.paho_client(client)  # aiomqtt's disconnect takes none
        paho.disconnect(properties=properties)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                while paho.is_connected():  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        return
    async with connect(cfg, who=who, persistent=False):
        pass


async def broker_version(client: aiomqtt.Client, wait: float = 2.0) -> str | None:
    """What the broker says it is, from ``$SYS/broker/version``.

    For example ``mosquitto version 2.0.11``; None when it does not say within ``wait`` s.
    """
    await client.subscribe("$SYS/broker/version", qos=0)
    try:
        async with asyncio.timeout(wait):
            async for message in client.messages:
                if message.topic.matches("$SYS/broker/version"):
                    return bytes(message.payload).decode(errors="replace")
    except TimeoutError:
        return None
    finally:
        await client.unsubscribe("$SYS/broker/version")
    return None


def manual_ack(client: aiomqtt.Client) -> None:
    """Stop the client acknowledging messages on receipt; :func:`ack` does it instead.

    aiomqtt 2.x has no public switch: this is paho's, on the client aiomqtt wraps
    (:func:`pipeline.io._aiomqtt_internals.paho_client`). Call before entering the client.
    """
    _aiomqtt_internals.paho_client(client).manual_ack_set(on=True)


def ack(client: aiomqtt.Client, message: aiomqtt.Message) -> None:
    """Acknowledge ``message`` to the broker (PUBACK); QoS 0 messages need none."""
    if message.qos > 0:
        _aiomqtt_internals.paho_client(client).ack(message.mid, message.qos)


_PUBACK = struct.Struct("!BBH")  # type, remaining length 2, packet id (3.1.1 and 5 alike)


def ack_all(client: aiomqtt.Client, messages: Sequence[aiomqtt.Message]) -> None:
    """Acknowledge ``messages``, in the order given, with one write to the socket.

    As :func:`ack` for each, but their PUBACKs go out together
    (:func:`~pipeline.io._aiomqtt_internals.queue_packets`): one system call, not one
    per message. A PUBACK without a reason code means success in MQTT 5, as in 3.1.1.
    """
    qos1 = [m.mid for m in messages if m.qos == 1]
    if len(qos1) != len(messages):  # QoS 0 needs none; QoS 2 (never subscribed) by paho
        for message in messages:
            ack(client, message)
        return
    pack = _PUBACK.pack
    data = b"".join([pack(PUBACK, 2, mid) for mid in qos1])
    if data:
        _aiomqtt_internals.queue_packets(_aiomqtt_internals.paho_client(client), PUBACK, data)


def buffer_reads(client: aiomqtt.Client) -> None:
    """Have the connected ``client`` read its socket a chunk at a time, not a packet.

    Each message then costs no system call of its own on the way in, and the messages of
    a chunk are parsed in one turn of the event loop
    (:func:`~pipeline.io._aiomqtt_internals.buffer_reads`). Call once connected, before
    :class:`IntakeLimit`; a new connection needs it again.
    """
    _aiomqtt_internals.buffer_reads(_aiomqtt_internals.paho_client(client))


class Received:
    """A message waiting in :class:`InOrderAcks` until it is safe."""

    __slots__ = ("done", "message")

    def __init__(self, message: aiomqtt.Message) -> None:
        self.message = message
        self.done = False


_R = TypeVar("_R", bound=Received)


class InOrderAcks:
    """Acknowledges QoS 1 messages in the order they were received, each once it is safe.

    MQTT requires PUBACKs in the order the PUBLISHes arrived ([MQTT-4.6.0-2]); Kafka
    acknowledges records in its own order (partitions complete independently). So a
    message whose record Kafka has taken waits here until every message received before
    it is safe too; then the contiguous prefix is acknowledged. One per connection: a new
    connection starts a new window (the broker redelivers what was never acknowledged).

    The prefix goes out once per turn of the event loop (:meth:`flush`, scheduled by
    :meth:`done`): Kafka completes a batch's records one callback each, all in the same
    turn, so their PUBACKs leave together in one write (:func:`ack_all`) instead of one
    system call each, and never later than the turn after the last of them.

    Args:
        acknowledge: sends the PUBACKs of a run of messages, in the order given
            (``functools.partial(ack_all, client)``).
    """

    def __init__(self, acknowledge: Callable[[list[aiomqtt.Message]], None]) -> None:
        self._acknowledge = acknowledge
        self._window: collections.deque[Received] = collections.deque()
        self._flushing = False

    def __len__(self) -> int:
        return len(self._window)

    def received(self, message: aiomqtt.Message) -> Received:
        """A message arrived; returns its token for :meth:`done`."""
        return self.track(Received(message))

    def track(self, token: _R) -> _R:
        """A message arrived, its token made by the caller (a subclass); returns ``token``."""
        if token.message.qos > 0:  # QoS 0 needs no acknowledgement: nothing to wait for
            self._window.append(token)
        return token

    def done(self, token: Received) -> None:
        """The message of ``token`` is safe: acknowledged, in order, by the next flush."""
        token.done = True
        if not self._flushing and self._window and self._window[0].done:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> int:
        """Acknowledge the safe prefix now; returns how many messages were acknowledged.

        :meth:`done` schedules it; call it directly before the connection ends, so no
        PUBACK is left behind the DISCONNECT.
        """
        self._flushing = False
        window = self._window
        safe = []
        while window and window[0].done:
            safe.append(window.popleft().message)
        if not safe:
            return 0
        try:
            self._acknowledge(safe)
        except Exception as exc:  # the connection is gone: the broker will redeliver
            log.debug("could not acknowledge mids %d-%d: %s", safe[0].mid, safe[-1].mid, exc)
        return len(safe)


class IntakeLimit:
    """Stops reading from the broker while ``limit`` received messages wait to be taken.

    An MQTT 5 broker keeps at most Receive Maximum unacknowledged QoS 1 messages out to a
    client. Mosquitto 2.0.11 (Debian 12's) does not: a PUBACK for the oldest message in
    flight moves up to Receive Maximum more from the session's queue into flight
    (``db__message_delete_outgoing``; fixed in 2.0.13, eclipse/mosquitto#2306), so with
    in-order acknowledgements a backlog arrives nearly all at once and waits in the
    client's memory: 15,000 messages and +125 MB of ingest RSS in a 25,000-message burst.
    MQTT 3.1.1 has no Receive Maximum at all. This bounds the client side, whatever the
    broker does: once ``limit`` messages wait, the socket is not read (TCP flow control
    then holds the broker back) until half of them have been taken.

    aiomqtt reads the socket with an event-loop reader and has no pause, so this removes
    and later restores that reader (:mod:`pipeline.io._aiomqtt_internals`). Should a loop
    not allow it (uvloop), the limit stays off and says so once.
    One per connection, created inside it; call :meth:`took` for each message taken.
    """

    _warned: ClassVar[bool] = False

    def __init__(self, client: aiomqtt.Client, limit: int) -> None:
        self._paho = _aiomqtt_internals.paho_client(client)
        self._waiting = client.messages  # a view: its len() is what waits to be taken
        self._high = max(1, limit)
        self._low = self._high // 2
        self._loop = asyncio.get_running_loop()
        self._paused: tuple[object, int, _aiomqtt_internals.Reader] | None = None
        self.pauses = 0
        inner = self._paho.on_message
        assert inner is not None  # noqa: S101  (aiomqtt sets it when it creates the client)

        def on_message(paho: Any, userdata: Any, message: Any) -> None:
            inner(paho, userdata, message)
            if self._paused is None and len(self._waiting) >= self._high:
                self._pause()

        self._paho.on_message = on_message

    @property
    def paused(self) -> bool:
        """Whether the socket is not being read now."""
        return self._paused is not None

    def took(self) -> None:
        """A message was taken from the client: read again once half are gone."""
        if self._paused is not None and len(self._waiting) <= self._low:
            self._resume()

    def _pause(self) -> None:
        sock = self._paho.socket()
        if not _aiomqtt_internals.pausable(self._loop):
            if not IntakeLimit._warned:
                IntakeLimit._warned = True
                log.warning("this event loop has no selector: MQTT intake is not bounded")
            return
        if sock is None:
            return
        fd = sock.fileno()
        reader = _aiomqtt_internals.take_reader(self._loop, fd)
        if reader is None:  # not registered (closing): nothing to pause
            return
        self._paused = (sock, fd, reader)
        if isinstance(sock, _aiomqtt_internals.BufferedSocket):
            sock.held = True  # what was read ahead waits too
        self.pauses += 1

    def _resume(self) -> None:
        assert self._paused is not None  # noqa: S101
        sock, fd, reader = self._paused
        self._paused = None
        pending = 0
        if isinstance(sock, _aiomqtt_internals.BufferedSocket):
            sock.held = False
            pending = sock.pending()
        # Only the same, still open connection: a closed socket's descriptor may be reused.
        if self._paho.socket() is sock and getattr(sock, "fileno", lambda: -1)() == fd:
            _aiomqtt_internals.put_reader(self._loop, fd, reader, pending=pending)


def _address(cfg: MqttConfig) -> str:
    return f"{cfg.host}:{cfg.port}"


def _refusal(rc: int | ReasonCode | None) -> str:
    """Why the broker refused the connection, from its CONNACK code (``Not authorized``)."""
    match rc:
        case ReasonCode():
            return str(rc)  # paho's name for the code: MQTT 5, and 3.1.1 with paho 2
        case int():
            return connack_string(rc)
    return "no reason given"


@contextlib.asynccontextmanager
async def connected(cfg: MqttConfig, client: aiomqtt.Client) -> AsyncIterator[aiomqtt.Client]:
    """Enter ``client`` (from :func:`connect`); a failure to connect names the broker.

    Raises:
        ServiceUnreachable: the broker could not be reached, or refused the connection
            (``refused``: bad credentials, a client id it does not accept).
    """
    async with contextlib.AsyncExitStack() as stack:
        try:
            await stack.enter_async_context(client)
        except MqttConnectError as exc:  # CONNACK with a failure code
            reason = _refusal(exc.rc)
            raise ServiceUnreachable("MQTT", _address(cfg), reason, refused=True) from exc
        except aiomqtt.MqttError as exc:
            cause = _aiomqtt_internals.os_error_behind(exc)
            reason = "connection refused" if isinstance(cause, ConnectionRefusedError) else str(exc)
            raise ServiceUnreachable("MQTT", _address(cfg), reason) from exc
        yield client


async def probe(cfg: MqttConfig, limit: float | None = None) -> None:
    """One attempt to open a connection to the broker (TCP, and TLS when configured).

    No MQTT CONNECT: connecting as the ingest client id would take over its session, and
    another id would be refused in IoTDA device mode. This proves the broker is there;
    the client's own connect then says whether it accepts us.

    Raises:
        ServiceUnreachable: naming the broker and why.
    """
    timeout = min(_PROBE_TIMEOUT, limit) if limit else _PROBE_TIMEOUT
    context = client_context(cfg.tls, key="mqtt.tls") if cfg.tls.enabled else None
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(
                cfg.host, cfg.port, ssl=context, server_hostname=cfg.host if context else None
            )
    except (OSError, TimeoutError) as exc:
        reason = why_unreachable(exc, timeout)
    else:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
        return
    raise ServiceUnreachable("MQTT", _address(cfg), reason)


async def wait_until_reachable(
    cfg: MqttConfig, stop: asyncio.Event | None = None, *, within: float | None = None
) -> None:
    """Return once the broker accepts a connection, waiting up to ``mqtt.startup_timeout``.

    Raises:
        ServiceUnreachable: the broker did not answer in time.
        Stopped: ``stop`` was set first.
    """
    await wait_for_service(
        lambda limit: probe(cfg, limit),
        service="MQTT",
        address=_address(cfg),
        within=cfg.startup_timeout if within is None else within,
        stop=stop,
        log=log,
    )
