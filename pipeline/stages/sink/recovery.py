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

from aiokafka import TopicPartition

from pipeline.io import kafka
from pipeline.stages.sink.outcomes import GROUP, SOURCE, parse_source

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer

    from pipeline.config import KafkaConfig

__all__ = ["Recovery"]

log = logging.getLogger(__name__)

_CLOCK_SKEW_MS = 60_000


class Recovery:
    """The input offsets, per assigned partition, whose outcome this group already recorded.

    Only the partitions this worker is assigned are kept (others are other replicas'),
    and a partition's entries go when it is revoked or its record is taken.

    Args:
        cfg: the Kafka configuration (outcome topics are read with it).
        group: the sink's consumer group; other groups' outcomes are another pipeline's.
        limit: seconds a read-back may take (it runs in the assignment callback, while
            the consumer sends no heartbeat).
    """

    def __init__(self, cfg: KafkaConfig, group: str, *, limit: float) -> None:
        self._cfg = cfg
        self._group = group.encode()
        self._limit = limit
        self._outputs = [cfg.topics.allocations, cfg.topics.allocations_dlq]
        self._recorded: dict[TopicPartition, set[int]] = {}
        self._done = asyncio.Event()
        self._done.set()
        self._failed = False

    async def ready(self) -> bool:
        """Wait until no read-back is in progress; False if the last one failed.

        A record must not start before then, nor at all after a failure: the stage is
        stopping (and a record started without the read-back may be allocated twice).
        """
        await self._done.wait()
        return not self._failed

    def take(self, tp: TopicPartition, offset: int) -> bool:
        """Whether the record at ``tp``/``offset`` already has an outcome (asked once)."""
        offsets = self._recorded.get(tp)
        if offsets is None or offset not in offsets:
            return False
        offsets.discard(offset)
        return True

    def forget(self, tps: list[TopicPartition]) -> None:
        """Drop what is known about revoked partitions."""
        for tp in tps:
            self._recorded.pop(tp, None)

    def known(self) -> int:
        """Recorded outcomes still waiting for their record to come by."""
        return sum(len(offsets) for offsets in self._recorded.values())

    async def learn(self, consumer: AIOKafkaConsumer, assigned: list[TopicPartition]) -> None:
        """Read back the outcomes recorded since the committed offsets of ``assigned``.

        Raises:
            TimeoutError: it took longer than ``limit`` seconds.
        """
        if not assigned:
            return
        self._done.clear()
        try:
            async with asyncio.timeout(self._limit):
                since = await self._first_uncommitted_time(consumer, assigned)
                found: dict[TopicPartition, set[int]] = {tp: set() for tp in assigned}
                if since is not None:
                    # Outcomes are written after their input record, so none of those past
                    # the committed offsets is older than the first uncommitted input (less
                    # clock skew).
                    await self._read_sources(since - _CLOCK_SKEW_MS, found)
            self._recorded = found
            log.info("sink found %d outcomes recorded since the committed offsets", self.known())
        except TimeoutError as exc:
            self._failed = True
            msg = f"reading back the recorded outcomes took longer than {self._limit:g} s"
            raise TimeoutError(msg) from exc
        except BaseException:
            self._failed = True
            raise
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

    async def _read_sources(self, since_ms: int, found: dict[TopicPartition, set[int]]) -> None:
        """Add to ``found`` the input offsets named by this group's outcomes since then."""
        async with kafka.reader(self._cfg) as reader:
            tps = await kafka.partitions(reader, *self._outputs)
            starts = await reader.offsets_for_times(dict.fromkeys(tps, max(0, since_ms)))
            ends = await reader.end_offsets(tps)
            ranges: kafka.Ranges = {
                tp: (start.offset, ends[tp]) for tp, start in starts.items() if start is not None
            }
            async for record in kafka.read_range(reader, ranges):
                headers = {name: bytes(value) for name, value in record.headers or ()}
                # Only this group's outcomes: another group is another pipeline.
                if SOURCE in headers and headers.get(GROUP) == self._group:
                    where = parse_source(headers[SOURCE])
                    if where is not None:
                        tp = TopicPartition(where[0], where[1])
                        if tp in found:
                            found[tp].add(where[2])


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
