"""The sink across rebalances: what is handed back, committed, read back, and when it fails."""

from __future__ import annotations

import asyncio
import collections
import inspect
import time

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor

from pipeline.config import Config
from pipeline.dps.emulator import start_emulator
from pipeline.errors import StageFailed
from pipeline.io import kafka
from pipeline.stages import runtime
from pipeline.stages.sink import Sink
from pipeline.stages.sink.outcomes import GROUP, SOURCE
from pipeline.stages.sink.recovery import Recovery
from tests.harness import read_topic, running
from tests.stages.sink.support import (
    child,
    eventually,
    ok,
    ok_calls,
    prepare,
    produce,
    with_emulator,
)

pytestmark = pytest.mark.services


def where(source: bytes) -> tuple[TopicPartition, int]:
    topic, partition, offset = source.decode().rsplit("/", 2)
    return TopicPartition(topic, int(partition)), int(offset)


async def test_records_fetched_before_a_hand_back_are_never_started(cfg: Config, uid: str) -> None:
    # Records of a partition that hand_back() dropped must not be started afterwards, even
    # those fetched before it.
    # One record in progress at a time: the rest of the fetched batch waits for its slot
    # while the partition is handed back.
    sns = [f"{uid}-{i}" for i in range(4)]
    await prepare(cfg)
    async with await start_emulator(accept_any_sn=True) as emu:
        emu.state.set_faults({"latency_ms": 1500})
        cfg = with_emulator(cfg, emu, concurrency=1, max_pending=1)
        sources = await produce(cfg, [(b"one-partition", child(sn)) for sn in sns])
        tp, first = where(sources[0])
        sink = Sink(cfg)
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


# A CancelledError nobody asked for, as aiokafka raises from a reader stopped before it
# ever waited: the read-back's partitions would have waited for good, without a word.
@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (RuntimeError("outcome topic unreadable"), "outcome topic unreadable"),
        (asyncio.CancelledError(), "cancelled from within"),
    ],
    ids=["error", "stray-cancellation"],
)
async def test_a_failed_read_back_ends_the_stage_with_stage_failed(
    cfg: Config, uid: str, monkeypatch: pytest.MonkeyPatch, error: BaseException, reason: str
) -> None:
    async def unreadable(*_: object) -> None:
        raise error

    monkeypatch.setattr(Recovery, "_first_uncommitted_time", unreadable)
    await prepare(cfg)
    async with await start_emulator(accept_any_sn=True) as emu:
        cfg = with_emulator(cfg, emu)
        await produce(cfg, [(f"k{i}".encode(), child(f"{uid}-{i}")) for i in range(3)])
        stop = asyncio.Event()
        with pytest.raises(StageFailed) as caught:
            await asyncio.wait_for(runtime.run(Sink(cfg), stop), 60)
        calls = list(emu.state.calls)
        committed = await kafka.backlog(cfg.kafka, cfg.sink.group_id, cfg.kafka.topics.added)

    assert str(caught.value) == f"sink stopped: reading back the recorded outcomes failed: {reason}"
    assert caught.value.__cause__ is error
    assert calls == []  # no record started without the read-back
    assert committed == 3  # and nothing was committed


async def test_a_read_back_that_outlasts_its_limit_ends_the_stage(
    cfg: Config, uid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The read-back runs beside the consumer, which goes on heartbeating; one that never
    # ends would leave its partitions unserved, their records waiting, without a word.
    async def endless(*_: object) -> None:
        await asyncio.sleep(3600)

    monkeypatch.setattr(Recovery, "_first_uncommitted_time", endless)
    await prepare(cfg)
    async with await start_emulator(accept_any_sn=True) as emu:
        cfg = with_emulator(cfg, emu, timeout=0.5)  # the limit is twice the DPS timeout
        await produce(cfg, [(b"k", child(f"{uid}-0"))])
        with pytest.raises(StageFailed) as caught:
            await asyncio.wait_for(runtime.run(Sink(cfg), asyncio.Event()), 60)
        calls = list(emu.state.calls)
    assert str(caught.value) == (
        "sink stopped: reading back the recorded outcomes took longer than 1 s"
    )
    assert isinstance(caught.value.__cause__, TimeoutError)
    assert calls == []


async def test_the_read_back_runs_after_the_assignment_callback_and_a_revocation_ends_it(
    cfg: Config, uid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The assignment callback returns while the read-back is still held; the records of
    # its partitions are fetched and wait for it. A revocation then ends the read-back:
    # none of them starts, and the partitions still owned are read back again.
    real = Recovery._first_uncommitted_time
    held, released = asyncio.Event(), asyncio.Event()
    reads: list[list[TopicPartition]] = []

    async def held_once(
        self: Recovery, consumer: AIOKafkaConsumer, assigned: list[TopicPartition]
    ) -> int | None:
        reads.append(sorted(assigned))
        if len(reads) == 1:
            held.set()
            try:
                await asyncio.Event().wait()  # until cancelled
            finally:
                released.set()
        return await real(self, consumer, assigned)

    monkeypatch.setattr(Recovery, "_first_uncommitted_time", held_once)
    sns = [f"{uid}-{i}" for i in range(3)]
    await prepare(cfg)
    async with await start_emulator(accept_any_sn=True) as emu:
        cfg = with_emulator(cfg, emu)
        sources = await produce(cfg, [(b"one-partition", child(sn)) for sn in sns])
        tp, first = where(sources[0])
        sink = Sink(cfg)
        assigned = asyncio.Event()
        recover = sink.recover

        async def recover_then_say(tps: list[TopicPartition]) -> None:
            await recover(tps)  # what the assignment callback runs
            assigned.set()

        monkeypatch.setattr(sink, "recover", recover_then_say)
        async with running(sink) as task:
            await eventually(
                lambda: assigned.is_set() and held.is_set() and sink._in_progress() == 3,
                lambda: "the callback returned, the read-back held, the records fetched",
                timeout=30,
                task=task,
            )
            assert not released.is_set()
            assert emu.state.calls == []  # the records wait for their read-back
            partitions = set(reads[0])
            await sink.hand_back([tp])  # what a revocation runs
            assert released.is_set()  # the read-back was cancelled
            assert sink._in_progress() == 0  # its records were handed back, none started
            await eventually(
                lambda: not sink._read_backs,
                lambda: "the other partitions read back again",
                timeout=30,
                task=task,
            )
            assert sorted(partitions - {tp}) == reads[1]
            assert emu.state.calls == []
            # The partition comes back: read back again, its records are allocated.
            await sink.recover([tp])
            assert sink._consumer is not None
            sink._consumer.seek(tp, first)
            await eventually(
                lambda: len(ok_calls(emu)) == len(sns),
                lambda: f"{len(sns)} allocations (got {len(ok_calls(emu))})",
                timeout=30,
                task=task,
            )
        calls = list(emu.state.calls)
        backlog = await kafka.backlog(cfg.kafka, cfg.sink.group_id, cfg.kafka.topics.added)

    assert reads[2] == [tp]
    assert collections.Counter(c.sn for c in calls) == dict.fromkeys(sns, 1)
    assert all(ok(c) for c in calls)
    assert backlog == 0  # and committed


def default(name: str) -> int:
    """aiokafka's default for ``AIOKafkaConsumer(name=...)``."""
    value = inspect.signature(AIOKafkaConsumer).parameters[name].default
    assert isinstance(value, int)
    return value


@pytest.mark.slow
async def test_a_hand_back_longer_than_aiokafkas_default_timeouts_still_commits(
    cfg: Config, uid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A hand-back may wait 2 x dps.timeout. The group waits for the member that far (its
    # rebalance timeout), and aiokafka heartbeats through the revocation callback, so it
    # may outlast the session timeout too (aiokafka's default, 10 s): the member is kept
    # and its commit accepted. It must outlast 10 s to show that, and no more.
    latency, timeout = 14.5, 16.0
    session_timeout_ms = default("session_timeout_ms")
    assert session_timeout_ms == 10_000
    await prepare(cfg)
    async with await start_emulator(accept_any_sn=True) as emu:
        cfg = with_emulator(cfg, emu, timeout=timeout)
        sink = Sink(cfg)
        hand_back = sink.hand_back
        hand_backs: list[float] = []

        async def timed_hand_back(tps: list[TopicPartition]) -> None:
            started = time.monotonic()
            await hand_back(tps)
            hand_backs.append(time.monotonic() - started)

        monkeypatch.setattr(sink, "hand_back", timed_hand_back)
        async with running(sink) as task:
            # A first record, answered at once, brings the sink its DPS token (the
            # emulator's latency would delay the token as well).
            await produce(cfg, [(b"k", child(f"{uid}-first"))])
            await eventually(
                lambda: len(ok_calls(emu)) == 1, lambda: "the first allocation", timeout=30,
                task=task,
            )  # fmt: skip
            emu.state.set_faults({"latency_ms": latency * 1000})
            sn = f"{uid}-slow"
            [source] = await produce(cfg, [(b"k", child(sn))])
            tp, offset = where(source)
            await eventually(
                lambda: len(emu.state.calls) == 2,
                lambda: "the call on the wire",
                timeout=30,
                task=task,
            )
            assert sink._consumer is not None
            # Room for a hand-back of 2 x 16 s, and 10 s for the commit that follows;
            # the session timeout and heartbeat interval are aiokafka's defaults.
            assert sink._consumer._rebalance_timeout_ms == 42_000
            assert sink._consumer._session_timeout_ms == session_timeout_ms
            assert sink._consumer._heartbeat_interval_ms == default("heartbeat_interval_ms")
            # Another member joins: the sink hands back while its call takes 14.5 s more.
            hand_backs.clear()
            joined_at = time.monotonic()
            async with kafka.consumer(
                cfg.kafka,
                group_id=cfg.sink.group_id,
                partition_assignment_strategy=(RangePartitionAssignor,),  # as the sink's
            ) as other:
                other.subscribe([cfg.kafka.topics.added, cfg.kafka.topics.deleted])
                async with asyncio.timeout(90):
                    while not other.assignment():
                        await other.getmany(timeout_ms=200)
                rebalanced_after = time.monotonic() - joined_at
                committed = await other.committed(tp)
            got = await read_topic(cfg.kafka, cfg.kafka.topics.allocations, expect=2)
        calls = list(emu.state.calls)

    print(f"hand-back {hand_backs[0]:.1f} s, rebalance {rebalanced_after:.1f} s")  # noqa: T201
    assert rebalanced_after > 10, "the rebalance did not outlast aiokafka's default timeout"
    assert hand_backs[0] > session_timeout_ms / 1000, "the hand-back was shorter than a session"
    assert committed == offset + 1  # yet its commit was accepted: the member was kept
    assert [(c.sn, ok(c)) for c in calls] == [(f"{uid}-first", True), (sn, True)]
    assert sorted(r.key for r in got) == sorted([f"{uid}-first".encode(), sn.encode()])


async def test_read_back_keeps_only_the_assigned_partitions(cfg: Config, uid: str) -> None:
    # A replica keeps read-back outcomes only for its own partitions: those of partitions
    # other replicas own would never be released.
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
    assert await recovery.ready(mine)
    assert not any([await recovery.ready(tp) for tp in others])  # never read back here
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
