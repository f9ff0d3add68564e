"""The sink under a degraded DPS (``python -m benchmarks --degraded``).

The same ``pipeline sink`` at the same ``sink.concurrency``, against the same emulator,
in three settings interleaved over rounds (the order rotates each round):

- ``healthy``: no fault;
- ``hung``: :data:`HANG_RATE` of every DPS call (allocates and gets alike) takes effect
  and then hangs until the sink gives up at ``sink.dps.timeout`` (the emulator's
  ``hang_rate`` with ``hang_after_effect``: each one is an ambiguous allocate the sink
  checks with Get DPS Device, the harder case);
- ``hung, off``: the same fault with ``sink.detached_limit`` 0, a slot held for the whole
  call: the sink before the soft deadline.

Each measurement reads the same preloaded children (a consumer group of its own) and
writes its own output topic. A hung call lasts ``dps.timeout``, so the first seconds of a
run are not its steady state (no hung call has ended yet, no detached place is given
back): the rate is the outputs whose broker append time falls in the
:data:`SPAN` seconds that follow ``dps.timeout`` seconds of warm-up after the first
output. The emulator's count of calls in flight gives the most at once in each run.
Target: ``hung`` at least :data:`TARGET` of ``healthy`` (median of the rounds).
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec
from rich.table import Table

from benchmarks import measure, procs, workload
from benchmarks.context import Context
from benchmarks.measure import Output
from benchmarks.options import Options
from benchmarks.report import save
from benchmarks.runner import start_emulator  # the one way the bench starts it
from benchmarks.services import ensure_services
from benchmarks.stages import rotated
from pipeline.tools.console import make_console

if TYPE_CHECKING:
    from rich.console import Console

    from pipeline.config import Config

__all__ = ["HANG_RATE", "KINDS", "SPAN", "TARGET", "run"]

HANG_RATE = 0.05
TARGET = 0.5
"""Least acceptable ratio of the ``hung`` rate to the ``healthy`` one."""
KINDS = ("healthy", "hung", "hung, off")
SPAN = 10.0
"""Seconds measured, after a warm-up of ``dps.timeout``."""
CHILDREN = 60_000
"""Children preloaded: more than the sink allocates in warm-up and span at full speed."""


@dataclasses.dataclass(frozen=True, slots=True)
class _Run:
    rate: float
    peak_in_flight: int
    exhausted: bool
    """The input ran out before the span ended (the rate is over what was left)."""


async def run(
    cfg: Config, *, rounds: int, config_path: str | None, out: Path, summary: Path
) -> int:
    """Measure, print the table, write ``out`` (every figure) and ``summary`` (the same)."""
    console = make_console(stderr=True)
    with console.status("checking Mosquitto and Kafka (starting deploy/local if need be)"):
        await ensure_services(cfg)
    log_dir = Path(tempfile.mkdtemp(prefix="pipeline-degraded-"))
    ctx = Context(cfg, Options(rounds=rounds), config_path=config_path, log_dir=log_dir)
    started = time.monotonic()
    emulator = await start_emulator(ctx)
    runs: dict[str, list[_Run]] = {kind: [] for kind in KINDS}
    try:
        source = ctx.config("dg-input")
        await ctx.topics_for(source, "added")
        children = workload.child_records(
            workload.down_records(workload.messages(CHILDREN // workload.CHILDREN, "dg"))
        )
        await measure.preload(source.kafka, source.kafka.topics.added, children)
        for i in range(rounds):
            console.print(f"round {i + 1}/{rounds}: " + ", ".join(rotated(KINDS, i)))
            for kind in rotated(KINDS, i):
                measured = await _measure(ctx, kind, i, source.kafka.topics.added, len(children))
                runs[kind].append(measured)
                console.print(
                    f"  {kind}: {measured.rate:,.0f} allocations/s, at most "
                    f"{measured.peak_in_flight} calls in flight at DPS"
                    + (" (input ran out)" if measured.exhausted else "")
                )
    except procs.BenchError as exc:
        console.print(f"[red]benchmarks: {exc}[/red]\n(process logs in {log_dir})")
        return 1
    finally:
        await emulator.stop()
        await ctx.cleanup()
    doc = _document(ctx, runs, time.monotonic() - started)
    table(console, doc)
    for path in (out, summary):
        save(console, path, doc)
    return 0


async def _measure(ctx: Context, kind: str, round_no: int, added: str, n: int) -> _Run:
    name = f"dg{round_no}{kind[0]}{'o' if kind.endswith('off') else ''}"
    cfg = ctx.config(name, added=added)
    if kind.endswith("off"):
        cfg = msgspec.structs.replace(cfg, sink=msgspec.structs.replace(cfg.sink, detached_limit=0))
    await ctx.topics_for(cfg, "allocations", "allocations_dlq")
    hang = HANG_RATE if kind != "healthy" else 0.0
    await _admin(ctx, "POST", "faults", {"hang_rate": hang, "hang_after_effect": True})
    await _admin(ctx, "DELETE", "in-flight")
    output = Output(cfg, cfg.kafka.topics.allocations)
    await output.start()
    proc = await ctx.worker("sink", cfg, name)
    warmup = cfg.sink.dps.timeout
    try:
        await output.first(proc.check)
        deadline = time.monotonic() + warmup + SPAN + 1.0  # + the broker's stamping
        while time.monotonic() < deadline:
            proc.check()
            await asyncio.sleep(0.5)
        count = await output.count()
        records = await output.wait(count, limit=ctx.options.limit, alive=proc.check)
        peak = (await _admin(ctx, "GET", "in-flight"))["peak"]
    finally:
        # The hung calls would hold up an orderly stop for dps.timeout: nothing here
        # needs its commits.
        if proc.process.returncode is None:
            proc.process.kill()
        await proc.process.wait()
        await _admin(ctx, "POST", "faults", {"hang_rate": 0.0})  # releases what hangs
        await _admin(ctx, "DELETE", "calls")
    stamps = sorted(r.timestamp / 1000 for r in records)
    begin = stamps[0] + warmup
    end = begin + SPAN
    exhausted = len(records) >= n and stamps[-1] < end
    if exhausted:
        end = stamps[-1]
    within = sum(1 for t in stamps if begin <= t < end)
    return _Run(within / max(end - begin, 1e-3), int(peak), exhausted)


async def _admin(ctx: Context, method: str, path: str, body: object = None) -> Any:
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, f"{ctx.dps_url}/_emulator/{path}", json=body) as response,
    ):
        response.raise_for_status()
        return await response.json() if response.status == 200 else None  # noqa: PLR2004


def _document(ctx: Context, runs: dict[str, list[_Run]], seconds: float) -> dict[str, Any]:
    s = ctx.base.sink
    by_kind: dict[str, dict[str, Any]] = {
        kind: {
            "median": statistics.median(r.rate for r in rs),
            "min": min(r.rate for r in rs),
            "max": max(r.rate for r in rs),
            "rates": [r.rate for r in rs],
            "peak_in_flight": [r.peak_in_flight for r in rs],
            "exhausted": [r.exhausted for r in rs],
        }
        for kind, rs in runs.items()
    }
    healthy = by_kind["healthy"]["median"]
    ratios = {kind: by_kind[kind]["median"] / healthy for kind in KINDS[1:]}
    return {
        "degraded": {
            "unit": "allocations/s",
            "hang_rate": HANG_RATE,
            "concurrency": s.concurrency,
            "detached_limit": s.detached_limit,
            "timeout": s.dps.timeout,
            "warmup_seconds": s.dps.timeout,
            "span_seconds": SPAN,
            "rounds": ctx.options.rounds,
            "kinds": by_kind,
            "ratios": ratios,
            "round_ratios": {
                kind: [r.rate / h.rate for r, h in zip(runs[kind], runs["healthy"], strict=True)]
                for kind in KINDS[1:]
            },
            "target": {
                "what": "hung / healthy",
                "at_least": TARGET,
                "met": ratios["hung"] >= TARGET,
            },
            "seconds": round(seconds, 1),
            "python": sys.version.split()[0],
        }
    }


def table(console: Console, doc: dict[str, Any]) -> None:
    """Print the rates, ratios and the target."""
    d = doc["degraded"]
    title = (
        f"sink under a degraded DPS: {d['hang_rate']:.0%} of calls hang up to "
        f"dps.timeout {d['timeout']:g} s; concurrency {d['concurrency']}, detached_limit "
        f"{d['detached_limit']}; medians of {d['rounds']} interleaved rounds, \\[min-max]"
    )
    t = Table(title=title)
    for column in ("setting", "allocations/s", "range", "x healthy", "most calls in flight"):
        t.add_column(column, justify="left" if column == "setting" else "right")
    for kind, figures in d["kinds"].items():
        ratio = d["ratios"].get(kind)
        t.add_row(
            kind,
            f"{figures['median']:,.0f}",
            f"[{figures['min']:,.0f}-{figures['max']:,.0f}]",
            "" if ratio is None else f"{ratio:.2f}",
            str(max(figures["peak_in_flight"])),
        )
    console.print(t)
    target = d["target"]
    verdict = "met" if target["met"] else "MISSED"
    console.print(
        f"target: hung / healthy >= {target['at_least']:g}: {d['ratios']['hung']:.2f} ({verdict})"
    )
