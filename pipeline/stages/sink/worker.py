"""The sink's loop: intake with back-pressure, commits, and what a rebalance needs.

- Records are taken while fewer than ``sink.max_pending`` are in progress, each in its
  own task; the :class:`~.allocator.Allocator` bounds the calls in flight
  (``sink.concurrency``), so records waiting to retry do not hold up the others.
- Only records of partitions this worker owns, fetched under their current assignment,
  are started: records fetched before a hand-back are dropped, never started late.
- An offset is committed only once the outcome of its record, and of every record before
  it in the partition, is in Kafka (:class:`~.offsets.OffsetTracker`).
- While the :class:`~.breaker.Breaker` is open, intake is paused and readiness says why.
- On revocation (in the revocation callback) and at shutdown, records with a call on the
  wire get up to twice ``dps.timeout`` to finish, the others are handed back
  uncommitted, and the finished prefix is committed; the consumer's rebalance timeout
  leaves room for that (heartbeats go on during the callback).
- On assignment, the callback only notes the new partitions and starts a read-back of
  the outcomes recorded past their committed offsets (:class:`~.recovery.Recovery`) as a
  task of the stage's own; no record of a partition starts (no DPS call) before its
  read-back is done, and a revocation ends a read-back of its partitions. The callback
  thus returns at once, and the consumer keeps aiokafka's default session timeout: a
  killed sink's partitions move to another replica within about that timeout and a
  heartbeat interval.
- A failed rebalance callback, a read-back that fails or outlasts twice ``dps.timeout``,
  or an outcome Kafka refuses for good ends the stage with
  :class:`~pipeline.errors.StageFailed` (the process exits non-zero).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import time
from typing import TYPE_CHECKING, Any

from aiokafka.coordinator.assignors.range import RangePartitionAssignor

from pipeline.config import DpsConfig
from pipeline.core.mapping import Mapper
from pipeline.dps.client import DpsClient
from pipeline.errors import MappingError, StageFailed
from pipeline.io import kafka
from pipeline.io.aio import Backoff
from pipeline.ops import tracing
from pipeline.ops.metrics import (
    SINK_BREAKER_OPENS,
    SINK_INFLIGHT,
    SINK_OUTCOMES,
    SINK_PAUSED,
)
from pipeline.stages.runtime import Subscription
from pipeline.stages.sink.allocator import Allocator
from pipeline.stages.sink.breaker import Breaker
from pipeline.stages.sink.lifecycle import Lifecycle, stamp_of
from pipeline.stages.sink.limiter import RateLimiter
from pipeline.stages.sink.offsets import OffsetTracker
from pipeline.stages.sink.outcomes import Outcomes, log_context, source_header
from pipeline.stages.sink.recovery import Recovery
from pipeline.stages.sink.releaser import Releaser

if TYPE_CHECKING:
    from collections.abc import Callable

    from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

    from pipeline.config import Config
    from pipeline.stages.runtime import Run

__all__ = ["Sink", "tune_collector"]

log = logging.getLogger(__name__)

_REBALANCE_MARGIN = 10.0
"""Seconds the consumer's rebalance timeout allows beyond a hand-back: the commit that
follows it, and Kafka's own round trips."""
_POLL = 0.05
"""Seconds between looks at records being handed back."""
_RELEASE_POOL = 100
"""Connections to DPS for the releaser's calls, beyond the allocator's (slots, detached)."""
_GC_YOUNG = 10_000
"""The garbage collector's youngest-generation threshold in a sink process (CPython's
default is 700): :func:`tune_collector`."""


def tune_collector() -> None:
    """Collect less often, and never traverse what start-up made: for a sink's process.

    Each record lives in a task with its coroutines, futures, structs and the HTTP
    exchange's objects, hundreds of records in progress at once: at CPython's default
    threshold the collector ran every few records and took about a tenth of the sink's
    CPU (A/B in the bench: 439 against 396 CPU µs per allocation with :data:`_GC_YOUNG`).
    Then ``gc.freeze()`` moves every object made so far (modules, configuration) out of
    the collector's sight, so the collections that do run traverse only what the records
    made (334 against 290 µs, lower in every round). Memory is still reclaimed by
    reference counting at once; only cycles wait a little longer.

    Process-wide, so the command line calls it for a process that runs a sink (with the
    other stages, in ``pipeline run``), not the stage: a test process running sinks keeps
    its defaults.
    """
    young, older, oldest = gc.get_threshold()
    gc.set_threshold(max(_GC_YOUNG, young), older, oldest)
    gc.freeze()


def _nothing(*_: object) -> None:
    """Where progress and readiness go before the sink runs."""


class Sink:
    """The sink worker.

    Args:
        cfg: the whole configuration (``kafka`` and ``sink`` sections are used).
    """

    name = "sink"

    def __init__(self, cfg: Config) -> None:
        s = cfg.sink
        self.cfg = cfg
        self._topics = cfg.kafka.topics
        self._mapper = Mapper(
            sn_from=s.sn_from, org_id=s.org_id, org_overrides=s.org_overrides,
            device_data=s.device_data,
        )  # fmt: skip
        self._hand_back_limit = 2 * s.dps.timeout
        self._group = s.group_id
        self._pending = asyncio.Semaphore(s.pending_limit)
        self._tracker = OffsetTracker()
        self._breaker = Breaker(
            Backoff(s.retry_initial, s.retry_max), self._dps_state, failures=s.breaker_failures
        )
        self._limiter = RateLimiter(s.rate_limit)
        self._lifecycle = Lifecycle(cfg.kafka)
        self._recovery = Recovery(
            cfg.kafka, s.group_id, limit=self._hand_back_limit, also=self._lifecycle.learn
        )
        self._consumer: AIOKafkaConsumer | None = None
        self._allocator: Allocator | None = None
        self._releaser: Releaser | None = None
        self._jobs: dict[asyncio.Task[None], tuple[TopicPartition, bytes]] = {}
        # Read-backs in progress, each with the partitions it reads back.
        self._read_backs: dict[asyncio.Task[None], frozenset[TopicPartition]] = {}
        self._owned: set[TopicPartition] = set()
        # Bumped on every hand-back and assignment: a batch fetched under an older one is stale.
        self._epochs: collections.Counter[TopicPartition] = collections.Counter()
        self._dps_failing = False
        self._failed = asyncio.Event()
        self._error: StageFailed | None = None
        # Progress and readiness go to the runtime once the sink runs; nowhere before.
        self._beat: Callable[[], None] = _nothing
        self._check: Callable[[str, bool, str | None], None] = _nothing
        self._tracing = tracing.OFF

    def topics(self) -> list[str]:
        """What it reads and writes."""
        t = self._topics
        return [t.added, t.deleted, t.lifecycle, t.allocations, t.releases, t.allocations_dlq]

    def needs_mqtt(self) -> bool:
        """It does not."""
        return False

    def subscription(self) -> Subscription:
        """The added children, as the sink group; partitions handed back and read back.

        What aiokafka 0.14 does (consumer/group_coordinator.py), and what follows:

        - The revocation callback runs in ``_on_join_prepare()``, before
          ``ensure_active_group()`` stops the heartbeat task: heartbeats go on during a
          hand-back (answered REBALANCE_IN_PROGRESS, which aiokafka counts as a
          success), so the session timeout does not bound it; the broker waits for our
          JoinGroup up to the rebalance timeout, which must therefore fit a hand-back.
        - The assignment callback runs in ``_on_join_complete()``, after the heartbeat
          task was stopped and before it starts again: nothing long may run there, so
          the read-back is a task of ours (:meth:`recover`).
        - ``session_timeout_ms`` and ``heartbeat_interval_ms`` stay aiokafka's defaults
          (10 s, 3 s): a member that dies is dropped about 10 s after its last heartbeat.

        Added and deleted children are consumed together with range assignment (aiokafka's
        default, round robin, would not keep partition p of both with one member): with
        ``lifecycle``, all three have one partition count (checked at start-up) and one
        key, so partition p of each holds the same children (:mod:`.lifecycle`).
        """
        rebalance_timeout_ms = int((self._hand_back_limit + _REBALANCE_MARGIN) * 1000)
        t = self._topics
        return Subscription(
            self.cfg.sink.group_id,
            [t.added, t.deleted],
            revoked=self.hand_back,
            assigned=self.recover,
            options={
                "rebalance_timeout_ms": rebalance_timeout_ms,
                "partition_assignment_strategy": (RangePartitionAssignor,),
            },
            copartitioned=[t.added, t.deleted, t.lifecycle],
        )

    def checks(self) -> list[str]:
        """``sink.dps``: false while the breaker is open, with the reason."""
        return ["dps"]

    def busy(self) -> bool:
        """Records are in progress."""
        return self._in_progress() > 0

    def _in_progress(self) -> int:
        return len(self._jobs)

    def _dps_state(self, failing: bool, reason: str | None) -> None:
        """The breaker opened (or its reason changed) or closed: tell the operator."""
        opened = failing and not self._dps_failing
        self._dps_failing = failing
        SINK_PAUSED.set(1 if failing else 0)
        self._check("dps", not failing, reason)
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

    async def work(self, run: Run) -> None:
        """Allocate until stopping, then hand back in-flight work and commit.

        Raises:
            StageFailed: a read-back failed, or Kafka refused an outcome for good.
        """
        consumer = run.consumer
        assert consumer is not None  # noqa: S101  (a consuming stage gets its consumer)
        self._beat, self._check = run.beat, run.check
        self._tracing = run.tracing
        self._consumer = consumer
        SINK_INFLIGHT.set_function(self._in_progress)  # read when scraped
        # Every outcome is awaited as soon as it is sent (its call slot waits for it): a
        # linger would only delay it. Under load, records still share a request: those
        # sent while one is on the wire go together in the next.
        producer = kafka.producer(self.cfg.kafka, linger_ms=0)
        s = self.cfg.sink
        # Room for every call slot and detached call, and for the releaser's calls.
        pool = s.concurrency + s.detached_limit + _RELEASE_POOL
        async with producer, DpsClient(s.dps, pool_size=pool, tracing=run.tracing) as dps:
            outcomes = Outcomes(
                producer, self._topics, self.cfg.sink.group_id, on_recorded=self._beat
            )
            self._allocator = Allocator(
                self.cfg.sink, mapper=self._mapper, dps=dps, breaker=self._breaker,
                limiter=self._limiter, outcomes=outcomes, on_answer=self._beat,
            )  # fmt: skip
            self._releaser = Releaser(
                self.cfg.sink, mapper=self._mapper, dps=dps, breaker=self._breaker,
                limiter=self._limiter, outcomes=outcomes, on_answer=self._beat,
            )  # fmt: skip
            self._started()
            failed = asyncio.ensure_future(self._failed.wait())
            committer = asyncio.create_task(self._commit_loop(run.stopping), name="sink.commit")
            try:
                await self._consume(consumer, outcomes, [run.stopping, failed])
            finally:
                failed.cancel()
                await self._shutdown(committer)
        if self._error is not None:
            raise self._error

    def _started(self) -> None:
        self._check("dps", True, None)
        dps_cfg = self.cfg.sink.dps
        if dps_cfg.app_key == DpsConfig().app_key and "127.0.0.1" not in dps_cfg.base_url:
            log.warning(
                "sink.dps.app_key is the demo default while %s is not local: "
                "set sink.dps.app_key and sink.dps.app_secret",
                dps_cfg.base_url,
            )

    async def _consume(
        self,
        consumer: AIOKafkaConsumer,
        outcomes: Outcomes,
        stops: list[asyncio.Future[Any]],
    ) -> None:
        """Take records until one of ``stops``; then the intake is cancelled where it waits."""
        intake = asyncio.create_task(self._intake(consumer, outcomes), name="sink.intake")
        try:
            await asyncio.wait({intake, *stops}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            intake.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await intake  # an error of the intake's own is raised here

    async def _intake(self, consumer: AIOKafkaConsumer, outcomes: Outcomes) -> None:
        limit = self.cfg.sink.pending_limit
        while True:
            batch = await consumer.getmany(timeout_ms=500, max_records=limit)
            epochs = {tp: self._epochs[tp] for tp in batch}
            for tp, records in batch.items():
                for record in records:
                    # Capacity first: this is where back-pressure stops intake. A record
                    # not started is not committed: it is consumed again next time.
                    await self._pending.acquire()
                    if not self._current(tp, epochs[tp]):
                        # Handed back while this batch waited: whoever owns the
                        # partition now reads these records from the committed offset.
                        self._pending.release()
                        break
                    self._start(outcomes, tp, record, epochs[tp])

    def _current(self, tp: TopicPartition, epoch: int) -> bool:
        """Whether ``tp`` is still owned under the assignment of ``epoch``."""
        return tp in self._owned and self._epochs[tp] == epoch

    def _start(
        self,
        outcomes: Outcomes,
        tp: TopicPartition,
        record: ConsumerRecord[bytes, bytes],
        epoch: int,
    ) -> None:
        self._tracker.start(tp, record.offset)
        if not self._jobs:
            self._beat()  # idle until now: the stall clock starts here, not at the last beat
        source = source_header(tp.topic, tp.partition, record.offset)
        task = asyncio.create_task(
            self._handle(outcomes, tp, record, source, epoch), name=f"sink {source.decode()}"
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
        epoch: int,
    ) -> None:
        # Records of a partition being read back wait here, each in its own task, rather
        # than the partition being paused in the consumer: the check sits where a record
        # starts, beside the epoch check, so it holds for whatever aiokafka had fetched
        # before a pause took effect, and the breaker's pause and resume of every
        # assigned partition (_sync_intake) cannot lift it early. The cost: records
        # fetched meanwhile hold a sink.max_pending slot each while they wait; they are
        # the next to start anyway, and an assignment's partitions (aiokafka assigns
        # them all at once) are read back together.
        recovery = self._recovery
        ready = await recovery.ready(tp) if recovery.pending(tp) else recovery.started(tp)
        if not ready or not self._current(tp, epoch):
            # The read-back failed (the stage is stopping), or the partition was handed
            # back meanwhile: the record stays uncommitted.
            return
        try:
            with self._tracing.process(record, group=self._group):
                if recovery.take(tp, record.offset):
                    SINK_OUTCOMES.labels("already_recorded").inc()
                else:
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
        try:
            await self._operate(outcomes, tp, record, source)
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

    async def _operate(
        self,
        outcomes: Outcomes,
        tp: TopicPartition,
        record: ConsumerRecord[bytes, bytes],
        source: bytes,
    ) -> None:
        """An add or a delete, in its child's turn (:mod:`.lifecycle`)."""
        allocator, releaser = self._allocator, self._releaser
        assert allocator is not None  # noqa: S101  (set before intake starts)
        assert releaser is not None  # noqa: S101
        deleting = tp.topic == self._topics.deleted
        stamp = stamp_of(record.value, record.timestamp)
        if record.key is None or stamp is None:
            # Unreadable, or not keyed by its child: the mapping dead-letters it.
            if deleting:
                await releaser.process(record, source, superseded=False)
            else:
                await allocator.process(record, source)
            return
        device_id = record.key.decode("utf-8", "replace")
        async with self._lifecycle.turn(tp.partition, device_id, stamp) as superseded:
            if deleting:
                await releaser.process(record, source, superseded=superseded)
            elif superseded:
                latest = self._lifecycle.latest(tp.partition, device_id).generation
                try:
                    mapped = self._mapper.map(record.value or b"")
                except MappingError:
                    mapped = None
                await outcomes.dead_letter(
                    record, source, mapped, kind="superseded", code=None,
                    message=f"child {device_id} was deleted or added again after this add "
                    f"(generation {stamp.generation}, latest {latest}): not allocated",
                    request_id=None, attempts=0,
                )  # fmt: skip
            else:
                await allocator.process(
                    record, source,
                    superseded=lambda: self._lifecycle.superseded(tp.partition, device_id, stamp),
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
        busy = set[bytes]()
        for part in (self._allocator, self._releaser):
            if part is not None:
                busy |= part.busy
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
        await self._stop_read_backs(None)
        self._recovery.forget(self._owned)
        await self._release(None)
        if self._releaser is not None:
            await self._releaser.close()
        committer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await committer
        await self._commit()

    async def _commit_loop(self, stopping: asyncio.Future[None]) -> None:
        while not stopping.done():
            await asyncio.sleep(self.cfg.sink.commit_interval)
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
        # A read-back of theirs ends here (one that also covered partitions still owned
        # starts again for those), and their records waiting for it are told no.
        self._read_back(await self._stop_read_backs(tps) & self._owned)
        self._recovery.forget(revoked)
        self._lifecycle.forget({tp.partition for tp in tps} - {tp.partition for tp in self._owned})
        await self._release(tps)
        await self._commit()
        self._tracker.forget(revoked)

    async def recover(self, assigned: list[TopicPartition]) -> None:
        """Note newly assigned partitions and start reading back their recorded outcomes.

        Returns at once: the read-back runs as a task of the stage (aiokafka sends no
        heartbeats while this callback runs), and records of these partitions wait for it.
        """
        if self._consumer is None or not assigned:
            return
        tps = set(assigned)
        self._owned |= tps
        self._epochs.update(tps)
        # Before anything awaits: from here no record of theirs starts until read back.
        self._recovery.begin(tps)
        self._sync_intake()  # new partitions stay paused while the breaker is open
        # aiokafka revokes everything before it assigns, so no read-back of these should
        # be running; if one is, it answers for an older assignment: read them again.
        stale = await self._stop_read_backs(tps)
        self._read_back(tps | (stale & self._owned))

    def _read_back(self, tps: set[TopicPartition]) -> None:
        """Start reading back the outcomes recorded past the committed offsets of ``tps``."""
        if not tps or self._consumer is None:
            return
        task = asyncio.create_task(
            self._learn(self._consumer, sorted(tps)),
            name="sink.read-back",
        )
        self._read_backs[task] = frozenset(tps)
        task.add_done_callback(self._read_back_done)

    async def _learn(self, consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> None:
        """The read-back task: a failure becomes :class:`StageFailed` (the stage ends)."""
        try:
            await self._recovery.learn(consumer, tps)
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # stopped: by a revocation, or the stage's end
            # A cancellation nobody asked for (from a library's task): without this, its
            # partitions would wait for good, without a word.
            msg = "sink stopped: reading back the recorded outcomes failed: cancelled from within"
            raise StageFailed(msg) from exc
        except TimeoutError as exc:  # it says what took too long
            msg = f"sink stopped: {exc}"
            raise StageFailed(msg) from exc
        except Exception as exc:
            msg = f"sink stopped: reading back the recorded outcomes failed: {exc}"
            raise StageFailed(msg) from exc
        self._beat()  # the read-back is done: records may move again

    def _read_back_done(self, task: asyncio.Task[None]) -> None:
        tps = self._read_backs.pop(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        where = sorted(f"{tp.topic}/{tp.partition}" for tp in tps)
        log.error("%s (partitions %s)", exc, where)
        if self._error is None:
            self._error = exc if isinstance(exc, StageFailed) else StageFailed(str(exc))
        self._failed.set()

    async def _stop_read_backs(self, tps: set[TopicPartition] | None) -> set[TopicPartition]:
        """Cancel the read-backs of any of ``tps`` (None: all).

        Returns their other partitions: still pending, to be read back again.
        """
        stopped = {
            task: parts for task, parts in self._read_backs.items() if tps is None or parts & tps
        }
        for task in stopped:
            task.cancel()
        # A read-back that failed before it was cancelled is reported by its callback.
        await asyncio.gather(*stopped, return_exceptions=True)
        rest: set[TopicPartition] = set().union(*stopped.values())
        return rest - tps if tps is not None else set()
