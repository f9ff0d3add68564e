"""The ``pipeline`` command line: one entry point, one sub-command per job."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from pipeline.config import Config, load_config
from pipeline.errors import ConfigError
from pipeline.logs import setup_logging

__all__ = ["main"]

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline",
        description="Provision Huawei IoTDA child devices into Envision EnOS DPS via Kafka.",
    )
    parser.add_argument(
        "--config", metavar="FILE", help="TOML configuration (default: ./pipeline.toml if present)"
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", help="bring up the local services and run the whole flow once")
    p.set_defaults(handler=_demo)

    topics = sub.add_parser("topics", help="Kafka topic administration")
    tsub = topics.add_subparsers(dest="topics_command", metavar="ACTION", required=True)
    p = tsub.add_parser("create", help="create every configured topic that does not exist")
    p.add_argument(
        "--partitions", type=int, help="partitions per topic (default: kafka.partitions)"
    )
    p.set_defaults(handler=_topics_create)
    return parser


async def _demo(_args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.demo import run  # noqa: PLC0415  (keeps `pipeline --help` fast)

    return await run(cfg)


async def _topics_create(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.kafka import ensure_topics  # noqa: PLC0415

    created = await ensure_topics(cfg.kafka, cfg.kafka.topics.all(), partitions=args.partitions)
    for name in cfg.kafka.topics.all():
        print(f"{name}: {'created' if name in created else 'exists'}")  # noqa: T201
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    args = _parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"pipeline: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    try:
        code: int = asyncio.run(args.handler(args, cfg))
    except KeyboardInterrupt:
        return 130
    return code
