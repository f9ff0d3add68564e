"""Several replicas of every stage, added, stopped, killed and restarted under load.

2 ingest replicas split the gateways (shards 0/2 and 1/2 on the real $oc/... topics; a
third joins shard 0 as an active-active twin and retires), 2 routers and 3 sinks in
their groups, 6 partitions. ``quick`` (in ``make test``): 3,200 children, one round of
churn; ``full`` (``make test-long``): 50,000 children, three rounds (or
PIPELINE_SCALE_EVENTS x 4 children, PIPELINE_SCALE_ROUNDS); each prints its summary.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import orjson
import pytest

from pipeline.config import Config
from pipeline.dps.emulator import RunningEmulator, start_emulator
from pipeline.io import kafka
from pipeline.schemas import AddedChild, Allocation, DeviceInfo
from pipeline.tools.replay import FixtureMessage, replay_messages
from pipeline.tools.services import free_port
from tests.harness import (
    add_response,
    audit_holds,
    group_stable,
    read_topic,
    spawn,
    wait_readyz,
)

pytestmark = [pytest.mark.services, pytest.mark.slow, pytest.mark.timeout(900)]

SIZES = [
    pytest.param((800, 1, 160.0), id="quick"),
    pytest.param(
        (
            int(os.environ.get("PIPELINE_SCALE_EVENTS", "12500")),
            int(os.environ.get("PIPELINE_SCALE_ROUNDS", "3")),
            400.0,
        ),
        id="full",
        marks=pytest.mark.long,
    ),
]
"""Events (x 4 children), rounds of churn, and the publishing rate (churn while they flow)."""
CHILDREN = 4
CONCURRENCY = 32
DETACHED = 8
"""``sink.detached_limit``: calls DPS was late to answer, in flight without a slot."""
GATEWAYS = 30


@dataclasses.dataclass
class Fleet:
    """The worker processes of one test, and what happened to them."""

    cfg: Config
    logs: Path
    gateways: list[str]
    procs: dict[str, asyncio.subprocess.Process] = dataclasses.field(default_factory=dict)
    changes: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    kills: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    ports: dict[str, int] = dataclasses.field(default_factory=dict)

    def _args(self, name: str) -> tuple[str, list[str], dict[str, str]]:
        stage, _, replica = name.partition("-")
        self.ports[name] = free_port()
        if stage != "ingest":
            return (
                stage,
                [],
                {
                    "METRICS__ENABLED": "true",
                    f"METRICS__{stage.upper()}_PORT": str(self.ports[name]),
                },
            )
        shard = {"a": "0/2", "b": "1/2", "c": "0/2"}[replica]
        env = {
            "MQTT__GATEWAYS": orjson.dumps(self.gateways).decode(),
            "MQTT__SHARD": shard,
            "MQTT__CLIENT_ID": f"{self.cfg.mqtt.client_id}-{replica}",
        }
        env |= {"METRICS__ENABLED": "true", "METRICS__INGEST_PORT": str(self.ports[name])}
        return "ingest", ["--retire"] if replica == "c" else [], env

    async def start(self, name: str) -> None:
        command, args, env = self._args(name)
        self.procs[name] = await spawn(
            command, self.cfg, *args, log=self.logs / f"{name}.log", env=env
        )
        self.changes[name.partition("-")[0]] += 1
        if command == "ingest":  # subscribed: from now on its session keeps the messages
            await wait_readyz(self.ports[name], self.procs[name])
        else:  # running its event loop, which owns SIGTERM (before, a SIGTERM is fatal)
            await wait_readyz(self.ports[name], self.procs[name], "/healthz")

    async def stop(self, name: str, sig: int) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(sig)
        code = await asyncio.wait_for(proc.wait(), 90)
        if sig == signal.SIGTERM:
            assert code == 0, (self.logs / f"{name}.log").read_text()[-3000:]
        else:
            self.kills[name.partition("-")[0]] += 1
        self.changes[name.partition("-")[0]] += 1

    async def restart(self, name: str, sig: int) -> None:
        await self.stop(name, sig)
        await self.start(name)

    async def close(self) -> None:
        await asyncio.gather(*(self.stop(name, signal.SIGTERM) for name in list(self.procs)))


@contextlib.asynccontextmanager
async def fleet(cfg: Config, logs: Path, gateways: list[str]) -> AsyncIterator[Fleet]:
    workers = Fleet(cfg, logs, gateways)
    try:
        for name in ("ingest-a", "ingest-b", "route-a", "route-b", "sink-a", "sink-b", "sink-c"):
            await workers.start(name)
        yield workers
    finally:
        for proc in workers.procs.values():
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def growing(cfg: Config, topic: str, at_least: int) -> None:
    """Until ``topic`` holds ``at_least`` records (offsets): work is flowing through it."""
    async with asyncio.timeout(120):
        while await kafka.size(cfg.kafka, topic) < at_least:
            await asyncio.sleep(0.05)


async def churn(workers: Fleet, cfg: Config, total: int, rounds: int) -> None:
    """Membership changes of every stage while the events flow, one round per share."""
    t = cfg.kafka.topics
    for r in range(rounds):
        share = (r + 1) / (rounds + 1)
        await growing(cfg, t.added, int(total * CHILDREN * share * 0.3))
        await workers.restart("route-a", signal.SIGKILL)  # inside a transaction, most likely
        await growing(cfg, t.allocations, int(total * CHILDREN * share * 0.2))
        await workers.restart("sink-a", signal.SIGKILL)  # with DPS calls in flight
        await workers.start("ingest-c")  # an active-active twin of shard 0...
        await workers.start("sink-d")
        await workers.restart("route-b", signal.SIGTERM)
        await workers.restart("ingest-a", signal.SIGKILL)
        await workers.stop("sink-b", signal.SIGTERM)
        await workers.start("route-c")
        await workers.restart("ingest-b", signal.SIGTERM)
        await workers.stop("ingest-c", signal.SIGTERM)  # ...that retires
        await workers.stop("route-c", signal.SIGKILL)
        await workers.stop("sink-d", signal.SIGKILL)
        await workers.start("sink-b")


async def allocated(cfg: Config, emulator: RunningEmulator, sns: set[str]) -> list[Allocation]:
    """Once every sn is allocated and recorded: the allocation records."""
    async with asyncio.timeout(300):
        while {c.sn for c in emulator.state.calls if c.code == 0} < sns:
            await asyncio.sleep(0.5)
    records = await read_topic(
        cfg.kafka, cfg.kafka.topics.allocations, expect=len(sns), timeout=120
    )
    return [msgspec.json.decode(r.value, type=Allocation) for r in records]


@pytest.mark.parametrize("size", SIZES)
async def test_replicas_of_every_stage_under_churn_lose_nothing(
    cfg: Config, uid: str, tmp_path: Path, size: tuple[int, int, float]
) -> None:
    events, rounds, rate = size
    gateways = [f"gw{i:02d}-{uid}" for i in range(GATEWAYS)]
    await kafka.ensure_topics(cfg.kafka, cfg.kafka.topics.all(), partitions=6)
    messages = [
        FixtureMessage(
            topic=f"$oc/devices/{gateways[i % GATEWAYS]}/sys/events/down",
            payload=orjson.dumps(
                add_response(f"{uid}-{i}", [f"{uid}-{i}-{c}" for c in range(CHILDREN)])
            ),
        )
        for i in range(events)
    ]
    sns = {f"{uid}-{i}-{c}" for i in range(events) for c in range(CHILDREN)}
    async with await start_emulator(accept_any_sn=True) as emulator:
        emulator.state.set_faults({"latency_ms": 20})  # so calls are in flight at a kill
        cfg = msgspec.structs.replace(
            cfg,
            sink=msgspec.structs.replace(
                cfg.sink,
                concurrency=CONCURRENCY,
                detached_limit=DETACHED,
                dps=msgspec.structs.replace(cfg.sink.dps, base_url=emulator.url),
            ),
        )
        async with fleet(cfg, tmp_path, gateways) as workers:
            await group_stable(cfg.kafka, cfg.router.group_id, 2)
            await group_stable(cfg.kafka, cfg.sink.group_id, 3)
            publishing = asyncio.create_task(
                replay_messages(cfg.mqtt, messages, rate=rate, progress=False)
            )
            await churn(workers, cfg, events, rounds)
            assert await publishing == events
            allocations = await allocated(cfg, emulator, sns)
            await workers.close()
    added = await read_topic(cfg.kafka, cfg.kafka.topics.added)
    # Every child allocated, each exactly once in iotda.subdevices.added.
    keys = collections.Counter(
        msgspec.json.decode(
            msgspec.json.decode(r.value, type=AddedChild).device, type=DeviceInfo
        ).node_id
        for r in added
    )
    assert set(keys) == sns
    assert max(keys.values()) == 1
    assert {a.sn for a in allocations} == sns
    # Repeated DPS calls only for what was in flight at a sink's kill.
    ok_calls = collections.Counter(c.sn for c in emulator.state.calls if c.code == 0)
    repeated = sum(n - 1 for n in ok_calls.values())
    assert repeated <= (CONCURRENCY + DETACHED) * workers.kills["sink"]
    # The oracle: every response routed, every child exactly one outcome.
    await audit_holds(cfg, children=events * CHILDREN)
    assert all(workers.changes[stage] >= 3 for stage in ("ingest", "route", "sink")), (
        workers.changes
    )
    print(  # noqa: T201  (the summary `make test-scale` shows)
        f"\nscale-out: {events * CHILDREN} children from {GATEWAYS} gateways, 6 partitions; "
        f"membership changes {dict(workers.changes)}, SIGKILLs {dict(workers.kills)}; "
        f"each child once downstream; {repeated} repeated DPS calls "
        f"(bound {CONCURRENCY + DETACHED} x {workers.kills['sink']} sink kills)"
    )
