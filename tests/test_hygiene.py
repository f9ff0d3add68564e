"""What a test creates on the brokers is removed after it: the mechanism itself, checked.

The ``cfg`` fixture calls :meth:`tests.harness.Services.clean` after every test; here it
is called on purpose, on things made the way the stages make them.
"""

from __future__ import annotations

import aiomqtt
import pytest

from pipeline.config import Config
from pipeline.io import kafka, mqtt
from tests import harness

pytestmark = pytest.mark.services


async def test_a_tests_sessions_topics_and_groups_are_removed(
    cfg: Config, services: harness.Services, uid: str
) -> None:
    marker = f"hygiene-{uid}"
    since = services.mosquitto.log_size()
    # A persistent session subscribed to the real filter, as ingest keeps one...
    client = mqtt.connect(cfg.mqtt, client_id=f"ingest-{marker}")
    async with client:
        await client.subscribe(cfg.mqtt.topic, qos=1)
    assert harness.held_sessions(services.brokers.mqtt_port, {f"ingest-{marker}"}) == {
        f"ingest-{marker}"
    }
    # (asking consumed it: the broker drops a session that is checked; make it again)
    async with mqtt.connect(cfg.mqtt, client_id=f"ingest-{marker}") as client:
        await client.subscribe(cfg.mqtt.topic, qos=1)
    # ...a topic, and a consumer group with a committed offset.
    topic = f"iotda.down-events.{marker}"
    await kafka.ensure_topics(cfg.kafka, [topic])
    async with kafka.producer(cfg.kafka) as producer:
        await producer.send_and_wait(topic, b"x", key=b"k")
    consumer = kafka.consumer(cfg.kafka, topic, group_id=f"router-{marker}")
    async with consumer:
        await consumer.getmany(timeout_ms=5000)
        await consumer.commit()
    topics, groups = await harness.kafka_contents(cfg.kafka.bootstrap_servers)
    assert topic in topics
    assert f"router-{marker}" in groups

    await services.clean(marker, since=since)

    topics, groups = await harness.kafka_contents(cfg.kafka.bootstrap_servers)
    assert not [t for t in topics if marker in t]
    assert not [g for g in groups if marker in g]
    assert harness.held_sessions(services.brokers.mqtt_port, {f"ingest-{marker}"}) == set()


def test_a_session_is_found_from_the_brokers_log(services: harness.Services) -> None:
    # The log says which clients asked to keep a session (clean start off); those are
    # the sessions a test may leave.
    since = services.mosquitto.log_size()

    async def connect() -> None:
        async with aiomqtt.Client(
            "127.0.0.1", services.brokers.mqtt_port, identifier="kept-1", clean_session=False
        ):
            pass
        async with aiomqtt.Client(
            "127.0.0.1", services.brokers.mqtt_port, identifier="clean-1", clean_session=True
        ):
            pass

    from tests.conftest import run_sync  # noqa: PLC0415

    run_sync(connect())
    assert services.mosquitto.persistent_clients(since) == {"kept-1"}
    assert harness.held_sessions(services.brokers.mqtt_port, {"kept-1"}) == {"kept-1"}
