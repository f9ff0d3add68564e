"""Many gateways in one ingest (IoTDA device mode): one session per gateway, each as it."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import json
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from pipeline.config import Config, MqttConfig, Secret
from pipeline.io import mqtt
from pipeline.tools.replay import FixtureMessage, replay_messages
from pipeline.tools.services import free_port
from tests.harness import (
    Records,
    add_response,
    arrived,
    kill,
    private_mosquitto,
    read_topic,
    spawn,
    terminate,
    wait_readyz,
)

pytestmark = [pytest.mark.services, pytest.mark.slow]

STAMP = "2026112300"
ADMIN = ("admin", "admin-pass")


@contextlib.contextmanager
def platform(tmp: Path, port: int, secrets: dict[str, str]) -> Iterator[None]:
    """A broker that checks each gateway's IoTDA password and lets it touch its own topics."""
    passwd, acl = tmp / "passwd", tmp / "acl"
    when = dt.datetime.strptime(STAMP, "%Y%m%d%H").replace(tzinfo=dt.UTC)
    lines = [":".join(ADMIN)]
    for device, secret in secrets.items():
        _, username, password = mqtt.iotda_credentials(device, secret, 0, when)
        lines.append(f"{username}:{password}")
    # mosquitto_passwd -U hashes a whole plain file at once (50 calls would take seconds).
    passwd.write_text("\n".join(lines) + "\n")
    subprocess.run(["mosquitto_passwd", "-U", str(passwd)], check=True)
    acl.write_text(
        "user admin\ntopic readwrite $oc/#\ntopic read $SYS/#\n\npattern readwrite $oc/devices/%u/#\n"
    )
    extra = f"allow_anonymous false\npassword_file {passwd}\nacl_file {acl}\nmax_connections -1\n"
    with private_mosquitto(tmp, port, extra, probe=ADMIN):
        yield


def gateways_file(tmp: Path, secrets: dict[str, str]) -> Path:
    """[[gateway]] entries whose secrets are files, as an operator would mount them."""
    entries = []
    for device, secret in secrets.items():
        (tmp / f"{device}.secret").write_text(secret + "\n")
        entries.append(
            f'[[gateway]]\ndevice_id = "{device}"\nsecret = "file:{tmp}/{device}.secret"\n'
        )
    path = tmp / "gateways.toml"
    path.write_text("\n".join(entries))
    return path


def event_ids(records: Records) -> list[str]:
    return [json.loads(r.value)["event"]["services"][0]["event_id"] for r in records]


async def readyz(port: int) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/readyz") as r:
        return dict(await r.json())


async def test_fifty_gateway_sessions_in_one_ingest(cfg: Config, uid: str, tmp_path: Path) -> None:
    devices = [f"gw{i:02d}-{uid}" for i in range(50)]
    wrong = devices[7]
    secrets = {d: f"secret-{d}" for d in devices}
    configured = secrets | {wrong: "not-its-secret"}
    port, metrics = free_port(), free_port()
    env = {
        "MQTT__PORT": str(port),
        "MQTT__GATEWAYS_FILE": str(gateways_file(tmp_path, configured)),
        "MQTT__IOTDA__SIGN_TYPE": "0",
        "MQTT__IOTDA__TIMESTAMP": STAMP,
        "MQTT__RECONNECT_MAX": "2",
        "METRICS__ENABLED": "true",
        "METRICS__INGEST_PORT": str(metrics),
    }
    good = [d for d in devices if d != wrong]
    messages = [
        FixtureMessage(
            topic=f"$oc/devices/{d}/sys/events/down",
            payload=orjson.dumps(add_response(f"{d}-{i}", [f"{d}-{i}"])),
        )
        for i in range(10)
        for d in good
    ]
    publisher = MqttConfig(port=port, username=ADMIN[0], password=Secret(ADMIN[1]))
    with platform(tmp_path, port, secrets):
        first = await spawn("ingest", cfg, env=env)
        await wait_readyz(metrics, first)
        async with asyncio.timeout(60):  # 49 connected, the wrong secret refused
            while (await readyz(metrics))["details"].get(
                "ingest.mqtt"
            ) != "49 of 50 gateway sessions connected":
                await asyncio.sleep(0.2)
        body = await readyz(metrics)
        assert body["ready"] is True
        assert body["checks"][f"ingest.mqtt.{wrong}"] is False
        assert body["details"][f"ingest.mqtt.{wrong}"].startswith(f"refused by 127.0.0.1:{port}: ")
        assert body["details"][f"ingest.mqtt.{wrong}"].endswith("(check its credentials)")
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{metrics}/metrics") as r,
        ):
            text = await r.text()
        assert f'pipeline_mqtt_reconnects_total{{reason="refused",session="{wrong}"}}' in text
        assert f'pipeline_mqtt_connected{{session="{wrong}"}} 0.0' in text
        assert f'pipeline_mqtt_connected{{session="{good[0]}"}} 1.0' in text
        # SIGKILL mid-stream, restart: every gateway's persistent session kept its messages.
        publishing = asyncio.create_task(replay_messages(publisher, messages, progress=False))
        async with asyncio.timeout(60):
            while len(await read_topic(cfg.kafka, cfg.kafka.topics.down_events, expect=0)) < 100:
                await asyncio.sleep(0.1)
        await kill(first)
        second = await spawn("ingest", cfg, env=env)
        await wait_readyz(metrics, second)
        assert await publishing == len(messages)
        expected = {f"{d}-{i}" for i in range(10) for d in good}
        await arrived(
            cfg.kafka,
            cfg.kafka.topics.down_events,
            until=lambda records: set(event_ids(records)) >= expected,
        )
        assert await terminate(second) == 0
        records = await read_topic(cfg.kafka, cfg.kafka.topics.down_events)
        assert second.stderr is not None
        log = [json.loads(line) for line in (await second.stderr.read()).decode().splitlines()]
    landed = collections.Counter(event_ids(records))
    assert set(landed) == expected
    assert max(landed.values()) <= 2  # at least once; the router removes repeats
    refused = [line for line in log if line["level"] == "warning" and line.get("gateway") == wrong]
    assert len(refused) == 1  # said once, not on every retry
    assert "check its credentials" in refused[0]["msg"]


def test_ingest_lifts_the_open_file_limit_for_its_sessions() -> None:
    # A process started with a low soft limit (a shell's `ulimit -n 100`) and a higher
    # hard one: ingest lifts the soft limit so 500 sessions fit, and no further.
    script = (
        "import resource\n"
        "from pipeline.stages.ingest.worker import ensure_descriptors\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "print(ensure_descriptors(500), resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )

    def lower() -> None:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (100, hard))

    done = subprocess.run(
        [sys.executable, "-c", script], preexec_fn=lower, capture_output=True, check=True
    )
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    expected = 564 if hard == resource.RLIM_INFINITY else min(hard, 564)
    assert done.stdout.split() == [str(expected).encode()] * 2
