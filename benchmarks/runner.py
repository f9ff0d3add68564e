"""The bench run: prepare, measure, report (see the package's docstring)."""

from __future__ import annotations

import asyncio
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
import orjson
from rich.console import Console

from benchmarks import baseline, procs, profile, replicas, report
from benchmarks.context import Context
from benchmarks.latency import end_to_end
from benchmarks.services import ensure_services
from benchmarks.stages import Stages, decode_rates
from pipeline.tools.console import make_console

if TYPE_CHECKING:
    from benchmarks.options import Options
    from pipeline.config import Config

__all__ = ["chart_available", "run", "write"]

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
    with console.status("checking Mosquitto and Kafka (starting deploy/local if need be)"):
        await ensure_services(cfg)
    log_dir = Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
    ctx = Context(cfg, options, config_path=config_path, log_dir=log_dir)
    try:
        doc = await _measure(console, ctx, profile_dir)
    except procs.BenchError as exc:
        console.print(f"[red]benchmarks: {exc}[/red]\n(process logs in {log_dir})")
        return 1
    finally:
        await ctx.cleanup()
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
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")
            console.print(f"{what} written to {path}")
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


def _meta(ctx: Context) -> dict[str, Any]:
    return {
        "run_id": ctx.run_id,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": {name: importlib.metadata.version(name) for name in _LIBRARIES},
        "options": dataclasses.asdict(ctx.options),
    }


async def _measure(console: Console, ctx: Context, profile_dir: Path | None) -> dict[str, Any]:
    o = ctx.options
    emulator = await _emulator(ctx)
    try:
        stages = Stages(ctx)
        await stages.prepare()
        if o.replicas:
            return await _replicas(console, ctx, stages)
        console.print(f"decode: {len(stages.payloads):,} messages x {o.decode_reps}")
        decode = decode_rates(stages.payloads, o.decode_reps)
        for i in range(o.rounds):
            work = {
                "ingest": f"ingest {o.messages:,} messages",
                "route": f"route {o.events * 4:,} children",
                "sink": f"sink {o.allocations:,} allocations",
            }
            console.print(
                f"round {i + 1}/{o.rounds}: "
                + ", ".join(text for stage, text in work.items() if stage in o.only)
            )
            await stages.round(i)
        profiles = None
        if profile_dir is not None:
            console.print(f"profile round: each stage with py-spy attached, into {profile_dir}")
            await asyncio.to_thread(profile_dir.mkdir, parents=True, exist_ok=True)
            profiles = await stages.profile(o.rounds, profile_dir)
        e2e, failure = None, None
        if o.sustain:
            console.print(
                f"end to end: {o.sustain:,} messages for the sustained rate, then "
                f"{len(o.rates)} rates x {o.rate_seconds:g} s, then a burst of {o.burst:,}"
            )
            try:
                e2e = await end_to_end(ctx, console.print)
            except procs.BenchError as exc:  # keep what the rounds measured
                console.print(f"[red]end to end failed: {exc}[/red] (logs in {ctx.log_dir})")
                failure = str(exc)
        versions = None
        if o.baseline is not None and failure is None:
            versions, failure = await _against(console, ctx, o.baseline)
    finally:
        await emulator.stop()
    doc = report.document(_meta(ctx), decode, stages.samples, e2e)
    if versions is not None:
        base, rates = versions
        doc["baseline"] = report.versions(base.ref, base.commit, rates, doc["targets"])
    if failure is not None:
        doc["e2e_error"] = failure
    if profiles is not None:
        doc["profiles"] = profiles
    return doc


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
            return (base, await baseline.sustained(ctx, base, console.print)), None
    except procs.BenchError as exc:
        console.print(f"[red]baseline failed: {exc}[/red] (logs in {ctx.log_dir})")
        return None, f"baseline: {exc}"


async def _replicas(console: Console, ctx: Context, stages: Stages) -> dict[str, Any]:
    o = ctx.options
    measured = replicas.Replicas(ctx, stages.messages, stages.children)
    for i in range(o.rounds):
        console.print(
            f"round {i + 1}/{o.rounds}: {', '.join(map(str, replicas.SINKS))} sinks on "
            f"{o.allocations:,} allocations, {', '.join(map(str, replicas.INGESTS))} ingests "
            f"on {o.messages:,} messages"
        )
        await measured.round(i)
    return {"meta": _meta(ctx), "replicas": replicas.document(measured)}


async def _emulator(ctx: Context) -> procs.Proc:
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
