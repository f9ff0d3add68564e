"""The sink's loop: intake with back-pressure, commits, and what a rebalance needs.

- Records are taken as slots free up (``sink.concurrency``); each is handed to the
  :class:`~.allocator.Allocator` in its own task.
- An offset is committed only once the outcome of its record, and of every record before
  it in the partition, is in Kafka (:class:`~.offsets.OffsetTracker`).
- While the :class:`~.breaker.Breaker` is open, consumption is paused.
- On revocation the records in flight get time to finish and are committed; on
  assignment, outcomes recorded past the committed offsets are read back
  (:class:`~.recovery.Recovery`) before any record of those partitions starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from aiokafka import ConsumerRebalanceListener, TopicPartition

from pipeline.config import DpsConfig
from pipeline.core.mapping import Mapper
from pipeline.dps.client import DpsClient
from pipeline.io import kafka
from pipeline.io.aio import Stopped, unless_stopped
from pipeline.ops.metrics import SINK_INFLIGHT, SINK_OUTCOMES, SINK_PAUSED
from pipeline.stages.sink.allocator import Allocator
from pipeline.stages.sink.breaker import Breaker
from pipeline.stages.sink.offsets import OffsetTracker
from pipeline.stages.sink.outcomes import Outcomes, source_header
from pipeline.stages.sink.recovery import Recovery

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer, ConsumerRecord

    from pipeline.config import Config
    from pipeline.ops.server import Health

__all__ = ["Sink"]

log = logging.getLogger(__name__)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self._sink.hand_back(list(revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self._sink.recover(list(assigned))


class Sink:
    """The sink worker.

    Args:
        cfg: the whole configuration (``kafka`` and ``sink`` sections are used).
        health: readiness checks to keep up to date (``kafka``, ``dps``).
    """

    def __init__(self, cfg: Config, health: Health | None = None) -> None:
        s = cfg.sink
        self._cfg = cfg
        self._topics = cfg.kafka.topics
        self._health = health
        self._mapper = Mapper(
            sn_from=s.sn_from, org_id=s.org_id, org_overrides=s.org_overrides,
            device_data=s.device_data,
        )  # fmt: skip
        self._slots = asyncio.Semaphore(s.concurrency)
        self._tracker = OffsetTracker()
        self._breaker = Breaker(s.retry_initial, s.retry_max, self._paused)
        self._recovery = Recovery(cfg.kafka, s.group_id)
        self._consumer: AIOKafkaConsumer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        if health is not None:
            health.set("sink.kafka", False)
            health.set("sink.dps", False)

    def _paused(self, failing: bool) -> None:
        SINK_PAUSED.set(1 if failing else 0)
        if self._health is not None:
            self._health.set("sink.dps", not failing)
        consumer = self._consumer
        if consumer is None:
            return
        if failing:
            log.warning("DPS is failing: pausing consumption, probing with backoff")
            consumer.pause(*consumer.assignment())
        else:
            log.info("DPS answers again: resuming consumption")
            consumer.resume(*consumer.assignment())

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then hand back in-flight work and commit."""
        await kafka.wait_until_reachable(self._cfg.kafka, stop)
        topics = self._topics
        await kafka.ensure_topics(
            self._cfg.kafka, [topics.added, topics.allocations, topics.allocations_dlq]
        )
        consumer = kafka.consumer(self._cfg.kafka, group_id=self._cfg.sink.group_id)
        producer = kafka.producer(self._cfg.kafka)
        self._consumer = consumer
        async with producer, consumer, DpsClient(self._cfg.sink.dps) as dps:
            outcomes = Outcomes(producer, topics, self._cfg.sink.group_id)
            allocator = Allocator(
                self._cfg.sink, mapper=self._mapper, dps=dps, breaker=self._breaker,
                outcomes=outcomes,
            )  # fmt: skip
            consumer.subscribe([topics.added], listener=_Rebalance(self))
            if self._health is not None:
                self._health.set("sink.kafka", True)
                self._health.set("sink.dps", True)
            log.info("sink consuming %s as %s", topics.added, self._cfg.sink.group_id)
            dps_cfg = self._cfg.sink.dps
            if dps_cfg.app_key == DpsConfig().app_key and "127.0.0.1" not in dps_cfg.base_url:
                log.warning(
                    "sink.dps.app_key is the demo default while %s is not local: "
                    "set sink.dps.app_key and sink.dps.app_secret",
                    dps_cfg.base_url,
                )
            committer = asyncio.create_task(self._commit_loop(stop), name="sink.commit")
            try:
                await self._consume(consumer, allocator, outcomes, stop)
            finally:
                await self._shutdown(committer)
        log.info("sink stopped")

    async def _consume(
        self,
        consumer: AIOKafkaConsumer,
        allocator: Allocator,
        outcomes: Outcomes,
        stop: asyncio.Event,
    ) -> None:
        stopped = asyncio.create_task(stop.wait())
        try:
            while True:
                batch = await unless_stopped(
                    stopped,
                    consumer.getmany(timeout_ms=500, max_records=self._cfg.sink.concurrency),
                )
                for tp, records in batch.items():
                    for record in records:
                        # Capacity first: this is where back-pressure stops intake. A record
                        # not started is not committed: it is consumed again next time.
                        await unless_stopped(stopped, self._slots.acquire())
                        self._tracker.start(tp, record.offset)
                        task = asyncio.create_task(self._handle(allocator, outcomes, tp, record))
                        self._tasks.add(task)
                        task.add_done_callback(self._tasks.discard)
        except Stopped:
            pass
        finally:
            stopped.cancel()

    async def _handle(
        self,
        allocator: Allocator,
        outcomes: Outcomes,
        tp: TopicPartition,
        record: ConsumerRecord[bytes, bytes],
    ) -> None:
        SINK_INFLIGHT.inc()
        try:
            await self._recovery.wait()
            source = source_header(tp.topic, tp.partition, record.offset)
            if self._recovery.take(source):
                SINK_OUTCOMES.labels("already_recorded").inc()
            else:
                try:
                    await allocator.process(record, source)
                except Exception as exc:
                    # A bug must not stop this partition's commits for good: dead-letter
                    # the record with the reason, so it can be redriven once fixed.
                    log.exception("unexpected error handling %s", source.decode())
                    await outcomes.dead_letter(
                        record, source, None, kind="invalid", code=None,
                        message=f"internal error: {exc!r}", request_id=None, attempts=0,
                    )  # fmt: skip
            self._tracker.done(tp, record.offset)
            if self._breaker.open and not self._tracker.in_flight() and self._consumer:
                # DPS is failing and no record is left to probe with (they gave up): fetch
                # the next ones, or consumption would stay paused for good.
                log.info("no record in flight while DPS is failing: fetching one to probe")
                self._consumer.resume(*self._consumer.assignment())
        finally:
            SINK_INFLIGHT.dec()
            self._slots.release()

    async def _shutdown(self, committer: asyncio.Task[None]) -> None:
        if self._tasks:
            log.info("waiting for %d in-flight records", len(self._tasks))
            _, pending = await asyncio.wait(self._tasks, timeout=self._cfg.sink.dps.timeout * 2)
            for task in pending:  # handed back: not committed, allocated again next time
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        committer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await committer
        await self._commit()

    async def _commit_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(self._cfg.sink.commit_interval)
            await self._commit()

    async def _commit(self) -> None:
        commits = self._tracker.take_commits()
        if not commits or self._consumer is None:
            return
        assigned = self._consumer.assignment()
        commits = {tp: offset for tp, offset in commits.items() if tp in assigned}
        try:
            await self._consumer.commit(commits)
        except Exception as exc:  # a rebalance in progress: the records will be redone
            log.warning("offset commit failed (%s); those records may be allocated again", exc)

    async def hand_back(self, revoked: list[TopicPartition]) -> None:
        """Before partitions go elsewhere: let their in-flight records finish, then commit."""
        tps = set(revoked)
        deadline = time.monotonic() + self._cfg.sink.dps.timeout * 2
        while self._tracker.in_flight(tps) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await self._commit()
        self._tracker.forget(revoked)

    async def recover(self, assigned: list[TopicPartition]) -> None:
        """Learn which records past the committed offsets already have a recorded outcome."""
        consumer = self._consumer
        if consumer is None or not assigned:
            return
        if self._breaker.open:
            consumer.pause(*assigned)
        # aiokafka fetches for the new partitions while this callback runs: no record may
        # be handled before we know which already have an outcome.
        await self._recovery.learn(consumer, assigned)
