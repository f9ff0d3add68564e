"""The ``pipeline`` command line: one entry point, one sub-command per job."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiomqtt

from pipeline.config import Config, load_config
from pipeline.errors import ConfigError, PipelineError
from pipeline.ops.logs import setup_logging
from pipeline.tools.bench.options import Options as BenchOptions

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

__all__ = ["main"]

log = logging.getLogger(__name__)

STAGES = ("ingest", "route", "sink")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline",
        description="Provision Huawei IoTDA child devices into Envision EnOS DPS via Kafka.",
    )
    parser.add_argument(
        "--config", metavar="FILE", help="TOML configuration (default: ./pipeline.toml if present)"
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="default: info; error for demo and bench (they print a summary)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_workers(sub)
    _add_tools(sub)
    _add_admin(sub)
    return parser


def _add_workers(sub: Any) -> None:
    for name, text in (
        ("ingest", "MQTT down events -> Kafka (acknowledges MQTT only after Kafka has the record)"),
        ("route", "down events -> one record per added / failed child (Kafka transactions)"),
        ("sink", "added children -> DPS allocate, with retries, back-pressure and a DLQ"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.set_defaults(handler=_worker, stages=(name,))
    p = sub.add_parser("run", help="all three stages in one process")
    p.set_defaults(handler=_worker, stages=STAGES)


def _add_tools(sub: Any) -> None:
    p = sub.add_parser("replay", help="publish JSONL replay fixtures to MQTT")
    p.add_argument("files", nargs="*", metavar="FILE")
    p.add_argument("--demo", action="store_true", help="also publish the bundled demo fixture")
    p.add_argument("--rate", type=float, help="messages per second (default: as fast as possible)")
    p.add_argument("--topic-prefix", default="", help="prepended to every fixture topic")
    p.add_argument("--no-delays", action="store_true", help="ignore the fixtures' delay_ms")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_replay)

    p = sub.add_parser("record", help="capture MQTT traffic into a replay fixture")
    p.add_argument("-o", "--output", default="-", help="JSONL file (default: stdout)")
    p.add_argument("--topic", help="topic filter (default: mqtt.topic)")
    p.add_argument("--count", type=int, help="stop after this many messages")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.set_defaults(handler=_record)

    p = sub.add_parser("dps-emulator", help="serve the EnOS DPS emulator over HTTP")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8085)
    p.add_argument("--devices", metavar="FILE", help="JSON list of devices to preload")
    p.add_argument("--accept-any-sn", action="store_true", help="register every sn on first sight")
    p.add_argument("--token-ttl", type=int, default=7200, help="access token lifetime, seconds")
    p.set_defaults(handler=_emulator)

    p = sub.add_parser("demo", help="bring up everything locally and run the whole flow once")
    p.add_argument("--fixture", help="replay fixture (default: the bundled demo)")
    p.set_defaults(handler=_demo)

    p = sub.add_parser(
        "bench",
        help="each stage against its raw ceiling, end-to-end latency, memory",
        description="Each stage against its raw ceiling (a minimal loop of the same client "
        "doing only the transport), interleaved over rounds; then end-to-end latency "
        "against offered load and each worker's peak RSS. Medians, min-max, ratios.",
    )
    o = BenchOptions()
    p.add_argument(
        "--rounds", type=int, default=o.rounds, help=f"interleaved rounds (default {o.rounds})"
    )
    p.add_argument(
        "--messages",
        type=int,
        default=o.messages,
        help=f"MQTT messages per ingest measurement (default {o.messages})",
    )
    p.add_argument(
        "--events",
        type=int,
        default=o.events,
        help=f"down events per route measurement, 4 children each (default {o.events})",
    )
    p.add_argument(
        "--allocations",
        type=int,
        default=o.allocations,
        help=f"children per sink measurement (default {o.allocations})",
    )
    p.add_argument(
        "--sustain",
        type=int,
        default=o.sustain,
        help=f"messages for the sustained rate; 0 skips end to end (default {o.sustain})",
    )
    p.add_argument(
        "--rates",
        type=_fractions,
        default=o.rates,
        metavar="F,F,...",
        help="offered loads, as fractions of the sustained rate (default 0.25,0.5,1,2)",
    )
    p.add_argument(
        "--rate-seconds",
        type=float,
        default=o.rate_seconds,
        help=f"seconds of load per rate (default {o.rate_seconds:g})",
    )
    p.add_argument(
        "--latency-rounds",
        type=int,
        default=o.latency_rounds,
        help=f"rounds over the rates, in rotating order (default {o.latency_rounds})",
    )
    p.add_argument(
        "--burst",
        type=int,
        default=o.burst,
        help=f"messages of the burst; 0 skips it (default {o.burst})",
    )
    p.add_argument("--out", metavar="FILE.json", type=Path, help="write every figure as JSON")
    p.add_argument(
        "--chart",
        metavar="FILE.png",
        type=Path,
        help="draw throughput and latency (needs the bench extra: matplotlib)",
    )
    p.add_argument(
        "--profile",
        metavar="DIR",
        type=Path,
        help="one more round with py-spy attached to each stage worker; "
        "stacks in DIR, top costs printed (needs py-spy)",
    )
    p.set_defaults(handler=_bench)  # fmt: skip


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        msg = f"not a list of numbers: {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not values or any(not 0 < v <= 10 for v in values):  # noqa: PLR2004
        raise argparse.ArgumentTypeError("each rate is a fraction in (0, 10]")
    return values


def _add_admin(sub: Any) -> None:
    topics = sub.add_parser("topics", help="Kafka topic administration")
    tsub = topics.add_subparsers(dest="topics_command", metavar="ACTION", required=True)
    p = tsub.add_parser("create", help="create every configured topic that does not exist")
    p.add_argument(
        "--partitions", type=int, help="partitions per topic (default: kafka.partitions)"
    )
    p.set_defaults(handler=_topics_create)

    schemas = sub.add_parser("schemas", help="JSON Schemas and the AsyncAPI document")
    ssub = schemas.add_subparsers(dest="schemas_command", metavar="ACTION", required=True)
    p = ssub.add_parser("export", help="write schemas/ from the code")
    p.add_argument("--dir", default="schemas", help="output directory (default: schemas)")
    p.add_argument("--check", action="store_true", help="fail if schemas/ is stale; write nothing")
    p.set_defaults(handler=_schemas_export)

    p = sub.add_parser("redrive", help="move DLQ records back to their input topic")
    p.add_argument("dlq", choices=["allocations", "down-events"], help="which DLQ")
    p.add_argument("--code", type=int, action="append", help="only records with this DPS code")
    p.add_argument("--kind", action="append", choices=["rejected", "exhausted", "invalid"])
    p.add_argument("--dry-run", action="store_true", help="count what would move")
    p.add_argument(
        "--from-beginning",
        action="store_true",
        help="offer every DLQ record again, not just new ones",
    )
    p.set_defaults(handler=_redrive)

    p = sub.add_parser("status", help="per stage: lag, throughput, DLQ counts")
    p.set_defaults(handler=_status)


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def _worker(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.ops.server import Health, ops_server  # noqa: PLC0415  (keeps --help fast)

    stop = asyncio.Event()
    _stop_on_signals(stop)
    health = Health(cfg.metrics.stall_after)
    stages: tuple[str, ...] = args.stages
    factories = _stage_factories()
    port = getattr(cfg.metrics, f"{args.command}_port")
    async with contextlib.AsyncExitStack() as stack:
        if cfg.metrics.enabled:
            await stack.enter_async_context(ops_server(cfg.metrics.host, port, health))
        async with asyncio.TaskGroup() as tg:
            for name in stages:
                worker = factories[name](cfg, health)
                tg.create_task(_until_stopped(worker, stop), name=f"pipeline.{name}")
    return 0


async def _until_stopped(worker: Any, stop: asyncio.Event) -> None:
    try:
        await worker.run(stop)
    finally:
        stop.set()  # one stage ending (or failing) stops the others in `run`


def _stage_factories() -> dict[str, Callable[..., Any]]:
    from pipeline.stages.ingest import Ingest  # noqa: PLC0415
    from pipeline.stages.router import Router  # noqa: PLC0415
    from pipeline.stages.sink import Sink  # noqa: PLC0415

    return {"ingest": Ingest, "route": Router, "sink": Sink}


async def _replay(args: argparse.Namespace, cfg: Config) -> int:
    import importlib.resources  # noqa: PLC0415

    from pipeline.tools.demo import DEMO_FIXTURE  # noqa: PLC0415
    from pipeline.tools.replay import replay  # noqa: PLC0415

    if not args.files and not args.demo:
        print("pipeline replay: give fixture FILEs, or --demo", file=sys.stderr)  # noqa: T201
        return 2
    with importlib.resources.as_file(DEMO_FIXTURE) as demo:
        count = await replay(
            cfg.mqtt,
            [*args.files, *([demo] if args.demo else [])],
            rate=args.rate,
            topic_prefix=args.topic_prefix,
            progress=not args.no_progress,
            honour_delays=not args.no_delays,
        )
    print(f"published {count} messages")  # noqa: T201
    return 0


async def _record(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.tools.replay import record  # noqa: PLC0415

    stop = asyncio.Event()
    _stop_on_signals(stop)
    if args.output == "-":
        task = asyncio.create_task(
            record(cfg.mqtt, sys.stdout, topic=args.topic, count=args.count, duration=args.duration)
        )
    else:
        task = asyncio.create_task(
            record(
                cfg.mqtt,
                Path(args.output),
                topic=args.topic,
                count=args.count,
                duration=args.duration,
            )
        )
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if not task.done():
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return 0


async def _emulator(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.dps.emulator import serve  # noqa: PLC0415

    return await serve(
        host=args.host,
        port=args.port,
        devices_file=args.devices,
        accept_any_sn=args.accept_any_sn,
        app_key=cfg.sink.dps.app_key,
        app_secret=cfg.sink.dps.app_secret.reveal(),
        token_ttl=args.token_ttl,
    )


async def _topics_create(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.io.kafka import ensure_topics  # noqa: PLC0415

    created = await ensure_topics(cfg.kafka, cfg.kafka.topics.all(), partitions=args.partitions)
    for name in cfg.kafka.topics.all():
        print(f"{name}: {'created' if name in created else 'exists'}")  # noqa: T201
    return 0


async def _schemas_export(args: argparse.Namespace, _cfg: Config) -> int:
    from pipeline.tools.export import export  # noqa: PLC0415

    return export(Path(args.dir), check=args.check)


async def _redrive(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.tools.redrive import redrive  # noqa: PLC0415

    moved = await redrive(
        cfg,
        args.dlq,
        codes=args.code,
        kinds=args.kind,
        dry_run=args.dry_run,
        from_beginning=args.from_beginning,
    )
    print(f"{'would move' if args.dry_run else 'moved'} {moved} records")  # noqa: T201
    return 0


async def _status(_args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.tools.status import status  # noqa: PLC0415

    return await status(cfg)


async def _demo(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.tools.demo import run  # noqa: PLC0415

    return await run(cfg, fixture=args.fixture)


async def _bench(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.tools.bench import run  # noqa: PLC0415

    options = BenchOptions(
        rounds=args.rounds, messages=args.messages, events=args.events,
        allocations=args.allocations, sustain=args.sustain, rates=args.rates,
        rate_seconds=args.rate_seconds, latency_rounds=args.latency_rounds, burst=args.burst,
    )  # fmt: skip
    return await run(
        cfg, options, config_path=args.config, out=args.out, chart=args.chart,
        profile_dir=args.profile,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    args = _parser().parse_args(argv)
    # demo and bench print their own summary, which already lists every DLQ reason.
    quiet = args.command in ("demo", "bench")
    setup_logging(args.log_level or ("error" if quiet else "info"))
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"pipeline: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    handler: Callable[[argparse.Namespace, Config], Coroutine[Any, Any, int]] = args.handler
    try:
        code: int = asyncio.run(handler(args, cfg))
    except KeyboardInterrupt:
        return 130
    except TimeoutError:
        print("pipeline: timed out", file=sys.stderr)  # noqa: T201
        return 1
    except (PipelineError, ValueError, OSError) as exc:
        # Bad input (a fixture, a devices file) or an unreachable service: one line.
        print(f"pipeline: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    except aiomqtt.MqttError as exc:
        print(f"pipeline: MQTT: {exc}", file=sys.stderr)  # noqa: T201
        return 1
    return code
