"""Each child's latest generation, and one operation at a time per child.

The router numbers a child's adds and deletes (``generation``, in its gateway's order)
and writes each with a :class:`~pipeline.schemas.ChildState` to the compacted
``iotda.subdevices.lifecycle`` topic, in the same transaction. ``added``, ``deleted`` and
``lifecycle`` have the same partition count and key (the child's device_id), so
partition p of each holds the same children, and the sink (range assignment) owns
``added`` p and ``deleted`` p together.

- On assignment of p, before any record of p starts (the read-back's gate,
  :class:`~.recovery.Recovery`), ``lifecycle`` p is read from its beginning to its end:
  the latest generation of each of its children, as committed by then.
- Every add or delete the sink starts raises its child's latest generation to its own.
- Operations on one child run one at a time (a per-child lock, first come first
  served). When its turn comes, an operation whose generation is below the child's
  latest is superseded: a later add or delete exists, so its DPS call is not made.
  Since every operation raised the latest when it started, the ones that do run run
  in generation order, and DPS ends as the latest generation says.
- Generation 0 (written before the router tracked lifecycles) is superseded only by a
  known generation above it, never by an absent entry.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from typing import TYPE_CHECKING

import msgspec

from pipeline.io import kafka

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterable

    from aiokafka import TopicPartition

    from pipeline.config import KafkaConfig

__all__ = ["Lifecycle", "generation_of"]

log = logging.getLogger(__name__)


class _State(msgspec.Struct):
    """The fields of a ChildState the sink needs."""

    device_id: str
    generation: int


class _Generation(msgspec.Struct):
    """The generation of an AddedChild or a DeletedChild (0 when absent: written before)."""

    generation: int = 0


_state = msgspec.json.Decoder(_State)
_generation = msgspec.json.Decoder(_Generation)


def generation_of(value: bytes | None) -> int | None:
    """The ``generation`` of an added or deleted child's record; None if unreadable."""
    if value is None:
        return None
    try:
        return _generation.decode(value).generation
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None


class Lifecycle:
    """Per assigned partition number, each child's latest generation; per child, a lock.

    Args:
        cfg: the Kafka configuration (``kafka.topics.lifecycle`` is read with it).
    """

    def __init__(self, cfg: KafkaConfig) -> None:
        self._cfg = cfg
        self._topic = cfg.topics.lifecycle
        self._latest: dict[int, dict[str, int]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: collections.Counter[str] = collections.Counter()

    async def learn(self, tps: Iterable[TopicPartition]) -> None:
        """Read ``lifecycle`` partitions of ``tps`` (by number) from beginning to end.

        What is read only raises what is known (a child's latest never goes down).
        """
        numbers = {tp.partition for tp in tps}
        if not numbers:
            return
        read = 0
        async with kafka.reader(self._cfg) as reader:
            ranges = {
                tp: span
                for tp, span in (await kafka.whole(reader, self._topic)).items()
                if tp.partition in numbers
            }
            async for record in kafka.read_range(reader, ranges):
                read += 1
                try:
                    state = _state.decode(record.value or b"")
                except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
                    where = f"{record.topic}/{record.partition}/{record.offset}"
                    log.warning("skipping an unreadable lifecycle record at %s: %s", where, exc)
                    continue
                self.see(record.partition, state.device_id, state.generation)
        for number in numbers:
            self._latest.setdefault(number, {})
        log.info(
            "sink read %d lifecycle records of partitions %s", read, sorted(numbers),
            extra={"topic": self._topic},
        )  # fmt: skip

    def forget(self, numbers: Iterable[int]) -> None:
        """Drop the children of partitions no longer owned."""
        for number in numbers:
            self._latest.pop(number, None)

    def see(self, partition: int, device_id: str, generation: int) -> None:
        """An operation of ``generation`` started (or was recorded): raise the latest."""
        known = self._latest.setdefault(partition, {})
        if generation > known.get(device_id, 0):
            known[device_id] = generation

    def latest(self, partition: int, device_id: str) -> int:
        """The child's latest generation known (0: none)."""
        return self._latest.get(partition, {}).get(device_id, 0)

    @contextlib.asynccontextmanager
    async def turn(self, partition: int, device_id: str, generation: int) -> AsyncIterator[bool]:
        """The child's turn for an operation of ``generation``; yields whether it is superseded.

        The operation raises the child's latest as it starts; it then waits for the
        operations on the child before it.
        """
        self.see(partition, device_id, generation)
        lock = self._locks.setdefault(device_id, asyncio.Lock())
        self._users[device_id] += 1
        try:
            async with lock:
                yield generation < self.latest(partition, device_id)
        finally:
            self._users[device_id] -= 1
            if not self._users[device_id]:
                del self._users[device_id], self._locks[device_id]
