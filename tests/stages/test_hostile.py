"""Poison input never stops a stage: a hostile corpus through the real ingest and router."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import orjson
import pytest
from aiokafka import ConsumerRecord

from pipeline.config import Config
from pipeline.io import mqtt
from pipeline.schemas import AddedChild, DeviceInfo, DownEventRecord
from pipeline.tools.replay import FixtureMessage, replay_messages
from pipeline.tools.services import free_port
from tests.harness import read_topic, spawn, terminate, wait_readyz
from tests.stages.hostile import BAD, event, odd_but_valid

pytestmark = [pytest.mark.services, pytest.mark.slow]

MAX_PAYLOAD = 1024 * 1024
RSS_LIMIT_MB = 200


def down(gateway: str) -> str:
    return f"$oc/devices/{gateway}/sys/events/down"


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@dataclasses.dataclass
class Corpus:
    """What is published, and what each message must become."""

    messages: list[FixtureMessage]
    good: list[tuple[str, bytes, list[str]]]  # topic, payload, the sns it adds
    bad: list[tuple[bytes | None, str, bytes]]  # DLQ key, reason, payload


def corpus(uid: str) -> Corpus:
    gateways = [f"gw-{uid}-{i}" for i in range(3)]
    # The bad: every class of BAD, plus what only the topic or the size makes bad.
    too_big = orjson.dumps(event(f"big-{uid}", [f"sn-big-{i}" for i in range(100_000)]))
    over = b'{"services": [], "pad": "' + b"x" * (MAX_PAYLOAD + 10) + b'"}'
    valid = orjson.dumps(event(f"odd-topic-{uid}", [f"{uid}-odd-topic"]))
    odd_topic = "$oc/devices//sys/events/down"
    bad = [
        *((down(gateways[0]), payload, reason) for _, payload, reason in BAD),
        (
            down(gateways[1]),
            too_big,
            f"payload is {len(too_big):,} bytes, over mqtt.max_payload (1,048,576)",
        ),
        (
            down(gateways[2]),
            over,
            f"payload is {len(over):,} bytes, over mqtt.max_payload (1,048,576)",
        ),
        (
            odd_topic,
            valid,
            f"MQTT topic '{odd_topic}' does not match $oc/devices/{{device_id}}/sys/events/down",
        ),
    ]
    good: list[tuple[str, bytes, list[str]]] = []
    messages: list[FixtureMessage] = []
    for n, (topic, payload, _) in enumerate(bad):  # two good between each bad, round robin
        for k in range(2):
            sns = [f"{uid}-{n}-{k}-a", f"{uid}-{n}-{k}-b"]
            good.append(
                (
                    down(gateways[(2 * n + k) % 3]),
                    orjson.dumps(event(f"ev-{uid}-{n}-{k}", sns)),
                    sns,
                )
            )
            messages.append(FixtureMessage(topic=good[-1][0], payload=good[-1][1]))
        messages.append(FixtureMessage(topic=topic, payload=payload))
    # The odd but good: they land, from gateways whose names are odd too.
    odd_gateways = [f"{uid}-网关-Ω", f"{uid}-" + "g" * 2000]
    for i, (_, payload, sns) in enumerate(odd_but_valid(uid)):
        good.append((down(odd_gateways[i % 2]), payload, sns))
        messages.append(FixtureMessage(topic=good[-1][0], payload=payload))
    keyed = [
        (topic.split("/")[2].encode() or None, reason, payload) for topic, payload, reason in bad
    ]
    return Corpus(messages, good, keyed)


@contextlib.asynccontextmanager
async def retained(cfg: Config, topics: dict[str, bytes]) -> AsyncIterator[None]:
    """Retained messages on ``topics`` while the block runs; cleared afterwards."""
    async with mqtt.connect(
        cfg.mqtt, client_id=f"{cfg.mqtt.client_id}-ret", persistent=False
    ) as pub:
        for topic, payload in topics.items():
            await pub.publish(topic, payload, qos=1, retain=True)
    try:
        yield
    finally:
        async with mqtt.connect(
            cfg.mqtt, client_id=f"{cfg.mqtt.client_id}-ret", persistent=False
        ) as pub:
            for topic in topics:
                await pub.publish(topic, b"", qos=1, retain=True)


def dead_lettered(
    records: list[ConsumerRecord[bytes, bytes]],
) -> collections.Counter[tuple[object, ...]]:
    """(key, reason, payload size, payload SHA-256) of each DLQ record, whole or truncated."""
    got: collections.Counter[tuple[object, ...]] = collections.Counter()
    for record in records:
        headers = {k: bytes(v) for k, v in record.headers}
        if "payload-size" in headers:  # a bounded prefix of a payload too big to keep
            assert len(record.value) == 64 * 1024
            assert headers["payload-truncated"] == b"the first 65536 bytes are kept"
            size, digest = int(headers["payload-size"]), headers["payload-sha256"].decode()
        else:
            size, digest = len(record.value), hashlib.sha256(record.value).hexdigest()
        got[(record.key, headers["error"].decode(), size, digest)] += 1
    return got


async def test_hostile_corpus_never_stops_ingest_or_router(cfg: Config, uid: str) -> None:
    c = corpus(uid)
    # Retained messages, published before ingest subscribes: each handled once.
    kept_good = orjson.dumps(event(f"retained-{uid}", [f"{uid}-retained"]))
    kept = {f"gw-{uid}-retained": kept_good, f"gw-{uid}-retained-bad": b"null"}
    c.good.append((down(f"gw-{uid}-retained"), kept_good, [f"{uid}-retained"]))
    c.bad.append(
        (f"gw-{uid}-retained-bad".encode(), "payload is not a JSON object (got null)", b"null")
    )
    port = free_port()
    t = cfg.kafka.topics
    async with retained(cfg, {down(gw): payload for gw, payload in kept.items()}):
        ingest = await spawn("ingest", cfg, METRICS__ENABLED="true", METRICS__INGEST_PORT=str(port))
        router = await spawn("route", cfg)
        try:
            await wait_readyz(port, ingest)
            sent = await replay_messages(cfg.mqtt, c.messages, progress=False)
            assert sent == len(c.messages)
            landed = await read_topic(cfg.kafka, t.down_events, expect=len(c.good))
            dlq = await read_topic(cfg.kafka, t.down_events_dlq, expect=len(c.bad))
            sns = sorted(sn for _, _, adds in c.good for sn in adds)
            added = await read_topic(cfg.kafka, t.added, expect=len(sns))
            assert (ingest.returncode, router.returncode) == (None, None)  # never exited
            rss = peak_rss_mb(ingest.pid), peak_rss_mb(router.pid)
            assert (await terminate(ingest), await terminate(router)) == (0, 0)
        finally:
            for proc in (ingest, router):
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()

    # Every good message landed once, in its gateway's order, byte for byte.
    by_gateway: dict[str, list[bytes]] = collections.defaultdict(list)
    for r in landed:
        record = msgspec.json.decode(r.value, type=DownEventRecord)
        by_gateway[record.gateway_id].append(bytes(record.event))
    expected: dict[str, list[bytes]] = collections.defaultdict(list)
    for topic, payload, _ in c.good:
        expected[topic.split("/")[2]].append(payload)
    assert by_gateway == expected
    # Every bad one is in the DLQ once, with its reason.
    want = collections.Counter(
        (key, reason, len(payload), hashlib.sha256(payload).hexdigest())
        for key, reason, payload in c.bad
    )
    assert dead_lettered(dlq) == want
    # The router made each good child once.
    children = [msgspec.json.decode(r.value, type=AddedChild).device for r in added]
    assert sorted(msgspec.json.decode(d, type=DeviceInfo).node_id for d in children) == sns
    assert all(n <= RSS_LIMIT_MB for n in rss), rss
