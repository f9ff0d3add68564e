"""The edge topology, for real: a Mosquitto playing IoTDA, an edge Mosquitto bridging to
it with the configuration `pipeline bridge-config` writes, and ingest on the edge."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest
from prometheus_client import REGISTRY

from pipeline.config import Config, MqttConfig, Secret, TlsConfig
from pipeline.io import mqtt
from pipeline.ops.server import Health
from pipeline.stages.ingest import Ingest
from pipeline.tools.services import free_port
from tests import harness
from tests.harness import (
    ROOT,
    add_response,
    arrived,
    make_certs,
    private_mosquitto,
    read_topic,
    running,
    wait_check,
)

pytestmark = [pytest.mark.services, pytest.mark.slow]

STAMP = "2026112300"
ADMIN = ("admin", "admin-pass")


def down(gateway: str) -> str:
    return f"$oc/devices/{gateway}/sys/events/down"


@contextlib.contextmanager
def iotda(tmp: Path, port: int, secrets: dict[str, str]) -> Iterator[Path]:
    """A broker playing IoTDA: TLS, each gateway's HMAC password, each user its own topics."""
    tmp.mkdir()
    ca, cert, key = make_certs(tmp)
    passwd, acl = tmp / "passwd", tmp / "acl"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwd), *ADMIN], check=True)
    when = dt.datetime.strptime(STAMP, "%Y%m%d%H").replace(tzinfo=dt.UTC)
    for device, secret in secrets.items():
        _, username, password = mqtt.iotda_credentials(device, secret, 0, when)
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), username, password], check=True)
    acl.write_text(
        "user admin\ntopic readwrite $oc/#\ntopic read $SYS/#\n\npattern readwrite $oc/devices/%u/#\n"
    )
    extra = (
        f"allow_anonymous false\npassword_file {passwd}\nacl_file {acl}\n"
        f"cafile {ca}\ncertfile {cert}\nkeyfile {key}\n"
    )
    with private_mosquitto(tmp, port, extra, probe=ADMIN, probe_args=["--cafile", str(ca)]):
        yield ca


class Edge:
    """The edge broker, from deploy/edge/mosquitto.conf, that a test can stop and kill."""

    def __init__(self, tmp: Path, port: int) -> None:
        self.port = port
        self.dir = tmp
        (tmp / "data").mkdir(parents=True)
        (tmp / "bridges.d").mkdir()
        conf = (ROOT / "deploy" / "edge" / "mosquitto.conf").read_text()
        conf = (
            conf.replace("listener 1883 127.0.0.1", f"listener {port} 127.0.0.1")
            .replace("/var/lib/mosquitto/", f"{tmp}/data/")
            .replace("/etc/mosquitto/bridges.d", f"{tmp}/bridges.d")
            .replace("log_dest stderr", f"log_dest file {tmp}/log")
        )
        (tmp / "mosquitto.conf").write_text("user root\n" + conf)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = harness.popen(["mosquitto", "-c", str(self.dir / "mosquitto.conf")])
        probe = [
            "mosquitto_sub",
            "-p",
            str(self.port),
            "-t",
            "$SYS/broker/version",
            "-C",
            "1",
            "-W",
            "1",
        ]
        for _ in range(50):
            if subprocess.run(probe, capture_output=True, check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise AssertionError("the edge broker did not start")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(10)


def bridge_config(tmp: Path, iotda_port: int, ca: Path, secrets: dict[str, str]) -> Path:
    """Run `pipeline bridge-config` as a user would, secrets from the environment."""
    gateways = tmp / "gateways.toml"
    gateways.write_text(
        "".join(
            f'[[gateway]]\ndevice_id = "{d}"\nsecret = "env:SECRET_{i}"\n\n'
            for i, d in enumerate(secrets)
        )
    )
    out = tmp / "iotda.conf"
    env = os.environ | {f"SECRET_{i}": s for i, s in enumerate(secrets.values())}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "bridge-config", "--gateways-file", str(gateways),
         "--host", "127.0.0.1", "--port", str(iotda_port), "--ca-file", str(ca),
         "--timestamp", STAMP, "-o", str(out)],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert result.stderr == f"wrote {len(secrets)} bridges to {out}\n"
    assert out.stat().st_mode & 0o777 == 0o600
    assert not any(secret in out.read_text() for secret in secrets.values())  # only HMACs
    return out


@contextlib.asynccontextmanager
async def admin(port: int, ca: Path) -> AsyncIterator[Any]:
    cfg = MqttConfig(
        port=port,
        username=ADMIN[0],
        password=Secret(ADMIN[1]),
        tls=TlsConfig(enabled=True, ca_file=str(ca)),
    )
    async with mqtt.connect(
        cfg, client_id=f"admin-{time.monotonic_ns()}", persistent=False
    ) as client:
        yield client


def event_ids(records: list[Any]) -> list[str]:
    return [json.loads(r.value)["event"]["services"][0]["event_id"] for r in records]


async def until(check: Any, limit: float = 30) -> None:
    async with asyncio.timeout(limit):
        while not check():
            await asyncio.sleep(0.1)


async def test_events_reach_the_pipeline_through_an_edge_bridge(
    cfg: Config, uid: str, tmp_path: Path
) -> None:
    a, b, c = (f"gw-{x}-{uid}" for x in "abc")
    real = {a: "secret-a", b: "secret-b", c: "secret-c"}
    configured = {a: "secret-a", b: "secret-b", c: "not-the-secret"}  # c is refused
    iotda_port, edge_port = free_port(), free_port()
    cfg = msgspec.structs.replace(
        cfg,
        mqtt=msgspec.structs.replace(
            cfg.mqtt, port=edge_port, bridge_state="$SYS/broker/connection/+/state"
        ),
    )
    with iotda(tmp_path / "iotda", iotda_port, real) as ca:
        edge = Edge(tmp_path / "edge", edge_port)
        bridges = bridge_config(tmp_path, iotda_port, ca, configured)
        (edge.dir / "bridges.d" / "iotda.conf").write_text(bridges.read_text())
        edge.start()
        try:
            await through_the_edge(cfg, edge, iotda_port, ca, (a, b, c))
        finally:
            if edge.proc is not None and edge.proc.poll() is None:
                edge.stop()


async def through_the_edge(  # noqa: PLR0915  (one scenario, step by step)
    cfg: Config, edge: Edge, iotda_port: int, ca: Path, gateways: tuple[str, str, str]
) -> None:
    a, b, c = gateways
    t = cfg.kafka.topics
    sent: list[str] = []

    async def publish(gateway: str, n: int) -> None:
        async with admin(iotda_port, ca) as client:
            for i in range(n):
                event_id = f"{gateway}-{len(sent)}-{i}"
                await client.publish(
                    down(gateway), orjson.dumps(add_response(event_id, [event_id])), qos=1
                )
                sent.append(event_id)

    async with admin(iotda_port, ca) as watcher:
        await watcher.subscribe("$oc/devices/+/sys/events/#", qos=1)
        # 1. Both good bridges are up, the wrong secret's is reported down by name.
        health = Health()
        async with running(Ingest(cfg), health) as task:
            await wait_check(health, "ingest.mqtt", task)
            await until(
                lambda: (
                    health.report().get(f"ingest.bridge.{a}")
                    and health.report().get(f"ingest.bridge.{b}")
                )
            )
            await until(lambda: health.report().get(f"ingest.bridge.{c}") is False)
            assert health.ready  # one bridge down does not make ingest unready...
            assert health.details()[f"ingest.bridge.{c}"] == (  # ...but it is reported
                f"the edge broker's bridge {c}_0_0_{STAMP} to IoTDA is down"
            )
            assert REGISTRY.get_sample_value("pipeline_mqtt_bridge_up", {"bridge": c}) == 0
            assert REGISTRY.get_sample_value("pipeline_mqtt_bridge_up", {"bridge": a}) == 1
            # 2. Down events published on IoTDA land; up events go out; nothing echoes back.
            await publish(a, 1)
            await publish(b, 1)
            await read_topic(cfg.kafka, t.down_events, expect=2)
            async with mqtt.connect(cfg.mqtt, client_id=f"gw-software-{a}", persistent=False) as gw:
                await gw.publish(f"$oc/devices/{a}/sys/events/up", b'{"services": []}', qos=1)
            seen: list[str] = []
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    async for message in watcher.messages:  # until quiet: keep what came
                        seen.append(message.topic.value)  # noqa: PERF401
            assert collections.Counter(seen) == {
                down(a): 1,
                down(b): 1,
                f"$oc/devices/{a}/sys/events/up": 1,
            }
        # 3. Ingest is down: what IoTDA delivers waits on the edge, even through a SIGKILL.
        async with mqtt.connect(cfg.mqtt, client_id=f"observer-{a}", persistent=False) as observer:
            await observer.subscribe(down(a), qos=1)
            await publish(a, 3)
            async with asyncio.timeout(10):
                n = 0
                async for _ in observer.messages:
                    n += 1
                    if n == 3:
                        break
        await asyncio.sleep(0.5)  # the edge's autosave runs at its next loop pass
        edge.stop(signal.SIGKILL)
        edge.start()
        # 4. The edge is down: IoTDA keeps what it delivers for the bridge's session.
        health = Health()
        async with running(Ingest(cfg), health) as task:
            await wait_check(health, "ingest.mqtt", task)
            edge.stop()
            await publish(b, 3)
            edge.start()
            await arrived(
                cfg.kafka, t.down_events, until=lambda got: set(event_ids(got)) >= set(sent)
            )
    records = await read_topic(cfg.kafka, t.down_events)
    landed = collections.Counter(event_ids(records))
    assert set(landed) == set(sent)
    assert max(landed.values()) <= 2  # at least once; the router removes repeats
