"""Helpers for tests that run stages against the real brokers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

from aiokafka import ConsumerRecord

from pipeline import kafka
from pipeline.config import Config, KafkaConfig
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
        deadline = time.monotonic() + timeout
        # The stage under test creates its topics when it starts: wait for them.
        while not (tps := await kafka.partitions(consumer, topic)):
            assert time.monotonic() < deadline, f"topic {topic} does not exist"
            await asyncio.sleep(0.1)
        consumer.assign(tps)
        await consumer.seek_to_beginning()
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


def worker_env(cfg: Config, **extra: str) -> dict[str, str]:
    """Environment that gives a ``pipeline`` subprocess this test's configuration."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    t = cfg.kafka.topics
    values = {
        "MQTT__TOPIC": cfg.mqtt.topic,
        "MQTT__CLIENT_ID": cfg.mqtt.client_id,
        "MQTT__PORT": str(cfg.mqtt.port),
        "ROUTER__GROUP_ID": cfg.router.group_id,
        "ROUTER__TRANSACTIONAL_ID": cfg.router.transactional_id,
        "SINK__GROUP_ID": cfg.sink.group_id,
        "SINK__DPS__BASE_URL": cfg.sink.dps.base_url,
        "SINK__CONCURRENCY": str(cfg.sink.concurrency),
        "METRICS__ENABLED": "false",
        **{f"KAFKA__TOPICS__{name.upper()}": getattr(t, name) for name in t.__struct_fields__},
        **extra,
    }
    env.update({f"PIPELINE_{k}": v for k, v in values.items()})
    return env


async def spawn(command: str, cfg: Config, **extra: str) -> asyncio.subprocess.Process:
    """Start ``python -m pipeline COMMAND`` with this test's configuration."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pipeline",
        "--log-level",
        "warning",
        command,
        env=worker_env(cfg, **extra),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


async def kill(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL: no shutdown code runs."""
    proc.send_signal(signal.SIGKILL)
    await proc.wait()


async def terminate(proc: asyncio.subprocess.Process, limit: float = 60) -> int:
    """SIGTERM and wait; returns the exit code."""
    proc.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(proc.wait(), limit)
