"""MQTT options: IoTDA device auth, reconnection, username/password, shared subscriptions."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import msgspec
import orjson
import pytest
from prometheus_client import REGISTRY

from pipeline.config import Config, IotdaAuthConfig, MqttConfig, Secret, TlsConfig
from pipeline.errors import ConfigError, ServiceUnreachable
from pipeline.io import mqtt
from pipeline.ops.server import Health
from pipeline.stages import runtime
from pipeline.stages.ingest import Ingest
from pipeline.tools.replay import FixtureMessage, replay_messages
from pipeline.tools.services import free_port
from tests.harness import (
    add_response,
    make_certs,
    private_mosquitto,
    read_topic,
    running,
    wait_check,
)


def test_sign_type_0_keeps_the_hour_the_process_started() -> None:
    # The broker keys the session by client id, and the client id holds the hour: one
    # stamp for every reconnect keeps the session (and what it queued) across an hour.
    iotda = IotdaAuthConfig(device_id="gw", secret=Secret("s"))
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    first = mqtt.identity(MqttConfig(iotda=iotda))
    assert mqtt.identity(MqttConfig(iotda=iotda)) == first
    assert first.client_id != mqtt.iotda_credentials("gw", "s", 0, later)[0]
    pinned = msgspec.structs.replace(iotda, timestamp="2026112300")
    assert mqtt.identity(MqttConfig(iotda=pinned)).client_id == "gw_0_0_2026112300"


def test_iotda_credentials_worked_example() -> None:
    # protocols.md A2: secret 12345678 at 2025041401 (UTC) gives this password.
    when = dt.datetime(2025, 4, 14, 1, 30, tzinfo=dt.UTC)
    client_id, username, password = mqtt.iotda_credentials("prod_node1", "12345678", 0, when)
    assert password == "c75150e6cb841417396819e4d2ee4358a416344a03a083e3a8567074ddec820a"
    assert client_id == "prod_node1_0_0_2025041401"
    assert username == "prod_node1"
    local = when.astimezone(dt.timezone(dt.timedelta(hours=8)))  # same instant, other zone
    assert (
        mqtt.iotda_credentials("prod_node1", "12345678", 1, local)[0] == "prod_node1_0_1_2025041401"
    )


def test_shared_subscription_topic() -> None:
    assert mqtt.subscription_topic(MqttConfig()) == "$oc/devices/+/sys/events/down"
    assert mqtt.subscription_topic(MqttConfig(shared_group="ingest")) == (
        "$share/ingest/$oc/devices/+/sys/events/down"
    )


def messages(uid: str, n: int, start: int = 0, gateway: str = "gw-1") -> list[FixtureMessage]:
    return [
        FixtureMessage(
            topic=f"$oc/devices/{gateway}/sys/events/down",
            payload=orjson.dumps(add_response(f"{uid}-{i}", [f"sn-{i}"])),
        )
        for i in range(start, start + n)
    ]


def event_ids(records: list[Any]) -> set[str]:
    return {json.loads(r.value)["event"]["services"][0]["event_id"] for r in records}


@contextlib.asynccontextmanager
async def ingest_on(cfg: Config) -> AsyncIterator[Health]:
    health = Health()
    async with running(Ingest(cfg), health) as task:
        await wait_check(health, "ingest.mqtt", task)
        yield health


@pytest.mark.services
async def test_reconnects_after_broker_restart(cfg: Config, uid: str, tmp_path: Path) -> None:
    port = free_port()
    cfg = msgspec.structs.replace(
        cfg, mqtt=msgspec.structs.replace(cfg.mqtt, port=port, reconnect_min=0.1, reconnect_max=1.0)
    )
    lost = {"session": "ingest", "reason": "lost"}
    before = REGISTRY.get_sample_value("pipeline_mqtt_reconnects_total", lost) or 0
    with private_mosquitto(tmp_path, port) as broker:
        health = Health()
        async with running(Ingest(cfg), health) as task:
            await wait_check(health, "ingest.mqtt", task)
            await replay_messages(cfg.mqtt, messages(uid, 20), progress=False)
            await read_topic(cfg.kafka, cfg.kafka.topics.down_events, expect=20)
            broker.terminate()
            broker.wait(10)
            async with asyncio.timeout(10):
                while health.report()["ingest.mqtt"]:
                    await asyncio.sleep(0.05)
            with private_mosquitto(tmp_path, port):
                await wait_check(health, "ingest.mqtt", task)  # reconnected and subscribed again
                await replay_messages(cfg.mqtt, messages(uid, 20, 20), progress=False)
                records = await read_topic(cfg.kafka, cfg.kafka.topics.down_events, expect=40)
    assert event_ids(records) == {f"{uid}-{i}" for i in range(40)}
    assert len(records) == 40
    assert (REGISTRY.get_sample_value("pipeline_mqtt_reconnects_total", lost) or 0) > before


@pytest.mark.services
async def test_iotda_device_mode_authenticates(cfg: Config, uid: str, tmp_path: Path) -> None:
    """Username = device id, password = HMAC of the secret keyed by the hour, checked by a
    real broker with a password file.

    The broker is given the credentials ingest derives: with sign type 0 their hour is
    when the process started (reconnects keep the client id, and with it the session),
    which in a long test run is not the hour this test runs in.
    """
    assert shutil.which("mosquitto_passwd")
    device_id, secret = f"gw_{uid}", "device-secret-42"
    port = free_port()
    iotda = IotdaAuthConfig(device_id=device_id, secret=Secret(secret))
    ingest_cfg = msgspec.structs.replace(
        cfg, mqtt=msgspec.structs.replace(cfg.mqtt, port=port, iotda=iotda)
    )
    who = mqtt.identity(ingest_cfg.mqtt)
    assert who.username == device_id
    assert who.password is not None
    passwd = tmp_path / "passwd"
    subprocess.run(
        ["mosquitto_passwd", "-c", "-b", str(passwd), device_id, who.password.reveal()], check=True
    )
    subprocess.run(["mosquitto_passwd", "-b", str(passwd), "publisher", "pub-pass"], check=True)
    pub_cfg = msgspec.structs.replace(
        cfg.mqtt, port=port, username="publisher", password=Secret("pub-pass")
    )
    wrong = msgspec.structs.replace(pub_cfg, password=Secret("wrong"))
    extra = f"allow_anonymous false\npassword_file {passwd}\n"
    with private_mosquitto(tmp_path, port, extra, probe=("publisher", "pub-pass")):
        async with ingest_on(ingest_cfg):
            await replay_messages(
                pub_cfg,
                messages(uid, 3, gateway=device_id),
                progress=False,
            )
            records = await read_topic(cfg.kafka, cfg.kafka.topics.down_events, expect=3)
        assert event_ids(records) == {f"{uid}-{i}" for i in range(3)}
        with pytest.raises(ServiceUnreachable) as refused:
            await replay_messages(wrong, messages(uid, 1), progress=False)
        assert str(refused.value) == f"MQTT 127.0.0.1:{port} refused the connection: Not authorized"


@pytest.mark.services
async def test_shared_subscription_splits_bridged_topics_between_replicas(
    cfg: Config, uid: str
) -> None:
    # Topics an edge bridge mounted under a plain prefix (topic ... in 1 edge/... $oc/...):
    # not $-topics, so a shared subscription receives them.
    prefix = f"edge/{uid}/"
    shared = msgspec.structs.replace(
        cfg.mqtt, shared_group=f"ingest-{uid}", topic=f"{prefix}$oc/devices/+/sys/events/down"
    )
    a = msgspec.structs.replace(cfg, mqtt=msgspec.structs.replace(shared, client_id=f"a-{uid}"))
    b = msgspec.structs.replace(cfg, mqtt=msgspec.structs.replace(shared, client_id=f"b-{uid}"))
    async with ingest_on(a), ingest_on(b):
        await replay_messages(cfg.mqtt, messages(uid, 200), topic_prefix=prefix, progress=False)
        records = await read_topic(cfg.kafka, cfg.kafka.topics.down_events, expect=200)
    # Each message landed once: the broker gave it to one replica only.
    assert len(records) == 200
    assert event_ids(records) == {f"{uid}-{i}" for i in range(200)}


@pytest.mark.services
async def test_shared_group_on_the_real_topics_is_refused_on_mosquitto(
    cfg: Config, uid: str
) -> None:
    shared = msgspec.structs.replace(cfg.mqtt, shared_group=f"ingest-{uid}")
    ingest = Ingest(msgspec.structs.replace(cfg, mqtt=shared))
    with pytest.raises(ConfigError) as refused:
        async with asyncio.timeout(30):
            await runtime.run(ingest, asyncio.Event())
    assert str(refused.value) == (
        "config key mqtt.shared_group: mosquitto version 2.0.11 never delivers $-topics such "
        "as $oc/devices/+/sys/events/down to a shared subscription, so this ingest would "
        "receive nothing; split the gateways with mqtt.gateways and mqtt.shard instead, or "
        "run replicas without a shared group (the router removes duplicates)"
    )


def test_iotda_client_id_is_stable_across_reconnects() -> None:
    async def ids(iotda: IotdaAuthConfig) -> tuple[str, str]:
        cfg = MqttConfig(iotda=iotda)
        return mqtt.connect(cfg).identifier, mqtt.connect(cfg).identifier

    fixed = IotdaAuthConfig(device_id="gw", secret=Secret("s"), timestamp="2025041401")
    assert asyncio.run(ids(fixed)) == ("gw_0_0_2025041401", "gw_0_0_2025041401")
    first, second = asyncio.run(ids(IotdaAuthConfig(device_id="gw", secret=Secret("s"))))
    assert first == second
    assert first.startswith("gw_0_0_")


@pytest.mark.services
# paho leaves the socket of a failed TLS handshake for the garbage collector.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_tls_with_custom_ca_and_verification_on(
    cfg: Config, uid: str, tmp_path: Path
) -> None:
    ca, cert, key = make_certs(tmp_path)
    port = free_port()
    extra = f"cafile {ca}\ncertfile {cert}\nkeyfile {key}\n"
    tls = TlsConfig(enabled=True, ca_file=str(ca))
    secure = msgspec.structs.replace(
        cfg, mqtt=msgspec.structs.replace(cfg.mqtt, port=port, tls=tls)
    )
    with private_mosquitto(tmp_path, port, extra, probe_args=["--cafile", str(ca)]):
        async with ingest_on(secure):
            await replay_messages(secure.mqtt, messages(uid, 3), progress=False)
            records = await read_topic(cfg.kafka, cfg.kafka.topics.down_events, expect=3)
        assert event_ids(records) == {f"{uid}-{i}" for i in range(3)}
        unverified = msgspec.structs.replace(
            secure.mqtt, tls=TlsConfig(enabled=True)
        )  # system CAs only
        with pytest.raises(
            ServiceUnreachable,
            match=rf"^MQTT 127\.0\.0\.1:{port} not reachable: .*CERTIFICATE_VERIFY_FAILED",
        ):
            await replay_messages(unverified, messages(uid, 1), progress=False)


async def test_acknowledgements_go_out_in_the_order_messages_arrived() -> None:
    sent: list[list[int]] = []
    acks = mqtt.InOrderAcks(lambda messages: sent.append([m.mid for m in messages]))
    received = [
        acks.received(
            aiomqtt.Message(f"t/{mid}", b"", qos=qos, retain=False, mid=mid, properties=None)
        )
        for mid, qos in ((100, 1), (101, 1), (102, 0), (103, 1), (104, 1), (105, 1))
    ]
    assert len(acks) == 5  # QoS 0 waits for nothing
    acks.done(received[3])  # 100 and 101 are not safe yet
    acks.done(received[4])
    acks.done(received[1])
    await asyncio.sleep(0)  # a turn of the loop: any scheduled flush has run
    assert sent == []
    acks.done(received[0])
    acks.done(received[2])  # QoS 0: nothing to send
    assert sent == []  # not yet: at the end of this turn
    await asyncio.sleep(0)
    assert sent == [[100, 101, 103, 104]]  # the whole prefix, in arrival order, one run
    acks.done(received[5])
    assert acks.flush() == 1  # at once, when asked (before a DISCONNECT)
    assert sent == [[100, 101, 103, 104], [105]]
    await asyncio.sleep(0)
    assert sent == [[100, 101, 103, 104], [105]]  # the scheduled flush found nothing more
    assert len(acks) == 0


async def test_a_failed_acknowledgement_does_not_stop_the_window() -> None:
    sent: list[int] = []

    def flaky(messages: list[aiomqtt.Message]) -> None:
        if messages[0].mid == 1:
            msg = "connection gone"
            raise OSError(msg)
        sent.extend(m.mid for m in messages)

    acks = mqtt.InOrderAcks(flaky)
    first, second, third = (
        acks.received(aiomqtt.Message("t", b"", qos=1, retain=False, mid=mid, properties=None))
        for mid in (1, 2, 3)
    )
    acks.done(second)
    acks.done(first)
    assert acks.flush() == 2  # their acknowledgement failed: the broker redelivers them
    acks.done(third)
    assert acks.flush() == 1
    assert sent == [3]


@pytest.mark.services
async def test_intake_limit_stops_reading_while_messages_wait(
    mqtt_cfg: MqttConfig, uid: str
) -> None:
    # The broker may send up to Receive Maximum (500 here) unacknowledged messages, and
    # Mosquitto 2.0.11 sends more; the intake limit (40) holds what waits in memory.
    topic = f"$oc/devices/{uid}-gw/sys/events/down"
    cfg = msgspec.structs.replace(mqtt_cfg, max_inflight=500)
    count, limit = 1500, 40
    client = mqtt.connect(cfg)
    mqtt.manual_ack(client)
    async with client:
        await client.subscribe(topic, qos=1)
        mqtt.buffer_reads(client)  # as ingest: what was read ahead waits while paused
        intake = mqtt.IntakeLimit(client, limit)
        async with mqtt.connect(cfg, client_id=f"pub-{uid}", persistent=False) as publisher:
            await asyncio.gather(
                *(publisher.publish(topic, str(n).encode(), qos=1) for n in range(count))
            )
        got: list[int] = []
        most_waiting = 0
        # Below the keepalive (60 s): read-ahead left unparsed at a resume would only be
        # parsed when the next PINGRESP woke the reader, so the test would time out.
        async with asyncio.timeout(40):
            async for message in client.messages:
                most_waiting = max(most_waiting, client.messages.__len__() + 1)
                intake.took()
                got.append(int(bytes(message.payload)))
                mqtt.ack(client, message)
                if len(got) % 50 == 0:
                    await asyncio.sleep(0.01)  # a slow consumer: the backlog builds up
                if len(got) == count:
                    break
        await mqtt.end_session(client, cfg, mqtt.identity(cfg))
    assert got == list(range(count))  # nothing lost or reordered by pausing
    assert intake.pauses > 0
    assert most_waiting <= limit + 1
    assert not intake.paused


@pytest.mark.services
async def test_a_run_of_messages_acknowledged_at_once_is_not_redelivered(
    mqtt_cfg: MqttConfig, uid: str
) -> None:
    topic = f"$oc/devices/{uid}-gw/sys/events/down"
    count = 50

    async def publish(*payloads: bytes) -> None:
        async with mqtt.connect(mqtt_cfg, client_id=f"pub-{uid}", persistent=False) as publisher:
            await asyncio.gather(*(publisher.publish(topic, p, qos=1) for p in payloads))

    client = mqtt.connect(mqtt_cfg)
    mqtt.manual_ack(client)
    async with client:
        await client.subscribe(topic, qos=1)
        await publish(*(str(n).encode() for n in range(count)))
        got: list[aiomqtt.Message] = []
        async with asyncio.timeout(30):
            async for message in client.messages:
                got.append(message)
                if len(got) == count:
                    break
        mqtt.ack_all(client, got)  # 50 PUBACKs, one write
        # The broker handles a connection's packets in order: once it answers the
        # UNSUBSCRIBE sent after them, it has the PUBACKs. (Closing at once can lose
        # them: Mosquitto 2.0.11 drops what it has not read when the peer hangs up.)
        await client.unsubscribe(topic)
    assert [int(bytes(m.payload)) for m in got] == list(range(count))
    client = mqtt.connect(mqtt_cfg)  # the same session: what was not acknowledged comes first
    mqtt.manual_ack(client)
    async with client:
        await client.subscribe(topic, qos=1)
        await publish(b"after")
        async with asyncio.timeout(30):
            message = await anext(aiter(client.messages))
        mqtt.ack(client, message)
        await mqtt.end_session(client, mqtt_cfg, mqtt.identity(mqtt_cfg))
    assert message.payload == b"after"
