"""The sink's parts on their own: the offset tracker and the breaker."""

from __future__ import annotations

import asyncio

from aiokafka import TopicPartition

from pipeline.stages.sink import Breaker, OffsetTracker


def test_offset_tracker_commits_only_contiguous_outcomes() -> None:
    t = OffsetTracker()
    p0, p1 = TopicPartition("t", 0), TopicPartition("t", 1)
    for offset in (5, 6, 7):
        t.start(p0, offset)
    t.start(p1, 0)
    t.done(p0, 7)
    assert t.take_commits() == {}  # 5 and 6 are still in flight
    t.done(p0, 5)
    assert t.take_commits() == {p0: 6}
    t.done(p0, 6)
    t.done(p1, 0)
    assert t.take_commits() == {p0: 8, p1: 1}
    assert t.take_commits() == {}
    assert t.in_flight() == 0
    t.start(p0, 8)
    t.forget([p0])
    t.done(p0, 8)  # revoked meanwhile: ignored
    assert t.take_commits() == {}


async def test_breaker_single_probe_while_open() -> None:
    changes: list[bool] = []
    breaker = Breaker(0.05, 0.1, changes.append)
    assert await breaker.acquire() is False  # closed: everyone goes
    breaker.release(False, failed=True)
    assert changes == [True]
    assert breaker.open
    probe = await breaker.acquire()
    assert probe is True
    waiter = asyncio.create_task(breaker.acquire())
    await asyncio.sleep(0.2)
    assert not waiter.done()  # only the probe may call while open
    breaker.release(probe, failed=False)
    assert await asyncio.wait_for(waiter, 1) is False
    assert changes == [True, False]
    assert not breaker.open
