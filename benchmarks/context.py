"""What one bench run shares: its options, its names, and what it must clean up."""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING

import msgspec

from benchmarks import measure, procs
from pipeline.config import Config, Topics
from pipeline.io import kafka

if TYPE_CHECKING:
    from pathlib import Path

    from benchmarks.baseline import Baseline
    from benchmarks.options import Options

__all__ = ["Context"]

_SESSION_EXPIRY = 900
"""Seconds the broker keeps a bench session; every session is also discarded at the end."""
_GROUPS_LIMIT = 60.0
"""Seconds to wait for the run's consumer groups to empty so they can be deleted."""


class Context:
    """Names unique to this run, the emulator's URL, and the topics and sessions to remove."""

    def __init__(
        self, base: Config, options: Options, *, config_path: str | None, log_dir: Path
    ) -> None:
        self.base = base
        self.options = options
        self.config_path = config_path
        self.log_dir = log_dir
        self.run_id = uuid.uuid4().hex[:6]
        self.dps_url = ""
        self.topics: list[str] = []
        self.sessions: list[Config] = []

    def config(self, name: str, **topics: str) -> Config:
        """The configuration of measurement ``name``: its own topics, groups and client id.

        ``topics`` overrides topic names (e.g. ``down_events=`` a shared, preloaded input).
        """
        prefix = f"bench.{self.run_id}.{name}"
        names = {f: f"{prefix}.{getattr(Topics(), f)}" for f in Topics.__struct_fields__}
        replace = msgspec.structs.replace
        b = self.base
        ident = f"bench-{self.run_id}-{name}"
        return replace(
            b,
            mqtt=replace(
                b.mqtt,
                topic=f"bench/{self.run_id}/{name}/$oc/devices/+/sys/events/down",
                client_id=ident,
                session_expiry=_SESSION_EXPIRY,
            ),
            kafka=replace(b.kafka, topics=Topics(**(names | topics))),
            # One group per stage: a router and a sink sharing a group would rebalance
            # each other (end to end runs both on one set of topics).
            router=replace(b.router, group_id=f"{ident}-route", transactional_id=f"{ident}-route"),
            sink=replace(
                b.sink,
                group_id=f"{ident}-sink",
                dps=replace(b.sink.dps, base_url=self.dps_url or b.sink.dps.base_url),
                device_data={"deviceName": "name", "model": "model"},
            ),
        )

    def mqtt_prefix(self, cfg: Config) -> str:
        """What to put before ``$oc/devices/...`` to publish to ``cfg``'s subscription."""
        return cfg.mqtt.topic.split("$oc/", 1)[0]

    async def topics_for(self, cfg: Config, *fields: str) -> None:
        """Create the topics ``fields`` of ``cfg`` (broker-stamped); removed at the end."""
        names = [getattr(cfg.kafka.topics, f) for f in fields]
        self.topics.extend(names)
        await measure.create_topics(cfg.kafka, names)

    async def session_for(self, cfg: Config) -> None:
        """Open ``cfg``'s MQTT session so it queues a backlog; discarded at the end."""
        self.sessions.append(cfg)
        await measure.open_session(cfg.mqtt)

    async def worker(
        self,
        command: str,
        cfg: Config,
        name: str,
        *,
        baseline: Baseline | None = None,
        env: dict[str, str] | None = None,
    ) -> procs.Proc:
        """Start ``pipeline <command>`` (ingest, route, sink) with ``cfg``; of ``baseline``.

        ``env``: the child's environment instead of :func:`procs.child_env` of ``cfg``.
        """
        env = procs.child_env(cfg) if env is None else env
        if baseline is not None:
            env = baseline.environ(env)
        return await procs.start(
            name,
            ["pipeline", "--log-level", "warning", command],
            env=env,
            log_dir=self.log_dir,
            config_path=self.config_path,
            python=None if baseline is None else baseline.python,
        )

    async def ceiling(self, loop: str, cfg: Config, name: str, *args: str) -> procs.Proc:
        """Start ceiling ``loop`` with ``cfg``; read its result with ``Proc.result``."""
        return await procs.start(
            name,
            ["benchmarks.ceilings", loop, *args],
            env=procs.child_env(cfg),
            log_dir=self.log_dir,
            config_path=self.config_path,
            capture=True,
        )

    async def cleanup(self) -> None:
        """Discard the run's MQTT sessions; delete its topics and consumer groups."""
        for cfg in self.sessions:
            await measure.close_session(cfg.mqtt)
        self.sessions.clear()
        async with kafka.admin(self.base.kafka) as client:
            groups = [g for g, *_ in await client.list_consumer_groups()]
            # Those it made, and those the stages made for themselves (their state topics).
            prefix = f"bench.{self.run_id}."
            made = [t for t in await client.list_topics() if t.startswith(prefix)]
        if ours_topics := sorted({*self.topics, *made}):
            await kafka.delete_topics(self.base.kafka, ours_topics)
        self.topics.clear()
        ours = [g for g in groups if g.startswith(f"bench-{self.run_id}-")]
        # A worker the bench killed leaves its group until its session times out.
        async with asyncio.timeout(_GROUPS_LIMIT):
            while ours := list(await kafka.delete_groups(self.base.kafka, ours)):  # noqa: ASYNC110
                await asyncio.sleep(0.5)
