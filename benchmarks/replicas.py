"""Throughput against the number of replicas (``python -m benchmarks --replicas``).

- sink: 1, 2 and 4 ``pipeline sink`` processes in one consumer group allocate the same
  children from an input topic of :data:`PARTITIONS` partitions. The replicas start on
  an empty topic and the children are written once the group is stable with all of
  them, so a measurement is of the replicas working, not of their joining.
- ingest: 1 and 2 ``pipeline ingest`` processes split the gateways (``mqtt.gateways``
  with ``mqtt.shard i/n``, the scale-out that works on the real ``$oc`` topics), each
  from a backlog queued in its own persistent session, as for the single-stage rounds.

Rate is over the broker's append times of the output records, as everywhere in the
bench. Counts alternate over the rounds in a rotating order; medians and ranges.
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import time
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec
from rich.table import Table

from benchmarks import measure, workload
from benchmarks.measure import Output
from benchmarks.procs import BenchError
from benchmarks.stages import Sample, output_sample, rotated
from pipeline.config import listed_gateways
from pipeline.core.shards import share
from pipeline.io import kafka, mqtt
from pipeline.tools.replay import FixtureMessage, replay_messages

if TYPE_CHECKING:
    from rich.console import Console

    from benchmarks.context import Context
    from benchmarks.procs import Proc
    from pipeline.config import Config

__all__ = ["INGESTS", "PARTITIONS", "SINKS", "Replicas", "document", "table"]

SINKS = (1, 2, 4)
INGESTS = (1, 2)
PARTITIONS = 8
"""Partitions of the sink's input: every one of 4 replicas has two."""
_JOIN_LIMIT = 60.0


class Replicas:
    """Inputs prepared once; one round of every replica count at a time."""

    def __init__(
        self, ctx: Context, messages: list[FixtureMessage], children: list[tuple[bytes, bytes]]
    ) -> None:
        self._ctx = ctx
        self._messages = messages
        self._children = children
        self.samples: dict[str, dict[int, list[Sample]]] = {
            "sink": {n: [] for n in SINKS},
            "ingest": {n: [] for n in INGESTS},
        }
        self.split: dict[int, list[int]] = {}
        """Per ingest replica count: how many of the messages each replica's gateways had."""

    async def round(self, round_no: int) -> None:
        """Every sink count, then every ingest count, each in a rotating order."""
        for count in rotated(SINKS, round_no):
            self.samples["sink"][count].append(await self._sink(count, round_no))
        for count in rotated(INGESTS, round_no):
            self.samples["ingest"][count].append(await self._ingest(count, round_no))

    async def _sink(self, count: int, round_no: int) -> Sample:
        ctx = self._ctx
        name = f"xs{round_no}n{count}"
        cfg = ctx.config(name)
        wide = msgspec.structs.replace(
            cfg, kafka=msgspec.structs.replace(cfg.kafka, partitions=PARTITIONS)
        )
        # The sink reads added, deleted and lifecycle co-partitioned: one partition count.
        await ctx.topics_for(
            wide, "added", "deleted", "lifecycle", "allocations", "allocations_dlq"
        )
        out = Output(cfg, cfg.kafka.topics.allocations)
        await out.start()
        workers = [await ctx.worker("sink", cfg, f"{name}-{i}") for i in range(count)]
        try:
            await _group_stable(cfg, cfg.sink.group_id, count, workers)
            await measure.preload(cfg.kafka, cfg.kafka.topics.added, self._children)
            return await _measured(out, len(self._children), workers, ctx.options.limit)
        finally:
            await asyncio.gather(*(w.stop() for w in workers))
            await _forget_calls(ctx)

    async def _ingest(self, count: int, round_no: int) -> Sample:
        ctx = self._ctx
        name = f"xi{round_no}n{count}"
        base = ctx.config(name)
        await ctx.topics_for(base, "down_events", "down_events_dlq")
        gateways = sorted({f"gw-{seq % workload.GATEWAYS}" for seq in range(workload.GATEWAYS)})
        shards = [
            msgspec.structs.replace(
                base,
                mqtt=msgspec.structs.replace(
                    base.mqtt,
                    client_id=f"{base.mqtt.client_id}-{i}",
                    gateways=gateways,
                    shard=f"{i}/{count}",
                ),
            )
            for i in range(count)
        ]
        for cfg in shards:
            ctx.sessions.append(cfg)
            async with mqtt.connect(cfg.mqtt) as client:
                for gateway in share(listed_gateways(cfg.mqtt), cfg.mqtt.shard):
                    topic = mqtt.subscription_topic(cfg.mqtt, gateway.device_id)
                    await mqtt.subscribe(client, cfg.mqtt, topic)
        owner = {
            g.device_id: i
            for i, cfg in enumerate(shards)
            for g in share(listed_gateways(cfg.mqtt), cfg.mqtt.shard)
        }
        split = [0] * count
        for message in self._messages:
            split[owner[message.topic.split("/")[2]]] += 1
        self.split[count] = split
        await replay_messages(
            base.mqtt, self._messages, topic_prefix=ctx.mqtt_prefix(base), progress=False
        )
        out = Output(base, base.kafka.topics.down_events)
        await out.start()
        workers = [await ctx.worker("ingest", cfg, f"{name}-{i}") for i, cfg in enumerate(shards)]
        try:
            return await _measured(out, len(self._messages), workers, ctx.options.limit)
        finally:
            await asyncio.gather(*(w.stop() for w in workers))
            for cfg in shards:
                await measure.close_session(cfg.mqtt)


async def _measured(out: Output, n: int, workers: list[Proc], limit: float) -> Sample:
    """The rate of ``n`` outputs of ``workers``, and the largest peak RSS among them."""

    def alive() -> None:
        for worker in workers:
            worker.check()

    records = await out.wait(n, limit=limit, alive=alive)
    peak = max(w.memory().peak_mb for w in workers)
    return dataclasses.replace(output_sample(records), peak_mb=peak)


async def _group_stable(cfg: Config, group: str, members: int, workers: list[Proc]) -> None:
    """Wait until ``group`` is Stable with ``members`` members (each replica has joined)."""
    admin = kafka.admin(cfg.kafka)
    await admin.start()
    deadline = time.monotonic() + _JOIN_LIMIT
    try:
        while True:
            for worker in workers:
                worker.check()
            (response,) = await admin.describe_consumer_groups([group])
            described = response.groups[0]
            state, joined = described[2], len(described[5])
            if state == "Stable" and joined == members:
                return
            if time.monotonic() > deadline:
                msg = f"group {group}: {joined} of {members} replicas joined ({state})"
                raise BenchError(msg)
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


async def _forget_calls(ctx: Context) -> None:
    """The emulator's call log stays small."""
    async with (
        aiohttp.ClientSession() as http,
        http.delete(f"{ctx.dps_url}/_emulator/calls") as response,
    ):
        response.raise_for_status()


def document(replicas: Replicas) -> dict[str, Any]:
    """The figures: per stage and replica count, the rate's summary and the speed-up."""
    out: dict[str, Any] = {}
    for stage, unit in (("sink", "allocations/s"), ("ingest", "msg/s")):
        by_count = replicas.samples[stage]
        one = statistics.median(s.rate for s in by_count[1])
        out[stage] = {
            "unit": unit,
            "replicas": {
                str(count): {
                    "median": statistics.median(s.rate for s in samples),
                    "min": min(s.rate for s in samples),
                    "max": max(s.rate for s in samples),
                    "rates": [s.rate for s in samples],
                    "speedup": statistics.median(s.rate for s in samples) / one,
                    "peak_mb": max(s.peak_mb or 0.0 for s in samples),
                }
                for count, samples in by_count.items()
            },
        }
    out["ingest"]["split"] = {str(n): shares for n, shares in replicas.split.items()}
    return out


def table(console: Console, doc: dict[str, Any]) -> None:
    """Print the replica table."""
    rounds = doc["meta"]["options"]["rounds"]
    # Escaped: rich markup reads a lowercase [word] as a style and drops it.
    t = Table(title=f"throughput by replicas: medians of {rounds} interleaved rounds, \\[min-max]")
    for column in ("stage", "replicas", "median", "range", "x one replica", "peak RSS MB"):
        t.add_column(column, justify="left" if column == "stage" else "right")
    for stage, entry in doc["replicas"].items():
        for count, figures in entry["replicas"].items():
            t.add_row(
                f"{stage} ({entry['unit']})" if count == "1" else "",
                count,
                f"{figures['median']:,.0f}",
                f"[{figures['min']:,.0f}-{figures['max']:,.0f}]",
                f"{figures['speedup']:.2f}",
                f"{figures['peak_mb']:.0f}",
            )
    console.print(t)
    split = doc["replicas"]["ingest"]["split"]
    console.print(
        "ingest: each replica's share of the messages (its gateways, by mqtt.shard): "
        + "; ".join(f"{n} replicas {shares}" for n, shares in split.items())
    )
