"""End to end: the sustained rate, latency against offered load, and memory after a burst.

The three workers run as separate processes on one set of topics, as deployed. Each
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
import time
from typing import TYPE_CHECKING

import msgspec

from benchmarks import procs, workload
from benchmarks.measure import Incomplete, Output, rate, span
from pipeline.io import kafka, mqtt
from pipeline.tools.replay import MAX_CONCURRENT_PUBLISHES, FixtureMessage, replay_messages

if TYPE_CHECKING:
    from collections.abc import Callable

    from aiokafka import ConsumerRecord, TopicPartition

    from benchmarks.context import Context
    from pipeline.config import Config

__all__ = ["E2E", "Burst", "Step", "end_to_end", "percentile"]

_WARMUP = 20


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
    """Per round, one per child allocation."""

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


async def _publish(cfg: Config, prefix: str, count: int, phase: str, per_s: float | None) -> float:
    """Publish ``count`` e2e messages at ``per_s`` (or as fast as possible); returns msg/s."""
    limit = max(1, min(MAX_CONCURRENT_PUBLISHES, cfg.mqtt.max_inflight))
    slots = asyncio.Semaphore(limit)
    client = mqtt.connect(cfg.mqtt, client_id=f"{cfg.mqtt.client_id}-pub-{phase}", persistent=False)
    client.pending_calls_threshold = limit
    started = time.monotonic()
    async with client, asyncio.TaskGroup() as tg:

        async def publish(message: FixtureMessage) -> None:
            try:
                await client.publish(prefix + message.topic, message.payload, qos=1)
            finally:
                slots.release()

        for seq in range(count):
            if per_s is not None and (wait := started + seq / per_s - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            await slots.acquire()
            tg.create_task(publish(workload.e2e_message(seq, phase)), name=f"bench.publish-{seq}")
    return count / max(time.monotonic() - started, 1e-3)


def _latencies(records: list[ConsumerRecord[bytes, bytes]]) -> list[float]:
    out = []
    for record in records:
        sent = workload.sent_ns(_allocation.decode(record.value).event_id)
        if sent is not None:
            out.append(record.timestamp - sent / 1e6)
    return out


class _Pipeline:
    def __init__(self, ctx: Context, cfg: Config, workers: dict[str, procs.Proc]) -> None:
        self.ctx, self.cfg, self.workers = ctx, cfg, workers
        self.prefix = ctx.mqtt_prefix(cfg)

    def alive(self) -> None:
        for proc in self.workers.values():
            proc.check()

    async def through(
        self, count: int, phase: str, per_s: float | None, limit: float
    ) -> tuple[float, list[ConsumerRecord[bytes, bytes]]]:
        """Publish ``count`` messages; their allocation records once all are in."""
        out = Output(self.cfg, self.cfg.kafka.topics.allocations)
        await out.start()
        offered = await _publish(self.cfg, self.prefix, count, phase, per_s)
        records = await out.wait(count * workload.CHILDREN, limit=limit, alive=self.alive)
        return offered, records

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
        batch = [workload.e2e_message(seq, "b") for seq in range(count)]
        await replay_messages(cfg.mqtt, batch, topic_prefix=self.prefix, progress=False)
        landed_after: float | None = None
        with contextlib.suppress(Incomplete):  # memory is read all the same
            await landed.wait(count, limit=o.limit, alive=self.alive)
            landed_after = time.monotonic() - started
        # The router and the sink work on through the backlog the burst left; their
        # memory is read while they do, ingest's once it has been idle for a while.
        settle = time.monotonic() + o.burst_settle
        while time.monotonic() < settle:
            self.alive()
            await asyncio.sleep(0.5)
        return Burst(
            messages=count,
            landed=await landed.count(),
            landed_seconds=landed_after,
            routed=await self._routed(since),
            allocated=await allocated.count(),
            seconds=time.monotonic() - started,
            memory=self.memory(),
        )


async def end_to_end(ctx: Context, say: Callable[[str], None]) -> E2E:
    """Run the whole pipeline and measure it (see the module's docstring)."""
    o = ctx.options
    cfg = ctx.config("e2e")
    await ctx.topics_for(cfg, *cfg.kafka.topics.__struct_fields__)
    await ctx.session_for(cfg)
    workers: dict[str, procs.Proc] = {}
    try:
        for command in ("ingest", "route", "sink"):
            workers[command] = await ctx.worker(command, cfg, f"e2e-{command}")
        pipe = _Pipeline(ctx, cfg, workers)
        await pipe.through(_WARMUP, "w", None, o.limit)
        _, records = await pipe.through(o.sustain, "s", None, o.limit)
        sustained = rate(len(records), *span(records)) / workload.CHILDREN
        say(
            f"  sustained: {sustained:,.0f} msg/s ({sustained * workload.CHILDREN:,.0f} children/s)"
        )
        steps = {fraction: Step(fraction) for fraction in o.rates}
        for r in range(o.latency_rounds):
            k = r % len(o.rates)  # rotate the order from round to round
            for i, fraction in [*enumerate(o.rates)][k:] + [*enumerate(o.rates)][:k]:
                per_s = fraction * sustained
                count = max(2, round(per_s * o.rate_seconds))
                offered, records = await pipe.through(
                    count, f"r{r}{i}", per_s, o.limit + 4 * o.rate_seconds
                )
                step, latencies = steps[fraction], _latencies(records)
                step.offered.append(offered)
                step.messages.append(count)
                step.latencies_ms.append(latencies)
                p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
                say(f"  {fraction:g} x: {offered:,.0f} msg/s, p50 {p50:,.0f} ms, p99 {p99:,.0f} ms")
        sustained_memory = pipe.memory()
        burst = None
        if o.burst:
            say(f"  burst of {o.burst:,} messages")
            burst = await pipe.burst(o.burst)
    finally:
        for proc in workers.values():
            await proc.stop()
    return E2E(sustained, list(steps.values()), sustained_memory, burst)
