"""The sink across rebalances: what is handed back, committed, read back, and when it fails."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka import TopicPartition

from pipeline.config import Config
from pipeline.dps.emulator import start_emulator
from pipeline.errors import StageFailed
from pipeline.io import kafka
from pipeline.ops.server import Health
from pipeline.stages.sink import Sink
from pipeline.stages.sink.outcomes import GROUP, SOURCE
from pipeline.stages.sink.recovery import Recovery
from tests.harness import read_topic, running
from tests.stages.sink.support import child, eventually, ok, prepare, produce, with_emulator

pytestmark = pytest.mark.services


def where(source: bytes) -> tuple[TopicPartition, int]:
    topic, partition, offset = source.decode().rsplit("/", 2)
    return TopicPartition(topic, int(partition)), int(offset)


async def test_records_fetched_before_a_hand_back_are_never_started(cfg: Config, uid: str) -> None:
    # The issue: _consume kept starting records of a partition hand_back() had dropped.
    # One record in progress at a time: the rest of the fetched batch waits for its slot
    # while the partition is handed back.
    sns = [f"{uid}-{i}" for i in range(4)]
    await prepare(cfg)
    async with await start_emulator(accept_any_sn=True) as emu:
        emu.state.set_faults({"latency_ms": 1500})
        cfg = with_emulator(cfg, emu, concurrency=1, max_pending=1)
        sources = await produce(cfg, [(b"one-partition", child(sn)) for sn in sns])
        tp, first = where(sources[0])
        sink = Sink(cfg, Health())
        async with running(sink) as task:
            await eventually(
                lambda: len(emu.state.calls) == 1,
                lambda: "the first record's call on the wire",
                timeout=30,
                task=task,
            )
            await sink.hand_back([tp])  # what a revocation runs
            assert sink._consumer is not None
            committed = await sink._consumer.committed(tp)
            # The slot is free and the batch's next records were reached: none may start.
            await asyncio.sleep(0.5)
            in_progress = sink._in_progress()
            calls = list(emu.state.calls)

    assert [(c.sn, ok(c)) for c in calls] == [(sns[0], True)]
    assert committed == first + 1  # the call on the wire finished and was committed
    assert in_progress == 0


async def test_a_failed_read_back_ends_the_stage_with_stage_failed(
    cfg: Config, uid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def unreadable(*_: object) -> None:
        msg = "outcome topic unreadable"
        raise RuntimeError(msg)

    monkeypatch.setattr(Recovery, "_first_uncommitted_time", unreadable)
    await prepare(cfg)
    async with await start_emulator(accept_any_sn=True) as emu:
        cfg = with_emulator(cfg, emu)
        await produce(cfg, [(f"k{i}".encode(), child(f"{uid}-{i}")) for i in range(3)])
        stop = asyncio.Event()
        with pytest.raises(StageFailed) as caught:
            await asyncio.wait_for(Sink(cfg, Health()).run(stop), 60)
        calls = list(emu.state.calls)
        committed = await kafka.backlog(cfg.kafka, cfg.sink.group_id, cfg.kafka.topics.added)

    assert (
        str(caught.value) == "sink stopped: a rebalance callback failed: outcome topic unreadable"
    )
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert calls == []  # no record started without the read-back
    assert committed == 3  # and nothing was committed


async def test_a_read_back_that_outlasts_its_limit_ends_the_stage(
    cfg: Config, uid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It runs in the assignment callback, while the consumer sends no heartbeats: past
    # the limit, the group would drop the member without a word.
    async def endless(*_: object) -> None:
        await asyncio.sleep(3600)

    monkeypatch.setattr(Recovery, "_first_uncommitted_time", endless)
    await prepare(cfg)
    async with await start_emulator(accept_any_sn=True) as emu:
        cfg = with_emulator(cfg, emu, timeout=0.5)  # the limit is twice the DPS timeout
        await produce(cfg, [(b"k", child(f"{uid}-0"))])
        with pytest.raises(StageFailed) as caught:
            await asyncio.wait_for(Sink(cfg, Health()).run(asyncio.Event()), 60)
        calls = list(emu.state.calls)
    assert str(caught.value) == (
        "sink stopped: a rebalance callback failed: "
        "reading back the recorded outcomes took longer than 1 s"
    )
    assert calls == []


@pytest.mark.slow
async def test_a_hand_back_longer_than_aiokafkas_default_rebalance_timeout_still_commits(
    cfg: Config, uid: str
) -> None:
    # The issue: a hand-back may wait 2 x dps.timeout while the consumer's rebalance
    # timeout defaulted to 10 s: the member was dropped and its commit refused.
    latency, timeout = 14.0, 15.0
    sn = f"{uid}-slow"
    await prepare(cfg)
    async with await start_emulator(accept_any_sn=True) as emu:
        emu.state.set_faults({"latency_ms": latency * 1000})
        cfg = with_emulator(cfg, emu, timeout=timeout)
        [source] = await produce(cfg, [(b"k", child(sn))])
        tp, offset = where(source)
        sink = Sink(cfg, Health())
        async with running(sink) as task:
            await eventually(
                lambda: len(emu.state.calls) == 1,
                lambda: "the call on the wire",
                timeout=30,
                task=task,
            )
            assert sink._consumer is not None
            # Room for a hand-back of 2 x 15 s, and 10 s for the commit that follows.
            assert sink._consumer._rebalance_timeout_ms == 40_000
            assert sink._consumer._session_timeout_ms == 40_000
            # Another member joins: the sink hands back while its call takes 14 s more.
            joined_at = time.monotonic()
            async with kafka.consumer(cfg.kafka, group_id=cfg.sink.group_id) as other:
                other.subscribe([cfg.kafka.topics.added])
                async with asyncio.timeout(90):
                    while not other.assignment():
                        await other.getmany(timeout_ms=200)
                rebalanced_after = time.monotonic() - joined_at
                committed = await other.committed(tp)
            got = await read_topic(cfg.kafka, cfg.kafka.topics.allocations, expect=1)
        calls = list(emu.state.calls)

    assert rebalanced_after > 10, "the hand-back did not outlast aiokafka's default timeout"
    assert committed == offset + 1  # yet its commit was accepted: the member was kept
    assert [(c.sn, ok(c)) for c in calls] == [(sn, True)]
    assert [r.key for r in got] == [sn.encode()]


async def test_read_back_keeps_only_the_assigned_partitions(cfg: Config, uid: str) -> None:
    # The issue: the read-back kept outcomes of partitions other replicas own, for good.
    await prepare(cfg)
    group = cfg.sink.group_id
    sources = await produce(cfg, [(f"k{i}".encode(), child(f"{uid}-{i}")) for i in range(12)])
    async with kafka.producer(cfg.kafka) as producer:
        for i, source in enumerate(sources):
            # Every record has an outcome; every third was recorded by another pipeline.
            owner = group if i % 3 else "another-pipeline"
            await producer.send_and_wait(
                cfg.kafka.topics.allocations,
                b"{}",
                key=b"sn",
                headers=[(SOURCE, source), (GROUP, owner.encode())],
            )
    places = [where(source) for source in sources]
    partitions = sorted({tp for tp, _ in places}, key=lambda tp: tp.partition)
    assert len(partitions) > 1, "all records landed in one partition: nothing to tell apart"
    mine, others = partitions[0], partitions[1:]
    expected = {off for i, (tp, off) in enumerate(places) if tp == mine and i % 3}
    recovery = Recovery(cfg.kafka, group, limit=30)
    async with kafka.consumer(cfg.kafka, group_id=group) as consumer:
        await recovery.learn(consumer, [mine])
    assert await recovery.ready()
    assert recovery.known() == len(expected) > 0
    assert not any(recovery.take(tp, off) for tp, off in places if tp in others)
    assert {off for tp, off in places if tp == mine and recovery.take(tp, off)} == expected
    assert recovery.known() == 0  # each taken once
    await _learn_again_then_forget(recovery, cfg, mine, len(expected))


async def _learn_again_then_forget(
    recovery: Recovery, cfg: Config, mine: TopicPartition, count: int
) -> None:
    async with kafka.consumer(cfg.kafka, group_id=cfg.sink.group_id) as consumer:
        await recovery.learn(consumer, [mine])
    assert recovery.known() == count
    recovery.forget([mine])  # revoked
    assert recovery.known() == 0
