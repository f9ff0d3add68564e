"""Helpers for tests that run stages against the real brokers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

from aiokafka import ConsumerRecord

from pipeline import kafka
from pipeline.config import KafkaConfig
from pipeline.ops import Health


class Worker(Protocol):
    async def run(self, stop: asyncio.Event) -> None: ...


@contextlib.asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[asyncio.Task[None]]:
    """Run a stage in the background; stop it (as SIGTERM would) when the block ends."""
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def wait_ready(health: Health, check: str, task: asyncio.Task[None] | None = None) -> None:
    async with asyncio.timeout(30):
        while not health.report().get(check):
            if task is not None and task.done():
                task.result()  # raise what killed it
            await asyncio.sleep(0.02)


async def read_topic(
    cfg: KafkaConfig, topic: str, *, expect: int, settle: float = 1.0, timeout: float = 60
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every committed record of ``topic`` once ``expect`` have arrived and ``settle`` s passed
    without more (so an extra record would be seen and fail the exact count)."""
    consumer = kafka.consumer(cfg, group_id=None)
    records: list[ConsumerRecord[bytes, bytes]] = []
    async with consumer:
        tps = await kafka.partitions(consumer, topic)
        assert tps, f"topic {topic} does not exist"
        consumer.assign(tps)
        await consumer.seek_to_beginning()
        deadline = time.monotonic() + timeout
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            got = [r for rs in batch.values() for r in rs]
            if got:
                records.extend(got)
                quiet_since = time.monotonic()
            elif len(records) >= expect and time.monotonic() - quiet_since >= settle:
                break
    return records


def by_key(records: list[ConsumerRecord[bytes, bytes]]) -> list[tuple[Any, Any]]:
    return sorted((r.key, r.value) for r in records)
