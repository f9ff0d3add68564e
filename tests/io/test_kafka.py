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


async def test_window_finds_a_time_range_by_the_time_index(cfg: Config, uid: str) -> None:
    topic = f"window-{uid}"
    await kafka.ensure_topics(cfg.kafka, [topic], partitions=2)
    base = 1_700_000_000_000
    async with kafka.producer(cfg.kafka) as producer:
        for i in range(10):  # partition 0: timestamps base, base+1000, ...; partition 1: none
            await producer.send_and_wait(
                topic, b"%d" % i, partition=0, timestamp_ms=base + i * 1000
            )
    p0, p1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    async with kafka.reader(cfg.kafka) as reader:
        assert await kafka.window(reader, [p0, p1]) == {p0: (0, 10), p1: (0, 0)}
        assert await kafka.window(reader, [p0], base + 2500, base + 5000) == {p0: (3, 5)}
        assert await kafka.window(reader, [p0], base + 2000) == {p0: (2, 10)}
        assert await kafka.window(reader, [p0], None, base + 1) == {p0: (0, 1)}
        # Past the last record: an empty range at the end; an inverted window is empty.
        assert await kafka.window(reader, [p0], base + 99_000) == {p0: (10, 10)}
        assert await kafka.window(reader, [p0], base + 5000, base + 2000) == {p0: (5, 5)}
        got = [r.value async for r in kafka.read_range(reader, await kafka.window(
            reader, [p0, p1], base + 7000, base + 9000))]  # fmt: skip
        assert got == [b"7", b"8"]
        assert await kafka.window(reader, []) == {}


async def test_max_records_reads_a_time_window_in_slices(cfg: Config, uid: str) -> None:
    topic = f"slices-{uid}"
    await kafka.ensure_topics(cfg.kafka, [topic], partitions=2)
    async with kafka.producer(cfg.kafka) as producer:
        for i, at in enumerate((1_000, 2_000, 3_000, 4_000)):
            await producer.send_and_wait(topic, b"%d" % i, partition=0, timestamp_ms=at)
        await producer.send_and_wait(topic, b"old", partition=1, timestamp_ms=1_000)
    p0, p1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    async with kafka.reader(cfg.kafka) as reader:
        tps = await kafka.partitions(reader, topic)
        assert await kafka.window(reader, tps, 2_500) == {p0: (2, 4), p1: (1, 1)}
        assert await kafka.partitions(reader, f"none-{uid}") == []
        ranges = await kafka.window(reader, tps, 0)
        assert ranges == {p0: (0, 4), p1: (0, 1)}
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
            assert kafka.partition_of(key, n) == theirs(key, parts, parts)
    assert ours(None, [0, 1], [1]) == 1  # no key: any available partition
