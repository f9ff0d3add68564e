"""The MQTT connection, wrapped once: options, IoTDA device auth and manual acknowledgement."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import logging
import re
import ssl
from typing import TYPE_CHECKING

import aiomqtt
from aiomqtt.exceptions import MqttConnectError  # not re-exported by aiomqtt 2.x
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from pipeline.errors import ServiceUnreachable
from pipeline.io.aio import wait_for_service, why_unreachable
from pipeline.io.tls import client_context

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from pipeline.config import MqttConfig

__all__ = [
    "ack",
    "connect",
    "connected",
    "iotda_credentials",
    "manual_ack",
    "probe",
    "subscription_topic",
    "wait_until_reachable",
]

_PROBE_TIMEOUT = 10.0
_CODE = re.compile(r"^\[code:\d+\] ")

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


def _address(cfg: MqttConfig) -> str:
    return f"{cfg.host}:{cfg.port}"


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
            reason = _CODE.sub("", str(exc))  # "[code:135] Not authorized"
            raise ServiceUnreachable("MQTT", _address(cfg), reason, refused=True) from exc
        except aiomqtt.MqttError as exc:
            reason = str(exc)
            if "Connection refused" in reason and "Errno" in reason:
                reason = "connection refused"  # "[Errno 111] Connection refused"
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
    context = client_context(cfg.tls) if cfg.tls.enabled else None
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
