"""The sink's loop: intake with back-pressure, commits, and what a rebalance needs.

- Records are taken while fewer than ``sink.max_pending`` are in progress, each in its
  own task; the :class:`~.allocator.Allocator` bounds the calls in flight
  (``sink.concurrency``), so records waiting to retry do not hold up the others.
- Only records of partitions this worker owns, fetched under their current assignment,
  are started: records fetched before a hand-back are dropped, never started late.
- An offset is committed only once the outcome of its record, and of every record before
  it in the partition, is in Kafka (:class:`~.offsets.OffsetTracker`).
- While the :class:`~.breaker.Breaker` is open, intake is paused and readiness says why.
- On revocation (and at shutdown), records with a call on the wire get up to
  twice ``dps.timeout`` to finish, the others are handed back uncommitted, and the finished
  prefix is committed; the consumer's rebalance and session timeouts leave room for
  that. On assignment, outcomes recorded past the committed offsets are read back
  (:class:`~.recovery.Recovery`) before any record of those partitions starts.
- A failed rebalance callback, or an outcome Kafka refuses for good, ends the stage with
  :class:`~pipeline.errors.StageFailed` (the process exits non-zero).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import time
from typing import TYPE_CHECKING

from pipeline.config import DpsConfig
from pipeline.core.mapping import Mapper
from pipeline.dps.client import DpsClient
from pipeline.errors import StageFailed
from pipeline.io import kafka
from pipeline.io.aio import Backoff, first_set
from pipeline.ops.metrics import (
    SINK_BREAKER_OPENS,
    SINK_INFLIGHT,
    SINK_OUTCOMES,
    SINK_PAUSED,
    report_lag,
)
from pipeline.stages.sink.allocator import Allocator
from pipeline.stages.sink.breaker import Breaker
from pipeline.stages.sink.limiter import RateLimiter
from pipeline.stages.sink.offsets import OffsetTracker
from pipeline.stages.sink.outcomes import Outcomes, log_context, source_header
from pipeline.stages.sink.recovery import Recovery

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

    from pipeline.config import Config
    from pipeline.ops.server import Health

__all__ = ["Sink"]

log = logging.getLogger(__name__)

_REBALANCE_MARGIN = 10.0
"""Seconds the consumer's rebalance and session timeouts allow beyond a hand-back (or a
read-back): the commit that follows it, and Kafka's own round trips."""
_POLL = 0.05
"""Seconds between looks at records being handed back."""


class Sink:
    """The sink worker.

    Args:
        cfg: the whole configuration (``kafka`` and ``sink`` sections are used).
        health: readiness checks (``sink.kafka``, ``sink.dps``) and progress to report.
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
        self._hand_back_limit = 2 * s.dps.timeout
        self._pending = asyncio.Semaphore(s.pending_limit)
        self._tracker = OffsetTracker()
        self._breaker = Breaker(
            Backoff(s.retry_initial, s.retry_max), self._dps_state, failures=s.breaker_failures
        )
        self._limiter = RateLimiter(s.rate_limit)
        self._recovery = Recovery(cfg.kafka, s.group_id, limit=self._hand_back_limit)
        self._consumer: AIOKafkaConsumer | None = None
        self._allocator: Allocator | None = None
        self._jobs: dict[asyncio.Task[None], tuple[TopicPartition, bytes]] = {}
        self._owned: set[TopicPartition] = set()
        # Bumped on every hand-back and assignment: a batch fetched under an older one is stale.
        self._epochs: collections.Counter[TopicPartition] = collections.Counter()
        self._dps_failing = False
        self._failed = asyncio.Event()
        self._error: StageFailed | None = None
        if health is not None:
            health.set("sink.kafka", False)
            health.set("sink.dps", False)
            health.watch("sink", lambda: self._in_progress() > 0)
        SINK_INFLIGHT.set_function(self._in_progress)  # read when scraped

    def _in_progress(self) -> int:
        return len(self._jobs)

    def _beat(self) -> None:
        if self._health is not None:
            self._health.beat("sink")

    def _dps_state(self, failing: bool, reason: str | None) -> None:
        """The breaker opened (or its reason changed) or closed: tell the operator."""
        opened = failing and not self._dps_failing
        self._dps_failing = failing
        SINK_PAUSED.set(1 if failing else 0)
        if self._health is not None:
            self._health.set("sink.dps", not failing, detail=reason)
        if opened:
            SINK_BREAKER_OPENS.inc()
            log.warning(
                "DPS fails for everyone: pausing intake, probing with backoff (%s)", reason,
                extra={"reason": reason},
            )  # fmt: skip
        elif failing:
            log.warning("DPS still fails, now: %s", reason, extra={"reason": reason})
        else:
            log.info("DPS answers again: resuming intake")
        self._sync_intake()

    def _sync_intake(self) -> None:
        """Pause intake while the breaker is open, unless no record is left to probe with."""
        consumer = self._consumer
        if consumer is None:
            return
        assigned = consumer.assignment()
        if self._breaker.open and self._tracker.in_flight():
            consumer.pause(*assigned)
        else:
            consumer.resume(*assigned)

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then hand back in-flight work and commit.

        Raises:
            StageFailed: a rebalance callback failed, or Kafka refused an outcome for good.
        """
        await kafka.wait_until_reachable(self._cfg.kafka, stop)
        topics = self._topics
        await kafka.prepare_topics(
            self._cfg.kafka, [topics.added, topics.allocations, topics.allocations_dlq]
        )
        # A hand-back (revocation) runs while other members wait to rejoin, and a
        # read-back (assignment) runs before heartbeats resume: both must fit.
        timeout_ms = int((self._hand_back_limit + _REBALANCE_MARGIN) * 1000)
        consumer = kafka.consumer(
            self._cfg.kafka, group_id=self._cfg.sink.group_id,
            rebalance_timeout_ms=timeout_ms, session_timeout_ms=timeout_ms,
        )  # fmt: skip
        # Every outcome is awaited as soon as it is sent (its call slot waits for it): a
        # linger would only delay it. Under load, records still share a request: those
        # sent while one is on the wire go together in the next.
        producer = kafka.producer(self._cfg.kafka, linger_ms=0)
        self._consumer = consumer
        listener = kafka.Rebalance("sink", revoked=self.hand_back, assigned=self.recover)
        async with producer, consumer, DpsClient(self._cfg.sink.dps) as dps:
            outcomes = Outcomes(producer, topics, self._cfg.sink.group_id, on_recorded=self._beat)
            self._allocator = Allocator(
                self._cfg.sink, mapper=self._mapper, dps=dps, breaker=self._breaker,
                limiter=self._limiter, outcomes=outcomes, on_answer=self._beat,
            )  # fmt: skip
            consumer.subscribe([topics.added], listener=listener)
            self._started()
            stopped = first_set(stop, listener.failed, self._failed)
            committer = asyncio.create_task(self._commit_loop(stop), name="sink.commit")
            lag = asyncio.create_task(
                kafka.watch_lag(consumer, functools.partial(report_lag, "sink")), name="sink.lag"
            )
            liveness = kafka.Liveness(self._cfg.kafka, "sink", self._kafka_state)
            watcher = asyncio.create_task(liveness.run(), name="sink.kafka-liveness")
            try:
                await self._consume(consumer, outcomes, stopped)
            finally:
                stopped.cancel()
                for task in (lag, watcher):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                await self._shutdown(committer)
        listener.raise_if_failed()
        if self._error is not None:
            raise self._error
        log.info("sink stopped")

    def _kafka_state(self, ok: bool, reason: str | None) -> None:
        if self._health is not None:
            self._health.set("sink.kafka", ok, reason)

    def _started(self) -> None:
        if self._health is not None:
            self._health.set("sink.dps", True)
        log.info("sink consuming %s as %s", self._topics.added, self._cfg.sink.group_id)
        dps_cfg = self._cfg.sink.dps
        if dps_cfg.app_key == DpsConfig().app_key and "127.0.0.1" not in dps_cfg.base_url:
            log.warning(
                "sink.dps.app_key is the demo default while %s is not local: "
                "set sink.dps.app_key and sink.dps.app_secret",
                dps_cfg.base_url,
            )

    async def _consume(
        self, consumer: AIOKafkaConsumer, outcomes: Outcomes, stopped: asyncio.Task[None]
    ) -> None:
        """Take records until ``stopped``; then the intake is cancelled where it waits."""
        intake = asyncio.create_task(self._intake(consumer, outcomes), name="sink.intake")
        try:
            await asyncio.wait({intake, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            intake.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await intake  # an error of the intake's own is raised here

    async def _intake(self, consumer: AIOKafkaConsumer, outcomes: Outcomes) -> None:
        limit = self._cfg.sink.pending_limit
        while True:
            batch = await consumer.getmany(timeout_ms=500, max_records=limit)
            epochs = {tp: self._epochs[tp] for tp in batch}
            for tp, records in batch.items():
                for record in records:
                    # Capacity first: this is where back-pressure stops intake. A record
                    # not started is not committed: it is consumed again next time.
                    await self._pending.acquire()
                    if tp not in self._owned or self._epochs[tp] != epochs[tp]:
                        # Handed back while this batch waited: whoever owns the
                        # partition now reads these records from the committed offset.
                        self._pending.release()
                        break
                    self._start(outcomes, tp, record)

    def _start(
        self, outcomes: Outcomes, tp: TopicPartition, record: ConsumerRecord[bytes, bytes]
    ) -> None:
        self._tracker.start(tp, record.offset)
        if not self._jobs:
            self._beat()  # idle until now: the stall clock starts here, not at the last beat
        source = source_header(tp.topic, tp.partition, record.offset)
        task = asyncio.create_task(
            self._handle(outcomes, tp, record, source), name=f"sink {source.decode()}"
        )
        self._jobs[task] = (tp, source)
        if self._breaker.open:
            self._sync_intake()  # taken in to probe with: pause again
        # A callback, not a `finally`: a task cancelled before it first runs runs no code.
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        del self._jobs[task]
        self._pending.release()

    async def _handle(
        self,
        outcomes: Outcomes,
        tp: TopicPartition,
        record: ConsumerRecord[bytes, bytes],
        source: bytes,
    ) -> None:
        if not await self._recovery.ready():
            return  # the read-back failed: the stage is stopping, the record stays uncommitted
        try:
            await self._process(outcomes, tp, record, source)
        except StageFailed as exc:
            if self._error is None:
                self._error = exc
            log.error("%s; stopping", exc, extra=log_context(record, None))  # noqa: TRY400
            self._failed.set()
            return
        self._tracker.done(tp, record.offset)
        if self._breaker.open:
            self._sync_intake()  # the last record in progress may have given up

    async def _process(
        self,
        outcomes: Outcomes,
        tp: TopicPartition,
        record: ConsumerRecord[bytes, bytes],
        source: bytes,
    ) -> None:
        if self._recovery.take(tp, record.offset):
            SINK_OUTCOMES.labels("already_recorded").inc()
            return
        assert self._allocator is not None  # noqa: S101  (set before intake starts)
        try:
            await self._allocator.process(record, source)
        except StageFailed:
            raise
        except Exception as exc:
            # A bug must not stop this partition's commits for good: dead-letter the
            # record with the reason, so it can be redriven once fixed.
            log.exception("unexpected error handling a record", extra=log_context(record, None))
            await outcomes.dead_letter(
                record, source, None, kind="invalid", code=None,
                message=f"internal error: {exc!r}", request_id=None, attempts=0,
            )  # fmt: skip

    async def _release(self, tps: set[TopicPartition] | None) -> None:
        """Hand back the records in progress in ``tps`` (None: all).

        Records with a call on the wire (or an outcome being written) get up to the
        hand-back limit to finish; the others are cancelled: not committed, they are
        consumed again by whoever owns the partition next.
        """
        jobs = {task: src for task, (tp, src) in self._jobs.items() if tps is None or tp in tps}
        if not jobs:
            return
        busy = self._allocator.busy if self._allocator is not None else set()
        log.info("handing back %d records in progress", len(jobs))
        deadline = time.monotonic() + self._hand_back_limit
        cancelled: set[asyncio.Task[None]] = set()
        left = set(jobs)
        while left:
            late = time.monotonic() >= deadline
            for task in left - cancelled:
                if late or jobs[task] not in busy:
                    task.cancel()
                    cancelled.add(task)
            _, left = await asyncio.wait(left, timeout=_POLL)
        await asyncio.gather(*jobs, return_exceptions=True)

    async def _shutdown(self, committer: asyncio.Task[None]) -> None:
        await self._release(None)
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
        if not commits:
            return
        try:
            await self._consumer.commit(commits)
        except Exception as exc:  # a rebalance in progress: the records will be redone
            log.warning("offset commit failed (%s); those records may be allocated again", exc)

    async def hand_back(self, revoked: list[TopicPartition]) -> None:
        """Before partitions go elsewhere: stop their records, commit what finished."""
        tps = set(revoked)
        self._owned -= tps
        self._epochs.update(tps)
        await self._release(tps)
        await self._commit()
        self._tracker.forget(revoked)
        self._recovery.forget(revoked)

    async def recover(self, assigned: list[TopicPartition]) -> None:
        """Learn which records past the committed offsets already have a recorded outcome."""
        consumer = self._consumer
        if consumer is None or not assigned:
            return
        self._owned |= set(assigned)
        self._epochs.update(assigned)
        self._sync_intake()  # new partitions stay paused while the breaker is open
        # aiokafka fetches for the new partitions while this callback runs: no record may
        # be handled before we know which already have an outcome.
        await self._recovery.learn(consumer, assigned)
        self._beat()  # the read-back is done: records may move again
