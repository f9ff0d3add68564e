"""Reading a topic between two offsets, and what lies between them.

Every "read the records of a topic between two offsets" goes through :func:`read_range`,
with ranges from :func:`whole`, from :func:`window` (a time window, by the brokers' time
index) or built from :func:`partitions` and the consumer's offsets; :func:`size` and
:func:`backlog` count what such a range holds.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

from aiokafka import TopicPartition
from aiokafka.cluster import ClusterMetadata
from aiokafka.errors import KafkaConnectionError, KafkaError

from pipeline.io import _aiokafka_internals
from pipeline.io.aio import Backoff
from pipeline.io.kafka.clients import admin, reader

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Mapping

    from aiokafka import AIOKafkaConsumer, ConsumerRecord
    from aiokafka.admin import AIOKafkaAdminClient

    from pipeline.config import KafkaConfig

__all__ = ["Ranges", "backlog", "partitions", "read_range", "size", "whole", "window"]

Ranges = dict[TopicPartition, tuple[int, int]]
"""Per partition, the offsets ``[start, end)`` to read."""


async def partitions(client: AIOKafkaConsumer, *topics: str) -> list[TopicPartition]:
    """Every partition of ``topics``, from fresh cluster metadata (for manual assignment).

    Only ``topics`` are asked for: a cluster-wide metadata request costs in proportion
    to every topic of the cluster (thousands, on a shared one). aiokafka has no public
    call for it (:func:`pipeline.io._aiokafka_internals.fetch_metadata`).
    """
    cluster = ClusterMetadata()
    if not await _aiokafka_internals.fetch_metadata(client, cluster, topics):
        msg = f"no broker answered a metadata request for {', '.join(topics)}"
        raise KafkaConnectionError(msg)
    return [
        TopicPartition(topic, p)
        for topic in topics
        for p in sorted(cluster.partitions_for_topic(topic) or ())
    ]


async def read_range(
    client: AIOKafkaConsumer,
    ranges: Mapping[TopicPartition, tuple[int, int]],
    *,
    max_records: int | None = None,
) -> AsyncGenerator[ConsumerRecord[bytes, bytes]]:
    """Every record with ``start <= offset < end``, partition by partition in offset order.

    ``max_records``: records taken from the consumer at a time (default: all it fetched),
    so that a long read holds few decoded records at once.

    ``client`` is assigned exactly the partitions with something to read. A partition
    is done when the consumer's position reaches ``end``: a read-committed consumer never
    sees transaction markers or aborted records, so the record at ``end - 1`` may not
    exist. Use :func:`contextlib.aclosing` to stop early, and ``asyncio.timeout`` around
    the loop to bound it.
    """
    live = {tp: end for tp, (start, end) in ranges.items() if start < end}
    if not live:
        return
    client.assign(list(live))
    for tp, (start, _) in ranges.items():
        if tp in live:
            client.seek(tp, start)
    while live:
        batch = await client.getmany(*live, timeout_ms=500, max_records=max_records)
        for tp, records in batch.items():
            for record in records:
                if record.offset < live.get(tp, -1):
                    yield record
        live = {tp: end for tp, end in live.items() if await client.position(tp) < end}


async def whole(client: AIOKafkaConsumer, *topics: str) -> Ranges:
    """The ranges holding every record of ``topics`` now: beginning to end."""
    tps = await partitions(client, *topics)
    if not tps:
        return {}
    begins = await client.beginning_offsets(tps)
    ends = await client.end_offsets(tps)
    return {tp: (begins[tp], ends[tp]) for tp in tps}


async def window(
    client: AIOKafkaConsumer,
    tps: list[TopicPartition],
    since_ms: int | None = None,
    until_ms: int | None = None,
) -> Ranges:
    """The ranges of ``tps`` holding the records timestamped in ``[since_ms, until_ms)``.

    Found by the brokers' time index (``offsets_for_times``), not by reading: a window
    costs two lookups per partition whatever the partition holds. A bound left out is
    the partition's beginning or end. Timestamps are the records' (CreateTime, set by the
    producer); a record timestamped out of order with its neighbours may fall either side.
    """
    if not tps:
        return {}
    begins, ends, since, until = await asyncio.gather(
        client.beginning_offsets(tps),
        client.end_offsets(tps),
        _at(client, tps, since_ms),
        _at(client, tps, until_ms),
    )
    # No record at or after a bound: the range starts (or ends) at the end.
    starts = {tp: begins[tp] if since_ms is None else since.get(tp, ends[tp]) for tp in tps}
    stops = {tp: ends[tp] if until_ms is None else until.get(tp, ends[tp]) for tp in tps}
    return {tp: (starts[tp], max(starts[tp], stops[tp])) for tp in tps}


async def _at(
    client: AIOKafkaConsumer, tps: list[TopicPartition], ms: int | None
) -> dict[TopicPartition, int]:
    """Per partition, the first offset timestamped at or after ``ms`` (none: left out)."""
    if ms is None:
        return {}
    found = await client.offsets_for_times(dict.fromkeys(tps, ms))
    return {tp: at.offset for tp, at in found.items() if at is not None}


async def size(cfg: KafkaConfig, *topics: str) -> int:
    """Offsets held by ``topics`` (records, plus a marker per transaction if transactional)."""
    async with reader(cfg) as peek:
        tps = await partitions(peek, *topics)
        if not tps:
            return 0
        ends = await peek.end_offsets(tps)
        begins = await peek.beginning_offsets(tps)
        return sum(ends[tp] - begins[tp] for tp in tps)


async def backlog(cfg: KafkaConfig, group: str, topic: str) -> int:
    """Records of ``topic`` that consumer group ``group`` has not committed yet.

    ``end - committed`` overcounts on transactional topics: every commit marker takes an
    offset. Where that difference is non-zero, look: if no committed record follows the
    group's offset, the group is idle on that partition.
    """
    total = 0
    async with admin(cfg) as client, reader(cfg) as peek:
        tps = await partitions(peek, topic)
        ends = await peek.end_offsets(tps)
        begins = await peek.beginning_offsets(tps)
        done = await _group_offsets(client, group)
        for tp in tps:
            start = done[tp].offset if tp in done else begins[tp]
            if await _any_record(peek, tp, start, ends[tp]):
                total += ends[tp] - start
    return total


_COORDINATOR_WAIT = 10.0
"""Seconds to keep asking for a group's offsets while its coordinator is not available."""


async def _group_offsets(client: AIOKafkaAdminClient, group: str) -> dict[TopicPartition, Any]:
    """A group's committed offsets; a coordinator still loading or moving is waited for."""
    backoff = Backoff(0.1, 1.0)
    async with asyncio.timeout(_COORDINATOR_WAIT):
        while True:
            try:
                offsets: dict[TopicPartition, Any] = await client.list_consumer_group_offsets(group)
            except KafkaError as exc:
                if not exc.retriable:
                    raise
                await asyncio.sleep(backoff.next())
            else:
                return offsets


async def _any_record(client: AIOKafkaConsumer, tp: TopicPartition, start: int, end: int) -> bool:
    async with contextlib.aclosing(read_range(client, {tp: (start, end)})) as records:
        async for _ in records:
            return True
    return False
