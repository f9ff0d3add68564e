"""Kafka connections, wrapped once: producers, consumers and topic administration.

aiokafka is only partly annotated; this module is the typed boundary the stages use.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from pipeline.tls import client_context

if TYPE_CHECKING:
    from collections.abc import Iterable

    from pipeline.config import KafkaConfig

__all__ = ["admin", "backlog", "consumer", "ensure_topics", "partitions", "producer", "size"]

log = logging.getLogger(__name__)

_TOPIC_ALREADY_EXISTS = 36


def _common(cfg: KafkaConfig) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "bootstrap_servers": cfg.bootstrap_servers,
        "client_id": cfg.client_id,
        "security_protocol": cfg.security_protocol,
        "request_timeout_ms": int(cfg.request_timeout * 1000),
    }
    if cfg.tls.enabled and cfg.security_protocol in ("PLAINTEXT", "SASL_PLAINTEXT"):
        # [kafka.tls] enabled = true upgrades the plain protocol to its TLS form.
        opts["security_protocol"] = cfg.security_protocol.replace("PLAINTEXT", "SSL")
    if opts["security_protocol"] in ("SSL", "SASL_SSL"):
        opts["ssl_context"] = client_context(cfg.tls)
    if cfg.sasl_mechanism:
        opts["sasl_mechanism"] = cfg.sasl_mechanism
        opts["sasl_plain_username"] = cfg.sasl_username
        opts["sasl_plain_password"] = cfg.sasl_password.reveal() if cfg.sasl_password else None
    return opts


def producer(cfg: KafkaConfig, **overrides: Any) -> AIOKafkaProducer:
    """An idempotent producer that waits for all in-sync replicas (``acks=all``)."""
    opts = _common(cfg) | {
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": cfg.linger_ms,
        "compression_type": None,
    }
    return AIOKafkaProducer(**(opts | overrides))


def consumer(
    cfg: KafkaConfig, *topics: str, group_id: str | None, **overrides: Any
) -> AIOKafkaConsumer:
    """A consumer that commits explicitly and reads only committed transactional data."""
    opts = _common(cfg) | {
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "isolation_level": "read_committed",
    }
    return AIOKafkaConsumer(*topics, **(opts | overrides))


def admin(cfg: KafkaConfig) -> AIOKafkaAdminClient:
    """An admin client (topics, offsets, consumer groups)."""
    return AIOKafkaAdminClient(**_common(cfg))


async def ensure_topics(
    cfg: KafkaConfig, names: Iterable[str], *, partitions: int | None = None
) -> list[str]:
    """Create the topics that do not exist yet; return the names created."""
    client = admin(cfg)
    await client.start()
    try:
        existing = set(await client.list_topics())
        missing = [n for n in dict.fromkeys(names) if n not in existing]
        if not missing:
            return []
        response = await client.create_topics(
            [NewTopic(n, partitions or cfg.partitions, cfg.replication_factor) for n in missing]
        )
        for name, code, *rest in response.topic_errors:
            if code not in (0, _TOPIC_ALREADY_EXISTS):
                msg = f"creating topic {name} failed: error {code} {rest[0] if rest else ''}"
                raise RuntimeError(msg)
        # Metadata propagates asynchronously; wait until every new topic is visible.
        async with asyncio.timeout(30):
            while not set(missing) <= set(await client.list_topics()):  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        log.info("created topics %s", missing)
        return missing
    finally:
        await client.close()


async def partitions(client: AIOKafkaConsumer, *topics: str) -> list[TopicPartition]:
    """Every partition of ``topics``, from fresh cluster metadata (for manual assignment)."""
    cluster = await client._client.fetch_all_metadata()  # noqa: SLF001  (no public equivalent)
    return [
        TopicPartition(topic, p)
        for topic in topics
        for p in sorted(cluster.partitions_for_topic(topic) or ())
    ]


async def backlog(cfg: KafkaConfig, group: str, topic: str) -> int:
    """Records of ``topic`` that consumer group ``group`` has not committed yet.

    ``end - committed`` overcounts on transactional topics: every commit marker takes an
    offset. Where that difference is non-zero, look: if no committed record follows the
    group's offset, the group is idle on that partition.
    """
    client = admin(cfg)
    reader = consumer(cfg, group_id=None)
    await client.start()
    total = 0
    try:
        async with reader:
            tps = await partitions(reader, topic)
            ends = await reader.end_offsets(tps)
            begins = await reader.beginning_offsets(tps)
            done = await client.list_consumer_group_offsets(group)
            for tp in tps:
                start = done[tp].offset if tp in done else begins[tp]
                if ends[tp] <= start:
                    continue
                reader.assign([tp])
                reader.seek(tp, start)
                batch = await reader.getmany(tp, timeout_ms=300)
                if any(r.offset < ends[tp] for r in batch.get(tp, ())):
                    total += ends[tp] - start
    finally:
        await client.close()
    return total


async def size(cfg: KafkaConfig, *topics: str) -> int:
    """Offsets held by ``topics`` (records, plus a marker per transaction if transactional)."""
    reader = consumer(cfg, group_id=None)
    async with reader:
        tps = await partitions(reader, *topics)
        if not tps:
            return 0
        ends = await reader.end_offsets(tps)
        begins = await reader.beginning_offsets(tps)
        return sum(ends[tp] - begins[tp] for tp in tps)
