"""After a crash: which records past the committed offsets already have an outcome.

Outcomes are written before offsets are committed, so a sink that died in between
leaves records whose outcome is in Kafka but whose offset is not. On assignment the
sink reads its group's outcomes back (their ``source`` header) and does not call DPS
again for those records: duplicate calls are bounded by the calls that were in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from pipeline.io import kafka
from pipeline.stages.sink.outcomes import GROUP, SOURCE

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from pipeline.config import KafkaConfig

__all__ = ["Recovery"]

log = logging.getLogger(__name__)

_CLOCK_SKEW_MS = 60_000


class Recovery:
    """The sources of outcomes this group recorded past its committed offsets.

    Args:
        cfg: the Kafka configuration (outcome topics are read with it).
        group: the sink's consumer group; other groups' outcomes are another pipeline's.
    """

    def __init__(self, cfg: KafkaConfig, group: str) -> None:
        self._cfg = cfg
        self._group = group.encode()
        self._outputs = [cfg.topics.allocations, cfg.topics.allocations_dlq]
        self._recorded: set[bytes] = set()
        self._done = asyncio.Event()
        self._done.set()

    async def wait(self) -> None:
        """Until no read-back is in progress (records must not start before it ends)."""
        await self._done.wait()

    def take(self, source: bytes) -> bool:
        """Whether the record at ``source`` already has an outcome (asked once per record)."""
        if source in self._recorded:
            self._recorded.discard(source)
            return True
        return False

    async def learn(self, consumer: AIOKafkaConsumer, assigned: list[TopicPartition]) -> None:
        """Read back the outcomes recorded since the committed offsets of ``assigned``."""
        if not assigned:
            return
        self._done.clear()
        try:
            since = await self._first_uncommitted_time(consumer, assigned)
            if since is not None:
                # Outcomes are written after their input record, so none of those past the
                # committed offsets is older than the first uncommitted input (less skew).
                found = await self._read_sources(since - _CLOCK_SKEW_MS)
                log.info("sink found %d outcomes recorded since the committed offsets", found)
        finally:
            self._done.set()

    async def _first_uncommitted_time(
        self, consumer: AIOKafkaConsumer, assigned: list[TopicPartition]
    ) -> int | None:
        beginnings = await consumer.beginning_offsets(assigned)
        ends = await consumer.end_offsets(assigned)
        since: int | None = None
        async with kafka.reader(self._cfg) as reader:
            for tp in assigned:
                committed = await consumer.committed(tp)
                first = beginnings[tp] if committed is None else committed
                stamp = await _timestamp_at(reader, tp, first, ends[tp])
                if stamp is not None:
                    since = stamp if since is None else min(since, stamp)
        return since

    async def _read_sources(self, since_ms: int) -> int:
        found = 0
        async with kafka.reader(self._cfg) as reader:
            tps = await kafka.partitions(reader, *self._outputs)
            starts = await reader.offsets_for_times(dict.fromkeys(tps, max(0, since_ms)))
            ends = await reader.end_offsets(tps)
            ranges: kafka.Ranges = {
                tp: (start.offset, ends[tp]) for tp, start in starts.items() if start is not None
            }
            async with asyncio.timeout(60):
                async for record in kafka.read_range(reader, ranges):
                    headers = {name: bytes(value) for name, value in record.headers or ()}
                    # Only this group's outcomes: another group is another pipeline.
                    if SOURCE in headers and headers.get(GROUP) == self._group:
                        self._recorded.add(headers[SOURCE])
                        found += 1
        return found


async def _timestamp_at(
    reader: AIOKafkaConsumer, tp: TopicPartition, start: int, end: int
) -> int | None:
    """The timestamp of the first record of ``tp`` in ``[start, end)``, if there is one."""
    async with (
        asyncio.timeout(10),
        contextlib.aclosing(kafka.read_range(reader, {tp: (start, end)})) as records,
    ):
        async for record in records:
            return int(record.timestamp)
    return None
