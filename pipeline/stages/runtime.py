"""The stage runtime: what every stage needs around its own work, written once.

A stage (ingest, route, sink, or one of yours) is only its own processing. It names
the topics it uses, the brokers it needs, and what it consumes (a group, its topics,
what to do as partitions come and go); :func:`run` does the rest, in this order:

1. waits for the brokers the stage needs (``mqtt.startup_timeout``,
   ``kafka.startup_timeout``), saying so in its own words;
2. makes the stage's topics, or waits for them (``kafka.create_topics``), and checks
   that the topics its subscription names co-partitioned have one partition count;
3. registers the stage's readiness checks, not ready, and watches that Kafka answers
   (``{stage}.kafka``, every ``kafka.liveness_interval``);
4. for a consuming stage: opens its consumer, subscribes with the rebalance guard (a
   failed callback stops the stage instead of being logged and forgotten), and samples
   its lag every ``metrics.lag_interval``;
5. runs the stage's work until ``stop`` is set or a rebalance callback failed; the work
   then hands back or finishes what it holds, and returns;
6. closes the consumer (leaving the group), stops watching, and raises
   :class:`~pipeline.errors.StageFailed` if a rebalance callback failed.

A stage's constructor only keeps its configuration: nothing registers, binds a metric
or touches the process before :func:`run` starts it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import logging
from typing import TYPE_CHECKING, Any, Protocol

from pipeline.errors import ConfigError
from pipeline.io import kafka, mqtt
from pipeline.io.aio import Stopped
from pipeline.ops.metrics import report_lag
from pipeline.ops.server import Health
from pipeline.ops.tracing import OFF, Tracing, start

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping, Sequence

    from aiokafka import AIOKafkaConsumer, TopicPartition

    from pipeline.config import Config, KafkaConfig

__all__ = ["Run", "Stage", "Subscription", "check_copartitioned", "run", "run_all"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Subscription:
    """What a consuming stage reads, and what it does as its partitions change.

    Args:
        group_id: its consumer group.
        topics: the topics it reads.
        revoked: called with partitions about to go elsewhere (hand back, commit).
        assigned: called with partitions just given, before their records are handed out.
        options: consumer settings beyond ``kafka.consumer``'s (a longer rebalance timeout).
        copartitioned: topics that must have the same partition count (their partition p
            holds the same keys); checked at start-up, before the consumer opens.
    """

    group_id: str
    topics: Sequence[str]
    revoked: Callable[[list[TopicPartition]], Awaitable[None]]
    assigned: Callable[[list[TopicPartition]], Awaitable[None]]
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    copartitioned: Sequence[str] = ()


class Stage(Protocol):
    """A stage: its name, what it uses, and its work."""

    name: str
    """``ingest``, ``route``, ``sink``: in logs, readiness checks and metrics."""
    cfg: Config

    def topics(self) -> Sequence[str]:
        """The topics it reads or writes: made (or waited for) before it starts."""
        ...

    def needs_mqtt(self) -> bool:
        """Whether it cannot start without the MQTT broker."""
        ...

    def subscription(self) -> Subscription | None:
        """What it consumes, if it does."""
        ...

    def checks(self) -> Sequence[str]:
        """Its own readiness checks (``dps`` for ``sink.dps``), not ready until it says so."""
        ...

    def busy(self) -> bool:
        """Whether it has work waiting (with no progress for long, ``/healthz`` fails)."""
        ...

    async def work(self, run: Run) -> None:
        """Its processing, until ``run.stopping``; then hand back what it holds, return."""
        ...


@dataclasses.dataclass
class Run:
    """What the runtime gives a stage's work."""

    name: str
    health: Health
    stopping: asyncio.Future[None]
    """Done when the stage is to stop: ``stop`` was set, or a rebalance callback failed
    (wait on it with :func:`~pipeline.io.aio.unless_stopped`)."""
    consumer: AIOKafkaConsumer | None = None
    """The stage's consumer, subscribed (consuming stages only)."""
    tracing: Tracing = OFF
    """The stage's tracing (``[tracing]``), flushed when the stage stops."""
    closing: list[Callable[[], Awaitable[None]]] = dataclasses.field(default_factory=list)

    def after_close(self, release: Callable[[], Awaitable[None]]) -> None:
        """Call ``release`` once the consumer is closed: no rebalance callback runs after.

        What a callback may still create (the router's per-partition producers, started on
        assignment) is released here, not at the end of the work: an assignment that was
        under way while the work ended would otherwise leave them open.
        """
        self.closing.append(release)

    def beat(self) -> None:
        """The stage made progress (its stall clock restarts)."""
        self.health.beat(self.name)

    def check(self, check: str, ok: bool, detail: str | None = None) -> None:
        """Set the stage's readiness check ``{name}.{check}``."""
        self.health.set(f"{self.name}.{check}", ok, detail)


async def run(stage: Stage, stop: asyncio.Event, health: Health | None = None) -> None:
    """Run ``stage`` until ``stop`` is set (see the module's docstring for what happens).

    Raises:
        ServiceUnreachable: a broker did not answer within its start-up timeout.
        StageFailed: a rebalance callback failed, or the stage's work could not go on.
    """
    health = health if health is not None else Health()
    cfg = stage.cfg
    name = stage.name
    health.set(f"{name}.kafka", False)
    for check in stage.checks():
        health.set(f"{name}.{check}", False)
    health.watch(name, stage.busy)
    try:
        if stage.needs_mqtt():
            await mqtt.wait_until_reachable(cfg.mqtt, stop)
        await kafka.wait_until_reachable(cfg.kafka, stop)
    except Stopped:
        return  # stopped while waiting: nothing started, nothing to hand back
    await kafka.prepare_topics(cfg.kafka, stage.topics())
    subscription = stage.subscription()
    if subscription is not None:
        # Before anything is started: a liveness probe cancelled while its client
        # connects would leave aiokafka's bootstrap connection open.
        await check_copartitioned(cfg.kafka, name, subscription.copartitioned)
    stopping: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    current = Run(name, health, stopping, tracing=start(name, cfg.tracing))
    liveness = kafka.Liveness(cfg.kafka, name, lambda ok, why: health.set(f"{name}.kafka", ok, why))
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(current.tracing.close)  # last: the spans of everything
        watchers = [asyncio.create_task(liveness.run(), name=f"{name}.kafka-liveness")]
        stack.push_async_callback(_cancel, watchers)
        stack.push_async_callback(_release, current.closing)  # after the consumer closes
        guard = None
        if subscription is not None:
            consumer = kafka.consumer(
                cfg.kafka, group_id=subscription.group_id, **subscription.options
            )
            await stack.enter_async_context(consumer)
            guard = kafka.Rebalance(
                name, revoked=subscription.revoked, assigned=subscription.assigned
            )
            consumer.subscribe(list(subscription.topics), listener=guard)
            current.consumer = consumer
            lag = kafka.watch_lag(
                consumer, functools.partial(report_lag, name), interval=cfg.metrics.lag_interval
            )
            watchers.append(asyncio.create_task(lag, name=f"{name}.lag"))
            log.info("%s consuming %s as %s", name, ", ".join(subscription.topics),
                     subscription.group_id)  # fmt: skip
        events = [stop] if guard is None else [stop, guard.failed]
        watchers.append(asyncio.create_task(_relay(events, stopping), name=f"{name}.stop"))
        await stage.work(current)
    if guard is not None:
        guard.raise_if_failed()
    log.info("%s stopped", name)


async def run_all(stages: Sequence[Stage], stop: asyncio.Event, health: Health) -> None:
    """Run ``stages`` side by side (``pipeline run``, or just one).

    One that ends, or fails, stops the others.
    """

    async def one(stage: Stage) -> None:
        try:
            await run(stage, stop, health)
        finally:
            stop.set()

    async with asyncio.TaskGroup() as group:
        for stage in stages:
            group.create_task(one(stage), name=f"pipeline.{stage.name}")


async def check_copartitioned(cfg: KafkaConfig, name: str, topics: Sequence[str]) -> None:
    """Fail with one line unless ``topics`` all have the same partition count.

    Raises:
        ConfigError: they do not (the line names each topic and its count).
    """
    if len(topics) < 2:  # noqa: PLR2004  (a pair at least)
        return
    async with kafka.reader(cfg) as reader:
        found = await kafka.partitions(reader, *topics)
    counts = collections.Counter(tp.topic for tp in found)
    if len({counts[topic] for topic in topics}) > 1:
        listed = ", ".join(f"{topic} {counts[topic]}" for topic in topics)
        msg = (
            f"{name} needs the same partition count in its co-partitioned topics: "
            f"{listed}; recreate them alike (pipeline topics create)"
        )
        raise ConfigError(msg)


async def _relay(events: Sequence[asyncio.Event], stopping: asyncio.Future[None]) -> None:
    """Resolve ``stopping`` once any of ``events`` is set."""
    waits = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if not stopping.done():
            stopping.set_result(None)
    finally:
        for waiting in waits:
            waiting.cancel()


async def _release(closing: Sequence[Callable[[], Awaitable[None]]]) -> None:
    for release in reversed(closing):
        await release()


async def _cancel(tasks: Sequence[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
