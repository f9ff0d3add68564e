"""Session-wide services (real Mosquitto and Kafka) and per-test isolation."""

from __future__ import annotations

import gc
import io
import logging
import subprocess
import uuid
from collections.abc import Callable, Iterator

import msgspec
import pytest

from pipeline.config import Config, KafkaConfig, MqttConfig, Topics, load_config
from pipeline.ops.logs import setup_logging
from tests import harness
from tests.harness import ROOT


@pytest.fixture(scope="session")
def local_services() -> None:
    """Make sure the local Mosquitto and Kafka are up, starting them through deploy/local."""
    script = ROOT / "deploy" / "local" / "services.sh"
    if subprocess.run([script, "status"], capture_output=True, check=False).returncode != 0:
        subprocess.run([script, "up"], check=True)


@pytest.fixture(autouse=True)
def reap_workers() -> Iterator[None]:
    """No worker a test started outlives it, even when the test fails half way.

    Then the test's cyclic garbage is collected here, where its finalizers run safely.
    Left to a later collection, one can land inside ``ast.parse`` (pytest rewriting a
    module it imports late, such as hypothesis's at the session's end); a finalizer that
    logs a traceback (an asyncio task's exception never retrieved) makes CPython 3.11
    parse again, for the caret marks, and the outer parse fails with "SystemError: AST
    constructor recursion depth mismatch" (cpython gh-106905: its AST state is shared,
    and 3.11.7 and Debian's 3.11.2 predate the fix), ending the whole run.
    """
    yield
    harness.reap()
    gc.collect()


def pytest_sessionfinish() -> None:
    """What the last test left is collected before the plugins' end-of-run imports."""
    gc.collect()


@pytest.fixture
def uid() -> str:
    """A short id unique to this test, for topic names, client ids and group ids."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def cfg(local_services: None, uid: str) -> Config:
    """The default configuration with topics, groups and client ids unique to this test."""
    base = load_config(environ={})
    topics = Topics(**{f: f"{getattr(Topics(), f)}.{uid}" for f in Topics.__struct_fields__})
    return msgspec.structs.replace(
        base,
        mqtt=msgspec.structs.replace(
            # The real topic names; a test's stale session expires soon after it ends.
            base.mqtt,
            client_id=f"ingest-{uid}",
            session_expiry=120,
        ),
        kafka=msgspec.structs.replace(base.kafka, topics=topics),
        router=msgspec.structs.replace(
            base.router, group_id=f"router-{uid}", transactional_id=f"router-{uid}"
        ),
        sink=msgspec.structs.replace(base.sink, group_id=f"sink-{uid}"),
        metrics=msgspec.structs.replace(base.metrics, enabled=False),
    )


@pytest.fixture
def mqtt_cfg(cfg: Config) -> MqttConfig:
    return cfg.mqtt


@pytest.fixture
def kafka_cfg(cfg: Config) -> KafkaConfig:
    return cfg.kafka


@pytest.fixture
def json_logs() -> Iterator[Callable[[str], io.StringIO]]:
    """``setup_logging(level)`` into a fresh buffer; the logging setup is restored after."""
    root = logging.getLogger()
    names = ("aiokafka", "aiohttp.access")
    saved = root.handlers[:], root.level, [logging.getLogger(n).level for n in names]

    def setup(level: str) -> io.StringIO:
        stream = io.StringIO()
        setup_logging(level, stream)
        return stream

    yield setup
    root.handlers[:], root.level = saved[0], saved[1]
    for name, level in zip(names, saved[2], strict=True):
        logging.getLogger(name).setLevel(level)
