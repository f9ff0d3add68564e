"""Helpers shared by the sink's tests against the real Kafka and the DPS emulator."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Self

import msgspec
import orjson
import pytest
from aiokafka import ConsumerRecord
from prometheus_client import REGISTRY

from pipeline.config import Config, KafkaConfig
from pipeline.dps.emulator import CallRecord, RunningEmulator
from pipeline.io import kafka
from pipeline.schemas import AddedChild, Allocation, PvsDevice

GATEWAY = "gw-e2e"
GROUP = "group-1"


def child(sn: str, *, device_id: str | None = None, event_id: str = "ev-1") -> bytes:
    """An ``iotda.subdevices.added`` value whose sn (node_id) is ``sn``."""
    device = {"node_id": sn, "device_id": device_id or f"prod_{sn}", "product_id": "prod"}
    return msgspec.json.encode(
        AddedChild(
            gateway_id=GATEWAY,
            event_id=event_id,
            event_time=None,
            event_time_raw=None,
            device=msgspec.Raw(orjson.dumps(device)),
        )
    )


def key_of(value: bytes) -> bytes:
    """The key the router gives an added child: its device_id."""
    return str(orjson.loads(value)["device"]["device_id"]).encode()


async def prepare(cfg: Config) -> None:
    await kafka.ensure_topics(cfg.kafka, cfg.kafka.topics.all())


async def produce(cfg: Config, items: Iterable[tuple[bytes | None, bytes | None]]) -> list[bytes]:
    """Produce ``(key, value)`` records to the added topic; returns each one's source header."""
    topic = cfg.kafka.topics.added
    async with kafka.producer(cfg.kafka) as producer:
        futures = [await producer.send(topic, value, key=key) for key, value in items]
        metas = await asyncio.gather(*futures)
    return [f"{topic}/{m.partition}/{m.offset}".encode() for m in metas]


async def produce_children(cfg: Config, values: list[bytes]) -> list[bytes]:
    return await produce(cfg, [(key_of(v), v) for v in values])


def with_emulator(
    cfg: Config, emu: RunningEmulator, *, timeout: float = 5.0, **sink: Any
) -> Config:
    """``cfg`` with the sink calling ``emu``; ``sink`` overrides ``[sink]`` keys (the
    defaults here retry sooner than the product's, to keep tests short)."""
    changes = {"concurrency": 32, "retry_initial": 0.2, "retry_max": 2.0} | sink
    s = cfg.sink
    dps = msgspec.structs.replace(s.dps, base_url=emu.url, timeout=timeout)
    return msgspec.structs.replace(cfg, sink=msgspec.structs.replace(s, dps=dps, **changes))


async def eventually(
    check: Callable[[], bool],
    what: Callable[[], str],
    *,
    timeout: float,
    task: asyncio.Task[None] | None = None,
    interval: float = 0.02,
) -> None:
    """Poll ``check`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if task is not None and task.done():
            task.result()  # raise what killed the worker
            pytest.fail(f"the worker stopped while waiting for {what()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what()}")
        await asyncio.sleep(interval)


class Tail:
    """Every record of a topic from the beginning, read incrementally while a test runs."""

    def __init__(self, cfg: KafkaConfig, topic: str) -> None:
        self._consumer = kafka.consumer(cfg, group_id=None)
        self._topic = topic
        self.records: list[ConsumerRecord[bytes, bytes]] = []

    async def __aenter__(self) -> Self:
        await self._consumer.start()
        tps = await kafka.partitions(self._consumer, self._topic)
        assert tps, f"topic {self._topic} does not exist"
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    async def until(
        self,
        check: Callable[[list[ConsumerRecord[bytes, bytes]]], bool],
        what: str,
        *,
        timeout: float,
        alive: Callable[[], Awaitable[None]] | None = None,
    ) -> list[ConsumerRecord[bytes, bytes]]:
        deadline = time.monotonic() + timeout
        while not check(self.records):
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout} s waiting for {what} ({self.summary()})")
            if alive is not None:
                await alive()
            batch = await self._consumer.getmany(timeout_ms=100)
            self.records.extend(r for rs in batch.values() for r in rs)
        return self.records

    def keys(self) -> set[bytes]:
        return {r.key for r in self.records}

    def summary(self) -> str:
        return f"{len(self.records)} records, {len(self.keys())} keys in {self._topic}"


def source_of(record: ConsumerRecord[bytes, bytes]) -> bytes:
    sources = [bytes(v) for k, v in record.headers or () if k == "source"]
    assert len(sources) == 1, f"expected one source header, got {record.headers}"
    return sources[0]


def allocations(records: list[ConsumerRecord[bytes, bytes]]) -> list[Allocation]:
    return [msgspec.json.decode(r.value, type=Allocation) for r in records]


def ok(call: CallRecord) -> bool:
    """An allocate call that succeeded (the log holds every operation: get, reset, ...)."""
    return call.action == "allocate" and call.http_status == 200 and call.code == 0


def allocate_calls(emu: RunningEmulator) -> list[CallRecord]:
    """The allocate calls of the emulator's log, in order."""
    return [c for c in emu.state.calls if c.action == "allocate"]


def ok_calls(emu: RunningEmulator) -> list[CallRecord]:
    return [c for c in emu.state.calls if ok(c)]


def at(call: CallRecord) -> float:
    return dt.datetime.fromisoformat(call.at).timestamp()


def check_allocation(
    cfg: Config, record: ConsumerRecord[bytes, bytes], sn: str, *, attempts: int | None = 1
) -> Allocation:
    """An allocation record of a child made by :func:`child`, checked field by field."""
    assert record.key == sn.encode()
    value = msgspec.json.decode(record.value, type=Allocation)
    assert (value.sn, value.org_id, value.device_id, value.gateway_id) == (
        sn,
        cfg.sink.org_id,
        f"prod_{sn}",
        GATEWAY,
    )
    if attempts is not None:
        assert value.attempts == attempts
    assert value.request_id
    assert value.allocated_at.endswith("Z")
    assert dt.datetime.fromisoformat(value.allocated_at).tzinfo is not None
    device = msgspec.json.decode(value.device, type=PvsDevice)
    assert (device.sn, device.org_id, device.group_id) == (sn, cfg.sink.org_id, GROUP)
    assert device.status is not None
    assert device.status.current_status == "allocated"
    return value


def opens() -> float:
    """How many times a sink's breaker opened in this process so far."""
    return REGISTRY.get_sample_value("pipeline_sink_breaker_opens_total") or 0.0
