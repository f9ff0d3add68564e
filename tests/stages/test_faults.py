"""Crashes lose nothing: SIGKILL of ingest and router mid-stream, redelivered events."""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import time
from typing import Any

import msgspec
import orjson
import pytest

from pipeline.config import Config
from pipeline.errors import StageFailed
from pipeline.io import kafka
from pipeline.ops.metrics import ROUTER_DUPLICATES, ROUTER_SKIPPED_CHILDREN
from pipeline.schemas import DownEventRecord
from pipeline.stages import runtime
from pipeline.stages.router import Router
from pipeline.tools.replay import FixtureMessage, replay_messages
from pipeline.tools.services import free_port
from tests.harness import (
    Records,
    add_response,
    arrived,
    audit_holds,
    caught_up,
    kill,
    read_topic,
    running,
    spawn,
    terminate,
    wait_readyz,
)

pytestmark = [pytest.mark.services, pytest.mark.slow]


def ids(records: Records) -> list[str]:
    return [
        json.loads(bytes(msgspec.json.decode(r.value, type=DownEventRecord).event))["services"][0][
            "event_id"
        ]
        for r in records
    ]


async def test_ingest_sigkill_mid_replay_loses_nothing(cfg: Config, uid: str) -> None:
    total = 5000
    port = free_port()
    env = {"METRICS__ENABLED": "true", "METRICS__INGEST_PORT": str(port)}
    messages = [
        FixtureMessage(
            topic=f"$oc/devices/gw-{i % 7}/sys/events/down",
            payload=orjson.dumps(add_response(f"ev-{uid}-{i}", [f"sn-{i}"])),
        )
        for i in range(total)
    ]
    first = await spawn("ingest", cfg, env=env)
    await wait_readyz(port, first)  # subscribed: the broker now keeps our messages
    publisher = asyncio.create_task(replay_messages(cfg.mqtt, messages, progress=False))
    async with asyncio.timeout(120):
        while await kafka.size(cfg.kafka, cfg.kafka.topics.down_events) < total // 4:
            await asyncio.sleep(0.02)
    await kill(first)
    landed_before_restart = await kafka.size(cfg.kafka, cfg.kafka.topics.down_events)
    assert landed_before_restart < total  # killed mid-stream, really
    await asyncio.sleep(1)  # the publisher goes on while ingest is dead
    second = await spawn("ingest", cfg, env=env)
    await wait_readyz(port, second)
    assert await publisher == total
    expected = {f"ev-{uid}-{i}" for i in range(total)}
    await arrived(
        cfg.kafka, cfg.kafka.topics.down_events, until=lambda got: set(ids(got)) == expected
    )
    assert await terminate(second) == 0
    records = await read_topic(cfg.kafka, cfg.kafka.topics.down_events)
    event_ids = collections.Counter(ids(records))
    assert set(event_ids) == expected
    # At least once: the messages in flight at the kill may land twice, never more.
    assert all(n <= 2 for n in event_ids.values())
    assert await kafka.size(cfg.kafka, cfg.kafka.topics.down_events_dlq) == 0


async def produce_events(
    cfg: Config, events: list[tuple[str, str, dict[str, object]]], *, at_ms: int | None = None
) -> None:
    """Down-event records, as ingest lands them; ``at_ms``: their timestamp (default now)."""
    await kafka.ensure_topics(cfg.kafka, cfg.kafka.topics.all())
    async with kafka.producer(cfg.kafka) as producer:
        for gateway, _, event in events:
            record = DownEventRecord(
                gateway_id=gateway,
                mqtt_topic=f"$oc/devices/{gateway}/sys/events/down",
                received_at="2026-11-22T06:30:00.000Z",
                event=msgspec.Raw(orjson.dumps(event)),
            )
            await producer.send(
                cfg.kafka.topics.down_events,
                msgspec.json.encode(record),
                key=gateway.encode(),
                timestamp_ms=at_ms,
            )
        await producer.flush()


async def test_router_sigkill_each_child_exactly_once(cfg: Config, uid: str) -> None:
    per_event, events_n = 5, 800
    events = [
        (
            f"gw-{i % 9}",
            f"ev-{i}",
            add_response(f"ev-{uid}-{i}", [f"{i}-{c}" for c in range(per_event)], [f"f{i}"]),
        )
        for i in range(events_n)
    ]
    await produce_events(cfg, events)
    cfg = msgspec.structs.replace(cfg, router=msgspec.structs.replace(cfg.router, batch_max=50))
    first = await spawn("route", cfg)
    async with asyncio.timeout(120):
        while await kafka.size(cfg.kafka, cfg.kafka.topics.added) < 1000:
            await asyncio.sleep(0.01)
    await kill(first)  # mid-transaction, most likely
    second = await spawn("route", cfg)
    expected = events_n * per_event
    await arrived(cfg.kafka, cfg.kafka.topics.added, expected)
    await arrived(cfg.kafka, cfg.kafka.topics.failed, events_n)
    assert await terminate(second) == 0
    added = await read_topic(cfg.kafka, cfg.kafka.topics.added)
    failed = await read_topic(cfg.kafka, cfg.kafka.topics.failed)
    keys = collections.Counter(r.key for r in added)
    assert set(keys) == {
        f"prod_{i}-{c}".encode() for i in range(events_n) for c in range(per_event)
    }
    assert max(keys.values()) == 1  # exactly once in the committed output
    assert len(added) == expected
    assert sorted(r.key for r in failed) == sorted(f"f{i}".encode() for i in range(events_n))
    # The oracle: every response routed whole (no sink ran: routing only).
    await audit_holds(cfg, only="routing", children=expected, events=events_n)


async def test_redelivered_events_yield_children_once_even_after_restart(
    cfg: Config, uid: str
) -> None:
    a = ("gw-1", "a", add_response(f"a-{uid}", ["a1", "a2", "a3"], ["af"]))
    b = ("gw-1", "b", add_response(f"b-{uid}", ["b1"]))
    same_id_other_gateway = ("gw-2", "a", add_response(f"a-{uid}", ["c1"]))
    t0 = int(time.time() * 1000)
    await produce_events(cfg, [a, a, b, same_id_other_gateway], at_ms=t0)
    async with running(Router(cfg)):
        added = await read_topic(cfg.kafka, cfg.kafka.topics.added, expect=5)
    assert sorted(r.key for r in added) == [
        b"prod_a1",
        b"prod_a2",
        b"prod_a3",
        b"prod_b1",
        b"prod_c1",
    ]
    # A late redelivery, read by a fresh router: the window is re-learned from the log.
    await produce_events(cfg, [a])
    async with running(Router(cfg)):
        await caught_up(cfg.kafka, cfg.router.group_id, cfg.kafka.topics.down_events)
    added = await read_topic(cfg.kafka, cfg.kafka.topics.added)
    assert len(added) == 5
    failed = await read_topic(cfg.kafka, cfg.kafka.topics.failed, expect=1)
    assert [r.key for r in failed] == [b"af"]
    # Outside the (gateway, event_id) window the response is new again, but its child is
    # not: the router remembers each child's state, and an added child is not added again.
    short = msgspec.structs.replace(
        cfg, router=msgspec.structs.replace(cfg.router, dedup_window=0.5)
    )
    # The window is measured on record timestamps: one repeat inside it, one after it.
    await produce_events(cfg, [b], at_ms=t0 + 100)
    await produce_events(cfg, [b], at_ms=t0 + 2000)
    events_before = ROUTER_DUPLICATES._value.get()
    children_before = ROUTER_SKIPPED_CHILDREN.labels("duplicate")._value.get()
    async with running(Router(short)):
        await caught_up(cfg.kafka, cfg.router.group_id, cfg.kafka.topics.down_events)
    added = await read_topic(cfg.kafka, cfg.kafka.topics.added)
    assert sorted(r.key for r in added).count(b"prod_b1") == 1
    assert len(added) == 5
    # The first caught by the (gateway, event_id) window, the second (past it) by the
    # child's state.
    assert ROUTER_DUPLICATES._value.get() == events_before + 1
    assert ROUTER_SKIPPED_CHILDREN.labels("duplicate")._value.get() == children_before + 1


async def test_sigterm_router_commits_and_exits_zero(cfg: Config, uid: str) -> None:
    await produce_events(cfg, [("gw-1", "x", add_response(f"x-{uid}", ["x1", "x2"]))])
    proc = await spawn("route", cfg)
    await read_topic(cfg.kafka, cfg.kafka.topics.added, expect=2)
    assert await terminate(proc) == 0
    assert await kafka.backlog(cfg.kafka, cfg.router.group_id, cfg.kafka.topics.down_events) == 0


async def test_a_stalled_router_cannot_commit_for_partitions_it_lost(
    cfg: Config, uid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No KIP-447 in aiokafka: a router the group gave up on (it stopped polling inside a
    transaction) must not write the partitions' children again when it wakes."""
    events = [
        (
            f"gw-{i % 6}",
            f"ev-{uid}-{i}",
            add_response(f"ev-{uid}-{i}", [f"{uid}-{i}-a", f"{uid}-{i}-b"]),
        )
        for i in range(60)
    ]
    await produce_events(cfg, events)
    stalled, resume = asyncio.Event(), asyncio.Event()
    stale = Router(cfg)
    route_one = Router._route_one

    async def stalling(self: Router, *args: Any) -> None:
        if self is stale and not resume.is_set():
            stalled.set()
            await resume.wait()
        await route_one(self, *args)

    monkeypatch.setattr(Router, "_route_one", stalling)
    real_consumer = kafka.consumer
    # The stale router's consumer leaves the group after 3 s without polling.
    monkeypatch.setattr(
        kafka, "consumer", functools.partial(real_consumer, max_poll_interval_ms=3000)
    )
    stale_run = asyncio.create_task(runtime.run(stale, asyncio.Event()))
    async with asyncio.timeout(60):
        await stalled.wait()  # inside its transactions, with the batch in hand
    monkeypatch.setattr(kafka, "consumer", real_consumer)
    async with running(Router(cfg)):
        added = await read_topic(cfg.kafka, cfg.kafka.topics.added, expect=120)
        resume.set()  # the stale one wakes and tries to commit what it held
        with pytest.raises(StageFailed, match="another router took over a partition"):
            await asyncio.wait_for(stale_run, 60)
        added = await read_topic(cfg.kafka, cfg.kafka.topics.added, expect=120)
    counts = collections.Counter(r.key for r in added)
    assert len(counts) == 120
    assert set(counts.values()) == {1}  # each child exactly once


async def test_a_router_stopped_during_its_assignment_leaves_no_producer_open(
    cfg: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-partition producers an assignment starts are stopped even when the stage
    stops while that assignment is under way: they are released after the consumer closes
    (no callback runs after that), not when the work ends."""
    stop = asyncio.Event()
    router = Router(cfg)
    assigning = Router._assigned

    async def assigned(self: Router, tps: list[Any]) -> None:
        stop.set()  # the work ends now, while the producers are being started
        await asyncio.sleep(0.5)
        await assigning(self, tps)

    monkeypatch.setattr(Router, "_assigned", assigned)
    await asyncio.wait_for(runtime.run(router, stop), 60)
    assert router._producers == {}
