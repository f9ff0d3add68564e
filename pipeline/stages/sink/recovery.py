"""After a crash: which records past the committed offsets already have an outcome.

Outcomes are written before offsets are committed, so a sink that died in between
leaves records whose outcome is in Kafka but whose offset is not. When partitions are
assigned, the sink reads its group's outcomes back (their ``source`` header) and does
not call DPS again for those records: duplicate calls are bounded by the calls that
were in flight.

The read-back runs beside the consumer, not in its rebalance callback. Each partition is
*pending* from :meth:`Recovery.begin` until its read-back is done; :meth:`Recovery.ready`
waits for that, and says whether records of the partition may start: only once what
was recorded past its committed offset is known, never after a failed read-back, and
never for a partition forgotten (revoked) meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from aiokafka import TopicPartition

from pipeline.io import kafka
from pipeline.stages.sink.outcomes import GROUP, SOURCE, parse_source

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable

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
        limit: seconds a read-back may take; past it :meth:`learn` fails (records of
            its partitions would otherwise wait without an end).
        also: what else must be known before records of the partitions start (the
            children's lifecycle, :class:`~.lifecycle.Lifecycle`), read within ``limit``.
    """

    def __init__(
        self,
        cfg: KafkaConfig,
        group: str,
        *,
        limit: float,
        also: Callable[[list[TopicPartition]], Awaitable[None]] | None = None,
    ) -> None:
        self._cfg = cfg
        self._also = also
        self._group = group.encode()
        self._limit = limit
        self._outputs = [cfg.topics.allocations, cfg.topics.allocations_dlq, cfg.topics.releases]
        self._recorded: dict[TopicPartition, set[int]] = {}
        # Partitions whose read-back is not done yet; each event is set when it ends
        # (done, failed or forgotten). Events, not futures: a waiter cancelled (its
        # record handed back) must not cancel what the others wait on.
        self._pending: dict[TopicPartition, asyncio.Event] = {}
        self._failed = False

    def begin(self, tps: Iterable[TopicPartition]) -> None:
        """Mark ``tps`` pending: their records wait in :meth:`ready` until :meth:`learn`.

        A partition already pending stays so: its waiters go on waiting.
        """
        for tp in tps:
            self._recorded.pop(tp, None)
            self._pending.setdefault(tp, asyncio.Event())

    async def ready(self, tp: TopicPartition) -> bool:
        """Wait until ``tp`` is no longer pending; whether its records may start.

        False if its read-back failed (the stage is stopping, and a record started
        without the read-back may be allocated twice), or ``tp`` was never read back or
        was forgotten (revoked) meanwhile.
        """
        pending = self._pending.get(tp)
        if pending is not None:
            await pending.wait()
        return self.started(tp)

    def pending(self, tp: TopicPartition) -> bool:
        """Whether ``tp`` is being read back (then :meth:`ready` waits)."""
        return tp in self._pending

    def started(self, tp: TopicPartition) -> bool:
        """:meth:`ready` of a ``tp`` not :meth:`pending`, without the coroutine."""
        return not self._failed and tp in self._recorded

    def take(self, tp: TopicPartition, offset: int) -> bool:
        """Whether the record at ``tp``/``offset`` already has an outcome (asked once)."""
        offsets = self._recorded.get(tp)
        if offsets is None or offset not in offsets:
            return False
        offsets.discard(offset)
        return True

    def forget(self, tps: Iterable[TopicPartition]) -> None:
        """Drop what is known about revoked partitions; their waiters are told no."""
        for tp in tps:
            self._recorded.pop(tp, None)
            pending = self._pending.pop(tp, None)
            if pending is not None:
                pending.set()

    def known(self) -> int:
        """Recorded outcomes still waiting for their record to come by."""
        return sum(len(offsets) for offsets in self._recorded.values())

    async def learn(self, consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> None:
        """Read back the outcomes recorded since the committed offsets of ``tps``.

        ``tps`` are pending until it returns (:meth:`begin` is implied); then those still
        pending (not forgotten meanwhile) are ready. Cancelled, it leaves them pending:
        the caller forgets them or reads them back again.

        Raises:
            TimeoutError: it took longer than ``limit`` seconds (the partitions fail).
            Exception: any other failure to read (the partitions fail).
        """
        if not tps:
            return
        self.begin(tps)
        try:
            async with asyncio.timeout(self._limit):
                since = await self._first_uncommitted_time(consumer, tps)
                found: dict[TopicPartition, set[int]] = {tp: set() for tp in tps}
                if since is not None:
                    # Outcomes are written after their input record, so none of those past
                    # the committed offsets is older than the first uncommitted input (less
                    # clock skew).
                    await self._read_sources(since - _CLOCK_SKEW_MS, found)
                if self._also is not None:
                    await self._also(tps)  # within the same limit, before any record starts
        except TimeoutError as exc:
            self._fail(tps)
            msg = f"reading back the recorded outcomes took longer than {self._limit:g} s"
            raise TimeoutError(msg) from exc
        except Exception:
            self._fail(tps)
            raise
        for tp, offsets in found.items():
            pending = self._pending.pop(tp, None)
            if pending is not None:  # not forgotten meanwhile
                self._recorded[tp] = offsets
                pending.set()
        log.info("sink found %d outcomes recorded since the committed offsets", self.known())

    def _fail(self, tps: list[TopicPartition]) -> None:
        self._failed = True
        for tp in tps:
            pending = self._pending.pop(tp, None)
            if pending is not None:
                pending.set()

    async def _first_uncommitted_time(
        self, consumer: AIOKafkaConsumer, assigned: list[TopicPartition]
    ) -> int | None:
        beginnings = await consumer.beginning_offsets(assigned)
        ends = await consumer.end_offsets(assigned)
        ranges: kafka.Ranges = {}
        for tp in assigned:
            committed = await consumer.committed(tp)
            first = beginnings[tp] if committed is None else committed
            if first < ends[tp]:
                ranges[tp] = (first, ends[tp])
        if not ranges:
            # Nothing uncommitted. No reader either: one stopped before it ever waited
            # raises a CancelledError of aiokafka's into this task (0.14:
            # NoGroupCoordinator.close() awaits its own task, cancelled before it ran).
            return None
        async with kafka.reader(self._cfg) as reader:
            stamps = await _first_timestamps(reader, ranges)
        return min(stamps, default=None)

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


async def _first_timestamps(reader: AIOKafkaConsumer, ranges: kafka.Ranges) -> list[int]:
    """The timestamp of the first record in ``[start, end)`` of each partition that has one.

    All partitions are read at once, each paused at its first record: usually one fetch
    in all. (Read one after another, each partition would first wait out the fetch left
    waiting for the previous one, up to ``fetch_max_wait_ms``: 0.5 s a partition.)
    """
    live = {tp: end for tp, (start, end) in ranges.items() if start < end}
    reader.assign(list(live))
    for tp in live:
        reader.seek(tp, ranges[tp][0])
    stamps: list[int] = []
    while live:
        batch = await reader.getmany(*live, timeout_ms=500)
        for tp, records in batch.items():
            first = next((r for r in records if r.offset < live.get(tp, -1)), None)
            if first is not None:
                stamps.append(int(first.timestamp))
                reader.pause(tp)
                del live[tp]
        # A read-committed consumer skips transaction markers and aborted records: a
        # partition whose position reaches its end has no record in the range.
        live = {tp: end for tp, end in live.items() if await reader.position(tp) < end}
    return stamps
