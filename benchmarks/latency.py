"""End to end: the sustained rate, latency against offered load, and memory after a burst.

The three workers run as separate processes on one set of topics, as deployed (with
``--together``: one ``pipeline run`` process holding all three). Each
message is an add_sub_device_response with 4 children whose ``event_id`` carries the
time it was published (:func:`~.workload.e2e_message`); every allocation record repeats
that ``event_id``, and ``dps.allocations`` is broker-stamped, so a child's latency is
*append time of its allocation record - publish time of its message*.

1. warm-up: a few messages through, so connections, groups and tokens are settled;
2. sustained rate: a backlog published as fast as possible; allocations per second from
   the first to the last of them, divided by 4, is the message rate the pipeline sustains;
3. latency: messages published at fractions of that rate for a fixed time each, the
   rates in a rotating order over several rounds; p50 and p99 of the children's
   latencies per rate, all rounds pooled, and each round's;
4. burst: many messages published as fast as possible while everything runs; each
   worker's peak and current RSS ``burst_settle`` seconds after ingest has landed them
   all (the router and the sink are then still working through the backlog).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import re
import time
from typing import TYPE_CHECKING, Self

import msgspec

from benchmarks import procs, workload
from benchmarks.measure import Incomplete, Output, output_rate
from pipeline.io import kafka, mqtt
from pipeline.tools.replay import MAX_CONCURRENT_PUBLISHES, FixtureMessage

if TYPE_CHECKING:
    from collections.abc import Callable

    from aiokafka import ConsumerRecord, TopicPartition

    from benchmarks.context import Context
    from pipeline.config import Config

__all__ = ["E2E", "Burst", "Step", "end_to_end", "percentile"]

WARMUP = 20


class _Allocation(msgspec.Struct):
    event_id: str


_allocation = msgspec.json.Decoder(_Allocation)


def percentile(values: list[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclasses.dataclass(frozen=True, slots=True)
class Step:
    """Latency at one offered load, over the latency rounds."""

    fraction: float
    """Of the sustained rate."""
    offered: list[float] = dataclasses.field(default_factory=list)
    """Messages per second published, per round."""
    messages: list[int] = dataclasses.field(default_factory=list)
    """Messages published, per round."""
    latencies_ms: list[list[float]] = dataclasses.field(default_factory=list)
    """Per round, one per child allocation: its record's broker append time - publish."""
    receipts_ms: list[list[float]] = dataclasses.field(default_factory=list)
    """Per round, one per child allocation: its arrival at a consumer - publish."""
    landed_ms: list[list[float]] = dataclasses.field(default_factory=list)
    """Per round, one per message: its down event's broker append time - publish."""
    routed_ms: list[list[float]] = dataclasses.field(default_factory=list)
    """Per round, one per child: its added record's broker append time - publish."""
    committed_ms: list[list[float]] = dataclasses.field(default_factory=list)
    """Per round, one per child: its added record's arrival at a read-committed consumer
    - publish (once the router's transaction has committed: what the sink can see)."""

    @property
    def pooled(self) -> list[float]:
        """Every round's latencies together."""
        return [v for values in self.latencies_ms for v in values]

    @property
    def p50(self) -> float:
        """Median latency of all rounds, ms."""
        return percentile(self.pooled, 50)

    @property
    def p99(self) -> float:
        """99th percentile latency of all rounds, ms."""
        return percentile(self.pooled, 99)


@dataclasses.dataclass(frozen=True, slots=True)
class Burst:
    """A burst, how far each stage had got, and each worker's memory then."""

    messages: int
    """Published (acknowledged by the broker)."""
    wanted: int
    """Asked for: fewer were published when the broker did not take them within the limit."""
    published_seconds: float
    landed: int
    landed_seconds: float | None
    """From the first publish until ingest had landed them all (None: not within the
    measurement time limit; memory was read then)."""
    routed: int
    """Down events the router had committed when memory was read."""
    allocated: int
    """Children allocated when memory was read."""
    seconds: float
    """From the first publish until memory was read."""
    memory: dict[str, procs.Memory]


@dataclasses.dataclass(frozen=True, slots=True)
class E2E:
    """The end-to-end results."""

    sustained: float
    """Messages per second (of 4 children each) the pipeline sustains."""
    steps: list[Step]
    sustained_memory: dict[str, procs.Memory]
    burst: Burst | None


class _Published(msgspec.Struct):
    """What a publisher got the broker to accept."""

    count: int
    """Messages the broker acknowledged (PUBACK)."""
    seconds: float
    """From the first publish to the last PUBACK, or to the time limit."""

    @property
    def per_s(self) -> float:
        return self.count / max(self.seconds, 1e-3)


async def _publish(
    cfg: Config, prefix: str, count: int, phase: str, *, per_s: float | None, limit: float
) -> _Published:
    """Publish ``count`` e2e messages at ``per_s`` (None: at once), for ``limit`` s at most.

    Each message's event_id carries the time it is handed to the client (after the
    pacing and a free publish slot), so a broker slow to acknowledge holds the publisher
    back: what it accepted is in ``count`` and the offered rate, not in the latencies.
    """
    slot_count = max(1, min(MAX_CONCURRENT_PUBLISHES, cfg.mqtt.max_inflight))
    slots = asyncio.Semaphore(slot_count)
    client = mqtt.connect(cfg.mqtt, client_id=f"{cfg.mqtt.client_id}-pub-{phase}", persistent=False)
    client.pending_calls_threshold = slot_count
    acked = 0
    started = time.monotonic()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(limit), client, asyncio.TaskGroup() as tg:

            async def publish(message: FixtureMessage) -> None:
                nonlocal acked
                try:
                    await client.publish(prefix + message.topic, message.payload, qos=1)
                finally:
                    slots.release()
                acked += 1

            for seq in range(count):
                if per_s is not None and (wait := started + seq / per_s - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                await slots.acquire()
                message = workload.e2e_message(seq, phase)
                tg.create_task(publish(message), name=f"bench.publish-{seq}")
    return _Published(acked, time.monotonic() - started)


_EVENT_ID = re.compile(rb"e2e-[0-9a-z]+-[0-9]{7}-[0-9]+")
"""An :func:`~.workload.e2e_message` event_id, as it appears in a down-event record."""


def _latencies(records: list[ConsumerRecord[bytes, bytes]]) -> list[float]:
    """Per allocation record: its broker append time - its message's publish time, ms."""
    out = []
    for record in records:
        sent = workload.sent_ns(_allocation.decode(record.value).event_id)
        if sent is not None:
            out.append(record.timestamp - sent / 1e6)
    return out


def _hop(records: list[ConsumerRecord[bytes, bytes]]) -> list[float]:
    """Per record carrying an e2e event_id: its broker append time - publish time, ms."""
    out = []
    for record in records:
        if (found := _EVENT_ID.search(record.value)) is not None:
            sent = workload.sent_ns(found.group().decode())
            if sent is not None:
                out.append(record.timestamp - sent / 1e6)
    return out


class _Receipts:
    """The second clock: a consumer of ``topic`` that stamps each record on arrival.

    It reads from where the topic ends when it is entered, as any downstream consumer
    would (read committed), and notes ``time.time()`` when a fetch hands it a record:
    receipt time - publish time is the latency a reader of that topic sees, on this
    host's clock alone, independent of the broker's append times. On ``allocations``
    it checks the first clock; on ``added`` it is when the router's transaction has
    committed, so the router's commit and the sink's share of the rest show apart.
    """

    def __init__(self, cfg: Config, topic: str) -> None:
        self._cfg = cfg
        self._topic = topic
        self.latencies_ms: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._reader = kafka.reader(self._cfg.kafka, fetch_max_wait_ms=50)
        await self._reader.start()
        tps = await kafka.partitions(self._reader, self._topic)
        self._reader.assign(tps)
        await self._reader.seek_to_end(*tps)
        for tp in tps:  # resolve the positions now, before anything is published
            await self._reader.position(tp)
        self._task = asyncio.create_task(self._run(), name="bench.receipts")
        return self

    async def _run(self) -> None:
        while True:
            batch = await self._reader.getmany(timeout_ms=200)
            now_ms = time.time() * 1000
            for records in batch.values():
                for record in records:
                    if (found := _EVENT_ID.search(record.value)) is not None:
                        sent = workload.sent_ns(found.group().decode())
                        if sent is not None:
                            self.latencies_ms.append(now_ms - sent / 1e6)

    async def until(self, n: int, limit: float) -> list[float]:
        """Once ``n`` records have arrived (what arrived when ``limit`` s have passed)."""
        deadline = time.monotonic() + limit
        while len(self.latencies_ms) < n and time.monotonic() < deadline:
            if self._task is not None and self._task.done():
                self._task.result()  # raises what stopped it
            await asyncio.sleep(0.05)
        return list(self.latencies_ms)

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._reader.stop()


@dataclasses.dataclass(frozen=True, slots=True)
class _Through:
    """One batch of messages through the pipeline: three clocks on it."""

    published: _Published
    records: list[ConsumerRecord[bytes, bytes]]
    """The allocation records (broker-stamped)."""
    receipts_ms: list[float]
    """Per child: arrival at a consumer of the allocations - publish (this host's clock)."""
    landed_ms: list[float]
    """Per message: append of its down event (ingest's output) - publish."""
    routed_ms: list[float]
    """Per child: append of its added record (the router's output) - publish. The router
    writes in transactions: a record is appended before its transaction commits and
    seen by the sink only after."""
    committed_ms: list[float]
    """Per child: arrival of its added record at a read-committed consumer - publish."""


class Pipeline:
    def __init__(self, ctx: Context, cfg: Config, workers: dict[str, procs.Proc]) -> None:
        self.ctx, self.cfg, self.workers = ctx, cfg, workers
        self.prefix = ctx.mqtt_prefix(cfg)

    def alive(self) -> None:
        for proc in self.workers.values():
            proc.check()

    async def through(self, count: int, phase: str, per_s: float | None, limit: float) -> _Through:
        """Publish ``count`` messages; their allocation records once all are in.

        Raises:
            Incomplete: the broker did not acknowledge them all within ``limit`` s, or
                their allocations did not all arrive within ``limit`` s after that.
        """
        topics = self.cfg.kafka.topics
        out, landed = Output(self.cfg, topics.allocations), Output(self.cfg, topics.down_events)
        routed = Output(self.cfg, topics.added)
        for output in (out, landed, routed):
            await output.start()
        async with (
            _Receipts(self.cfg, topics.allocations) as receipts,
            _Receipts(self.cfg, topics.added) as committed,
        ):
            published = await _publish(
                self.cfg, self.prefix, count, phase, per_s=per_s, limit=limit
            )
            if published.count < count:
                msg = (
                    f"MQTT: the broker acknowledged {published.count} of {count} messages "
                    f"in {published.seconds:.0f} s ({published.per_s:,.0f} msg/s)"
                )
                raise Incomplete(msg)
            n = count * workload.CHILDREN
            records = await out.wait(n, limit=limit, alive=self.alive)
            receipts_ms = await receipts.until(n, limit=10.0)
            committed_ms = await committed.until(n, limit=10.0)
        down = await landed.wait(count, limit=limit)
        added = await routed.wait(n, limit=limit)
        return _Through(published, records, receipts_ms, _hop(down), _hop(added), committed_ms)

    async def _routed(self, since: dict[TopicPartition, int]) -> int:
        """Down events the router has committed since the offsets ``since``."""
        client = kafka.admin(self.cfg.kafka)
        await client.start()
        try:
            done = await client.list_consumer_group_offsets(self.cfg.router.group_id)
        finally:
            await client.close()
        return sum(max(0, done[tp].offset - start) for tp, start in since.items() if tp in done)

    def memory(self) -> dict[str, procs.Memory]:
        return {name: proc.memory() for name, proc in self.workers.items()}

    async def burst(self, count: int) -> Burst:
        o, cfg, t = self.ctx.options, self.cfg, self.cfg.kafka.topics
        landed, allocated = Output(cfg, t.down_events), Output(cfg, t.allocations)
        await landed.start()
        await allocated.start()
        since = await landed.ends()
        started = time.monotonic()
        # A broker slow to accept a backlog (one whole-database save per change) may not
        # take all of it within the limit: the burst is then what it did take.
        published = await _publish(cfg, self.prefix, count, "b", per_s=None, limit=o.limit)
        landed_after: float | None = None
        with contextlib.suppress(Incomplete):  # memory is read all the same
            await landed.wait(published.count, limit=o.limit, alive=self.alive)
            landed_after = time.monotonic() - started
        # The router and the sink work on through the backlog the burst left; their
        # memory is read while they do, ingest's once it has been idle for a while.
        settle = time.monotonic() + o.burst_settle
        while time.monotonic() < settle:
            self.alive()
            await asyncio.sleep(0.5)
        return Burst(
            messages=published.count,
            wanted=count,
            published_seconds=published.seconds,
            landed=await landed.count(),
            landed_seconds=landed_after,
            routed=await self._routed(since),
            allocated=await allocated.count(),
            seconds=time.monotonic() - started,
            memory=self.memory(),
        )


def _p(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{percentile(values, 50):,.0f}/{percentile(values, 99):,.0f}"


async def end_to_end(ctx: Context, say: Callable[[str], None]) -> E2E:
    """Run the whole pipeline and measure it (see the module's docstring)."""
    o = ctx.options
    cfg = ctx.config("e2e")
    await ctx.topics_for(cfg, *cfg.kafka.topics.__struct_fields__)
    await ctx.session_for(cfg)
    workers: dict[str, procs.Proc] = {}
    try:
        for command in ("run",) if o.together else ("ingest", "route", "sink"):
            workers[command] = await ctx.worker(command, cfg, f"e2e-{command}")
        pipe = Pipeline(ctx, cfg, workers)
        await pipe.through(WARMUP, "w", None, o.limit)
        backlog = await pipe.through(o.sustain, "s", None, o.limit)
        sustained = output_rate(backlog.records) / workload.CHILDREN
        say(
            f"  sustained: {sustained:,.0f} msg/s ({sustained * workload.CHILDREN:,.0f} children/s;"
            f" the broker took the backlog at {backlog.published.per_s:,.0f} msg/s)"
        )
        steps = {fraction: Step(fraction) for fraction in o.rates}
        for r in range(o.latency_rounds):
            k = r % len(o.rates)  # rotate the order from round to round
            for i, fraction in [*enumerate(o.rates)][k:] + [*enumerate(o.rates)][:k]:
                per_s = fraction * sustained
                count = max(2, round(per_s * o.rate_seconds))
                done = await pipe.through(count, f"r{r}{i}", per_s, o.limit + 4 * o.rate_seconds)
                step, latencies = steps[fraction], _latencies(done.records)
                step.offered.append(done.published.per_s)
                step.messages.append(count)
                step.latencies_ms.append(latencies)
                step.receipts_ms.append(done.receipts_ms)
                step.landed_ms.append(done.landed_ms)
                step.routed_ms.append(done.routed_ms)
                step.committed_ms.append(done.committed_ms)
                say(
                    f"  {fraction:g} x: {done.published.per_s:,.0f} msg/s, p50/p99 ms: "
                    f"append {_p(latencies)}, receipt {_p(done.receipts_ms)}, "
                    f"ingest {_p(done.landed_ms)}, route {_p(done.routed_ms)}, "
                    f"committed {_p(done.committed_ms)}"
                )
        sustained_memory = pipe.memory()
        burst = None
        if o.burst:
            say(f"  burst of {o.burst:,} messages")
            burst = await pipe.burst(o.burst)
    finally:
        for proc in workers.values():
            await proc.stop()
    return E2E(sustained, list(steps.values()), sustained_memory, burst)
