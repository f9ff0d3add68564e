"""MQTT options: IoTDA device auth, reconnection, username/password, shared subscriptions."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest

from pipeline.config import Config, IotdaAuthConfig, MqttConfig, Secret, TlsConfig
from pipeline.errors import ServiceUnreachable
from pipeline.io import mqtt
from pipeline.ops.metrics import MQTT_RECONNECTS
from pipeline.ops.server import Health
from pipeline.stages.ingest import Ingest
from pipeline.tools.replay import FixtureMessage, replay_messages
from tests.harness import add_response, free_port, make_certs, read_topic, running, wait_check


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


def test_manual_ack_reaches_the_paho_client() -> None:
    # aiomqtt 2.x has no public switch; if an upgrade moves the wrapped client, fail here.
    async def check() -> None:
        client = mqtt.connect(MqttConfig())
        assert client._client._manual_ack is False
        mqtt.manual_ack(client)
        assert client._client._manual_ack is True

    asyncio.run(check())


@contextlib.contextmanager
def private_mosquitto(
    tmp: Path,
    port: int,
    extra: str = "",
    probe: tuple[str, str] | None = None,
    probe_args: list[str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """A broker of this test's own, so it can be stopped without disturbing the others."""
    (tmp / "data").mkdir(exist_ok=True)
    conf = tmp / "mosquitto.conf"
    if "allow_anonymous" not in extra:
        extra += "allow_anonymous true\n"
    conf.write_text(
        f"user root\nlistener {port} 127.0.0.1\npersistence true\n"
        f"persistence_location {tmp}/data/\nlog_dest file {tmp}/log\n{extra}",
        encoding="utf-8",
    )
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stderr=subprocess.DEVNULL)
    auth = [*(["-u", probe[0], "-P", probe[1]] if probe else []), *(probe_args or [])]
    command = [
        "mosquitto_sub",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-t",
        "$SYS/broker/version",
        "-C",
        "1",
        "-W",
        "1",
    ]
    try:
        for _ in range(50):
            if subprocess.run([*command, *auth], capture_output=True, check=False).returncode == 0:
                break
            time.sleep(0.1)
        else:
            msg = f"private mosquitto on {port} did not answer"
            raise AssertionError(msg)
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


def messages(uid: str, n: int, start: int = 0) -> list[FixtureMessage]:
    return [
        FixtureMessage(
            topic="$oc/devices/gw-1/sys/events/down",
            payload=orjson.dumps(add_response(f"{uid}-{i}", [f"sn-{i}"])),
        )
        for i in range(start, start + n)
    ]


def event_ids(records: list[Any]) -> set[str]:
    return {json.loads(r.value)["event"]["services"][0]["event_id"] for r in records}


@contextlib.asynccontextmanager
async def ingest_on(cfg: Config) -> AsyncIterator[Health]:
    health = Health()
    async with running(Ingest(cfg, health)) as task:
        await wait_check(health, "ingest.mqtt", task)
        yield health


@pytest.mark.services
async def test_reconnects_after_broker_restart(cfg: Config, uid: str, tmp_path: Path) -> None:
    port = free_port()
    cfg = msgspec.structs.replace(
        cfg, mqtt=msgspec.structs.replace(cfg.mqtt, port=port, reconnect_min=0.1, reconnect_max=1.0)
    )
    prefix = f"test/{uid}/"
    before = MQTT_RECONNECTS._value.get()
    with private_mosquitto(tmp_path, port) as broker:
        health = Health()
        async with running(Ingest(cfg, health)) as task:
            await wait_check(health, "ingest.mqtt", task)
            await replay_messages(cfg.mqtt, messages(uid, 20), topic_prefix=prefix, progress=False)
            await read_topic(cfg.kafka, cfg.kafka.topics.down_events, expect=20, settle=0.2)
            broker.terminate()
            broker.wait(10)
            async with asyncio.timeout(10):
                while health.report()["ingest.mqtt"]:
                    await asyncio.sleep(0.05)
            with private_mosquitto(tmp_path, port):
                await wait_check(health, "ingest.mqtt", task)  # reconnected and subscribed again
                await replay_messages(
                    cfg.mqtt, messages(uid, 20, 20), topic_prefix=prefix, progress=False
                )
                records = await read_topic(cfg.kafka, cfg.kafka.topics.down_events, expect=40)
    assert event_ids(records) == {f"{uid}-{i}" for i in range(40)}
    assert len(records) == 40
    assert MQTT_RECONNECTS._value.get() > before


@pytest.mark.services
async def test_iotda_device_mode_authenticates(cfg: Config, uid: str, tmp_path: Path) -> None:
    """Username = device id, password = HMAC of the secret keyed by the hour, checked by a
    real broker with a password file."""
    assert shutil.which("mosquitto_passwd")
    device_id, secret = f"gw_{uid}", "device-secret-42"
    _, username, password = mqtt.iotda_credentials(device_id, secret)
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwd), username, password], check=True)
    subprocess.run(["mosquitto_passwd", "-b", str(passwd), "publisher", "pub-pass"], check=True)
    port = free_port()
    iotda = IotdaAuthConfig(device_id=device_id, secret=Secret(secret))
    ingest_cfg = msgspec.structs.replace(
        cfg, mqtt=msgspec.structs.replace(cfg.mqtt, port=port, iotda=iotda)
    )
    pub_cfg = msgspec.structs.replace(
        cfg.mqtt, port=port, username="publisher", password=Secret("pub-pass")
    )
    wrong = msgspec.structs.replace(pub_cfg, password=Secret("wrong"))
    extra = f"allow_anonymous false\npassword_file {passwd}\n"
    with private_mosquitto(tmp_path, port, extra, probe=("publisher", "pub-pass")):
        async with ingest_on(ingest_cfg):
            await replay_messages(
                pub_cfg, messages(uid, 3), topic_prefix=f"test/{uid}/", progress=False
            )
            records = await read_topic(cfg.kafka, cfg.kafka.topics.down_events, expect=3)
        assert event_ids(records) == {f"{uid}-{i}" for i in range(3)}
        with pytest.raises(ServiceUnreachable) as refused:
            await replay_messages(wrong, messages(uid, 1), progress=False)
        assert str(refused.value) == f"MQTT 127.0.0.1:{port} refused the connection: Not authorized"


@pytest.mark.services
async def test_shared_subscription_splits_between_replicas(cfg: Config, uid: str) -> None:
    shared = msgspec.structs.replace(cfg.mqtt, shared_group=f"ingest-{uid}")
    a = msgspec.structs.replace(cfg, mqtt=msgspec.structs.replace(shared, client_id=f"a-{uid}"))
    b = msgspec.structs.replace(cfg, mqtt=msgspec.structs.replace(shared, client_id=f"b-{uid}"))
    async with ingest_on(a), ingest_on(b):
        await replay_messages(
            cfg.mqtt, messages(uid, 200), topic_prefix=f"test/{uid}/", progress=False
        )
        records = await read_topic(cfg.kafka, cfg.kafka.topics.down_events, expect=200)
    # Each message landed once: the broker gave it to one replica only.
    assert len(records) == 200
    assert event_ids(records) == {f"{uid}-{i}" for i in range(200)}


def test_iotda_client_id_is_stable_across_reconnects() -> None:
    async def ids(iotda: IotdaAuthConfig) -> tuple[str, str]:
        cfg = MqttConfig(iotda=iotda)
        return mqtt.connect(cfg)._client._client_id.decode(), mqtt.connect(
            cfg
        )._client._client_id.decode()

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
            await replay_messages(
                secure.mqtt, messages(uid, 3), topic_prefix=f"test/{uid}/", progress=False
            )
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
