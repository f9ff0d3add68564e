"""Kafka connections, wrapped once: producers, consumers and topic administration.

aiokafka is only partly annotated; this module is the typed boundary the stages use.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from pipeline.tls import client_context

if TYPE_CHECKING:
    from collections.abc import Iterable

    from pipeline.config import KafkaConfig

__all__ = ["admin", "consumer", "ensure_topics", "producer"]

log = logging.getLogger(__name__)

_TOPIC_ALREADY_EXISTS = 36


def _common(cfg: KafkaConfig) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "bootstrap_servers": cfg.bootstrap_servers,
        "client_id": cfg.client_id,
        "security_protocol": cfg.security_protocol,
        "request_timeout_ms": int(cfg.request_timeout * 1000),
    }
    if cfg.security_protocol in ("SSL", "SASL_SSL"):
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
