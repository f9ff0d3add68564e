"""`read_range`, the one way to read a topic between two offsets, on a real broker."""

from __future__ import annotations

import contextlib
import random

import pytest
from aiokafka import TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from pipeline.config import Config
from pipeline.io import kafka
from pipeline.io.kafka.clients import _KeyPartitioner

pytestmark = pytest.mark.services


async def test_read_range_skips_markers_and_aborted_records(cfg: Config, uid: str) -> None:
    topic = f"range-{uid}"
    await kafka.ensure_topics(cfg.kafka, [topic], partitions=1)
    tp = TopicPartition(topic, 0)
    async with kafka.producer(cfg.kafka, transactional_id=f"tx-{uid}") as producer:
        for batch, commit in ((b"a", True), (b"b", False), (b"c", True)):
            await producer.begin_transaction()
            for i in range(3):
                await producer.send_and_wait(topic, batch + str(i).encode())
            if commit:
                await producer.commit_transaction()
            else:
                await producer.abort_transaction()
    async with kafka.reader(cfg.kafka) as reader:
        end = (await reader.end_offsets([tp]))[tp]
        assert end == 12  # 9 records and 3 markers
        everything = [r.value async for r in kafka.read_range(reader, {tp: (0, end)})]
        assert everything == [b"a0", b"a1", b"a2", b"c0", b"c1", b"c2"]
        # A range that ends inside a batch stops there; one that starts on an aborted
        # record or a marker finishes without waiting for a record that never comes.
        assert [r.value async for r in kafka.read_range(reader, {tp: (1, 3)})] == [b"a1", b"a2"]
        assert [r.value async for r in kafka.read_range(reader, {tp: (3, 8)})] == []
        assert [r.value async for r in kafka.read_range(reader, {tp: (5, 5)})] == []
        async with contextlib.aclosing(kafka.read_range(reader, {tp: (0, end)})) as records:
            first = await anext(records)
        assert first.value == b"a0"
        assert await kafka.whole(reader, topic) == {tp: (0, end)}


async def test_since_seeks_by_time_and_max_records_reads_in_slices(cfg: Config, uid: str) -> None:
    topic = f"since-{uid}"
    await kafka.ensure_topics(cfg.kafka, [topic], partitions=2)
    async with kafka.producer(cfg.kafka) as producer:
        for i, at in enumerate((1_000, 2_000, 3_000, 4_000)):
            await producer.send_and_wait(topic, b"%d" % i, partition=0, timestamp_ms=at)
        await producer.send_and_wait(topic, b"old", partition=1, timestamp_ms=1_000)
    p0, p1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    async with kafka.reader(cfg.kafka) as reader:
        assert await kafka.since(reader, 2_500, topic) == {p0: (2, 4), p1: (1, 1)}
        assert await kafka.since(reader, 0, topic) == {p0: (0, 4), p1: (0, 1)}
        assert await kafka.since(reader, 9_000, topic) == {p0: (4, 4), p1: (1, 1)}
        assert await kafka.since(reader, 0, f"none-{uid}") == {}
        ranges = await kafka.since(reader, 0, topic)
        sliced = [r.value async for r in kafka.read_range(reader, ranges, max_records=1)]
        assert sorted(sliced) == [b"0", b"1", b"2", b"3", b"old"]


def test_the_partitioner_agrees_with_aiokafkas() -> None:
    ours, theirs = _KeyPartitioner(), DefaultPartitioner()
    rng = random.Random(7)
    keys = [rng.randbytes(n) for n in range(40) for _ in range(25)]
    keys += [f"gw-{i}".encode() for i in range(100)] + ["網關-ü".encode()]
    for n in (1, 3, 6, 12):
        parts = list(range(n))
        for key in keys:
            assert ours(key, parts, parts) == theirs(key, parts, parts)
    assert ours(None, [0, 1], [1]) == 1  # no key: any available partition
