"""Router stage: one Kafka record per child, read-process-write in Kafka transactions.

Each batch of down events, the child records it yields and the consumer offsets are one
transaction: a crash before the commit aborts the outputs and the input is read again;
after it, the offsets have moved with them. Consumers of the outputs read committed, so
each child appears exactly once. The router is each gateway's sequencer (down events are
keyed by gateway): it remembers, per input partition, each gateway's notification version
and each child's state (added or deleted, and its generation), and writes that memory to
the compacted ``router_state`` topic, to the input's partition, in the same transaction
as the records it decided; on assignment it reads that partition back before routing.
A rebalance waits for the transaction in flight (aiokafka has no KIP-447 fencing), and
redelivered responses (same gateway and event_id, as MQTT QoS 1 may produce) are skipped
within a window that survives restarts: on assignment it is rebuilt from the input
partition's recent history. The decisions are pure functions in
:mod:`pipeline.core.routing`; this module moves the bytes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from typing import TYPE_CHECKING, get_args

from aiokafka.errors import IllegalOperation, KafkaError, ProducerFenced

from pipeline.core.routing import (
    Changes,
    Dedup,
    DeviceUnknown,
    Gap,
    Memory,
    Out,
    Topic,
    apply,
    route,
)
from pipeline.errors import DecodeError, StageFailed
from pipeline.io import kafka
from pipeline.io.aio import Backoff, Stopped, unless_stopped
from pipeline.ops import tracing
from pipeline.ops.metrics import (
    ROUTER_CHILDREN,
    ROUTER_DUPLICATES,
    ROUTER_GAPS_OPEN,
    ROUTER_RECORDS,
    ROUTER_SKIPPED,
    ROUTER_SKIPPED_CHILDREN,
    ROUTER_STALE_NOTIFICATIONS,
    ROUTER_TRANSACTIONS,
    ROUTER_VERSION_GAPS,
    ROUTER_VERSIONS_MISSING,
    UNEXPECTED_ERRORS,
)
from pipeline.ops.server import Health
from pipeline.schemas import utc_now
from pipeline.stages.runtime import Subscription

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

    from pipeline.config import Config
    from pipeline.stages.runtime import Run

__all__ = ["Router"]

log = logging.getLogger(__name__)

_ROUTED = ROUTER_RECORDS.labels("routed")

ROUND = 2
"""Transactions of ``router.batch_max`` records a partition may run in one round: the
partitions' transactions run side by side and the round ends with the last one's commit
(its flush and commit wait for Kafka, with nothing else to route): two a round halve that
idle share."""

_CHILD_TOPICS = frozenset({"added", "failed", "deleted"})
"""Outputs that are a child each (``Out.topic`` names the ``kafka.topics`` key)."""


class _Batch:
    """What one transaction routes: its records, DLQ sends, and what to remember on commit."""

    def __init__(self, memory: Memory, producer: AIOKafkaProducer) -> None:
        self.outbox = kafka.Outbox(producer)
        """The child, lifecycle, sync request and memory records, in batches."""
        self.sends: list[asyncio.Future[object]] = []
        """The DLQ records (rare: sent one by one)."""
        self.seen: dict[tuple[str, str], int] = {}
        """(gateway, event_id) -> record timestamp, for the pairs this transaction routes."""
        self.counts: collections.Counter[str] = collections.Counter()
        self.dead = 0
        """Records dead-lettered (the others are routed)."""
        self.changes = Changes(memory)
        self.gaps: list[Gap] = []
        self.now = utc_now()
        """When the router decided: the lifecycle's ``changed_at``, a sync request's
        ``detected_at`` (one clock reading a transaction)."""


class Router:
    """The router worker.

    Every input partition has its own transactional producer, with the transactional id
    ``{router.transactional_id}-{topic}-{partition}``, the same in every replica. Whoever
    is assigned a partition starts that producer before reading it, which fences the
    previous owner: if a stalled router (one the group gave up on while it was in a
    transaction: aiokafka has no KIP-447 to check its generation) wakes and commits, its
    transaction fails with ProducerFenced instead of writing the partition's children a
    second time, and it stops.

    Args:
        cfg: the whole configuration (``kafka`` and ``router`` sections are used).
    """

    name = "route"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._topics = cfg.kafka.topics
        self._out_topics: dict[str, str] = {
            name: getattr(self._topics, name) for name in get_args(Topic)
        }
        """The topic each kind of output (``Out.topic``) goes to."""
        self.lock = asyncio.Lock()
        self._dedup = Dedup(cfg.router.dedup_window, cfg.router.dedup_max_entries)
        self._retry = Backoff(0.5, 10.0)
        self._consumer: AIOKafkaConsumer | None = None
        self._producers: dict[TopicPartition, AIOKafkaProducer] = {}
        self._memory: dict[TopicPartition, Memory] = {}
        self._health = Health()  # the runtime's, once working
        self._busy = False
        self._ahead: dict[TopicPartition, list[ConsumerRecord]] = {}
        """Records read during a round, for the next one (:meth:`_round`)."""
        self._generation = 0
        """Revocations so far: records read before one are not routed."""
        self._tracing = tracing.OFF  # the runtime's, once working

    def transactional_id(self, tp: TopicPartition) -> str:
        """The transactional id of the producer that writes what ``tp`` yields."""
        return f"{self.cfg.router.transactional_id}-{tp.topic}-{tp.partition}"

    def topics(self) -> list[str]:
        """What it reads and writes."""
        t = self._topics
        return [
            t.down_events, t.added, t.failed, t.deleted, t.lifecycle, t.router_state,
            t.sync_requests, t.down_events_dlq,
        ]  # fmt: skip

    def needs_mqtt(self) -> bool:
        """It does not."""
        return False

    def subscription(self) -> Subscription:
        """The down events, as the router group; producers follow the partitions."""
        return Subscription(
            self.cfg.router.group_id,
            [self._topics.down_events],
            revoked=self._revoked,
            assigned=self._assigned,
        )

    def checks(self) -> list[str]:
        """None beyond the runtime's."""
        return []

    def busy(self) -> bool:
        """A transaction is in progress."""
        return self._busy

    async def work(self, run: Run) -> None:
        """Route batches until stopping; the transaction in flight finishes first."""
        kafka.shorten_transaction_backoff()  # back-to-back transactions: 2 ms, not 20
        consumer = run.consumer
        assert consumer is not None  # noqa: S101  (a consuming stage gets its consumer)
        self._health = run.health
        self._tracing = run.tracing
        self._report_gaps()
        self._consumer = consumer
        run.after_close(self._stop_all)
        try:
            await self._check_state_partitions(run)
            while True:
                batch, generation = await self._next_batch(run, consumer)
                run.beat()
                # Records read before a revocation are another router's, or aiokafka reads
                # them again from the committed offsets: those are skipped.
                if batch and generation == self._generation:
                    async with self.lock:
                        if generation == self._generation:
                            self._busy = True
                            await self._round(consumer, batch)
                            self._busy = False
                            run.beat()
        except Stopped:
            pass  # the transaction in flight (if any) has committed

    async def _next_batch(
        self, run: Run, consumer: AIOKafkaConsumer
    ) -> tuple[dict[TopicPartition, list[ConsumerRecord]], int]:
        """Up to ROUND x batch_max records of each partition it holds, and their generation.

        What the previous round read ahead first, then what aiokafka has fetched. aiokafka
        hands records out partition by partition, the first one's up to max_records: the
        rest of each partition's fetched records is taken partition by partition, without
        waiting (outside the lock: aiokafka's getmany waits out a rebalance; what was
        taken before one is dropped, and read again from the committed offsets).
        """
        step = self.cfg.router.batch_max
        limit = ROUND * step
        batch, self._ahead = self._ahead, {}
        generation = self._generation
        if not batch:
            batch = await unless_stopped(
                run.stopping, consumer.getmany(timeout_ms=1000, max_records=step)
            )
            generation = self._generation
        if batch:
            for tp in consumer.assignment():
                have = batch.get(tp, [])
                if len(have) > limit:  # read ahead beyond a round: the rest is the next one's
                    batch[tp], self._ahead[tp] = have[:limit], have[limit:]
                elif len(have) < limit:
                    more = await consumer.getmany(tp, timeout_ms=0, max_records=limit - len(have))
                    if generation != self._generation:
                        batch, generation = {}, self._generation
                    if more:
                        batch[tp] = batch.get(tp, []) + more[tp]
        return batch, generation

    async def _round(
        self, consumer: AIOKafkaConsumer, batch: dict[TopicPartition, list[ConsumerRecord]]
    ) -> None:
        """The partitions' transactions of ``batch``, reading the next round's records meanwhile.

        aiokafka fetches from a broker only once what it fetched is handed out: without
        someone taking it during the round, records arriving then were fetched after it,
        once the next round had started without them, and waited for two rounds.
        """
        ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        reading = asyncio.create_task(self._read_ahead(consumer, ended), name="route.read-ahead")
        try:
            await self._transactions(consumer, batch)
        finally:
            ended.set_result(None)
            await reading

    async def _read_ahead(self, consumer: AIOKafkaConsumer, ended: asyncio.Future[None]) -> None:
        """Take fetched records into ``_ahead`` until ``ended``: one transaction's, at most.

        Enough to keep aiokafka fetching what arrives during the round (the latency it is
        for); behind a backlog, the next round is filled from aiokafka's own buffer, and
        records held here as well would only add to the memory (a round's of each
        partition: up to ``ROUND x batch_max x`` partitions of records).
        """
        limit = self.cfg.router.batch_max
        with contextlib.suppress(Stopped):
            while (held := sum(map(len, self._ahead.values()))) < limit:
                ahead = self._ahead
                got = await unless_stopped(
                    ended, consumer.getmany(timeout_ms=1000, max_records=limit - held)
                )
                for tp, records in got.items():
                    ahead.setdefault(tp, []).extend(records)

    def _read_again(self, consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> None:
        """Read ``tp`` again from ``offset``: what was read ahead of it comes again too."""
        consumer.seek(tp, offset)
        self._ahead.pop(tp, None)

    async def _check_state_partitions(self, run: Run) -> None:
        """router_state must be partitioned as down_events: partition p keeps p's memory.

        Kafka not answering is waited out (its readiness check says so meanwhile).
        """
        t = self._topics
        backoff = Backoff(0.2, 5.0)
        while True:
            try:
                async with kafka.reader(self.cfg.kafka) as peek:
                    tps = await kafka.partitions(peek, t.down_events, t.router_state)
                break
            except KafkaError as exc:
                if not exc.retriable:
                    raise
                await unless_stopped(run.stopping, asyncio.sleep(backoff.next()))
        counts = collections.Counter(tp.topic for tp in tps)
        if counts[t.router_state] != counts[t.down_events]:
            msg = (
                f"topic {t.router_state} (kafka.topics.router_state) has "
                f"{counts[t.router_state]} partitions and {t.down_events} has "
                f"{counts[t.down_events]}: they must be equal (the router keeps partition "
                "p's memory in partition p)"
            )
            raise StageFailed(msg)

    async def _stop_all(self) -> None:
        await self._stop_producers(list(self._producers))

    async def _start_producer(self, tp: TopicPartition) -> None:
        """Start ``tp``'s producer; this fences (and aborts) a previous owner's transaction."""
        producer = kafka.transactional_producer(self.cfg.kafka, self.transactional_id(tp))
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        self._producers[tp] = producer

    async def _stop_producers(self, tps: list[TopicPartition]) -> None:
        for tp in tps:
            producer = self._producers.pop(tp, None)
            if producer is not None:
                with contextlib.suppress(Exception):
                    await producer.stop()

    async def _renew_producer(self, tp: TopicPartition) -> None:
        """Replace ``tp``'s producer after Kafka refused one of its sends.

        aiokafka's producer cannot be trusted after that: its sequence numbers are off and
        later records would be lost. A new one with the same transactional id fences the old.
        """
        await self._stop_producers([tp])
        await self._start_producer(tp)

    async def _revoked(self, revoked: list[TopicPartition]) -> None:
        # Let the transaction in flight commit before another consumer gets the partitions.
        async with self.lock:
            log.info("router partitions revoked: %s", sorted(tp.partition for tp in revoked))
            await self._stop_producers(revoked)
            for tp in revoked:
                self._memory.pop(tp, None)
            self._ahead.clear()
            self._generation += 1
            self._report_gaps()

    async def _assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("router partitions assigned: %s", sorted(tp.partition for tp in assigned))
        # aiokafka may already be fetching: hold the lock so no batch is routed before the
        # previous owners are fenced and the de-duplication window is re-learned. Fencing
        # first: the committed offsets read afterwards include the previous owner's last
        # transaction, whether it committed or was aborted by the fencing.
        async with self.lock:
            # aiokafka reads every assigned partition again from its committed offset.
            self._ahead.clear()
            # (aiokafka may re-join without a revocation: drop what is not ours any more.)
            gone = [tp for tp in self._producers if tp not in assigned]
            await self._stop_producers(gone)
            for tp in gone:
                self._memory.pop(tp, None)
            for tp in assigned:
                if tp not in self._producers:
                    await self._start_producer(tp)
            await self.rebuild_dedup(assigned)
            # Every assigned partition, kept ones too: another router may have had one of
            # them meanwhile (aiokafka may re-join without a revocation).
            await self.rebuild_memory(assigned)

    async def _transactions(
        self, consumer: AIOKafkaConsumer, batch: dict[TopicPartition, list[ConsumerRecord]]
    ) -> None:
        """The partitions of ``batch`` side by side, each in transactions of ``batch_max``."""
        # A partition revoked since getmany() returned is another router's now: skip it.
        mine = {tp: records for tp, records in batch.items() if tp in self._producers}
        results = await asyncio.gather(
            *(self._partition(consumer, tp, records) for tp, records in mine.items()),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, ProducerFenced):
                msg = (
                    "another router took over a partition while this one was in a "
                    f"transaction for it (fenced: {result}); its outputs were aborted"
                )
                raise StageFailed(msg) from result
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _partition(
        self, consumer: AIOKafkaConsumer, tp: TopicPartition, records: list[ConsumerRecord]
    ) -> None:
        """``records`` of ``tp`` in order, ``router.batch_max`` a transaction."""
        step = self.cfg.router.batch_max
        for start in range(0, len(records), step):
            if not await self._transaction(consumer, tp, records[start : start + step]):
                return  # the partition is read again from where it stopped

    async def _transaction(
        self, consumer: AIOKafkaConsumer, tp: TopicPartition, records: list[ConsumerRecord]
    ) -> bool:
        """One transaction; False when the partition must be read again from ``records``."""
        try:
            await self._commit(tp, records)
        except ProducerFenced:
            raise
        except KafkaError as exc:
            ROUTER_TRANSACTIONS.labels("aborted").inc()
            if exc.retriable:
                delay = self._retry.next()
                log.warning(
                    "transaction aborted (%s); partition %d will be read again in %.1f s",
                    exc, tp.partition, delay, extra={"topic": tp.topic, "partition": tp.partition},
                )  # fmt: skip
                self._read_again(consumer, tp, records[0].offset)
                await asyncio.sleep(delay)
                return False
            log.warning(
                "Kafka refused the transaction (%s): routing partition %d one record at a time",
                exc, tp.partition, extra={"topic": tp.topic, "partition": tp.partition},
            )  # fmt: skip
            await self._renew_producer(tp)
            return await self._one_by_one(consumer, tp, records)
        self._retry.reset()
        return True

    async def _commit(self, tp: TopicPartition, records: list[ConsumerRecord]) -> None:
        """Route ``records`` of ``tp`` and move its offset in one transaction.

        A delete that needs a DeviceInfo the memory lacks aborts it; the DeviceInfos are
        read from ``lifecycle`` and the transaction is made again (once per assignment).
        """
        try:
            await self._commit_once(tp, records)
        except DeviceUnknown as exc:
            log.info("router: %s; reading it from %s", exc, self._topics.lifecycle)
            await self.find_devices(tp)
            await self._commit_once(tp, records)

    async def _commit_once(self, tp: TopicPartition, records: list[ConsumerRecord]) -> None:
        producer = self._producers[tp]
        batch = _Batch(self._memory.setdefault(tp, Memory()), producer)
        outbox = batch.outbox
        async with producer.transaction():
            try:
                await outbox.open(*self._out_topics.values())
                for record in records:
                    await self._route_one(producer, record, batch)
                for state, value in batch.changes.records():  # the memory, beside its decisions
                    outbox.add(self._topics.router_state, value, key=state, partition=tp.partition)
                # aiokafka commits a transaction even when a send in it failed (the record
                # is then lost): wait for every batch, so a failure aborts it instead.
                await outbox.flush()
            except IllegalOperation:
                # aiokafka refuses further sends once the transaction has failed (the
                # producer was fenced, say): the sends before say why, and that is raised.
                await asyncio.gather(outbox.wait(), *batch.sends)
                raise
            await asyncio.gather(*batch.sends)
            await producer.send_offsets_to_transaction(
                {tp: records[-1].offset + 1}, self.cfg.router.group_id
            )
        ROUTER_TRANSACTIONS.labels("committed").inc()
        _ROUTED.inc(len(records) - batch.dead)  # counted once a transaction, when committed
        for key, at_ms in batch.seen.items():
            self._dedup.add(key, at_ms)
        batch.changes.commit()
        counts = batch.counts
        for name in ("added", "failed", "deleted"):
            ROUTER_CHILDREN.labels(name).inc(counts[name])
        for name in ("duplicate", "superseded"):
            ROUTER_SKIPPED_CHILDREN.labels(name).inc(counts[name])
        ROUTER_STALE_NOTIFICATIONS.inc(counts["stale"])
        for gap in batch.gaps:
            ROUTER_VERSION_GAPS.inc()
            log.warning(
                "gateway %s skipped notification versions %d-%d; a sync request from "
                "version %d is on %s", gap.gateway_id, gap.first, gap.last, gap.sync_from,
                self._topics.sync_requests, extra={"gateway": gap.gateway_id},
            )  # fmt: skip
        if batch.gaps or counts["filled"]:
            self._report_gaps()

    async def _one_by_one(
        self, consumer: AIOKafkaConsumer, tp: TopicPartition, records: list[ConsumerRecord]
    ) -> bool:
        """One transaction per record; the one Kafka will not take goes to the DLQ.

        False when the partition must be read again (from the record it stopped at).
        """
        for record in records:
            try:
                await self._commit(tp, [record])
            except ProducerFenced:
                raise
            except KafkaError as exc:
                if exc.retriable:  # later: read this partition again from here
                    self._read_again(consumer, tp, record.offset)
                    return False
                await self._renew_producer(tp)
                await self._refused(tp, record, exc)
        return True

    async def _refused(self, tp: TopicPartition, record: ConsumerRecord, exc: KafkaError) -> None:
        """Dead-letter the input whose outputs Kafka refused, in its own transaction."""
        producer = self._producers[tp]
        reason = f"router: Kafka refused the child records of this event: {exc}"
        try:
            with self._tracing.process(record, group=self.cfg.router.group_id) as hop:
                log.error(reason, extra=_where(record))
                ROUTER_RECORDS.labels("dlq").inc(exemplar=hop.exemplar())
                async with producer.transaction():
                    sent = await self._dead_letter(producer, record, reason)
                    await sent
                    await producer.send_offsets_to_transaction(
                        {tp: record.offset + 1}, self.cfg.router.group_id
                    )
        except KafkaError as again:
            where = f"{tp.topic}/{tp.partition}/{record.offset}"
            msg = f"Kafka refused even the DLQ record for {where}: {again}"
            raise StageFailed(msg) from again

    async def _dead_letter(
        self, producer: AIOKafkaProducer, record: ConsumerRecord, reason: str
    ) -> asyncio.Future[object]:
        """Send ``record`` to the DLQ with ``reason``, in the trace of the hop handling it."""
        hop = tracing.current()
        hop.fail(reason)
        out = hop.send(self._topics.down_events_dlq, record.key)
        future: asyncio.Future[object] = await producer.send(
            self._topics.down_events_dlq,
            record.value,
            key=record.key,
            headers=[("error", reason.encode()), ("received-at", utc_now().encode()), *out.headers],
        )
        out.watch(future)
        return future

    async def _route_one(
        self, producer: AIOKafkaProducer, record: ConsumerRecord, batch: _Batch
    ) -> None:
        """Route one down-event record, as a hop of its trace."""
        with self._tracing.process(record, group=self.cfg.router.group_id) as hop:
            await self._route_traced(producer, record, batch, hop)

    async def _route_traced(
        self, producer: AIOKafkaProducer, record: ConsumerRecord, batch: _Batch, hop: tracing.Hop
    ) -> None:
        try:
            routed = route(record.value)
        except DecodeError as exc:
            ROUTER_RECORDS.labels("dlq").inc(exemplar=hop.exemplar())
            log.warning("dead-lettering a down-event record: %s", exc, extra=_where(record))
            batch.sends.append(await self._dead_letter(producer, record, f"router: {exc}"))
            batch.dead += 1
            return
        except Exception as exc:  # a bug: dead-letter this record, keep the partition moving
            UNEXPECTED_ERRORS.labels("route").inc()
            log.exception("unexpected error routing a record", extra=_where(record))
            reason = f"router: internal error: {type(exc).__name__}: {exc}"
            batch.sends.append(await self._dead_letter(producer, record, reason))
            batch.dead += 1
            return
        hop.describe(gateway_id=routed.gateway_id)
        for label in routed.skipped:
            ROUTER_SKIPPED.labels(*label).inc()
        for event in routed.events:
            if event.event_id is not None:  # a response: redelivered with the same event_id
                key = (routed.gateway_id, event.event_id)
                if key in batch.seen or self._dedup.seen(key, record.timestamp):
                    ROUTER_DUPLICATES.inc()
                    log.info(
                        "skipping redelivered event %s from %s", event.event_id, routed.gateway_id
                    )
                    continue
                batch.seen[key] = record.timestamp
            hop.describe(event_id=event.event_id)
            applied = apply(routed.gateway_id, event, batch.changes, batch.now)
            self._send_outs(applied.outs, batch, hop)
            if applied.gap is not None:
                batch.gaps.append(applied.gap)
            batch.counts.update(applied.counts)
        if batch.outbox.full:
            await batch.outbox.send_full()

    def _send_outs(self, outs: list[Out], batch: _Batch, hop: tracing.Hop) -> None:
        """Add what an event applied to the outbox: each child record a ``send`` of its trace.

        A child's lifecycle record follows it, in its trace; a sync request is the event's.
        """
        child = hop
        traced = self._tracing.enabled
        names = self._out_topics
        add = batch.outbox.add
        for out in outs:
            topic = names[out.topic]
            watched = out.topic in _CHILD_TOPICS
            if watched:
                child = hop.send(topic, out.key)
            add(
                topic, out.value, key=out.key, headers=child.headers,
                sent=child.sent if traced and watched else None,
            )  # fmt: skip

    async def rebuild_dedup(self, assigned: list[TopicPartition]) -> None:
        """Re-learn the (gateway, event_id) pairs of the window before the committed offsets."""
        consumer = self._consumer
        if consumer is None or not assigned:
            return
        since_ms = int((time.time() - self.cfg.router.dedup_window) * 1000)
        starts = await consumer.offsets_for_times(dict.fromkeys(assigned, since_ms))
        ranges: kafka.Ranges = {}
        for tp in assigned:
            committed = await consumer.committed(tp)
            start = starts.get(tp)
            if committed and start is not None and start.offset < committed:
                ranges[tp] = (start.offset, committed)
        if not ranges:
            return
        learned = 0
        async with kafka.reader(self.cfg.kafka) as reader, asyncio.timeout(60):
            async for record in kafka.read_range(reader, ranges):
                learned += self._learn(record)
        log.info("router re-learned %d recent events for de-duplication", learned)

    def _learn(self, record: ConsumerRecord) -> int:
        try:
            routed = route(record.value)
        except DecodeError:
            return 0
        responses = [e.event_id for e in routed.events if e.event_id is not None]
        for event_id in responses:
            self._dedup.add((routed.gateway_id, event_id), record.timestamp)
        return len(responses)

    async def rebuild_memory(self, assigned: list[TopicPartition]) -> None:
        """Read the router_state partitions of ``assigned`` to the end: the memory of each.

        Called after the previous owners are fenced, so what it reads is everything they
        committed (the memory matches the committed offsets exactly).
        """
        if not assigned:
            return
        memories = {tp.partition: Memory() for tp in assigned}
        learned = 0
        async with kafka.reader(self.cfg.kafka) as reader:
            ranges = {
                tp: span
                for tp, span in (await kafka.whole(reader, self._topics.router_state)).items()
                if tp.partition in memories
            }
            async with asyncio.timeout(120):
                async for record in kafka.read_range(reader, ranges):
                    learned += memories[record.partition].learn(record.key, record.value)
        for tp in assigned:
            self._memory[tp] = memories[tp.partition]
        log.info(
            "router re-read its memory of partitions %s: %d entries",
            sorted(memories), learned,
        )  # fmt: skip
        self._report_gaps()

    async def find_devices(self, tp: TopicPartition) -> None:
        """Read from ``lifecycle`` the DeviceInfo of every added child ``tp``'s memory lacks.

        The memory records are compact: each child's DeviceInfo is in the ``lifecycle``
        record written in the same transaction (keyed by device_id, compacted). A child
        whose record is not found there (another gateway's child of the same device_id
        since, say) gets ``null``, as one never seen added; that is logged.
        """
        memory = self._memory[tp]
        wanted = memory.unknown_devices()
        if not wanted:
            return
        topic = self._topics.lifecycle
        found = 0
        async with kafka.reader(self.cfg.kafka) as reader:
            spans = await kafka.whole(reader, topic)
            count = max(1, len(spans))
            needed = {kafka.partition_of(device_id.encode(), count) for _, device_id in wanted}
            ranges = {where: span for where, span in spans.items() if where.partition in needed}
            async with asyncio.timeout(120):
                async for record in kafka.read_range(reader, ranges):
                    found += memory.learn_device(record.key, record.value, wanted)
        lost = memory.settle(wanted)
        log.info(
            "router read %d DeviceInfos of partition %d's children from %s",
            found, tp.partition, topic,
        )  # fmt: skip
        if lost:
            log.warning(
                "no lifecycle record of %d added children of partition %d matches the "
                "router's memory (e.g. %s of gateway %s): their deletes carry no DeviceInfo",
                len(lost), tp.partition, lost[0][1], lost[0][0],
            )  # fmt: skip

    def _report_gaps(self) -> None:
        """Metrics and the ``route.versions`` readiness detail for the open version gaps.

        The check is there while a gap is open, true (the router routes on), its detail
        naming the gateways and the versions they miss.
        """
        gaps = {gw: r for memory in self._memory.values() for gw, r in memory.open_gaps().items()}
        ROUTER_GAPS_OPEN.set(len(gaps))
        ROUTER_VERSIONS_MISSING.set(sum(b - a + 1 for r in gaps.values() for a, b in r))
        if not gaps:  # the check is shown only while versions are missing
            self._health.clear("route.versions")
            return
        shown = sorted(gaps)[:5]
        detail = "; ".join(
            f"{gw} missing {', '.join(f'{a}-{b}' if a != b else str(a) for a, b in gaps[gw])}"
            for gw in shown
        )
        if len(gaps) > len(shown):
            detail += f"; and {len(gaps) - len(shown)} more gateways"
        detail += " (sync requests sent; `pipeline reconcile` checks what DPS holds)"
        self._health.set("route.versions", True, f"version gaps open: {detail}", required=False)


def _where(record: ConsumerRecord) -> dict[str, object]:
    """Log context of an input record."""
    return {"topic": record.topic, "partition": record.partition, "offset": record.offset}
