"""Topic and consumer-group administration: make, wait for, size up and delete.

Each call opens one admin client for its own work (``async with admin(cfg)``) and
closes it before it returns.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from aiokafka.admin import NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code
from aiokafka.protocol.admin import DeleteGroupsRequest

from pipeline.errors import StageFailed
from pipeline.io import _aiokafka_internals
from pipeline.io.kafka.clients import admin

if TYPE_CHECKING:
    from collections.abc import Iterable

    from pipeline.config import KafkaConfig

__all__ = ["delete_groups", "delete_topics", "ensure_topics", "prepare_topics", "record_limit"]

log = logging.getLogger(__package__)  # the package's one logger: pipeline.io.kafka


async def ensure_topics(
    cfg: KafkaConfig, names: Iterable[str], *, partitions: int | None = None
) -> list[str]:
    """Create the topics that do not exist yet; return the names created."""
    async with admin(cfg) as client:
        existing = set(await client.list_topics())
        missing = [n for n in dict.fromkeys(names) if n not in existing]
        if not missing:
            return []
        # Records up to max_record_size (a 1 MiB event plus its envelope); the broker's
        # default (about 1 MB) would refuse the biggest events IoTDA can send.
        configs = {"max.message.bytes": str(cfg.max_record_size)}
        if cfg.min_insync_replicas is not None:
            configs["min.insync.replicas"] = str(cfg.min_insync_replicas)
        # Topics that hold a latest state per key (the lifecycle, the router's memory).
        compacted = {**configs, "cleanup.policy": "compact"}
        response = await client.create_topics(
            [
                NewTopic(
                    n,
                    partitions or cfg.partitions,
                    cfg.replication_factor,
                    topic_configs=compacted if n in cfg.topics.compacted() else configs,
                )
                for n in missing
            ]
        )
        for name, code, *rest in response.topic_errors:
            if code not in (0, TopicAlreadyExistsError.errno):
                error = for_code(code)
                msg = f"creating topic {name} failed: {error.message} {rest[0] if rest else ''}"
                raise error(msg)
        # Metadata propagates asynchronously; wait until every new topic is visible.
        async with asyncio.timeout(30):
            while not set(missing) <= set(await client.list_topics()):  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        log.info("created topics %s", missing)
        return missing


async def delete_topics(cfg: KafkaConfig, names: Iterable[str]) -> None:
    """Delete ``names`` (those that exist) and wait until the cluster no longer lists them."""
    wanted = set(names)
    async with admin(cfg) as client:
        doomed = sorted(wanted & set(await client.list_topics()))
        if not doomed:
            return
        await client.delete_topics(doomed)
        async with asyncio.timeout(30):
            while set(doomed) & set(await client.list_topics()):  # noqa: ASYNC110
                await asyncio.sleep(0.05)


_GROUP_NOT_FOUND = 69


async def delete_groups(cfg: KafkaConfig, groups: Iterable[str]) -> dict[str, str]:
    """Delete consumer ``groups``; returns those Kafka kept, with why: ask again later.

    Kafka keeps a group that has a live member, or whose coordinator is still loading. A
    group is deleted only once it has no member: one whose process was killed stays
    until its session times out. aiokafka's admin client has no call for DeleteGroups,
    so the request goes to each group's coordinator through the client's connections
    (:func:`pipeline.io._aiokafka_internals.send_to_node`).
    """
    kept: dict[str, str] = {}
    async with admin(cfg) as client:
        for group in dict.fromkeys(groups):
            try:
                node = await client.find_coordinator(group)
                request = DeleteGroupsRequest([group])
                response = await _aiokafka_internals.send_to_node(client, request, node)
            except KafkaError as exc:  # its coordinator is loading or moving: ask again later
                if not exc.retriable:
                    raise
                kept[group] = type(exc).__name__
                continue
            for name, code in response.results:
                if code not in (0, _GROUP_NOT_FOUND):
                    kept[name] = for_code(code).__name__
    return kept


async def prepare_topics(cfg: KafkaConfig, names: Iterable[str], *, wait: float = 120.0) -> None:
    """What a worker does with its topics at start-up.

    With ``kafka.create_topics`` (the default, for local runs) the missing ones are
    created. Without it (production: a one-shot ``pipeline topics create`` makes them with
    the cluster's replication settings) the worker waits up to ``wait`` seconds for them.

    Raises:
        StageFailed: a topic still does not exist after ``wait`` seconds.
    """
    if cfg.create_topics:
        await ensure_topics(cfg, names)
        return
    wanted = list(dict.fromkeys(names))
    async with admin(cfg) as client:
        deadline = time.monotonic() + wait
        warned = False
        while missing := [n for n in wanted if n not in set(await client.list_topics())]:
            if time.monotonic() > deadline:
                msg = (
                    f"topics {', '.join(missing)} do not exist and kafka.create_topics is "
                    "false: run `pipeline topics create`"
                )
                raise StageFailed(msg)
            if not warned:
                log.warning(
                    "waiting up to %g s for topics %s (kafka.create_topics is false; "
                    "`pipeline topics create` makes them)", wait, ", ".join(missing),
                )  # fmt: skip
                warned = True
            await asyncio.sleep(1.0)


async def record_limit(cfg: KafkaConfig, topics: Iterable[str]) -> int:
    """The biggest record every one of ``topics`` takes.

    That is ``kafka.max_record_size``, or less where a topic's ``max.message.bytes`` is
    lower (a topic the pipeline did not create, or one changed since).
    """
    async with admin(cfg) as client:
        wanted = {"max.message.bytes": None}
        responses = await client.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, name, configs=wanted) for name in topics]
        )
    limit = cfg.max_record_size
    for response in responses:
        for error, _, _, name, entries in response.resources:
            for key, value, *_ in entries if not error else ():
                if key == "max.message.bytes" and int(value) < limit:
                    log.info("topic %s takes records up to %s bytes", name, value)
                    limit = int(value)
    return limit
