"""What tracing costs each stage (``python -m benchmarks --tracing``).

Each stage's worker (``pipeline ingest|route|sink``, on the inputs of :mod:`.stages`) in
four settings, interleaved over rounds (the order rotates each round, so a drift in the
machine's load favours none):

- ``before``: the code before tracing (the first parent of the tracing merge, or
  ``--baseline REF``), exported with its own virtualenv (:mod:`.baseline`);
- ``off``: this checkout, ``[tracing] enabled = false`` (the default);
- ``on``: tracing on, every trace sampled (``OTEL_TRACES_SAMPLER=always_on``), spans
  exported over OTLP/HTTP to a real Jaeger the bench starts (``deploy/local/jaeger.sh``);
- ``ratio``: tracing on with the production sampler, ``parentbased_traceidratio`` at
  :data:`RATIO`, to the same Jaeger.

The route and sink inputs carry a ``traceparent`` each, as ingest writes them: one in
``1/RATIO`` sampled, so the parent-based sampler follows its parent as in production.
Reported per stage: the rate's median and range, CPU per unit, and the ratios
``off/before`` (target: at least :data:`TARGET`), ``on/off`` and ``ratio/off``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec
from rich.table import Table

from benchmarks import procs
from benchmarks.baseline import checkout
from benchmarks.context import Context
from benchmarks.options import Options
from benchmarks.report import save
from benchmarks.runner import start_emulator  # the one way the bench starts it
from benchmarks.services import ensure_services
from benchmarks.stages import STAGES, Sample, Stages, rotated
from pipeline.config import Config, TracingConfig
from pipeline.io import kafka
from pipeline.tools.console import make_console

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from rich.console import Console

    from benchmarks.baseline import Baseline

__all__ = ["RATIO", "SETTINGS", "TARGET", "cpu_ratios", "default_ref", "run"]

SETTINGS = ("before", "off", "on", "ratio")
RATIO = 0.01
"""The production sampler's ratio (``OTEL_TRACES_SAMPLER_ARG``)."""
TARGET = 0.98
"""Least acceptable ``off / before`` throughput ratio, per stage."""
_ROOT = Path(__file__).resolve().parents[1]
_MERGE = re.compile(r"^(merge trace:|Merge branch 'trace')")


def default_ref() -> str:
    """The first parent of the merge that brought tracing in (``git log --merges``)."""
    log = subprocess.run(  # noqa: S603
        ["git", "-C", str(_ROOT), "log", "--merges", "--format=%H %s"],  # noqa: S607
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    for line in log.splitlines():
        commit, _, subject = line.partition(" ")
        if _MERGE.match(subject):
            return f"{commit}^1"
    msg = "no merge of the tracing branch in this history: give --baseline REF"
    raise procs.BenchError(msg)


class _Context(Context):
    """The bench's context, whose workers run in the setting being measured."""

    setting = "off"
    before: Baseline | None = None
    otlp = ""

    async def worker(
        self,
        command: str,
        cfg: Config,
        name: str,
        *,
        baseline: Baseline | None = None,
        env: dict[str, str] | None = None,
    ) -> procs.Proc:
        on = self.setting in {"on", "ratio"}
        cfg = msgspec.structs.replace(cfg, tracing=TracingConfig(enabled=on))
        base = procs.child_env(cfg) if env is None else env
        env = {k: v for k, v in base.items() if not k.startswith("OTEL_")}
        if on:
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = self.otlp
            env["OTEL_SERVICE_NAME"] = f"bench-{command}"
            if self.setting == "on":
                env["OTEL_TRACES_SAMPLER"] = "always_on"
            else:
                env |= {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                        "OTEL_TRACES_SAMPLER_ARG": str(RATIO)}  # fmt: skip
        of = self.before if self.setting == "before" else baseline
        return await super().worker(command, cfg, name, baseline=of, env=env)


class _Stages(Stages):
    """The stages' inputs, the route and sink ones with a ``traceparent`` on each record."""

    async def prepare(self) -> None:
        ctx = self._ctx
        cfg = ctx.config("input")
        await ctx.topics_for(cfg, "down_events", "added")
        self._route_in, self._sink_in = cfg.kafka.topics.down_events, cfg.kafka.topics.added
        await _preload(cfg, self._route_in, self._events)
        await _preload(cfg, self._sink_in, self._children)
        await self.prepare_emulator()

    async def measure(self, stage: str, number: int) -> Sample:
        """``stage``'s worker once (``number``: unique to the measurement, names its topics)."""
        measure_one = {"ingest": self._ingest, "route": self._route, "sink": self._sink}[stage]
        return await measure_one("stage", number)


async def _preload(cfg: Config, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    """``records`` written to ``topic``, each with a fresh traceparent: 1 in 1/RATIO sampled."""
    every = round(1 / RATIO)
    async with kafka.producer(cfg.kafka) as producer:
        for i, (key, value) in enumerate(records):
            ids = os.urandom(24).hex()
            parent = f"00-{ids[:32]}-{ids[32:]}-{'01' if i % every == 0 else '00'}"
            await producer.send(topic, value, key=key, headers=[("traceparent", parent.encode())])
        await producer.flush()


@contextlib.asynccontextmanager
async def _jaeger(log_dir: Path) -> AsyncIterator[str]:
    """A Jaeger v2 (``deploy/local/jaeger.sh``, ``deploy/local/jaeger.yaml``) on free ports.

    Yields its OTLP/HTTP endpoint; stopped afterwards.
    """
    script = _ROOT / "deploy" / "local" / "jaeger.sh"
    found = await asyncio.to_thread(
        subprocess.run, [str(script), "--path"], check=True, capture_output=True, text=True
    )
    binary = found.stdout.strip().splitlines()[-1]
    names = ("OTLP_GRPC", "OTLP_HTTP", "QUERY", "QUERY_GRPC", "HEALTH")
    ports = {name: procs.free_port() for name in names}
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env |= {f"JAEGER_{name}_PORT": str(port) for name, port in ports.items()}
    env["JAEGER_LISTEN_HOST"] = "127.0.0.1"
    config = _ROOT / "deploy" / "local" / "jaeger.yaml"
    with (log_dir / "jaeger.log").open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            binary, "--config", str(config), stdout=log, stderr=subprocess.STDOUT, env=env
        )
    try:
        api = f"http://127.0.0.1:{ports['QUERY']}/api/services"
        async with aiohttp.ClientSession() as http, asyncio.timeout(60):
            while True:
                if proc.returncode is not None:
                    msg = f"jaeger exited {proc.returncode} (log in {log_dir}/jaeger.log)"
                    raise procs.BenchError(msg)
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with http.get(api) as answer:
                        if answer.status == 200:  # noqa: PLR2004
                            break
                await asyncio.sleep(0.1)
        yield f"http://127.0.0.1:{ports['OTLP_HTTP']}"
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()


async def run(cfg: Config, options: Options, *, ref: str | None, config_path: str | None,
              out: Path, summary: Path) -> int:  # fmt: skip
    """Measure, print the table, write ``out`` (every figure) and ``summary`` (the same)."""
    console = make_console(stderr=True)
    with console.status("checking Mosquitto and Kafka (starting deploy/local if need be)"):
        await ensure_services(cfg)
    log_dir = Path(tempfile.mkdtemp(prefix="pipeline-tracing-"))
    ctx = _Context(cfg, options, config_path=config_path, log_dir=log_dir)
    started, load = time.monotonic(), os.getloadavg()
    samples: dict[str, dict[str, list[Sample]]] = {
        stage: {s: [] for s in SETTINGS} for stage in STAGES
    }
    try:
        ref = ref or default_ref()
        console.print(f"installing {ref} (the code before tracing) and starting Jaeger")
        async with checkout(ref) as before, _jaeger(log_dir) as otlp:
            ctx.before, ctx.otlp = before, otlp
            emulator = await start_emulator(ctx)
            try:
                stages = _Stages(ctx)
                await stages.prepare()
                number = 0
                for i in range(options.rounds):
                    console.print(f"round {i + 1}/{options.rounds}")
                    for stage in STAGES:
                        for setting in rotated(SETTINGS, i):
                            ctx.setting = setting
                            sample = await stages.measure(stage, number)
                            number += 1
                            samples[stage][setting].append(sample)
                            console.print(
                                f"  {stage} {setting}: {sample.rate:,.0f} {STAGES[stage][0]}, "
                                f"CPU {sample.cpu or 0:.2f}"
                            )
            finally:
                await emulator.stop()
    except procs.BenchError as exc:
        console.print(f"[red]benchmarks: {exc}[/red]\n(process logs in {log_dir})")
        return 1
    finally:
        await ctx.cleanup()
    doc = _document(ctx, samples, load, time.monotonic() - started)
    table(console, doc)
    for path in (out, summary):
        save(console, path, doc)
    return 0


def _figures(samples: list[Sample]) -> dict[str, Any]:
    rates = [s.rate for s in samples]
    micros = [(s.cpu or 0.0) / s.rate * 1e6 for s in samples]
    return {
        "median": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
        "rates": rates,
        "cpu_us_per_unit": statistics.median(micros),
        "cpu_us_per_unit_all": micros,
        "cpu": [s.cpu for s in samples],
    }


def cpu_ratios(figures: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """CPU per unit of one setting over another's: the medians', and round by round."""
    out: dict[str, Any] = {}
    for a, b in (("off", "before"), ("on", "off"), ("ratio", "off")):
        mine, theirs = figures[a]["cpu_us_per_unit_all"], figures[b]["cpu_us_per_unit_all"]
        out[f"{a}/{b}"] = _over(figures[a]["cpu_us_per_unit"], figures[b]["cpu_us_per_unit"])
        out[f"{a}/{b} rounds"] = [_over(x, y) for x, y in zip(mine, theirs, strict=True)]
    return out


def _over(x: float, y: float) -> float | None:
    """``x / y``; None when ``y`` read 0 (/proc counts CPU in 10 ms ticks: a tiny run)."""
    return x / y if y else None


def _document(ctx: _Context, samples: dict[str, dict[str, list[Sample]]],
              load: tuple[float, float, float], seconds: float) -> dict[str, Any]:  # fmt: skip
    stages: dict[str, Any] = {}
    for stage, by in samples.items():
        figures = {setting: _figures(s) for setting, s in by.items()}
        ratios = {
            f"{a}/{b}": figures[a]["median"] / figures[b]["median"]
            for a, b in (("off", "before"), ("on", "off"), ("ratio", "off"))
        }
        rounds = {
            f"{a}/{b}": [x.rate / y.rate for x, y in zip(by[a], by[b], strict=True)]
            for a, b in (("off", "before"), ("on", "off"), ("ratio", "off"))
        }
        stages[stage] = {
            "unit": STAGES[stage][0],
            "settings": figures,
            "ratios": ratios,
            "round_ratios": rounds,
            "cpu_ratios": cpu_ratios(figures),
            "target_met": ratios["off/before"] >= TARGET,
        }
    before = ctx.before
    o = ctx.options
    return {
        "tracing": {
            "baseline": {"ref": before.ref, "commit": before.commit} if before else None,
            "settings": {
                "before": "the code before tracing",
                "off": "this checkout, [tracing] enabled = false",
                "on": "OTEL_TRACES_SAMPLER=always_on, OTLP/HTTP to Jaeger",
                "ratio": f"OTEL_TRACES_SAMPLER=parentbased_traceidratio, ARG {RATIO}",
            },
            "sizes": {
                "rounds": o.rounds,
                "messages": o.messages,
                "children_routed": o.events * 4,
                "allocations": o.allocations,
            },
            "stages": stages,
            "target": {
                "what": "off / before, each stage",
                "at_least": TARGET,
                "met": all(s["target_met"] for s in stages.values()),
            },
            "load_average_at_start": [round(x, 2) for x in load],
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "cpus": os.cpu_count(),
            "seconds": round(seconds, 1),
            "python": sys.version.split()[0],
        }
    }


def table(console: Console, doc: dict[str, Any]) -> None:
    """Print the rates, CPU per unit and ratios of each stage."""
    d = doc["tracing"]
    base = d["baseline"]
    title = (
        f"tracing's cost: medians of {d['sizes']['rounds']} interleaved rounds \\[min-max]; "
        f"before = {base['ref'] if base else '?'}; ratio = parentbased_traceidratio {RATIO:g}"
    )
    t = Table(title=title)
    for column in ("stage", "setting", "rate", "range", "CPU µs/unit", "x off", "CPU x off"):
        t.add_column(column, justify="left" if column in {"stage", "setting"} else "right")
    for stage, s in d["stages"].items():
        for setting, f in s["settings"].items():
            ratio = {"before": None, "off": s["ratios"]["off/before"]}.get(
                setting, s["ratios"].get(f"{setting}/off")
            )
            key = "off/before" if setting == "off" else f"{setting}/off"
            cpu = s["cpu_ratios"].get(key)
            shown = "" if ratio is None else f"{ratio:.3f}"
            cpu_shown = "" if cpu is None else f"{cpu:.2f}"
            if setting == "off":
                shown, cpu_shown = f"{shown} x before", f"{cpu_shown} x before"
            t.add_row(stage, setting, f"{f['median']:,.0f} {s['unit']}",
                      f"[{f['min']:,.0f}-{f['max']:,.0f}]", f"{f['cpu_us_per_unit']:.0f}",
                      shown, cpu_shown)  # fmt: skip
    console.print(t)
    verdict = "met" if d["target"]["met"] else "MISSED"
    console.print(
        f"target: off / before >= {TARGET:g} in each stage: {verdict}; load average "
        f"{d['load_average_at_start']} at start, {d['load_average_at_end']} at end"
    )
