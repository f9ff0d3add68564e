"""What every measurement needs: its own topics and MQTT session, a backlog, and a clock.

Throughput is read from the outputs themselves. The bench creates every topic a
measurement writes with ``message.timestamp.type=LogAppendTime``, so each record carries
the time the broker appended it; a measurement's rate is ``(n - k) / (last - first)``
over its n output records, k of them appended at the first time (:func:`rate`). That
clock is the same for a stage and its ceiling, ignores process start-up and group joins
(which are not throughput), and needs no cooperation from the process measured.
Ceilings without a Kafka output (the MQTT drain, the HTTP loop) report the times of
their first and last completions themselves.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from aiokafka.admin import NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code

from benchmarks.procs import BenchError
from pipeline.io import kafka, mqtt

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

    from pipeline.config import Config, KafkaConfig, MqttConfig

__all__ = [
    "LOG_APPEND_TIME",
    "RESOLUTION",
    "Incomplete",
    "Output",
    "at_first",
    "close_session",
    "create_topics",
    "elapsed",
    "open_session",
    "output_rate",
    "preload",
    "rate",
]

LOG_APPEND_TIME = 1
"""``ConsumerRecord.timestamp_type`` of a broker-stamped record."""

_POLL = 0.2


class Incomplete(BenchError):
    """Fewer records arrived than expected within the time allowed."""


RESOLUTION = 1e-3
"""Broker timestamps have millisecond resolution: a shorter span reads as this long."""


def elapsed(first: float, last: float) -> float:
    """Seconds from the first to the last completion, at least :data:`RESOLUTION`.

    The router may land a small round in one batch, every record with one append time.
    """
    return max(last - first, RESOLUTION)


def rate(count: int, first: float, last: float, *, at_first: int = 1) -> float:
    """Units per second after the first of ``count`` completions, up to the last (seconds).

    ``at_first``: completions at the first time, all of which are before the span: a
    stage that writes in batches (the router's are 256 KiB) lands its first batch in one
    instant, after the work of all of it, so counting it in would credit that work to a
    span that does not hold it (18 % on the router's default round before this).
    """
    return max(count - at_first, 1) / elapsed(first, last)


def output_rate(records: list[ConsumerRecord[bytes, bytes]]) -> float:
    """The rate of a measurement's broker-stamped output ``records`` (see :func:`rate`)."""
    return rate(len(records), *span(records), at_first=at_first(records))


def at_first(records: list[ConsumerRecord[bytes, bytes]]) -> int:
    """How many of ``records`` have the earliest broker append time (for :func:`rate`)."""
    first = min(r.timestamp for r in records)
    return sum(1 for r in records if r.timestamp == first)


async def create_topics(cfg: KafkaConfig, names: Iterable[str]) -> None:
    """Create ``names`` with broker append times (and the pipeline's record size limit)."""
    configs = {
        "message.timestamp.type": "LogAppendTime",
        "max.message.bytes": str(cfg.max_record_size),
    }
    client = kafka.admin(cfg)
    await client.start()
    try:
        wanted = list(dict.fromkeys(names))
        response = await client.create_topics(
            [
                NewTopic(n, cfg.partitions, cfg.replication_factor, topic_configs=configs)
                for n in wanted
            ]
        )
        for name, code, *_ in response.topic_errors:
            if code not in (0, TopicAlreadyExistsError.errno):
                msg = f"creating topic {name} failed: {for_code(code).message}"
                raise BenchError(msg)
        async with asyncio.timeout(30):
            while not set(wanted) <= set(await client.list_topics()):  # noqa: ASYNC110
                await asyncio.sleep(0.1)
    finally:
        await client.close()


async def preload(cfg: KafkaConfig, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    """Write ``records`` (key, value) to ``topic`` and wait for Kafka to have them all."""
    async with kafka.producer(cfg) as producer:
        for key, value in records:
            await producer.send(topic, value, key=key)
        await producer.flush()


async def open_session(cfg: MqttConfig) -> None:
    """Create the persistent session of ``cfg.client_id``, subscribed, then leave.

    The broker queues what is published from then on; the measured process, connecting
    with the same client id, resumes the session and receives it as a backlog.
    """
    async with mqtt.connect(cfg) as client:
        await mqtt.subscribe(client, cfg, mqtt.subscription_topic(cfg))


async def close_session(cfg: MqttConfig) -> None:
    """Discard the session of ``cfg.client_id`` (clean start, no expiry) and what it holds."""
    async with mqtt.connect(cfg, persistent=False):
        pass


class Output:
    """The records a measurement writes to ``topic``, from the offsets it had at creation.

    Use :meth:`start` before the measured process starts, then :meth:`wait`.
    """

    def __init__(self, cfg: Config, topic: str) -> None:
        self._cfg = cfg.kafka
        self.topic = topic
        self._begin: dict[TopicPartition, int] = {}

    async def start(self) -> None:
        """Note where the topic ends now: what comes after is the measurement's."""
        async with kafka.reader(self._cfg) as reader:
            tps = await kafka.partitions(reader, self.topic)
            self._begin = dict(await reader.end_offsets(tps))

    async def first(self, alive: Callable[[], None], poll: float = 0.02) -> None:
        """Until the first record (or transaction marker) arrives, on one connection."""
        async with kafka.reader(self._cfg) as reader:
            while not await self._count(reader):
                alive()
                await asyncio.sleep(poll)

    async def ends(self) -> dict[TopicPartition, int]:
        """Where the topic ends now, per partition."""
        async with kafka.reader(self._cfg) as reader:
            return dict(await reader.end_offsets(list(self._begin)))

    async def count(self) -> int:
        """Offsets written since :meth:`start` (records, plus markers if transactional)."""
        async with kafka.reader(self._cfg) as reader:
            return await self._count(reader)

    async def _count(self, reader: AIOKafkaConsumer) -> int:
        ends = await reader.end_offsets(list(self._begin))
        return int(sum(ends[tp] - begin for tp, begin in self._begin.items()))

    async def wait(
        self, n: int, *, limit: float, alive: Callable[[], None] | None = None
    ) -> list[ConsumerRecord[bytes, bytes]]:
        """Until ``n`` committed records have arrived; returns them (read after the fact).

        Args:
            n: records expected.
            limit: seconds to wait at most.
            alive: raises if the process producing them died (checked on every poll).

        Raises:
            Incomplete: fewer than ``n`` records within ``limit``.
            BenchError: ``alive`` raised.
        """
        deadline = time.monotonic() + limit
        records: list[ConsumerRecord[bytes, bytes]] = []
        async with kafka.reader(self._cfg) as reader:
            while True:
                if alive is not None:
                    alive()
                # Offsets first (cheap); read the records once there can be enough.
                if await self._count(reader) >= n:
                    ends = await reader.end_offsets(list(self._begin))
                    ranges = {tp: (begin, ends[tp]) for tp, begin in self._begin.items()}
                    records = [r async for r in kafka.read_range(reader, ranges)]
                    if len(records) >= n:
                        return records
                if time.monotonic() > deadline:
                    got = len(records) or await self._count(reader)
                    msg = f"{self.topic}: {got} of {n} records after {limit:g} s"
                    raise Incomplete(msg)
                await asyncio.sleep(_POLL)


def span(records: list[ConsumerRecord[bytes, bytes]]) -> tuple[float, float]:
    """First and last broker append time of ``records``, in seconds."""
    stamps = [r.timestamp for r in records]
    if any(r.timestamp_type != LOG_APPEND_TIME for r in records):
        msg = "output records are not broker-stamped (LogAppendTime): the topic predates the run"
        raise BenchError(msg)
    return min(stamps) / 1000, max(stamps) / 1000
