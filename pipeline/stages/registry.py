"""The stages the command line runs: a name, a line of help, how to make one.

Each ``pipeline <stage>`` command, and ``pipeline run`` (every stage in one process),
comes from this table; the command line's control flow is the same for all of them
(:func:`pipeline.stages.runtime.run`). A new stage is a class with its own work (see
:class:`~pipeline.stages.runtime.Stage`) and a line here. Nothing heavy is imported
until a stage is made, so ``pipeline --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable

    from pipeline.config import Config
    from pipeline.stages.runtime import Stage

__all__ = ["STAGES", "Entry"]


def _no_arguments(_: argparse.ArgumentParser) -> None:
    """A stage with no options of its own."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One stage of the command line.

    Args:
        help: what it does, in a line.
        create: makes the stage from the configuration and its command's arguments.
        arguments: adds its options to a command's parser (its own and ``run``'s).
        needs_selector: it needs asyncio's own event loop, whatever
            ``runtime.event_loop`` says (ingest: :func:`pipeline.io.aio.run`).
    """

    help: str
    create: Callable[[Config, argparse.Namespace], Stage]
    arguments: Callable[[argparse.ArgumentParser], None] = _no_arguments
    needs_selector: bool = False


def _ingest(cfg: Config, args: argparse.Namespace) -> Stage:
    from pipeline.stages.ingest import Ingest  # noqa: PLC0415

    return Ingest(cfg, retire=args.retire)


def _ingest_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--retire",
        action="store_true",
        help="on SIGTERM, end the MQTT sessions instead of keeping them: land what the "
        "broker still holds for this replica, then have it drop the sessions (for a "
        "replica being removed)",
    )


def _route(cfg: Config, _: argparse.Namespace) -> Stage:
    from pipeline.stages.router import Router  # noqa: PLC0415

    return Router(cfg)


def _sink(cfg: Config, _: argparse.Namespace) -> Stage:
    from pipeline.stages.sink import Sink  # noqa: PLC0415

    return Sink(cfg)


STAGES: dict[str, Entry] = {
    "ingest": Entry(
        "MQTT down events -> Kafka (acknowledges MQTT only after Kafka has the record)",
        _ingest,
        _ingest_arguments,
        needs_selector=True,  # its MQTT intake limit (pipeline.io.mqtt.IntakeLimit)
    ),
    "route": Entry(
        "down events -> one record per added / failed child (Kafka transactions)", _route
    ),
    "sink": Entry("added children -> DPS allocate, with retries, back-pressure and a DLQ", _sink),
}
"""Every stage, in flow order."""
