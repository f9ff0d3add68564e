"""Many records written at once: appended to one batch per partition, not sent one by one.

aiokafka's ``send`` costs a coroutine, a metadata check, the partitioner and a future per
record, and a callback per record when Kafka answers; for a producer that writes
thousands of records a transaction (the router: three a child) that was most of its CPU.
:class:`Outbox` appends them to aiokafka's own batches (``create_batch``, ``send_batch``:
its public batch API), one open batch per partition, and waits for the batches instead.
The partition of a keyed record is the one every pipeline producer gives it
(:func:`~pipeline.io.kafka.clients.partition_of`), and records of one partition keep the
order they were added in.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from aiokafka.structs import RecordMetadata, TopicPartition

from pipeline.io.kafka.clients import partition_of

if TYPE_CHECKING:
    from collections.abc import Callable

    from aiokafka import AIOKafkaProducer

__all__ = ["Outbox"]


class _Open:
    """A partition's batch being filled, and who wants to hear about its records."""

    __slots__ = ("batch", "watchers")

    def __init__(self, batch: Any) -> None:
        self.batch = batch
        self.watchers: list[tuple[int, Callable[[Any, BaseException | None], None]]] = []


class Outbox:
    """The records of one transaction (or one flush) of ``producer``, in batches.

    Name the topics with :meth:`open` first (it learns their partitions), add records with
    :meth:`add` (no coroutine: it only appends), send the batches it filled with
    :meth:`send_full` whenever :attr:`full` says so, then :meth:`flush`: it returns once
    Kafka has every batch, and raises the first batch's error otherwise (aiokafka would
    commit a transaction around a failed send: wait for this before committing).
    """

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer
        self._open: dict[tuple[str, int], _Open] = {}
        self._partitions: dict[str, list[int]] = {}
        self._full: list[tuple[tuple[str, int], _Open]] = []
        self._sent: list[asyncio.Future[Any]] = []
        self._last: tuple[bytes, int, int] = (b"", 0, 0)
        """(key, partition count, partition) of the last keyed record: a child's records
        share a key, so its partition is computed once."""

    async def open(self, *topics: str) -> None:
        """Learn the partitions of ``topics``, the topics :meth:`add` takes."""
        for topic in topics:
            if topic not in self._partitions:
                self._partitions[topic] = sorted(await self._producer.partitions_for(topic))

    @property
    def full(self) -> bool:
        """Batches are full: :meth:`send_full` before adding many more."""
        return bool(self._full)

    def add(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes,
        partition: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        sent: Callable[[RecordMetadata | None, BaseException | None], None] | None = None,
    ) -> None:
        """Append one record (to ``partition``, or to its key's); ``sent`` hears Kafka's answer.

        Raises:
            KeyError: ``topic`` was not given to :meth:`open`.
        """
        if partition is None:
            partitions = self._partitions[topic]
            count = len(partitions)
            last_key, last_count, last = self._last
            if key is last_key and count == last_count:
                partition = last
            else:
                partition = partitions[partition_of(key, count)]
                self._last = (key, count, partition)
        if headers is None:
            headers = []  # aiokafka's record builder takes a list only
        where = (topic, partition)
        pending = self._open.get(where)
        if pending is None:
            pending = self._open[where] = _Open(self._producer.create_batch())
        metadata = pending.batch.append(timestamp=None, key=key, value=value, headers=headers)
        if metadata is None:  # full: to be sent, and the next one started
            self._full.append((where, pending))
            pending = self._open[where] = _Open(self._producer.create_batch())
            metadata = pending.batch.append(timestamp=None, key=key, value=value, headers=headers)
            if metadata is None:  # larger than a batch: aiokafka takes it alone
                msg = f"a record of {len(value)} bytes does not fit an empty batch for {topic}"
                raise ValueError(msg)
        if sent is not None:
            pending.watchers.append((metadata.offset, sent))

    async def send_full(self) -> None:
        """Send the batches :meth:`add` filled (aiokafka may wait for a partition's last)."""
        full, self._full = self._full, []
        for where, pending in full:
            await self._send(where, pending)

    async def _send(self, where: tuple[str, int], pending: _Open) -> None:
        pending.batch.close()
        topic, partition = where
        future = await self._producer.send_batch(pending.batch, topic, partition=partition)
        if pending.watchers:
            future.add_done_callback(lambda f: _tell(f, TopicPartition(topic, partition), pending))
        self._sent.append(future)

    async def flush(self) -> None:
        """Send every batch; return when Kafka has them all (raise the first failure)."""
        await self.send_full()
        opened, self._open = self._open, {}
        for where, pending in opened.items():
            await self._send(where, pending)
        await self.wait()

    async def wait(self) -> None:
        """Wait for the batches sent so far (raise the first failure); the open ones stay."""
        sent, self._sent = self._sent, []
        await asyncio.gather(*sent)


def _tell(future: asyncio.Future[Any], tp: TopicPartition, pending: _Open) -> None:
    """Each watched record of a batch: its own metadata (the batch's offset + its own)."""
    if future.cancelled():
        for _, sent in pending.watchers:
            sent(None, asyncio.CancelledError())
        return
    error = future.exception()
    if error is not None:
        for _, sent in pending.watchers:
            sent(None, error)
        return
    batch = future.result()
    for offset, sent in pending.watchers:
        sent(
            RecordMetadata(
                tp.topic, tp.partition, tp, batch.offset + offset, batch.timestamp,
                batch.timestamp_type, batch.log_start_offset,
            ),
            None,
        )  # fmt: skip
