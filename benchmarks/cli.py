"""``python -m benchmarks`` (``make bench``): the bench's command line.

With no arguments it measures with the default sizes on the configured brokers and writes
the results where the repository keeps them: the summary and the chart in
``benchmarks/results/`` (tracked), every figure in ``benchmarks/results/raw/`` (untracked).
Exit codes: 0 done; 1 a measurement failed or a service could not be reached; 2 bad
configuration or arguments, or a tool the options need is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import orjson

from benchmarks.options import Options
from pipeline.config import Config, load_config
from pipeline.errors import ConfigError, PipelineError
from pipeline.ops.logs import setup_logging

__all__ = ["RESULTS", "main"]

RESULTS = Path(__file__).resolve().parent / "results"
"""Where ``make bench`` writes: ``summary.json``, ``bench.png``, ``raw/`` (untracked)."""


def _defaults(replicas: bool) -> tuple[Path, Path, Path | None]:
    """Where a run writes unless told: every figure, the summary, the chart."""
    if replicas:
        return RESULTS / "raw" / "replicas.json", RESULTS / "summary-replicas.json", None
    return RESULTS / "raw" / "bench.json", RESULTS / "summary.json", RESULTS / "bench.png"


def _parser() -> argparse.ArgumentParser:
    o = Options()
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Each stage against its raw ceiling (a minimal loop of the same client "
        "doing only the transport), interleaved over rounds; then end-to-end latency "
        "against offered load and each worker's peak RSS. Medians, min-max, ratios.",
    )
    parser.add_argument(
        "--config", metavar="FILE", help="TOML configuration (default: ./pipeline.toml if present)"
    )
    parser.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], default="error",
        help="default: error (the bench prints its own summary)",
    )  # fmt: skip
    parser.add_argument(
        "--mosquitto",
        choices=["own", "configured"],
        default=o.mosquitto,
        help="own (default): measure on a Mosquitto of the bench's own saving every second, "
        "and the sustained rate again on one with deploy/'s persistence policy (a save "
        "after every change), side by side; configured: on the configured Mosquitto",
    )
    parser.add_argument(
        "--only",
        type=_stage_names,
        default=o.only,
        metavar="STAGE[,STAGE]",
        help="measure only these of ingest, route and sink against their ceilings "
        "(default: all three)",
    )
    parser.add_argument(
        "--rounds", type=int, default=o.rounds, help=f"interleaved rounds (default {o.rounds})"
    )
    parser.add_argument(
        "--messages",
        type=int,
        default=o.messages,
        help=f"MQTT messages per ingest measurement (default {o.messages})",
    )
    parser.add_argument(
        "--events",
        type=int,
        default=o.events,
        help=f"down events per route measurement, 4 children each (default {o.events})",
    )
    parser.add_argument(
        "--allocations",
        type=int,
        default=o.allocations,
        help=f"children per sink measurement (default {o.allocations})",
    )
    parser.add_argument(
        "--sustain",
        type=int,
        default=o.sustain,
        help=f"messages for the sustained rate; 0 skips end to end (default {o.sustain})",
    )
    parser.add_argument(
        "--rates",
        type=_fractions,
        default=o.rates,
        metavar="F,F,...",
        help="offered loads, as fractions of the sustained rate (default 0.25,0.5,1,2)",
    )
    parser.add_argument(
        "--rate-seconds",
        type=float,
        default=o.rate_seconds,
        help=f"seconds of load per rate (default {o.rate_seconds:g})",
    )
    parser.add_argument(
        "--latency-rounds",
        type=int,
        default=o.latency_rounds,
        help=f"rounds over the rates, in rotating order (default {o.latency_rounds})",
    )
    parser.add_argument(
        "--burst",
        type=int,
        default=o.burst,
        help=f"messages of the burst; 0 skips it (default {o.burst})",
    )
    parser.add_argument(
        "--baseline",
        metavar="GIT_REF",
        help="also: the end-to-end sustained rate of GIT_REF's code (exported to a temporary "
        "directory with its own virtualenv) and of this checkout, in interleaved rounds "
        "(--rounds, --sustain), and their ratio",
    )
    parser.add_argument(
        "--together",
        action="store_true",
        help="end to end with the three stages in one `pipeline run` process (default: "
        "one process each, as the Kubernetes manifests deploy them)",
    )
    parser.add_argument(
        "--replicas",
        action="store_true",
        help="instead: throughput of 1, 2 and 4 sink replicas and of 1 and 2 ingest "
        "replicas (uses --rounds, --messages and --allocations)",
    )
    parser.add_argument(
        "--history",
        type=int,
        metavar="N",
        help="instead: fill the topics with N down events (N records each, 2N added) and "
        "time `pipeline trace` and `pipeline audit` on them (benchmarks/history.py); "
        "writes benchmarks/results/summary-history.json",
    )
    parser.add_argument(
        "--degraded",
        action="store_true",
        help="instead: the sink healthy and with 5 %% of DPS calls hanging, with and "
        "without detached calls (benchmarks/degraded.py; uses --rounds)",
    )
    parser.add_argument(
        "--tracing",
        action="store_true",
        help="instead: each stage before tracing (--baseline, default: the first parent of "
        "the tracing merge), with tracing off, on (every trace sampled, to a Jaeger the "
        "bench starts) and with parentbased_traceidratio 0.01, interleaved "
        "(benchmarks/tracecost.py; uses --rounds, --messages, --events, --allocations)",
    )
    parser.add_argument(
        "--out",
        metavar="FILE.json",
        type=Path,
        help="write every figure, each child's latency included, as JSON (default: "
        "benchmarks/results/raw/bench.json, or raw/replicas.json; untracked)",
    )
    parser.add_argument(
        "--summary",
        metavar="FILE.json",
        type=Path,
        help="write the figures without the per-child latencies (default: "
        "benchmarks/results/summary.json, or summary-replicas.json)",
    )
    parser.add_argument(
        "--chart",
        metavar="FILE.png",
        type=Path,
        help="draw throughput and latency, needs matplotlib (default: "
        "benchmarks/results/bench.png; none for --replicas)",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        type=Path,
        help="one more round with py-spy attached to each stage worker; "
        "stacks in DIR, top costs printed (needs py-spy)",
    )
    parser.add_argument(
        "--from",
        dest="raw",
        metavar="FILE.json",
        type=Path,
        help="measure nothing: print the tables of FILE.json (a run's --out) and write its "
        "--summary and --chart",
    )
    return parser


def _stage_names(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in ("ingest", "route", "sink")]
    if not names or unknown:
        msg = f"expected some of ingest, route, sink separated by commas, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return names


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        msg = f"not a list of numbers: {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not values or any(not 0 < v <= 10 for v in values):  # noqa: PLR2004
        raise argparse.ArgumentTypeError("each rate is a fraction in (0, 10]")
    return values


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    args = _parser().parse_args(argv)
    setup_logging(args.log_level)
    if args.raw is not None:
        return _from_raw(args)
    from benchmarks import runner  # noqa: PLC0415  (keeps --help fast)

    out, summary, chart = _defaults(args.replicas)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        return _fail(2, f"benchmarks: {exc}")
    modes = ((args.history is not None, _history), (args.degraded, _degraded),
             (args.tracing, _tracing))  # fmt: skip
    for wanted, mode in modes:
        if wanted:  # a mode of its own instead of the default run
            return mode(args, cfg)
    options = Options(
        rounds=args.rounds, only=args.only, mosquitto=args.mosquitto, messages=args.messages,
        events=args.events, allocations=args.allocations, sustain=args.sustain, rates=args.rates,
        rate_seconds=args.rate_seconds, latency_rounds=args.latency_rounds, burst=args.burst,
        together=args.together, baseline=args.baseline, replicas=args.replicas,
    )  # fmt: skip
    try:
        return asyncio.run(
            runner.run(
                cfg, options, config_path=args.config, out=args.out or out,
                summary=args.summary or summary, chart=args.chart or chart,
                profile_dir=args.profile,
            )
        )  # fmt: skip
    except KeyboardInterrupt:
        return 130
    except (ConnectionError, PipelineError) as exc:  # a broker not reachable, in one line
        return _fail(1, f"benchmarks: {exc}")


def _history(args: argparse.Namespace, cfg: Config) -> int:
    """``--history N``: trace and audit on N records a topic (:mod:`benchmarks.history`)."""
    from benchmarks import history  # noqa: PLC0415
    from pipeline.tools.console import make_console  # noqa: PLC0415

    if args.history < 1:
        return _fail(2, f"benchmarks: --history {args.history}: must be 1 or more")
    summary = args.summary or RESULTS / "summary-history.json"
    try:
        return asyncio.run(
            history.run(
                cfg, args.history, config_path=args.config, summary=summary,
                console=make_console(stderr=True),
            )
        )  # fmt: skip
    except KeyboardInterrupt:
        return 130
    except (ConnectionError, PipelineError) as exc:  # a broker not reachable, in one line
        return _fail(1, f"benchmarks: {exc}")


def _degraded(args: argparse.Namespace, cfg: Config) -> int:
    """``--degraded``: the sink healthy and with hanging DPS calls (:mod:`benchmarks.degraded`)."""
    from benchmarks import degraded  # noqa: PLC0415

    return asyncio.run(
        degraded.run(
            cfg, rounds=args.rounds, config_path=args.config,
            out=args.out or RESULTS / "raw" / "degraded.json",
            summary=args.summary or RESULTS / "summary-degraded.json",
        )
    )  # fmt: skip


def _tracing(args: argparse.Namespace, cfg: Config) -> int:
    """``--tracing``: each stage before tracing, off, on, sampled (:mod:`benchmarks.tracecost`)."""
    from benchmarks import tracecost  # noqa: PLC0415

    options = Options(rounds=args.rounds, messages=args.messages, events=args.events,
                      allocations=args.allocations)  # fmt: skip
    return asyncio.run(
        tracecost.run(
            cfg, options, ref=args.baseline, config_path=args.config,
            out=args.out or RESULTS / "raw" / "tracing.json",
            summary=args.summary or RESULTS / "summary-tracing.json",
        )
    )  # fmt: skip


def _from_raw(args: argparse.Namespace) -> int:
    """``--from``: the tables, summary and chart of a run's figures, measured before."""
    from benchmarks import runner  # noqa: PLC0415
    from pipeline.tools.console import make_console  # noqa: PLC0415

    try:
        doc = orjson.loads(args.raw.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        return _fail(2, f"benchmarks: {args.raw}: {exc}")
    _, summary, chart = _defaults("replicas" in doc)
    chart = args.chart or chart
    if chart is not None and not runner.chart_available():
        return _fail(2, "benchmarks: --chart needs matplotlib: pip install matplotlib")
    runner.write(
        make_console(stderr=True), doc, out=args.out, summary=args.summary or summary, chart=chart
    )
    return 0


def _fail(code: int, line: str) -> int:
    print(line, file=sys.stderr)  # noqa: T201
    return code
