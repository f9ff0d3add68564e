"""Kafka over SASL_SSL (SCRAM-SHA-512, a CA made here, verification on), for real.

A private broker (deploy/local/kafka.sh) gets a SASL_SSL listener whose certificate is
signed by a test CA. The three stages run over it end to end; a wrong password and a
wrong CA each stop a worker at start-up with one line naming the cause.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import msgspec
import orjson
import pytest

from pipeline.config import Config, KafkaConfig, Secret, TlsConfig
from pipeline.dps.emulator import start_emulator
from pipeline.io import kafka
from pipeline.ops.server import Health
from pipeline.stages.ingest import Ingest
from pipeline.stages.router import Router
from pipeline.stages.sink import Sink
from pipeline.tools.replay import FixtureMessage, replay_messages
from pipeline.tools.services import free_port
from tests import harness
from tests.harness import (
    add_response,
    private_kafka,
    read_topic,
    running,
    wait_check,
    worker_env,
)

pytestmark = [pytest.mark.services, pytest.mark.slow]

PASSWORD = "scram-password-never-logged-51"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(tmp: Path) -> tuple[Path, Path, Path]:
    """A test CA, a broker keystore (key + certificate for 127.0.0.1 + CA) and another CA."""
    for name in ("ca", "other-ca"):
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", f"/CN=iot-pipeline test {name}", "-keyout", f"{name}.key", "-out", f"{name}.pem",
            cwd=tmp,
        )  # fmt: skip
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
        "-keyout", "broker.key", "-out", "broker.csr", cwd=tmp,
    )  # fmt: skip
    (tmp / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl(
        "x509", "-req", "-in", "broker.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "1", "-extfile", "san.ext", "-out", "broker.pem", cwd=tmp,
    )  # fmt: skip
    keystore = tmp / "broker-keystore.pem"
    keystore.write_text(
        "".join((tmp / n).read_text() for n in ("broker.key", "broker.pem", "ca.pem"))
    )
    return tmp / "ca.pem", keystore, tmp / "other-ca.pem"


def secured(cfg: Config, port: int, ca: Path, password: str = PASSWORD) -> Config:
    return msgspec.structs.replace(
        cfg,
        kafka=msgspec.structs.replace(
            cfg.kafka,
            bootstrap_servers=f"127.0.0.1:{port}",
            security_protocol="SASL_SSL",
            sasl_mechanism="SCRAM-SHA-512",
            sasl_username="pipeline",
            sasl_password=Secret(password),
            tls=TlsConfig(ca_file=str(ca)),
        ),
    )


def broker_env(keystore: Path, port: int) -> dict[str, str]:
    return {
        "PIPELINE_LOCAL_KAFKA_SASL_SSL_PORT": str(port),
        "PIPELINE_LOCAL_KAFKA_KEYSTORE": str(keystore),
        "PIPELINE_LOCAL_KAFKA_SCRAM_USERS": f"pipeline={PASSWORD}",
    }


async def test_ingest_route_sink_over_sasl_ssl(cfg: Config, uid: str, tmp_path: Path) -> None:
    ca, keystore, _ = make_pki(tmp_path)
    port = free_port()
    async with private_kafka(tmp_path / "kafka", **broker_env(keystore, port)):
        cfg = secured(cfg, port, ca)
        await kafka.probe(cfg.kafka)  # TLS and SASL accepted: no ConfigError
        async with await start_emulator(accept_any_sn=True) as emu:
            cfg = msgspec.structs.replace(
                cfg,
                sink=msgspec.structs.replace(
                    cfg.sink, dps=msgspec.structs.replace(cfg.sink.dps, base_url=emu.url)
                ),
            )
            health = Health()
            async with (
                running(Ingest(cfg), health) as ingest,
                running(Router(cfg)),
                running(Sink(cfg)),
            ):
                await wait_check(health, "ingest.mqtt", ingest)
                event = add_response(f"tls-{uid}", ["tls-sn-1", "tls-sn-2"], failed=["tls-sn-3"])
                message = FixtureMessage(
                    topic="$oc/devices/gw-tls/sys/events/down", payload=orjson.dumps(event)
                )
                await replay_messages(cfg.mqtt, [message], progress=False)
                allocations = await read_topic(cfg.kafka, cfg.kafka.topics.allocations, expect=2)
                failed = await read_topic(cfg.kafka, cfg.kafka.topics.failed, expect=1)
    assert sorted(r.key for r in allocations) == [b"tls-sn-1", b"tls-sn-2"]
    assert [r.key for r in failed] == [b"tls-sn-3"]


async def _start_worker(cfg: Config) -> tuple[int | None, str]:
    k = cfg.kafka
    assert k.sasl_password is not None
    assert k.tls.ca_file is not None
    env = worker_env(
        cfg,
        KAFKA__BOOTSTRAP_SERVERS=k.bootstrap_servers,
        KAFKA__SECURITY_PROTOCOL="SASL_SSL",
        KAFKA__SASL_MECHANISM="SCRAM-SHA-512",
        KAFKA__SASL_USERNAME="pipeline",
        KAFKA__SASL_PASSWORD=k.sasl_password.reveal(),
        KAFKA__TLS__CA_FILE=k.tls.ca_file,
    )
    proc = await harness.start(
        sys.executable, "-m", "pipeline", "ingest", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return None, "still running after 30 s"
    return proc.returncode, err.decode()


async def test_wrong_password_or_ca_fails_at_start_up_naming_the_cause(
    cfg: Config, tmp_path: Path
) -> None:
    ca, keystore, other_ca = make_pki(tmp_path)
    port = free_port()
    async with private_kafka(tmp_path / "kafka", **broker_env(keystore, port)):
        wrong_password = secured(cfg, port, ca, password="not-the-password-42")
        wrong_ca = secured(cfg, port, other_ca)
        (code_pw, err_pw), (code_ca, err_ca) = await asyncio.gather(
            _start_worker(wrong_password), _start_worker(wrong_ca)
        )
    assert code_pw == 2, err_pw
    assert err_pw.splitlines()[-1] == (
        f"pipeline: Kafka at 127.0.0.1:{port}: SASL SCRAM-SHA-512 authentication of user "
        "'pipeline' failed: check kafka.sasl_username and kafka.sasl_password"
    ), err_pw
    assert "not-the-password-42" not in err_pw
    assert code_ca == 2, err_ca
    last = err_ca.splitlines()[-1]
    assert last.startswith(
        f"pipeline: Kafka at 127.0.0.1:{port}: TLS certificate verification failed ("
    ), err_ca
    assert last.endswith("): check kafka.tls.ca_file"), err_ca
    # The pre-flight names the cause itself: aiokafka's own "Unable to bootstrap" never appears.
    assert "Unable to bootstrap" not in err_pw + err_ca


def test_cleartext_remote_dps_url() -> None:
    from pipeline.dps.protocol import cleartext_remote  # noqa: PLC0415

    assert cleartext_remote("http://10.1.2.3:8085")
    assert cleartext_remote("http://dps.example.com")
    assert not cleartext_remote("https://dps.example.com")
    assert not cleartext_remote("http://127.0.0.1:8085")
    assert not cleartext_remote("http://localhost:8085")
    assert not cleartext_remote("http://[::1]:8085")


async def test_dps_client_warns_at_start_up_about_cleartext_remote(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from pipeline.config import DpsConfig  # noqa: PLC0415
    from pipeline.dps.client import DpsClient  # noqa: PLC0415

    async with DpsClient(DpsConfig(base_url="http://10.1.2.3:8085")):
        pass
    async with DpsClient(DpsConfig(base_url="http://127.0.0.1:8085")):
        pass
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        (
            "sink.dps.base_url http://10.1.2.3:8085 is plain http:// to a remote host: the "
            "access token and signed requests travel unencrypted; use https://"
        )
    ]


def test_kafka_config_security_defaults_are_plaintext() -> None:
    assert KafkaConfig().security_protocol == "PLAINTEXT"
