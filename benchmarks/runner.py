"""The bench run: prepare, measure, report (see the package's docstring)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from rich.console import Console

from benchmarks import baseline, procs, profile, replicas, report
from benchmarks.context import Context
from benchmarks.latency import E2E, end_to_end
from benchmarks.services import Mosquittos, brokers
from benchmarks.stages import Stages, decode_rates
from pipeline.tools.console import make_console

if TYPE_CHECKING:
    from benchmarks.options import Options
    from pipeline.config import Config, MqttConfig

__all__ = ["chart_available", "run", "start_emulator", "write"]

_LIBRARIES = ("aiomqtt", "paho-mqtt", "aiokafka", "aiohttp", "msgspec")


def chart_available() -> bool:
    """Whether matplotlib (in the ``dev`` extra) is installed."""
    return importlib.util.find_spec("matplotlib") is not None


async def run(
    cfg: Config,
    options: Options,
    *,
    config_path: str | None = None,
    out: Path | None = None,
    summary: Path | None = None,
    chart: Path | None = None,
    profile_dir: Path | None = None,
) -> int:
    """Run the bench; print the tables; write the files given.

    ``out`` gets every figure (JSON), ``summary`` the same without the per-child latencies
    (:func:`.report.summary`), ``chart`` the chart (PNG; not with ``options.replicas``).
    With ``profile_dir``, one more round profiles each stage worker (:mod:`.profile`).
    """
    if chart is not None and not chart_available():
        print("benchmarks: --chart needs matplotlib: pip install matplotlib", file=sys.stderr)  # noqa: T201
        return 2
    if profile_dir is not None and not profile.available():
        print("benchmarks: --profile needs py-spy: pip install py-spy", file=sys.stderr)  # noqa: T201
        return 2
    console = make_console(stderr=True)
    started, load = time.monotonic(), os.getloadavg()
    started_at = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    log_dir = Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
    async with contextlib.AsyncExitStack() as stack:
        with console.status("starting Mosquitto, checking Kafka (deploy/local if need be)"):
            where = await stack.enter_async_context(brokers(cfg, options.mosquitto))
        ctx = Context(where.cfg, options, config_path=config_path, log_dir=log_dir)
        try:
            doc = await _measure(console, ctx, profile_dir, where)
        except procs.BenchError as exc:
            console.print(f"[red]benchmarks: {exc}[/red]\n(process logs in {log_dir})")
            return 1
        finally:
            await ctx.cleanup()  # before its brokers stop
    logged = _logged(log_dir)
    if logged:
        doc["meta"]["worker_logs"] = logged
        console.print(f"[yellow]processes logged warnings or errors (kept in {log_dir}):[/yellow]")
        for name, (count, first) in logged.items():
            console.print(f"  {name}: {count} lines, first: {first[:160]}")
    elif "e2e_error" not in doc:
        shutil.rmtree(log_dir, ignore_errors=True)
    doc["meta"] |= {
        "started_at": started_at,
        "seconds": round(time.monotonic() - started, 1),
        "loadavg_start": load,
        "loadavg_end": os.getloadavg(),
    }
    await asyncio.to_thread(write, console, doc, out=out, summary=summary, chart=chart)
    return 1 if "e2e_error" in doc else 0


def write(
    console: Console,
    doc: dict[str, Any],
    *,
    out: Path | None = None,
    summary: Path | None = None,
    chart: Path | None = None,
) -> None:
    """Print the tables of ``doc`` (a run's figures); write it, its summary and its chart."""
    brief = report.summary(doc)
    if "replicas" in doc:
        replicas.table(console, brief)
    else:
        report.table(console, brief)
    for path, data, what in ((out, doc, "figures"), (summary, brief, "summary")):
        if path is not None:
            report.save(console, path, data, what)
    if chart is not None and "replicas" not in doc:
        chart.parent.mkdir(parents=True, exist_ok=True)
        report.chart(brief, chart)
        console.print(f"chart drawn in {chart}")


def _logged(log_dir: Path) -> dict[str, tuple[int, str]]:
    """Per process that wrote to stderr (warnings and errors only): lines, and the first."""
    out = {}
    for log in sorted(log_dir.glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()
        if lines:
            out[log.stem] = (len(lines), lines[0])
    return out


def _meta(ctx: Context, where: Mosquittos | None = None) -> dict[str, Any]:
    return {
        "run_id": ctx.run_id,
        "mosquitto": None if where is None else where.described,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": {name: importlib.metadata.version(name) for name in _LIBRARIES},
        "options": dataclasses.asdict(ctx.options),
    }


async def _measure(
    console: Console, ctx: Context, profile_dir: Path | None, where: Mosquittos
) -> dict[str, Any]:
    o = ctx.options
    emulator = await start_emulator(ctx)
    try:
        stages = Stages(ctx)
        await stages.prepare()
        if o.replicas:
            return await _replicas(console, ctx, stages, where)
        decode = await _rounds(console, ctx, stages)
        profiles = None
        if profile_dir is not None:
            console.print(f"profile round: each stage with py-spy attached, into {profile_dir}")
            await asyncio.to_thread(profile_dir.mkdir, parents=True, exist_ok=True)
            profiles = await stages.profile(o.rounds, profile_dir)
        e2e, failure = await _end_to_end(console, ctx) if o.sustain else (None, None)
        versions = None
        if o.baseline is not None and failure is None:
            versions, failure = await _against(console, ctx, o.baseline)
        policy = None
        if where.policy is not None and o.sustain and failure is None:
            policy, failure = await _policy(console, ctx, where.policy)
    finally:
        await emulator.stop()
    doc = report.document(_meta(ctx, where), decode, stages.samples, e2e)
    if versions is not None:
        base, rates = versions
        doc["baseline"] = report.versions(base.ref, base.commit, rates, doc["targets"])
    if policy is not None:
        doc["policy"] = report.policy(policy)
    if failure is not None:
        doc["e2e_error"] = failure
    if profiles is not None:
        doc["profiles"] = profiles
    return doc


async def _end_to_end(console: Console, ctx: Context) -> tuple[E2E | None, str | None]:
    """The end-to-end figures; or why they are missing (what the rounds measured stays)."""
    o = ctx.options
    console.print(
        f"end to end: {o.sustain:,} messages for the sustained rate, then "
        f"{len(o.rates)} rates x {o.rate_seconds:g} s, then a burst of {o.burst:,}"
    )
    try:
        return await end_to_end(ctx, console.print), None
    except procs.BenchError as exc:
        console.print(f"[red]end to end failed: {exc}[/red] (logs in {ctx.log_dir})")
        return None, str(exc)


async def _rounds(console: Console, ctx: Context, stages: Stages) -> dict[str, list[float]]:
    """The decoder's rates; then the stages' rounds (their samples are in ``stages``)."""
    o = ctx.options
    console.print(f"decode: {len(stages.payloads):,} messages x {o.decode_reps}")
    decode = decode_rates(stages.payloads, o.decode_reps)
    work = {
        "ingest": f"ingest {o.messages:,} messages",
        "route": f"route {o.events * 4:,} children",
        "sink": f"sink {o.allocations:,} allocations",
    }
    for i in range(o.rounds):
        console.print(
            f"round {i + 1}/{o.rounds}: "
            + ", ".join(text for stage, text in work.items() if stage in o.only)
        )
        await stages.round(i)
    return decode


async def _policy(
    console: Console, ctx: Context, mqtt: MqttConfig
) -> tuple[dict[str, list[float]] | None, str | None]:
    """The sustained rates on the policy's Mosquitto (``mqtt``) and the run's; or why not."""
    o = ctx.options
    console.print(
        f"the persistence policy's cost: the sustained rate on a Mosquitto saving after "
        f"every change and on one saving every second, {o.rounds} interleaved rounds of "
        f"{o.sustain:,} messages"
    )
    variants = {"every second": baseline.Variant(), "policy": baseline.Variant(mqtt=mqtt)}
    try:
        return await baseline.sustained(ctx, variants, console.print, tag="p"), None
    except procs.BenchError as exc:
        console.print(f"[red]policy comparison failed: {exc}[/red] (logs in {ctx.log_dir})")
        return None, f"policy: {exc}"


async def _against(
    console: Console, ctx: Context, ref: str
) -> tuple[tuple[baseline.Baseline, dict[str, list[float]]] | None, str | None]:
    """The sustained rates of this checkout and of ``ref``; or why they were not measured."""
    o = ctx.options
    console.print(
        f"sustained rate against {ref}: {o.rounds} interleaved rounds of "
        f"{o.sustain:,} messages (installing it first)"
    )
    try:
        async with baseline.checkout(ref) as base:
            variants = {"current": baseline.Variant(), "baseline": baseline.Variant(code=base)}
            rates = await baseline.sustained(ctx, variants, console.print, tag="v")
            return (base, rates), None
    except procs.BenchError as exc:
        console.print(f"[red]baseline failed: {exc}[/red] (logs in {ctx.log_dir})")
        return None, f"baseline: {exc}"


async def _replicas(
    console: Console, ctx: Context, stages: Stages, where: Mosquittos
) -> dict[str, Any]:
    o = ctx.options
    measured = replicas.Replicas(ctx, stages.messages, stages.children)
    for i in range(o.rounds):
        console.print(
            f"round {i + 1}/{o.rounds}: {', '.join(map(str, replicas.SINKS))} sinks on "
            f"{o.allocations:,} allocations, {', '.join(map(str, replicas.INGESTS))} ingests "
            f"on {o.messages:,} messages"
        )
        await measured.round(i)
    return {"meta": _meta(ctx, where), "replicas": replicas.document(measured)}


async def start_emulator(ctx: Context) -> procs.Proc:
    """The DPS emulator in its own process (``pipeline dps-emulator --accept-any-sn``)."""
    port = procs.free_port()
    proc = await procs.start(
        "dps-emulator",
        ["pipeline", "--log-level", "warning", "dps-emulator", "--port", str(port),
         "--accept-any-sn"],
        env=dict(os.environ),
        log_dir=ctx.log_dir,
        config_path=ctx.config_path,
    )  # fmt: skip
    ctx.dps_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as http:
        while True:
            proc.check()
            try:
                async with http.get(f"{ctx.dps_url}/_emulator/faults") as response:
                    if response.status == 200:  # noqa: PLR2004
                        return proc
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                await proc.stop()
                msg = f"the DPS emulator did not answer on port {port}: {proc.tail()}"
                raise procs.BenchError(msg)
            await asyncio.sleep(0.1)
