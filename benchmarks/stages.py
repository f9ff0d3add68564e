"""Each stage and its ceilings, interleaved, on the same input; and the decoder against msgspec.

A round measures, for each stage, the real worker (``pipeline ingest|route|sink`` in its
own process) and its ceilings (:mod:`.ceilings`, each in its own process) one after the
other on identical input, in an order that rotates from round to round so that a drift
in the machine's load does not favour one side.

- ingest: the same N messages are queued in a fresh persistent MQTT session for each
  measurement; the process resumes it and drains the backlog into Kafka;
- route: every measurement reads the same preloaded ``iotda.down-events`` topic (a new
  consumer group each time) and writes its own output topic;
- sink: every measurement allocates the same children (the same sns, already registered
  in the emulator), from the same preloaded ``iotda.subdevices.added`` topic for the stage.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import statistics
import time
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
import msgspec

from benchmarks import ceilings, measure, profile, workload
from benchmarks.measure import Output, at_first, elapsed, rate, span
from benchmarks.procs import BenchError
from pipeline.core.decode import decode_down
from pipeline.dps.emulator import DEMO_GROUP
from pipeline.tools.replay import FixtureMessage, replay_messages

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path

    from aiokafka import ConsumerRecord

    from benchmarks.context import Context
    from benchmarks.procs import Memory, Proc
    from pipeline.config import Config

__all__ = [
    "STAGES",
    "CpuTrace",
    "Sample",
    "Stages",
    "decode_rates",
    "output_sample",
    "rotated",
    "sample_of",
]

_T = TypeVar("_T")
_DECODE_BLOCK = 250
"""Messages decoded by one loop before the other takes its turn."""

STAGES = {
    "ingest": ("msg/s", ("stage", "in-order", "naive", "drain")),
    "route": ("children/s", ("stage", "transactional")),
    "sink": ("allocations/s", ("stage", "kiko", "aiohttp", "http")),
}
"""Per stage: its unit, and what is measured (the stage first, then its ceilings)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Sample:
    """One measurement: a rate over ``count`` completions, and the process's peak memory."""

    rate: float
    count: int
    seconds: float
    peak_mb: float | None = None
    """Peak RSS of the worker (stages only; ceilings are not judged on memory)."""
    cpu: float | None = None
    """CPU seconds per second the process used while it wrote its output (a stage: from
    its first to its last record's append time, :class:`CpuTrace`; a ceiling reports its
    own): near 1.0 it is bound by its core, or by its share of the two cores; well
    below, it waits on something."""


_CPU_EVERY = 0.01
"""Seconds between samples of a worker's CPU time (``/proc`` counts it in 10 ms ticks)."""


class CpuTrace:
    """A worker's CPU time, sampled while it works, read over the span of its output.

    The bench sees a worker's last record only at its next poll, and then reads all of
    them back, while the worker, done, waits: CPU over that whole window understated
    ingest's share of a core by 2-6 points on 10,000 messages (its last 0.1-0.3 s idle),
    and its CPU per message with it.
    """

    def __init__(self, proc: Proc) -> None:
        self._proc = proc
        self._samples: list[tuple[float, float]] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Sample from now on, until :meth:`stop`."""
        self._task = asyncio.create_task(self._sample(), name="bench.cpu")

    async def stop(self) -> None:
        """Stop sampling."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def busy(self, first: float, last: float) -> float | None:
        """CPU seconds per second between wall times ``first`` and ``last`` (or all samples)."""
        inside = [s for s in self._samples if first <= s[0] <= last]
        if len(inside) < 2:  # noqa: PLR2004  (a span shorter than two samples)
            inside = self._samples
        if len(inside) < 2:  # noqa: PLR2004
            return None
        (t0, c0), (t1, c1) = inside[0], inside[-1]
        return (c1 - c0) / max(t1 - t0, 1e-3)

    async def _sample(self) -> None:
        while True:
            try:
                self._samples.append((time.time(), self._proc.cpu_seconds()))
            except (OSError, BenchError):  # it exited: the measurement says why
                return
            await asyncio.sleep(_CPU_EVERY)


def rotated(kinds: Sequence[_T], round_no: int) -> list[_T]:
    """``kinds`` started at a different one each round (``round_no`` modulo their number)."""
    k = round_no % len(kinds)
    return [*kinds[k:], *kinds[:k]]


def sample_of(
    count: int, first: float, last: float, memory: Memory | None = None, *, at_first: int = 1
) -> Sample:
    """The :class:`Sample` of ``count`` completions between ``first`` and ``last``.

    ``at_first``: how many completed at ``first`` (:func:`~.measure.rate`).
    """
    seconds = elapsed(first, last)
    peak = memory.peak_mb if memory else None
    return Sample(rate(count, first, last, at_first=at_first), count, seconds, peak)


def output_sample(
    records: list[ConsumerRecord[bytes, bytes]], memory: Memory | None = None
) -> Sample:
    """The :class:`Sample` of a measurement's broker-stamped output ``records``."""
    return sample_of(len(records), *span(records), memory, at_first=at_first(records))


def decode_rates(payloads: list[bytes], reps: int) -> dict[str, list[float]]:
    """Messages per CPU second of :func:`decode_down` and of the bare typed decode.

    Both are timed on this thread's CPU clock (``time.thread_time``), so time the
    machine gives to other processes does not count, and they alternate every
    :data:`_DECODE_BLOCK` messages, so both see the same caches and clock speed.
    """
    loops: dict[str, Callable[[bytes], object]] = {
        "decode_down": decode_down,
        "msgspec typed decode": ceilings.typed_decode,
    }
    blocks = [payloads[i : i + _DECODE_BLOCK] for i in range(0, len(payloads), _DECODE_BLOCK)]
    out: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(reps):
        spent = dict.fromkeys(loops, 0.0)
        for b, block in enumerate(blocks):
            for name in rotated(list(loops), b):
                decode = loops[name]
                started = time.thread_time()
                for payload in block:
                    decode(payload)
                spent[name] += time.thread_time() - started
        for name, seconds in spent.items():
            out[name].append(len(payloads) / seconds)
    return out


class Stages:
    """The three stages' inputs, prepared once, and one round of measurements at a time."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        o = ctx.options
        self._messages = workload.messages(o.messages, "in")
        self._events = workload.down_records(workload.messages(o.events, "rt"))
        per = workload.CHILDREN
        sink_events = workload.down_records(workload.messages(-(-o.allocations // per), "sk"))
        children = workload.child_records(sink_events)
        self._children = children[: o.allocations]
        routed = workload.child_records(self._events)
        self._child_bytes = round(statistics.mean(len(v) for _, v in routed))
        self._key_bytes = round(statistics.mean(len(k) for k, _ in routed))
        self._route_in = ""
        self._sink_in = ""
        self._requests = ctx.log_dir / "requests.json"
        self._recording: Path | None = None
        self.samples: dict[str, dict[str, list[Sample]]] = {
            stage: {kind: [] for kind in kinds} for stage, (_, kinds) in STAGES.items()
        }

    @property
    def messages(self) -> list[FixtureMessage]:
        """The ingest messages, as published."""
        return self._messages

    @property
    def children(self) -> list[tuple[bytes, bytes]]:
        """The sink's input records (key, value), their sns registered by :meth:`prepare`."""
        return self._children

    @property
    def payloads(self) -> list[bytes]:
        """The ingest messages' payloads (the decoder is measured on them too)."""
        return [m.payload for m in self._messages]

    async def prepare(self) -> None:
        """Preload the route and sink inputs; register the sink's sns in the emulator."""
        ctx = self._ctx
        cfg = ctx.config("input")
        await ctx.topics_for(cfg, "down_events", "added")
        self._route_in, self._sink_in = cfg.kafka.topics.down_events, cfg.kafka.topics.added
        await measure.preload(cfg.kafka, self._route_in, self._events)
        await measure.preload(cfg.kafka, self._sink_in, self._children)
        await self.prepare_emulator()

    async def prepare_emulator(self) -> None:
        """Register the sink's sns in the emulator (the sink's DPS requests, for its ceilings)."""
        requests = workload.requests(self._ctx.config("input"), self._children)
        self._requests.write_bytes(msgspec.json.encode(requests))
        devices = [
            {"sn": msgspec.json.decode(r.body)["sn"], "group_id": DEMO_GROUP} for r in requests
        ]
        await self._emulator("POST", "devices", devices)

    async def _emulator(self, method: str, path: str, body: object = None) -> None:
        url = f"{self._ctx.dps_url}/_emulator/{path}"
        async with (
            aiohttp.ClientSession() as http,
            http.request(method, url, json=body) as response,
        ):
            response.raise_for_status()

    async def round(self, round_no: int) -> None:
        """One round: every stage (of ``--only``) and its ceilings, in the rotating order."""
        for stage, measure_one in (
            ("ingest", self._ingest),
            ("route", self._route),
            ("sink", self._sink),
        ):
            if stage not in self._ctx.options.only:
                continue
            for kind in rotated(STAGES[stage][1], round_no):
                self.samples[stage][kind].append(await measure_one(kind, round_no))

    async def profile(self, round_no: int, directory: Path) -> dict[str, dict[str, Any]]:
        """One more round of the stages alone, each with py-spy attached; their summaries."""
        out = {}
        for stage, measure_one in (
            ("ingest", self._ingest),
            ("route", self._route),
            ("sink", self._sink),
        ):
            if stage not in self._ctx.options.only:
                continue
            self._recording = directory / f"{stage}.txt"
            await measure_one("stage", round_no)
            out[stage] = profile.summarize(self._recording)
        self._recording = None
        return out

    async def _worker(self, command: str, cfg: Config, name: str, out: Output, n: int) -> Sample:
        await out.start()
        proc = await self._ctx.worker(command, cfg, name)
        recording = None
        cpu = CpuTrace(proc)
        try:
            # From the first output on: start-up (imports, connections) is not the load.
            await out.first(proc.check)
            cpu.start()
            if self._recording is not None:
                recording = await profile.Recording.attach(proc.pid, self._recording)
            records = await out.wait(n, limit=self._ctx.options.limit, alive=proc.check)
            memory = proc.memory()
        finally:
            await cpu.stop()
            if recording is not None:
                await recording.stop()
            await proc.stop()
        return dataclasses.replace(output_sample(records, memory), cpu=cpu.busy(*span(records)))

    async def _ceiling(
        self, loop: str, cfg: Config, name: str, out: Output | None, n: int, *args: str
    ) -> Sample:
        if out is not None:
            await out.start()
        proc = await self._ctx.ceiling(loop, cfg, name, *args)
        limit = self._ctx.options.limit
        if out is None:
            result = await proc.result(limit)
            sample = sample_of(int(result["count"]), float(result["first"]), float(result["last"]))
        else:
            try:
                records = await out.wait(n, limit=limit, alive=proc.check_failed)
            except BaseException:
                await proc.stop()
                raise
            result = await proc.result(limit)
            sample = output_sample(records)
        return dataclasses.replace(sample, cpu=float(result["cpu"]))

    async def _ingest(self, kind: str, round_no: int) -> Sample:
        ctx, n = self._ctx, len(self._messages)
        name = f"i{round_no}{kind[0]}"
        cfg = ctx.config(name)
        await ctx.topics_for(cfg, "down_events", "down_events_dlq")
        await ctx.session_for(cfg)
        try:
            async with asyncio.timeout(ctx.options.limit):
                await replay_messages(
                    cfg.mqtt, self._messages, topic_prefix=ctx.mqtt_prefix(cfg), progress=False
                )
        except TimeoutError:
            msg = f"MQTT: the broker did not take {n} messages in {ctx.options.limit:g} s"
            raise measure.Incomplete(msg) from None
        out = Output(cfg, cfg.kafka.topics.down_events)
        try:
            match kind:
                case "stage":
                    return await self._worker("ingest", cfg, name, out, n)
                case "in-order" | "naive":
                    return await self._ceiling(kind, cfg, name, out, n, "--count", str(n))
                case _:
                    return await self._ceiling("drain", cfg, name, None, n, "--count", str(n))
        finally:
            await measure.close_session(cfg.mqtt)

    async def _route(self, kind: str, round_no: int) -> Sample:
        ctx = self._ctx
        n = len(self._events) * workload.CHILDREN
        name = f"r{round_no}{kind[0]}"
        cfg = ctx.config(name, down_events=self._route_in)
        await ctx.topics_for(cfg, "added", "failed", "down_events_dlq")
        out = Output(cfg, cfg.kafka.topics.added)
        if kind == "stage":
            return await self._worker("route", cfg, name, out, n)
        return await self._ceiling(
            "transactional", cfg, name, out, n,
            "--count", str(len(self._events)), "--children", str(workload.CHILDREN),
            "--child-bytes", str(self._child_bytes), "--key-bytes", str(self._key_bytes),
        )  # fmt: skip

    async def _sink(self, kind: str, round_no: int) -> Sample:
        ctx = self._ctx
        n = len(self._children)
        name = f"s{round_no}{kind[0]}"
        cfg = ctx.config(name, added=self._sink_in)
        await ctx.topics_for(cfg, "allocations", "allocations_dlq")
        try:
            out = Output(cfg, cfg.kafka.topics.allocations)
            if kind == "stage":
                return await self._worker("sink", cfg, name, out, n)
            calls = ("--requests", str(self._requests), "--concurrency", str(cfg.sink.concurrency))
            if kind == "kiko":
                return await self._ceiling("kiko", cfg, name, out, n, *calls)
            loop = "http" if kind == "http" else "allocate"
            return await self._ceiling(loop, cfg, name, None, n, *calls)
        finally:
            await self._emulator("DELETE", "calls")  # the emulator's call log stays small
