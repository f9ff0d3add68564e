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

__all__ = ["Batcher", "Outbox"]


class _Open:
    """A partition's batch being filled, and who wants to hear about its records."""

    __slots__ = ("batch", "watchers")

    def __init__(self, batch: Any) -> None:
        self.batch = batch
        self.watchers: list[tuple[int, Callable[[Any, BaseException | None], None]]] = []


class Outbox:
    """The records of one transaction (or one flush) of ``producer``, in batches.

    Add records with :meth:`add`, then :meth:`flush`: it returns once Kafka has every
    batch, and raises the first batch's error otherwise (aiokafka would commit a
    transaction around a failed send: wait for this before committing).
    """

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer
        self._open: dict[tuple[str, int], _Open] = {}
        self._partitions: dict[str, list[int]] = {}
        self._sent: list[asyncio.Future[Any]] = []

    async def add(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes,
        partition: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        sent: Callable[[RecordMetadata | None, BaseException | None], None] | None = None,
    ) -> None:
        """Append one record (to ``partition``, or to its key's); ``sent`` hears Kafka's answer."""
        if partition is None:
            partitions = self._partitions.get(topic)
            if partitions is None:
                partitions = self._partitions[topic] = sorted(
                    await self._producer.partitions_for(topic)
                )
            partition = partitions[partition_of(key, len(partitions))]
        if headers is None:
            headers = []  # aiokafka's record builder takes a list only
        where = (topic, partition)
        pending = self._open.get(where)
        if pending is None:
            pending = self._open[where] = _Open(self._producer.create_batch())
        metadata = pending.batch.append(timestamp=None, key=key, value=value, headers=headers)
        if metadata is None:  # full: send it, and start the next one
            await self._send(where, pending)
            pending = self._open[where] = _Open(self._producer.create_batch())
            metadata = pending.batch.append(timestamp=None, key=key, value=value, headers=headers)
            if metadata is None:  # larger than a batch: aiokafka takes it alone
                msg = f"a record of {len(value)} bytes does not fit an empty batch for {topic}"
                raise ValueError(msg)
        if sent is not None:
            pending.watchers.append((metadata.offset, sent))

    async def _send(self, where: tuple[str, int], pending: _Open) -> None:
        del self._open[where]
        pending.batch.close()
        topic, partition = where
        future = await self._producer.send_batch(pending.batch, topic, partition=partition)
        if pending.watchers:
            future.add_done_callback(lambda f: _tell(f, TopicPartition(topic, partition), pending))
        self._sent.append(future)

    async def flush(self) -> None:
        """Send the open batches; return when Kafka has them all (raise the first failure)."""
        for where, pending in list(self._open.items()):
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


class _Gathering:
    """A partition's batch being filled by :class:`Batcher`, and a future per record in it."""

    __slots__ = ("batch", "waiting")

    def __init__(self, batch: Any) -> None:
        self.batch = batch
        self.waiting: list[tuple[int, asyncio.Future[RecordMetadata]]] = []


_ALONE = 16 * 1024
"""Bytes of a value above which :class:`Batcher` has the producer send the record alone:
aiokafka's batch size. Its ``send`` checks the record against ``max_request_size`` and
says by how much it is too large; an empty batch would take it, and Kafka refuse it
with a bare ``MessageSizeTooLargeError``."""


class Batcher:
    """Records sent one at a time by many tasks, each waiting for Kafka's acknowledgement.

    What ``send_and_wait`` does with ``linger_ms=0``, with less per record: a record is
    appended to its partition's open batch, which leaves at the end of the event loop's
    current turn if no batch of that partition is on the wire, else as soon as the one
    on the wire is acknowledged (so records sent meanwhile share the next batch, as
    aiokafka's own accumulator does). A full batch leaves at once. Records of one
    partition keep the order they were sent in. A record without a key, or larger than
    :data:`_ALONE`, goes through the producer's ``send_and_wait`` (whose errors, e.g.
    ``MessageSizeTooLargeError``, it raises as they are).
    """

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer
        self._open: dict[tuple[str, int], _Gathering] = {}
        self._on_wire: set[tuple[str, int]] = set()
        self._sending: set[asyncio.Task[None]] = set()

    async def send(
        self, topic: str, value: bytes, *, key: bytes | None, headers: list[tuple[str, bytes]]
    ) -> RecordMetadata:
        """Write one record; its metadata once Kafka has it (raises the batch's error)."""
        if key is None or len(value) > _ALONE:
            return await self._producer.send_and_wait(topic, value, key=key, headers=headers)
        partitions = sorted(await self._producer.partitions_for(topic))
        where = (topic, partitions[partition_of(key, len(partitions))])
        gathering = self._open.get(where)
        if gathering is None:
            gathering = self._gather(where)
        metadata = gathering.batch.append(timestamp=None, key=key, value=value, headers=headers)
        if metadata is None:  # full: it leaves now, and this record starts the next one
            self._send(where)
            gathering = self._gather(where)
            # An empty batch takes a record of any size.
            metadata = gathering.batch.append(timestamp=None, key=key, value=value, headers=headers)
        future: asyncio.Future[RecordMetadata] = asyncio.get_running_loop().create_future()
        gathering.waiting.append((metadata.offset, future))
        return await future

    def _gather(self, where: tuple[str, int]) -> _Gathering:
        """A new open batch for ``where``; it leaves this turn unless one is on the wire."""
        gathering = self._open[where] = _Gathering(self._producer.create_batch())
        if where not in self._on_wire:
            asyncio.get_running_loop().call_soon(self._leave, where, gathering)
        return gathering

    def _leave(self, where: tuple[str, int], gathering: _Gathering) -> None:
        """The end of the turn in which ``gathering`` was opened: send it, if still open."""
        if self._open.get(where) is gathering and where not in self._on_wire:
            self._send(where)

    def _send(self, where: tuple[str, int]) -> None:
        gathering = self._open.pop(where)
        if not gathering.waiting:
            return  # every record of it went to the producer alone
        self._on_wire.add(where)
        task = asyncio.create_task(self._deliver(where, gathering), name=f"kafka.batch {where}")
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _deliver(self, where: tuple[str, int], gathering: _Gathering) -> None:
        """Send one batch, tell its records, then let the next batch of ``where`` go."""
        topic, partition = where
        try:
            gathering.batch.close()
            sent = await self._producer.send_batch(gathering.batch, topic, partition=partition)
            batch: RecordMetadata = await sent
        except asyncio.CancelledError:  # the loop is closing: its senders are told so
            for _, future in gathering.waiting:
                future.cancel()
            raise
        except Exception as exc:  # each record's sender gets the error
            for _, future in gathering.waiting:
                if not future.done():
                    future.set_exception(exc)
        else:
            tp = TopicPartition(topic, partition)
            for offset, future in gathering.waiting:
                if not future.done():  # not cancelled
                    metadata = RecordMetadata(
                        topic, partition, tp, batch.offset + offset, batch.timestamp,
                        batch.timestamp_type, batch.log_start_offset,
                    )  # fmt: skip
                    future.set_result(metadata)
        finally:
            self._on_wire.discard(where)
            if where in self._open:
                self._send(where)

    async def close(self) -> None:
        """Wait for the batches on the wire (at a stop; every sender has had its answer)."""
        for where in list(self._open):
            self._send(where)
        while self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)
