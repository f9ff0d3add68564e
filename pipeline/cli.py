"""The ``pipeline`` command line: one entry point, one sub-command per job.

Exit codes, by what the error is (``pipeline --help`` lists them too):

- 0: success (and a worker stopped by SIGTERM or SIGINT; 130 for a Ctrl-C of a tool).
- 2: the operator's fix. Bad configuration (:class:`~pipeline.errors.ConfigError`, one
  line naming the key), bad input (:class:`~pipeline.errors.InputError`, one line naming
  the file:line or the argument), or a file named to the command that cannot be read or
  written (an ``OSError`` with its file name).
- 1: a service could not be reached or failed (:class:`~pipeline.errors.ServiceUnreachable`,
  Kafka, MQTT or DPS errors: one line naming it and its address; another ``OSError``: its
  traceback logged), or a stage stopped because it could not go on safely
  (:class:`~pipeline.errors.StageFailed`). A restart, once the service is back, cures it.
- 3: ``pipeline reconcile`` found DPS differing from the topics (it lists the differences).
- 4: ``pipeline trace`` found no record of the device in the topics (or in the window).
- ``pipeline audit`` exits 1 when the promise does not hold (it lists the gaps).
- 70 (``EX_SOFTWARE``): a bug. An internal invariant broke
  (:class:`~pipeline.errors.InternalError`) or an error nobody expected; its traceback is
  logged as one JSON line.

When several stages fail at once (``run``), the code is the first of 2, 70, 1 among them;
each error is still reported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiomqtt

from pipeline import _signals
from pipeline.config import Config, load_config
from pipeline.errors import ConfigError, DpsError, InputError, ServiceUnreachable, StageFailed
from pipeline.io import aio
from pipeline.ops.logs import setup_logging
from pipeline.stages.registry import STAGES

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Iterator

__all__ = ["main"]

log = logging.getLogger(__name__)

EX_SOFTWARE = 70
"""sysexits.h: an internal software error (a bug)."""
_EXIT_CODES = """\
exit codes:
  0   success; a worker stopped by SIGTERM
  1   a service (Kafka, MQTT, DPS) could not be reached or failed, or a stage could not
      go on safely: one line naming it; a restart cures it once the service is back
      (audit: 1 when a child has no outcome or more than one, or an event was not routed)
  2   bad configuration or input: one line naming the key, the file:line or the argument
  3   reconcile: DPS differs from what the topics say (the differences are listed)
  4   trace: no record of that device in the topics (or in the window)
  70  a bug (an internal invariant broke, or an unexpected error): traceback logged
  130 a tool interrupted (Ctrl-C)
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline",
        description="Provision Huawei IoTDA child devices into Envision EnOS DPS via Kafka.",
        epilog=_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", metavar="FILE", help="TOML configuration (default: ./pipeline.toml if present)"
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="default: info; error for demo (it prints a summary)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_workers(sub)
    _add_tools(sub)
    _add_admin(sub)
    _add_trace(sub)
    _add_audit(sub)
    return parser


def _add_workers(sub: Any) -> None:
    for name, entry in STAGES.items():
        p = sub.add_parser(name, help=entry.help, description=entry.help)
        p.set_defaults(handler=_worker, stages=(name,))
        entry.arguments(p)
    p = sub.add_parser("run", help="every stage in one process")
    p.set_defaults(handler=_worker, stages=tuple(STAGES))
    for entry in STAGES.values():
        entry.arguments(p)


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
    p.add_argument("--demo", action="store_true", help="preload the bundled demo's devices")
    p.add_argument("--token-ttl", type=int, default=7200, help="access token lifetime, seconds")
    p.set_defaults(handler=_emulator)

    p = sub.add_parser(
        "demo",
        help="bring up everything locally and run the whole flow once",
        description="Run the whole flow once on a realistic fixture and print what happened. "
        "In a checkout (deploy/local installed) it runs on a Mosquitto and a Kafka of its "
        "own, on free ports, removed afterwards; otherwise on the configured brokers, where "
        "it removes its topics, groups and MQTT session when done.",
    )
    p.add_argument("--fixture", help="replay fixture (default: the bundled demo)")
    p.add_argument(
        "--brokers",
        choices=("own", "configured"),
        help="own: start a Mosquitto and a Kafka for the demo (the default in a checkout); "
        "configured: use mqtt.* and kafka.* (the default elsewhere)",
    )
    p.set_defaults(handler=_demo)


def _add_audit(sub: Any) -> None:
    p = sub.add_parser(
        "audit",
        help="check that every child in a time window got exactly one outcome",
        description="From the topics alone: every child in the added (and deleted) topic "
        "written in [--since, --until) has exactly one outcome (an allocation or release, "
        "or a DLQ record no redrive put back), and every add_sub_device_response in the "
        "window was routed whole. Lists each gap with its trace id; exit 0 when the "
        "promise holds, 1 when it does not.",
    )
    p.add_argument(
        "--since",
        required=True,
        metavar="WHEN",
        help="the window's start: a duration back from now (30m, 1h, 7d) or an RFC 3339 / "
        "ISO 8601 time",
    )
    p.add_argument("--until", metavar="WHEN", help="the window's end, the same way (default: now)")
    p.add_argument(
        "--limit",
        type=_at_least_one,
        default=100,
        metavar="N",
        help="findings listed of each kind, at most (all are counted; default: 100)",
    )
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument(
        "--prometheus",
        metavar="FILE",
        help="also write the results as pipeline_audit_* metrics to FILE (Prometheus text "
        "format, for node-exporter's textfile collector; replaced atomically)",
    )
    p.add_argument(
        "--every",
        metavar="DURATION",
        help="run again every DURATION (5m), the window moving with the clock, rewriting "
        "--prometheus FILE each time, until stopped; needs --prometheus",
    )
    p.add_argument(
        "--only",
        choices=("routing", "outcomes"),
        help="routing: only that every add response was routed (no sink running); "
        "outcomes: only the children's outcomes (default: both)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress display")
    p.set_defaults(handler=_audit)


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
    p.add_argument(
        "--batch",
        type=_at_least_one,
        default=500,
        metavar="N",
        help="DLQ records per Kafka transaction (default: 500)",
    )
    p.set_defaults(handler=_redrive)

    p = sub.add_parser(
        "reconcile",
        help="compare what the lifecycle topic says should be allocated with DPS",
        description="Compare each child's latest state in the lifecycle topic with DPS: "
        "added children should be allocated (in the orgId the sink maps them to), deleted "
        "ones not (unless sink.on_delete = record). Lists every difference; exit 0 when "
        "all agree, 3 when something differs.",
    )
    p.add_argument(
        "--since",
        metavar="WHEN",
        help="only children whose latest change is this recent: a duration (90m, 24h, 7d) "
        "or an ISO 8601 time (default: every child)",
    )
    p.add_argument(
        "--method",
        choices=("auto", "get", "search"),
        default="auto",
        help="get: Get DPS Device per sn; search: Search DPS Device, 1,000 sns a call; "
        "auto (default): get for up to 100 sns, else search",
    )
    p.add_argument(
        "--redrive",
        action="store_true",
        help="put each missing child back on the added topic (one transaction)",
    )
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument(
        "--rate", type=float, help="DPS calls per second, at most (default: sink.rate_limit)"
    )
    p.add_argument(
        "--concurrency", type=int, help="DPS calls in flight, at most (default: sink.concurrency)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress display")
    p.set_defaults(handler=_reconcile)

    p = sub.add_parser(
        "bridge-config",
        help="write a Mosquitto bridge to IoTDA for each gateway (edge broker)",
        description="Write the Mosquitto configuration of an edge broker's bridges to IoTDA, "
        "one per gateway, from the gateways' device ids and secrets. Secrets are read from the "
        "gateways file (file: or env: references) and never printed.",
    )
    p.add_argument(
        "--gateways-file",
        required=True,
        metavar="FILE",
        help="TOML: [[gateway]] device_id = ..., secret = 'file:...' or 'env:...'",
    )
    p.add_argument("--host", required=True, help="the IoTDA instance's MQTT access address")
    p.add_argument("--port", type=int, default=8883, help="its MQTTS port (default: 8883)")
    p.add_argument(
        "--ca-file", required=True, metavar="FILE", help="CA bundle of IoTDA's certificate"
    )
    p.add_argument("-o", "--output", default="-", help="file to write (mode 0600; default: stdout)")
    p.add_argument(
        "--timestamp",
        metavar="YYYYMMDDHH",
        help="fixed timestamp of the client ids and passwords (default: now, UTC)",
    )
    p.set_defaults(handler=_bridge_config)

    p = sub.add_parser("status", help="per stage: lag, throughput, DLQ counts; worker health")
    p.add_argument(
        "--endpoint",
        action="append",
        metavar="URL",
        help="a worker's ops server (http://host:port), repeatable; default: this host's "
        "metrics ports of the configuration",
    )
    p.set_defaults(handler=_status)

    text = "exit 0 if the worker here answers /healthz with 200 (a container's HEALTHCHECK)"
    p = sub.add_parser("healthcheck", help=text, description=text)
    p.add_argument("--port", type=int, help="default: the first configured metrics port open")
    p.add_argument("--path", default="/healthz", help="default: /healthz (or /readyz, ...)")
    p.set_defaults(handler=_healthcheck)


def _add_trace(sub: Any) -> None:
    p = sub.add_parser(
        "trace",
        help="one device's journey through the topics, oldest first",
        description="Print every record the pipeline wrote about one device, oldest first: "
        "the down event, the router's added, failed or deleted record, each allocation, DLQ "
        "record, release and redrive, with topic, partition, offset, time and trace id. "
        "Reads only the partitions the device's keys are in. Exit 0 when found, 4 when not.",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--sn", help="the child's sn in DPS")
    which.add_argument("--device-id", help="the child's IoTDA device_id")
    which.add_argument(
        "--event-id", help="a down event's event_id: every child it names (reads every partition)"
    )
    p.add_argument(
        "--since",
        metavar="WHEN",
        help="only records written at or after this: a duration (90m, 24h, 7d) or an ISO "
        "8601 time (default: the beginning of each topic)",
    )
    p.add_argument(
        "--until", metavar="WHEN", help="only records written before this (same forms as --since)"
    )
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.set_defaults(handler=_trace)


_STOPPED_BY_SIGTERM = ("ingest", "route", "sink", "run", "record")
"""Commands that stop cleanly on SIGTERM (``_stop_on_signals``); the others just end."""


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if _signals.received():  # it came while the worker was starting
        stop.set()


async def _worker(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.ops.server import Health, ops_server  # noqa: PLC0415  (keeps --help fast)
    from pipeline.stages import runtime  # noqa: PLC0415

    stop = asyncio.Event()
    _stop_on_signals(stop)
    health = Health(cfg.metrics.stall_after)
    stages = [STAGES[name].create(cfg, args) for name in args.stages]
    if "sink" in args.stages:
        from pipeline.stages.sink.worker import tune_collector  # noqa: PLC0415

        tune_collector()  # once the modules are imported: see there
    elif "ingest" in args.stages:
        from pipeline.stages.ingest.worker import tune_collector as tune_ingest  # noqa: PLC0415

        tune_ingest()  # once the modules are imported: see there
    key = f"metrics.{args.command}_port"
    port = getattr(cfg.metrics, key.removeprefix("metrics."), None)
    if port is None:  # a stage beyond the built-in ones
        key = f"metrics.ports.{args.command}"
        port = cfg.metrics.ports.get(args.command)
    async with contextlib.AsyncExitStack() as stack:
        if cfg.metrics.enabled:
            if port is None:
                raise ConfigError.at(key, "no port for this stage's /metrics, /healthz, /readyz")
            try:
                await stack.enter_async_context(ops_server(cfg.metrics.host, port, health))
            except OSError as exc:
                why = os.strerror(exc.errno) if exc.errno else str(exc)
                reason = f"cannot listen on {cfg.metrics.host}:{port}: {why}"
                raise ConfigError.at(key, reason) from exc
        await runtime.run_all(stages, stop, health)
    return 0


async def _replay(args: argparse.Namespace, cfg: Config) -> int:
    import importlib.resources  # noqa: PLC0415

    from pipeline.tools.demo import DEMO_FIXTURE  # noqa: PLC0415
    from pipeline.tools.replay import replay  # noqa: PLC0415

    if not args.files and not args.demo:
        return _fail(2, "pipeline replay: give fixture FILEs, or --demo")
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
    import importlib.resources  # noqa: PLC0415

    from pipeline.dps.emulator import serve  # noqa: PLC0415
    from pipeline.tools.demo import DEMO_DEVICES  # noqa: PLC0415

    try:
        with importlib.resources.as_file(DEMO_DEVICES) as demo:
            return await serve(
                host=args.host,
                port=args.port,
                devices_file=str(demo) if args.demo else args.devices,
                accept_any_sn=args.accept_any_sn,
                app_key=cfg.sink.dps.app_key,
                app_secret=cfg.sink.dps.app_secret.reveal(),
                token_ttl=args.token_ttl,
            )
    except OSError as exc:
        if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            raise
        why = os.strerror(exc.errno)
        return _fail(2, f"pipeline dps-emulator: cannot listen on {args.host}:{args.port}: {why}")


async def _topics_create(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.io import kafka  # noqa: PLC0415

    await kafka.wait_until_reachable(cfg.kafka, within=0)
    topics = cfg.kafka.topics.all()
    created = await kafka.ensure_topics(cfg.kafka, topics, partitions=args.partitions)
    for name in topics:
        print(f"{name}: {'created' if name in created else 'exists'}")  # noqa: T201
    return 0


async def _schemas_export(args: argparse.Namespace, _cfg: Config) -> int:
    from pipeline.tools.export import export  # noqa: PLC0415

    return export(Path(args.dir), check=args.check)


def _at_least_one(text: str) -> int:
    """An argument that counts something, 1 or more."""
    value = int(text)
    if value < 1:
        msg = f"must be 1 or more, got {value}"
        raise argparse.ArgumentTypeError(msg)
    return value


async def _redrive(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.io import kafka  # noqa: PLC0415
    from pipeline.tools.redrive import redrive  # noqa: PLC0415

    await kafka.wait_until_reachable(cfg.kafka, within=0)
    moved = await redrive(
        cfg,
        args.dlq,
        codes=args.code,
        kinds=args.kind,
        dry_run=args.dry_run,
        from_beginning=args.from_beginning,
        batch=args.batch,
    )
    print(f"{'would move' if args.dry_run else 'moved'} {moved} records")  # noqa: T201
    return 0


async def _reconcile(args: argparse.Namespace, cfg: Config) -> int:
    import datetime as dt  # noqa: PLC0415

    from pipeline.core.reconcile import parse_since  # noqa: PLC0415
    from pipeline.io import kafka  # noqa: PLC0415
    from pipeline.tools.reconcile import reconcile  # noqa: PLC0415

    since = None if args.since is None else parse_since(args.since, dt.datetime.now(dt.UTC))
    if args.rate is not None and args.rate <= 0:
        msg = f"--rate {args.rate}: must be above 0"
        raise InputError(msg)
    if args.concurrency is not None and args.concurrency < 1:
        msg = f"--concurrency {args.concurrency}: must be at least 1"
        raise InputError(msg)
    await kafka.wait_until_reachable(cfg.kafka, within=0)
    return await reconcile(
        cfg,
        since=since,
        method=args.method,
        redrive=args.redrive,
        as_json=args.json,
        rate=args.rate,
        concurrency=args.concurrency,
        progress=not args.no_progress,
    )


async def _trace(args: argparse.Namespace, cfg: Config) -> int:
    import datetime as dt  # noqa: PLC0415

    from pipeline.core.reconcile import parse_since  # noqa: PLC0415
    from pipeline.io import kafka  # noqa: PLC0415
    from pipeline.tools.trace import check_query, trace  # noqa: PLC0415

    now = dt.datetime.now(dt.UTC)
    since = None if args.since is None else parse_since(args.since, now)
    try:
        until = None if args.until is None else parse_since(args.until, now)
    except InputError:
        msg = f"--until {args.until!r}: give a duration (30s, 90m, 24h) or an ISO 8601 time"
        raise InputError(msg) from None
    check_query(
        sn=args.sn, device_id=args.device_id, event_id=args.event_id, since=since, until=until
    )
    await kafka.wait_until_reachable(cfg.kafka, within=0)
    return await trace(
        cfg,
        sn=args.sn,
        device_id=args.device_id,
        event_id=args.event_id,
        since=since,
        until=until,
        as_json=args.json,
    )


async def _audit(args: argparse.Namespace, cfg: Config) -> int:
    import datetime as dt  # noqa: PLC0415

    from aiokafka.errors import KafkaError  # noqa: PLC0415

    from pipeline.core.reconcile import parse_duration, parse_since  # noqa: PLC0415
    from pipeline.io import kafka  # noqa: PLC0415
    from pipeline.tools.audit import audit  # noqa: PLC0415

    def window() -> tuple[dt.datetime, dt.datetime | None]:
        now = dt.datetime.now(dt.UTC)
        since = parse_since(args.since, now)
        until = None if args.until is None else parse_since(args.until, now, "--until")
        if until is not None and until <= since:
            msg = f"--until {args.until!r}: must be after --since {args.since!r}"
            raise InputError(msg)
        return since, until

    window()  # bad input fails before Kafka is asked
    every = None if args.every is None else parse_duration(args.every, "--every")
    if every is not None and (args.prometheus is None or every.total_seconds() <= 0):
        msg = f"--every {args.every!r}: needs --prometheus FILE and a duration above 0"
        raise InputError(msg)
    prometheus = None if args.prometheus is None else Path(args.prometheus)

    async def once() -> int:
        since, until = window()
        return await audit(
            cfg,
            since=since,
            until=until,
            limit=args.limit,
            as_json=args.json,
            prometheus=prometheus,
            progress=not args.no_progress and every is None,
            only=args.only,
        )

    await kafka.wait_until_reachable(cfg.kafka, within=0)
    if every is None:
        return await once()
    while True:  # until SIGTERM or Ctrl-C; a failed round is logged, the next one tries again
        try:
            await once()
        except (ServiceUnreachable, OSError, KafkaError) as exc:
            log.warning("audit: this round failed (%s); next in %s", exc, every)
        await asyncio.sleep(every.total_seconds())


async def _bridge_config(args: argparse.Namespace, _cfg: Config) -> int:
    from pipeline.config import MqttConfig, listed_gateways  # noqa: PLC0415
    from pipeline.tools.bridge import bridge_config, write_bridge_config  # noqa: PLC0415

    gateways = listed_gateways(MqttConfig(gateways_file=args.gateways_file))
    text = bridge_config(
        gateways, host=args.host, port=args.port, ca_file=args.ca_file, stamp=args.timestamp
    )
    write_bridge_config(text, args.output)
    where = "stdout" if args.output == "-" else args.output
    print(f"wrote {len(gateways)} bridges to {where}", file=sys.stderr)  # noqa: T201
    return 0


async def _healthcheck(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.ops.healthcheck import healthcheck  # noqa: PLC0415

    healthy, line = healthcheck(cfg.metrics, port=args.port, path=args.path)
    print(f"healthcheck: {line}")  # noqa: T201
    return 0 if healthy else 1


async def _status(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.io import kafka  # noqa: PLC0415
    from pipeline.tools.status import status  # noqa: PLC0415

    await kafka.wait_until_reachable(cfg.kafka, within=0)
    return await status(cfg, args.endpoint)


async def _demo(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.tools.demo import run  # noqa: PLC0415

    return await run(cfg, fixture=args.fixture, brokers=args.brokers)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    _signals.hold()
    args = _parser().parse_args(argv)
    if args.command not in _STOPPED_BY_SIGTERM:
        _signals.release()
    # demo prints its own summary, which already lists every DLQ reason.
    quiet = args.command == "demo"
    setup_logging(args.log_level or ("error" if quiet else "info"))
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        return _fail(2, f"pipeline: {exc}")
    except Exception:
        log.exception("pipeline %s failed reading the configuration (a bug)", args.command)
        return EX_SOFTWARE
    handler: Callable[[argparse.Namespace, Config], Coroutine[Any, Any, int]] = args.handler
    try:
        code: int = aio.run(handler(args, cfg), cfg.runtime.event_loop, why=_needs_selector(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # every error ends here, as one line
        return _report(exc, cfg, args.command)
    return code


def _needs_selector(args: argparse.Namespace) -> str:
    """Why ``args``' command must run on asyncio's own event loop ("" if it need not)."""
    stages = tuple(STAGES) if args.command == "demo" else getattr(args, "stages", ())
    needing = [name for name in stages if STAGES[name].needs_selector]
    if not needing:
        return ""
    return f"it runs {', '.join(needing)}, whose MQTT intake limit needs asyncio's selector loop"


def _fail(code: int, line: str) -> int:
    print(line, file=sys.stderr)  # noqa: T201
    return code


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    """The errors inside (nested) exception groups, as the stages' TaskGroup raises them."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def _report(exc: Exception, cfg: Config, command: str) -> int:
    """Print the one line for ``exc`` (or log its traceback) and return the exit code."""
    verdicts = [(*_verdict(leaf, cfg), leaf) for leaf in _leaves(exc)]
    # The operator's fix first, then a bug, then a service; those with a line first.
    verdicts.sort(key=lambda v: (_PRECEDENCE[v[0]], v[1] is None))
    shown: set[str] = set()
    for code, line, leaf in verdicts:
        if line is None and code == EX_SOFTWARE:
            log.error("pipeline %s failed: %r (a bug)", command, leaf, exc_info=leaf)
        elif line is None:
            log.error("pipeline %s failed: %r", command, leaf, exc_info=leaf)
        elif not shown:
            print(f"pipeline: {line}", file=sys.stderr)  # noqa: T201
        elif line not in shown:
            log.error("also: %s", line)  # several stages failed differently (`run`)
        if line is not None:
            shown.add(line)
    return verdicts[0][0]


_PRECEDENCE = {2: 0, EX_SOFTWARE: 1, 1: 2}
"""Which exit code a group of errors gets: the first of 2, 70, 1 among them."""


def _verdict(exc: BaseException, cfg: Config) -> tuple[int, str | None]:
    """Exit code and one line for an error; no line: log its traceback.

    By type only, never by message: 2 for what the operator can fix, 1 for a service,
    70 (a bug) for everything else, :class:`~pipeline.errors.InternalError` included.
    """
    if isinstance(exc, ConfigError | InputError):
        return 2, str(exc)
    if isinstance(exc, OSError) and exc.filename is not None:
        return 2, f"{exc.filename}: {exc.strerror or exc}"
    if (line := _service_line(exc, cfg)) is not None:
        return 1, line
    if isinstance(exc, OSError):
        return 1, None  # the network or the host (a reset connection, no route): not a bug
    return EX_SOFTWARE, None


def _service_line(exc: BaseException, cfg: Config) -> str | None:
    """The line naming the service (and its address) an error is about, if it is."""
    from aiokafka import errors  # noqa: PLC0415  (only on the way out)

    unreachable = (
        errors.KafkaConnectionError,
        errors.KafkaTimeoutError,
        errors.NoBrokersAvailable,
        errors.NodeNotReadyError,
        errors.RequestTimedOutError,
    )
    match exc:
        case ServiceUnreachable() | StageFailed():
            return str(exc)
        case DpsError():
            return f"DPS {cfg.sink.dps.base_url}: {exc}"
        case aiomqtt.MqttError():
            return f"MQTT {cfg.mqtt.host}:{cfg.mqtt.port}: {exc}"
        case errors.KafkaError():
            text = str(exc.args[0]) if exc.args else ""
            reason = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
            what = " not reachable" if isinstance(exc, unreachable) else ""
            return f"Kafka {cfg.kafka.bootstrap_servers}{what}: {reason}"
        case ConnectionError() if exc.errno is None and exc.args:
            return str(exc)  # our own words (demo: the services are not there)
    return None
